"""The server side of benchmarks/serve_throughput.py: the random adapters it serves, the `peftkit
serve` process, the streaming clients, the concurrency sweep and the alone answers its outputs are
checked against; also the prompts, the request list and the percentiles the in-process part shares."""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ADAPTERS = ("a1", "a2", "a3", "a4")
BASE_ID = "base"  # the base model's name in the API (--served-model-name)
MODELS = (BASE_ID, *ADAPTERS)  # request k asks MODELS[k % 5]
HEALTH_POLL_S = 0.25
PROMPTS = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main differences between a virus and a bacterium?",
    "Give me five tips for learning a new language as an adult.",
    "Describe the water cycle to a ten-year-old.",
    "Why is the sky blue during the day and red at sunset?",
    "Write a polite email asking my landlord to fix a leaking tap.",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "How do I make a simple tomato pasta sauce?",
    "What should I consider before adopting a dog?",
    "Explain what a binary search is and when to use it.",
    "List some healthy breakfast ideas and say why they are good.",
    "What causes earthquakes?",
    "Write a haiku about autumn, then explain its imagery.",
    "How does compound interest work? Give an example.",
    "Describe a typical day in the life of a medieval farmer.",
]


def say(message: str) -> None:
    print(f"[serve_throughput] {message}", file=sys.stderr, flush=True)


def request_pair(k: int) -> tuple[int, str]:
    """Request number ``k``'s (prompt index, model): the same at every level."""
    return k % len(PROMPTS), MODELS[k % len(MODELS)]


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50 / p90 / p99, linearly interpolated between the sorted values (None: no values)."""
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for q in (50, 90, 99):
        if not ordered:
            out[f"p{q}"] = None
            continue
        at = (len(ordered) - 1) * q / 100
        lo, hi = math.floor(at), math.ceil(at)
        out[f"p{q}"] = ordered[lo] + (ordered[hi] - ordered[lo]) * (at - lo)
    return out


# -- setup -------------------------------------------------------------------------------------------


def save_adapters(args: argparse.Namespace, out: Path) -> dict[str, str]:
    """ADAPTERS as random LoRA adapters for ``args.model`` in ``out/NAME``: PEFT's A init and B
    ~ N(0, lora_std) (PEFT's zero B would leave the base model's answers unchanged)."""
    import torch

    from peftkit import LoraConfig, get_peft_model
    from peftkit.models import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(args.model)
    config = LoraConfig(
        r=args.r,
        lora_alpha=2 * args.r,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    dirs = {}
    for i, name in enumerate(ADAPTERS, start=1):
        torch.manual_seed(args.seed + i)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_A" in pname:
                    bound = 1 / math.sqrt(param.shape[1])  # PEFT's kaiming_uniform(a=sqrt(5)) bound
                    param.uniform_(-bound, bound)
                elif "lora_B" in pname:
                    param.normal_(0.0, args.lora_std)
        model.save_pretrained(out / name)
        dirs[name] = str(out / name)
    return dirs


# -- the server and its clients ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m peftkit serve ...`` on a free port; its output goes to ``log``."""

    def __init__(self, args: argparse.Namespace, adapter_dirs: dict[str, str], log: Path):
        self.port = free_port()
        self.log = log
        argv = [sys.executable, "-m", "peftkit", "serve", "--base-model", args.model]
        argv += ["--served-model-name", BASE_ID, "--precision", args.dtype, "--threads", str(args.threads)]
        argv += ["--max-batch-size", str(args.max_batch_size), "--port", str(self.port)]
        for name, directory in adapter_dirs.items():
            argv += ["--adapter", f"{name}={directory}"]
        self.argv = argv
        self._file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            argv,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        deadline = time.monotonic() + args.server_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"peftkit serve exited with {self.process.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError, ValueError):
                self.health()
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"peftkit serve did not answer /health in {args.server_timeout} s:\n{self.output()}"
        )

    def output(self) -> str:
        self._file.flush()
        return self.log.read_text(errors="replace")

    def health(self) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/health")
            reply = conn.getresponse()
            body = reply.read()
            if reply.status != 200:
                raise ValueError(f"/health answered {reply.status}")
            return json.loads(body)
        finally:
            conn.close()

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._file.close()
        return self.process.returncode


def stream_chat(port: int, k: int, max_tokens: int) -> dict[str, Any]:
    """Request number ``k`` as a streaming chat completion: its timings, text and token count."""
    prompt, model = request_pair(k)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[prompt]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    arrivals: list[float] = []
    pieces: list[str] = []
    usage: dict[str, int] | None = None
    finish = None
    try:
        sent = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        if reply.status != 200:
            raise RuntimeError(f"request {k} got {reply.status}: {reply.read()[:500]!r}")
        for raw in reply:  # one SSE line at a time, as soon as it arrives
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            now = time.perf_counter()
            data = line[len(b"data: ") :]
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"request {k} failed: {chunk['error']}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content:  # the first chunk only carries the role
                    arrivals.append(now)
                    pieces.append(content)
                finish = choice.get("finish_reason") or finish
        done = time.perf_counter()
    finally:
        conn.close()
    if usage is None:
        raise RuntimeError(f"request {k}: no usage chunk (stream_options.include_usage)")
    return {
        "k": k,
        "prompt": prompt,
        "model": model,
        "text": "".join(pieces),
        "tokens": usage["completion_tokens"],
        "finish": finish,
        "ttft_s": arrivals[0] - sent if arrivals else None,
        "intervals_s": [b - a for a, b in zip(arrivals, arrivals[1:])],
        "seconds": done - sent,
        "sent": sent,
        "done": done,
    }


