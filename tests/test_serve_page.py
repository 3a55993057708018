"""The chat page of ``peftkit serve`` in a real headless Chromium against a real server.

A tiny random Llama with two LoRA adapters is served by ``python -m peftkit serve`` in a
subprocess; Selenium drives the page at ``/``. Every answer the page streams must equal what the
API returns for the same messages without streaming (greedy decoding, fp32), so the page sends the
right model, messages and settings and reassembles the server-sent events correctly.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them); skipped without.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import peftkit
from _serve_helpers import free_port, save_random_adapter
from conftest import save_tiny_model_dir

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PAGE = Path(peftkit.__file__).parent / "serve" / "static" / "chat.html"
MAX_TOKENS = 12
API_KEY = "secret"
WAIT_S = 30

needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
)


def test_page_is_self_contained():
    """Nothing is fetched from elsewhere: the page must work on machines without internet access."""
    html = PAGE.read_text()
    links = re.findall(r"""\b(?:src|href|action)\s*=\s*["']?([^"'\s>]*)""", html, re.I)
    assert all(link.startswith("data:") for link in links), links
    assert not re.search(r"@import|url\(|fetch\(\s*[\"'`](https?:)?//", html, re.I)
    assert not re.search(r"\.innerHTML\s*=|insertAdjacentHTML|document\.write", html)


# ---------------------------------------------------------------- model, adapters and servers


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-page")
    model_dir = save_tiny_model_dir(root / "tiny-llama")
    lora = peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return {
        "model": str(model_dir),
        "a": save_random_adapter(model_dir, root / "lora-a", lora, seed=1),
        "b": save_random_adapter(model_dir, root / "lora-b", lora, seed=2),
    }


class Server:
    """``python -m peftkit serve`` in a subprocess, and requests to it."""

    def __init__(self, model_files, log_dir: Path, key: str | None = None):
        self.key = key
        self.url = f"http://127.0.0.1:{free_port()}"
        self.cmd = [sys.executable, "-m", "peftkit", "serve", "--base-model", model_files["model"]]
        self.cmd += ["--adapter", f"a={model_files['a']}", "--adapter", f"b={model_files['b']}"]
        self.cmd += ["--port", self.url.rsplit(":", 1)[1], "--precision", "fp32"]
        self.cmd += ["--api-key", key] if key else []
        self.log = log_dir / "stderr.txt"
        with open(self.log, "wb") as stderr:  # a file, not a pipe: a full pipe would block the server
            self.proc = subprocess.Popen(
                self.cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=dict(os.environ)
            )

    def wait_healthy(self, timeout: float = 60) -> Server:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:  # refused while it starts (urllib's errors are OSErrors)
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"peftkit serve did not come up ({' '.join(self.cmd)}):\n{self.log.read_text()[-4000:]}"
                )
            time.sleep(0.1)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        self.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def request(self, path: str, body: dict | None = None, key: str | None = "default"):
        """(status, parsed JSON body) of a GET (or a POST of ``body``); the server's key unless given."""
        key = self.key if key == "default" else key
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def base_id(self) -> str:
        status, body = self.request("/v1/models")
        assert status == 200, body
        return next(m["id"] for m in body["data"] if not m.get("parent"))

    def answer(self, model: str, messages: list[dict]) -> str:
        """The non-streamed greedy answer: what the page must show for the same conversation."""
        body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
        status, reply = self.request("/v1/chat/completions", body)
        assert status == 200, reply
        return reply["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def servers(model_files, tmp_path_factory):
    """Both servers (without and with a key), started at once: they load side by side, and while
    Chromium starts, instead of one after the other."""
    started = {
        key: Server(model_files, tmp_path_factory.mktemp("server-log"), key) for key in (None, API_KEY)
    }
    yield started
    for server in started.values():  # both shut down at once
        server.terminate()
    for server in started.values():
        server.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[None].wait_healthy()


@pytest.fixture(scope="module")
def keyed_server(servers):
    return servers[API_KEY].wait_healthy()


# ---------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser(servers, tmp_path_factory):  # after ``servers``: they start while Chromium does
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver path given, Selenium Manager never runs
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,800",
        # Without these Chromium keeps calling home, which floods a machine without internet.
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition, message)


def _open(driver, url: str) -> None:
    driver.get(url + "/")
    _wait(driver, lambda d: d.find_element("id", "model").is_enabled(), "the model list never loaded")


def _answers(driver) -> list[dict]:
    """The finished assistant bubbles, in page order: model, text, finish reason."""
    return driver.execute_script(
        """return [...document.querySelectorAll('.msg.assistant[data-done]')].map(m => ({
               model: m.dataset.model, text: m.querySelector('.text').textContent,
               finish: m.dataset.finishReason || null}));"""
    )


