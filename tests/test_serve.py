"""``peftkit serve`` as a real process on a localhost port, checked with the official ``openai``
client (the oracle for OpenAI's wire format) and plain HTTP for what the client hides."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import pytest

import peftkit
from _serve_helpers import Server, save_random_adapter

openai = pytest.importorskip("openai")

LORA = dict(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
ADAPTERS = ("a", "b", "c", "d")
PROMPTS = [
    "hello there",
    "word good is",
    "what is two plus two?",
    "tell me a story",
    "positive or negative?",
    "the weather today",
    "abc def ghi",
    "one more prompt, longer than the others by a few words",
]


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-adapters")
    dirs = {
        name: save_random_adapter(tiny_model_dir, root / name, peftkit.LoraConfig(**LORA), seed)
        for seed, name in enumerate(ADAPTERS, start=1)
    }
    # A LoRA adapter for another base model, for the runtime-loading refusals.
    other = root / "other-base"
    save_random_adapter(tiny_model_dir, other, peftkit.LoraConfig(**LORA), 9)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "some/other"})
    )
    args = ["--base-model", str(tiny_model_dir), "--served-model-name", "tiny", "--precision", "fp32"]
    for name in ADAPTERS:
        args += ["--adapter", f"{name}={dirs[name]}"]
    args += ["--allow-runtime-adapters", "--adapter-root", str(root), "--max-queue", "64"]
    server = Server(*args)
    yield server, dirs, root
    assert server.stop() == 0, server.stderr


def _client(server, **kwargs):
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs
    )


def _generate_reference(model_dir, dirs, rows, max_new_tokens, capsys, tmp_path) -> list[str]:
    """What ``peftkit generate`` answers, one prompt at a time (--batch-size 1), in fp32."""
    from peftkit.cli.main import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "adapter": a}) + "\n" for p, a in rows))
    argv = ["generate", "--base-model", str(model_dir), "--prompts-file", str(prompts), "--jsonl"]
    argv += ["--batch-size", "1", "--max-new-tokens", str(max_new_tokens), "--precision", "fp32"]
    for name, directory in dirs.items():
        argv += ["--adapter", f"{name}={directory}"]
    capsys.readouterr()
    assert main(argv) == 0
    return [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()]


def test_models_lists_the_base_and_every_adapter_with_its_parent(served):
    server, dirs, _ = served
    models = {m.id: m for m in _client(server).models.list()}
    assert list(models) == ["tiny", *ADAPTERS]
    assert all(models[name].parent == "tiny" for name in ADAPTERS)
    assert getattr(models["tiny"], "parent", None) is None
    assert {m.owned_by for m in models.values()} == {"peftkit"}


def test_greedy_answers_equal_peftkit_generate_alone_and_among_16_concurrent_requests(
    served, tiny_model_dir, capsys, tmp_path
):
    server, dirs, _ = served
    models = ["__base__", *ADAPTERS]
    rows = [(PROMPTS[i % len(PROMPTS)], models[i % len(models)]) for i in range(16)]
    expected = _generate_reference(tiny_model_dir, dirs, rows, 12, capsys, tmp_path)
    client = _client(server)

    def ask(prompt: str, adapter: str) -> str:
        model = "tiny" if adapter == "__base__" else adapter
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0
        )
        return reply.choices[0].message.content.strip()

    alone = [ask(prompt, adapter) for prompt, adapter in rows[:5]]
    assert alone == expected[:5]
    answers: list[str | None] = [None] * len(rows)
    start = threading.Barrier(len(rows))

    def worker(i: int) -> None:
        start.wait()
        answers[i] = ask(*rows[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(rows))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == expected
    with urllib.request.urlopen(server.url + "/health") as reply:
        assert json.loads(reply.read())["peak_running"] >= 4  # decoded together, not one at a time


def test_streaming_sends_openai_chunks_that_add_up_to_the_whole_answer(served):
    server, _, _ = served
    client = _client(server)
    messages = [{"role": "user", "content": "tell me a story"}]
    whole = client.chat.completions.create(model="b", messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(
        model="b",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_completions_sample_reproducibly_per_seed_and_stop_at_stop_strings(served):
    server, _, _ = served
    client = _client(server)

    def sample(seed: int) -> list[str]:
        reply = client.completions.create(
            model="c", prompt="hello there", max_tokens=8, temperature=1.0, top_p=0.9, n=3, seed=seed
        )
        assert [c.index for c in reply.choices] == [0, 1, 2]
        return [c.text for c in reply.choices]

    first = sample(7)
    assert sample(7) == first  # the same seed, the same answers
    assert len(set(first)) > 1  # the n choices are different draws
    greedy = client.completions.create(model="c", prompt="hello there", max_tokens=12, temperature=0)
    text = greedy.choices[0].text
    assert greedy.choices[0].finish_reason in ("stop", "length") and text
    stop = text[3:5]
    cut = client.completions.create(
        model="c", prompt="hello there", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_errors_come_in_openai_json_with_the_right_status(served):
    server, _, _ = served
    client = _client(server)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=messages, max_tokens=2)
    assert "nope" in err.value.message and "tiny, a, b, c, d" in err.value.message
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="a", messages=messages, max_tokens=2, temperature=5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="a", messages=messages, max_tokens=2, logprobs=True)
    assert err.value.body["param"] == "logprobs" and "not supported" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:  # the tiny model's context is 256 tokens
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "word " * 300}])
    assert "maximum context length is 256" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="a", messages=messages, max_tokens=250)
    assert err.value.body["code"] == "context_length_exceeded"
    status, body = server.post("/v1/chat/completions", {"model": "a", "messages": [{"role": "robot"}]})
    assert status == 400 and body["error"]["param"] == "messages.0.role"
    status, body = server.post("/v1/chat/completions", {"messages": messages})
    assert status == 400 and body["error"]["message"] == "'model' is required"
    request = urllib.request.Request(server.url + "/v1/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(request)
    assert http.value.code == 400 and "not valid JSON" in json.loads(http.value.read())["error"]["message"]


def test_a_client_that_disconnects_stops_its_generation(served):
    server, _, _ = served
    reply = server.stream_completion("a", 240)
    reply.readline()  # the first event: generation is under way
    reply.close()
    deadline = time.monotonic() + 30
    while "client disconnected" not in server.stderr and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(line for line in server.stderr.splitlines() if "client disconnected" in line)
    generated = int(line.split("completion_tokens=")[1].split()[0])
    assert generated < 240


def test_runtime_adapters_load_and_unload_only_from_under_the_root(served, tiny_model_dir, tmp_path):
    server, dirs, root = served
    fresh = save_random_adapter(tiny_model_dir, root / "fresh", peftkit.LoraConfig(**LORA), 11)
    outside = save_random_adapter(tiny_model_dir, tmp_path / "outside", peftkit.LoraConfig(**LORA), 12)
    status, body = server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": outside})
    assert status == 400 and "outside --adapter-root" in body["error"]["message"]
    status, body = server.post(
        "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "fresh/../../outside"}
    )
    assert status == 400 and "outside --adapter-root" in body["error"]["message"]
    status, body = server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "other-base"})
    assert status == 400 and "trained on some/other" in body["error"]["message"]
    status, body = server.post("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "fresh"})
    assert status == 400 and "already loaded" in body["error"]["message"]

    status, _ = server.post("/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": "fresh"})
    assert status == 200
    client = _client(server)
    assert "fresh" in [m.id for m in client.models.list()]
    messages = [{"role": "user", "content": "hello there"}]
    answer = client.chat.completions.create(model="fresh", messages=messages, max_tokens=8, temperature=0)
    base = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content != base.choices[0].message.content
    status, _ = server.post("/v1/unload_lora_adapter", {"lora_name": "fresh"})
    assert status == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="fresh", messages=messages, max_tokens=2)
    assert fresh  # loaded from a relative path under the root


def test_api_key_guards_every_endpoint_but_health(tiny_model_dir):
    server = Server(
        "--base-model", str(tiny_model_dir), "--precision", "fp32", env={"PEFTKIT_API_KEY": "s3cret"}
    )
    try:
        with urllib.request.urlopen(server.url + "/health") as reply:
            assert reply.status == 200
        with pytest.raises(openai.AuthenticationError) as err:
            _client(server, api_key="wrong").models.list()
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
        status, body = server.post("/v1/completions", {"model": "x", "prompt": "a"})
        assert status == 401 and "Authorization: Bearer" in body["error"]["message"]
        reply = _client(server, api_key="s3cret").completions.create(
            model=str(tiny_model_dir), prompt="hello", max_tokens=3, temperature=0
        )
        assert reply.usage.completion_tokens >= 1
    finally:
        assert server.stop() == 0


def test_a_full_queue_answers_429_with_retry_after(tiny_model_dir):
    server = Server(
        "--base-model",
        str(tiny_model_dir),
        "--precision",
        "fp32",
        "--max-batch-size",
        "1",
        "--max-queue",
        "1",
    )
    body = {
        "model": str(tiny_model_dir),
        "prompt": "hello",
        "max_tokens": 200,
        "temperature": 0,
        "stop": ["\u2603"],
    }
    results: list[tuple[int, dict, str | None]] = []

    def post() -> None:
        request = urllib.request.Request(
            server.url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request) as reply:
                results.append((reply.status, json.loads(reply.read()), None))
        except urllib.error.HTTPError as err:
            results.append((err.code, json.loads(err.read()), err.headers["Retry-After"]))

    try:
        threads = [threading.Thread(target=post) for _ in range(6)]  # one row, one queue place
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        assert server.stop() == 0
    assert sorted(status for status, _, _ in results)[0] == 200
    busy = [(body, retry) for status, body, retry in results if status == 429]
    assert busy, "six requests at once for one row and one queue place: some must be refused"
    assert all(body["error"]["code"] == "rate_limit_exceeded" and int(retry) >= 1 for body, retry in busy)


def test_sigterm_finishes_the_streams_in_flight_then_exits(tiny_model_dir):
    server = Server("--base-model", str(tiny_model_dir), "--precision", "fp32")
    reply = server.stream_completion(str(tiny_model_dir), 200)
    first = reply.readline()
    assert first.startswith(b"data: ")
    os.kill(server.process.pid, signal.SIGTERM)
    rest = reply.read().decode()
    assert rest.rstrip().endswith("data: [DONE]")
    events = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")  # finished, not cut off
    assert server.process.wait(30) == 0
    server.stop()


def test_methods_that_cannot_mix_rows_are_batched_per_adapter_with_the_same_answers(
    tiny_model_dir, tmp_path, capsys
):
    ia3 = dict(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
    )
    dirs = {
        name: save_random_adapter(tiny_model_dir, tmp_path / name, peftkit.IA3Config(**ia3), seed)
        for seed, name in enumerate(("x", "y"), start=3)
    }
    rows = [(PROMPTS[i % len(PROMPTS)], ("x", "y", "__base__")[i % 3]) for i in range(9)]
    expected = _generate_reference(tiny_model_dir, dirs, rows, 10, capsys, tmp_path)
    server = Server(
        "--base-model",
        str(tiny_model_dir),
        "--precision",
        "fp32",
        *[f"--adapter={n}={d}" for n, d in dirs.items()],
    )
    try:
        client = _client(server)
        answers: list[str | None] = [None] * len(rows)
        start = threading.Barrier(len(rows))

        def worker(i: int) -> None:
            prompt, adapter = rows[i]
            start.wait()
            reply = client.chat.completions.create(
                model=str(tiny_model_dir) if adapter == "__base__" else adapter,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=10,
                temperature=0,
            )
            answers[i] = reply.choices[0].message.content.strip()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(rows))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert answers == expected
    finally:
        assert server.stop() == 0


def test_virtual_token_methods_are_refused_at_start_with_the_reason(tiny_model_dir, tmp_path):
    prompt = save_random_adapter(
        tiny_model_dir,
        tmp_path / "soft",
        peftkit.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        1,
    )
    with pytest.raises(RuntimeError, match="virtual tokens"):
        Server("--adapter", f"soft={prompt}", "--precision", "fp32")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_memory_stays_flat_over_500_requests(served):
    server, _, _ = served
    client = _client(server)

    def burst(count: int) -> None:
        def one(i: int) -> None:
            model = ("tiny", *ADAPTERS)[i % 5]
            if i % 3:
                client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": PROMPTS[i % 8]}],
                    max_tokens=16,
                    temperature=0.7,
                    seed=i,
                )
            else:
                for _ in client.completions.create(
                    model=model, prompt=PROMPTS[i % 8], max_tokens=16, stream=True
                ):
                    pass

        for first in range(0, count, 8):  # 8 concurrent at a time
            threads = [threading.Thread(target=one, args=(i,)) for i in range(first, first + 8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

    burst(100)  # warm up: allocator pools, tokenizer caches
    before = _rss_kib(server.process.pid)
    burst(400)
    growth = _rss_kib(server.process.pid) - before
    print(f"RSS {before / 1024:.1f} MiB -> +{growth / 1024:.1f} MiB over 400 requests")
    assert growth < 20 * 1024, f"RSS grew by {growth / 1024:.1f} MiB over 400 requests"