class HealthPoll:
    """Polls /health while a level runs: the most rows running at once."""

    def __init__(self, server: ServerProcess):
        self.server, self.peak = server, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(HEALTH_POLL_S):
            with contextlib.suppress(OSError, ValueError):
                self.peak = max(self.peak, self.server.health()["running"])

    def __enter__(self) -> HealthPoll:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_clients(server: ServerProcess, clients: int, numbers_per_client: list[list[int]], max_tokens: int):
    """``clients`` threads, started together, each sending its request numbers back to back.
    Returns (results by request number, wall seconds, peak running)."""
    results: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []
    go = threading.Event()

    def client(numbers: list[int]) -> None:
        go.wait()
        try:
            for k in numbers:
                results[k] = stream_chat(server.port, k, max_tokens)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=client, args=(numbers_per_client[c],)) for c in range(clients)]
    for thread in threads:
        thread.start()
    with HealthPoll(server) as poll:
        start = time.perf_counter()
        go.set()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return results, wall, poll.peak


def wait_idle(server: ServerProcess, timeout: float = 60) -> dict[str, Any]:
    """/health once nothing runs or waits (a finished stream's row is freed at the next step)."""
    deadline = time.monotonic() + timeout
    while True:
        health = server.health()
        if (health["running"] == 0 and health["waiting"] == 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def run_sweep(args: argparse.Namespace, server: ServerProcess) -> dict[str, Any]:
    # Warm-up: one request alone, then the widest level at once (allocator, thread pool, shapes).
    run_clients(server, 1, [[0]], 4)
    top = max(args.levels)
    run_clients(server, top, [[k] for k in range(top)], 4)
    wait_idle(server)
    reps: dict[int, list[dict[str, Any]]] = {n: [] for n in args.levels}
    requests: dict[int, list[dict[str, Any]]] = {n: [] for n in args.levels}
    for rep in range(args.repeats):
        order = args.levels[rep % len(args.levels) :] + args.levels[: rep % len(args.levels)]
        for n in order:
            per_client = [[j * n + c for j in range(args.requests_per_client)] for c in range(n)]
            results, wall, peak = run_clients(server, n, per_client, args.max_tokens)
            health = wait_idle(server)
            tokens = sum(r["tokens"] for r in results.values())
            reps[n].append(
                {
                    "wall_s": wall,
                    "tokens": tokens,
                    "tokens_per_s": tokens / wall,
                    "peak_running_polled": peak,
                    "health_peak_running": health.get("peak_running"),
                }
            )
            requests[n].extend(results[k] for k in sorted(results))
            say(
                f"rep {rep + 1}/{args.repeats}, {n} clients: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f}/s"
            )
    levels = {}
    for n in args.levels:
        done = requests[n]
        levels[str(n)] = {
            "clients": n,
            "requests": len(done) // args.repeats,
            "reps": reps[n],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in reps[n]),
            "ttft_s": percentiles([r["ttft_s"] for r in done if r["ttft_s"] is not None]),
            "token_latency_s": percentiles([i for r in done for i in r["intervals_s"]]),
            "request_s": percentiles([r["seconds"] for r in done]),
            "peak_running": max(r["peak_running_polled"] for r in reps[n]),
            "finish": {
                f: sum(r["finish"] == f for r in done) for f in sorted({str(r["finish"]) for r in done})
            },
        }
    return {"levels": levels, "requests": requests}


def alone_answers(
    args: argparse.Namespace, server: ServerProcess, requests: dict[int, list]
) -> dict[str, Any]:
    """Each asked request number's answer alone: the 1-client level's, plus a reference pass (one
    client, one request at a time) for the numbers only wider levels asked."""
    alone: dict[int, dict[str, Any]] = {}
    if 1 in requests:
        for r in requests[1]:
            alone.setdefault(r["k"], r)
    asked = sorted({r["k"] for rs in requests.values() for r in rs})
    missing = [k for k in asked if k not in alone]
    reference = None
    if missing and not args.skip_reference:
        results, wall, _ = run_clients(server, 1, [missing], args.max_tokens)
        alone.update(results)
        tokens = sum(r["tokens"] for r in results.values())
        reference = {
            "requests": len(missing),
            "tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "token_latency_p50_s": percentiles([i for r in results.values() for i in r["intervals_s"]])[
                "p50"
            ],
        }
        say(f"reference pass: {len(missing)} requests alone, {tokens} tokens in {wall:.2f} s")
    return {"alone": alone, "reference": reference}


def same_outputs(levels: dict[str, Any], requests: dict[int, list], alone: dict[int, dict[str, Any]]) -> None:
    """Adds ``same_as_alone`` to each level: the fraction of its answers (checked ones) equal to
    the answer the same (prompt, model) got alone."""
    for n, rs in requests.items():
        checked = [r for r in rs if r["k"] in alone]
        same = sum(r["text"] == alone[r["k"]]["text"] for r in checked)
        levels[str(n)]["same_as_alone"] = same / len(checked) if checked else None
        levels[str(n)]["same_checked"] = len(checked)