def _send(driver, text: str, expect: int) -> list[dict]:
    """Type ``text``, press Send, wait until ``expect`` answers have finished; return the new ones."""
    before = len(_answers(driver))
    driver.find_element("id", "message").send_keys(text)
    driver.find_element("id", "send").click()
    _wait(driver, lambda d: len(_answers(d)) >= before + expect, f"no answer to {text!r}")
    _wait(driver, lambda d: d.find_element("id", "send").is_enabled(), "Send never came back")
    errors = driver.execute_script(
        "return [...document.querySelectorAll('.msg.error')].map(e => e.textContent)"
    )
    assert not errors, errors
    return _answers(driver)[before:]


def _select(driver, model: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", "model")).select_by_value(model)


# ---------------------------------------------------------------- scenarios


@needs_chromium
def test_chat_with_an_adapter(browser, server):
    _open(browser, server.url)
    base = server.base_id()
    options = browser.execute_script(
        "return [...document.getElementById('model').options].map(o => [o.value, o.text])"
    )
    assert [value for value, _ in options] == [base, "a", "b"]
    assert options[0][1].startswith("base:")
    assert browser.find_element("id", "max-tokens").get_attribute("value") == "256"
    assert browser.find_element("id", "temperature").get_attribute("value") == "0"

    _select(browser, "a")
    browser.find_element("id", "max-tokens").clear()
    browser.find_element("id", "max-tokens").send_keys(str(MAX_TOKENS))
    first = "word good is"
    (answer,) = _send(browser, first, expect=1)
    assert answer["model"] == "a"
    assert answer["text"].strip(), "an empty answer: the comparison would prove little"
    assert answer["text"].strip() == server.answer("a", [{"role": "user", "content": first}]).strip()

    # The second turn sends the conversation so far; user text is shown as text, not parsed as HTML.
    second = "<b>bold</b> & <img src=x>"
    (reply,) = _send(browser, second, expect=1)
    history = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": answer["text"]},
        {"role": "user", "content": second},
    ]
    assert reply["text"].strip() == server.answer("a", history).strip()
    user_bubbles = browser.execute_script(
        "return [...document.querySelectorAll('.msg.user')].map(m => [m.textContent, m.querySelectorAll('b,img').length])"
    )
    assert user_bubbles[-1] == [second, 0]

    browser.find_element("id", "clear").click()
    assert browser.find_elements("css selector", ".msg") == []


@needs_chromium
def test_compare_with_base(browser, server):
    _open(browser, server.url)
    base = server.base_id()
    browser.find_element("id", "compare").click()
    _select(browser, "b")
    browser.find_element("id", "max-tokens").clear()
    browser.find_element("id", "max-tokens").send_keys(str(MAX_TOKENS))
    message = "Translate to French: hello world"
    answers = {a["model"]: a["text"].strip() for a in _send(browser, message, expect=2)}
    expected = {m: server.answer(m, [{"role": "user", "content": message}]).strip() for m in (base, "b")}
    assert expected[base] != expected["b"], "adapter b does not change the answer: the test proves little"
    assert answers == expected

    # Side by side at 1280x800: two columns on one row, base on the left.
    panes = browser.execute_script(
        """return [...document.querySelectorAll('.pane')].map(p => {
               const r = p.getBoundingClientRect(); return [p.dataset.model, r.left, r.top]; });"""
    )
    assert [p[0] for p in panes] == [base, "b"]
    assert panes[0][2] == panes[1][2] and panes[0][1] < panes[1][1]


@needs_chromium
def test_api_key(browser, keyed_server):
    from selenium.webdriver.common.keys import Keys

    assert keyed_server.request("/v1/models", key=None)[0] == 401
    browser.get(keyed_server.url + "/")  # the page itself needs no key
    notice = browser.find_element("id", "notice")
    _wait(
        browser, lambda d: notice.is_displayed() and "API key" in notice.text, "no message asking for the key"
    )
    assert not browser.find_element("id", "send").is_enabled()

    key = browser.find_element("id", "api-key")
    assert key.get_attribute("type") == "password"
    key.send_keys("wrong" + Keys.ENTER)
    _wait(browser, lambda d: "rejected" in notice.text, "a wrong key was not reported")
    key.clear()
    key.send_keys(API_KEY + Keys.ENTER)
    _wait(browser, lambda d: d.find_element("id", "model").is_enabled(), "the key did not unlock the page")
    assert not notice.is_displayed()

    _open(browser, keyed_server.url)  # loaded afresh: the key is kept for the browser session
    assert browser.find_element("id", "api-key").get_attribute("value") == API_KEY
    browser.find_element("id", "max-tokens").clear()
    browser.find_element("id", "max-tokens").send_keys(str(MAX_TOKENS))
    message = "hello world"
    (answer,) = _send(browser, message, expect=1)
    assert answer["model"] == "a"
    assert answer["text"].strip() == keyed_server.answer("a", [{"role": "user", "content": message}]).strip()
