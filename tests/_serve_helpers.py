"""A real ``peftkit serve`` process on a free localhost port, for the server's tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

import peftkit


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_random_adapter(model_dir, out, config, seed: int) -> str:
    """``config``'s adapter on the model with random (non-identity) weights, saved to ``out``."""
    model = peftkit.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(
                    1 + 0.5 * torch.randn_like(param) if "ia3" in name else 0.3 * torch.randn_like(param)
                )
    model.save_pretrained(out)
    return str(out)


class Server:
    """``python -m peftkit serve ARGS`` on a free port; ``url``, ``stderr`` (what it logged so far)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = Path(os.environ.get("TMPDIR", "/tmp")) / f"peftkit-serve-{self.port}.log"
        self._log_file = open(self._log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "peftkit", "serve", *args, "--port", str(self.port)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"peftkit serve exited with {self.process.returncode}:\n{self.stderr}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"peftkit serve did not answer /health within {timeout} s:\n{self.stderr}")

    @property
    def stderr(self) -> str:
        self._log_file.flush()
        return self._log.read_text()

    def post(self, path: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def stream_completion(self, model: str, max_tokens: int) -> Any:
        """An open streaming ``/v1/completions`` reply (greedy, a stop string that never comes, so
        it runs to ``max_tokens`` or the end token), for reading event by event."""
        body = {"model": model, "prompt": "hello", "max_tokens": max_tokens, "temperature": 0}
        body |= {"stream": True, "stop": ["\u2603"]}
        request = urllib.request.Request(
            self.url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        return urllib.request.urlopen(request)

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        return self.process.returncode
