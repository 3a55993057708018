"""`peftkit serve` under concurrent clients, its single stream against `generate`, and where a decode
step's time goes.

The bar (on this 2-core CPU): 16 concurrent clients get >= 4x the aggregate tokens/s of 1 client,
with the same answers. Plain ``generate`` gains 6.7x (fp32) / 9.2x (bf16) from batch 1 to batch 16
on the embedded model here, so the server's batching must not lose that; and its single stream
should not be slower than ``generate``'s (about 15 tokens/s fp32, 23 bf16 at batch 1). This script
measures; it asserts nothing about speed::

    setup     4 LoRA adapters a1..a4 (r=16, alpha=32, q/k/v/o_proj; PEFT's A init, B ~ N(0,
              --lora-std), seeded, so they change the answers) saved for --model in a temp dir
    server    python -m peftkit serve --base-model M --served-model-name base --adapter a1=DIR ...
                     --precision DTYPE --threads T --max-batch-size B       (a process of its own)
      warm-up   one request, then max(--clients) at once (4 tokens each, untimed)
      sweep     for rep in 1..R, levels rotated by rep (each level leads once):
                  for N in --clients: N client threads start together; each sends
                  --requests-per-client streaming chat requests back to back; client c's j-th
                  request is number k = j*N + c, which fixes its (prompt k % 16, model k % 5:
                  base, a1..a4), so every level asks a prefix of the same request list
      reference every request number a level asked that the 1-client level did not, one at a
                time (1 client): the answer each (prompt, model) gets alone
    in process (the server stopped first, so nothing else runs) the model loaded as the server
              loads it (peftkit.cli.serve's own loader, so bf16 = base weights stored in bf16,
              adapters fp32, autocast; fp32 = fp32)
      single stream  for rep in 1..R, for base and LoRA a1, for each of --single-prompts prompts:
                  generate (peftkit.evaluation.generate_token_ids: transformers' generate, batch 1,
                  greedy; base = disable_adapter()) and the serve Engine (its thread, one
                  Sequence, no HTTP), taking turns, the first mover alternating by rep
      profile   --profile-steps decode steps of the Engine at batch 1 (a1; the base) and at each
                wider --profile-batches size (rows round-robin over base, a1..a4), and of
                generate at batch 1 (a1; the base)

Per request the client records the time to the first content chunk (TTFT), the intervals between
content chunks (per-token latency: one chunk per token, except where a token ends mid-character
and waits for the next) and the completion tokens from the usage chunk (include_usage; the eos
token counts, as generate's tokens up to and including eos do). A level's aggregate tokens/s = all
completion tokens / the level's wall time (first request sent to last answer read); percentiles
pool every request of every rep; tokens/s per level is the median over reps. peak running: the
most rows /health showed while the level ran (polled every 0.25 s). Same outputs: the fraction of
a level's answers (all reps) equal to the alone answer of its (prompt, model) (the 1-client
level's first answers are the alone ones): fp32 should give 1.0; in bf16 a batch changes the
kernels' blocking and so the rounding, and some may differ.

Single-stream tokens/s = tokens / wall time of each request, prompt processing included, for
every path alike; "x generate" pairs each Engine request with the generate request next to it.
The profile counts the model's forward calls with a hook (call 1 is the prefill) and, after 3
warm-up steps, times two windows of --profile-steps decode steps: the first without the profiler
(ms/step, split into the transformers model's forward, the PEFT wrapper around it, which routes
rows to adapters, and the rest of the loop), the second under torch.profiler, where each op's self
time goes to a bucket: weights' matmuls (aten::mm / addmm outside attention; LoRA's are those with
the rank as a dimension of the weight operand), attention (everything inside the model's attention
function), other ops, and "outside ops" (wall time no op accounts for: Python, hooks, the loop's
bookkeeping). The profiler's own per-op cost inflates the profiled ms/step; the shares are of that
time. For the profile the Engine's own loop runs on the main thread (the profiler records only
the thread that starts it), and its rows ignore eos (generate's: min_new_tokens) so that the batch
keeps its size. The profile's runs follow each other (no turns): compare their ms/step loosely.

    python benchmarks/serve_throughput.py                                # fp32, clients 1,4,16
    python benchmarks/serve_throughput.py --dtype bf16 --repeats 2
    python benchmarks/serve_throughput.py --clients 1,16 --skip-single --skip-profile
    python benchmarks/serve_throughput.py --skip-server --skip-single   # the profile only
"""

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
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "runs" / "benchmarks" / "serve_throughput.json"  # runs/ is git-ignored
ADAPTERS = ("a1", "a2", "a3", "a4")
BASE_ID = "base"  # the base model's name in the API (--served-model-name)
MODELS = (BASE_ID, *ADAPTERS)  # request k asks MODELS[k % 5]
BAR = 4.0  # 16 clients / 1 client aggregate tokens/s
PROFILE_WARMUP = 3  # decode steps before the timed windows (allocator, thread pool)
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from peftkit.threads import machine_cpus

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model alias or directory")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the server's --precision")
    p.add_argument(
        "--threads",
        type=int,
        default=machine_cpus(),
        help="torch threads of the server and the in-process runs (default: one per CPU)",
    )
    p.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends in turn")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    p.add_argument("--repeats", type=int, default=1, help="sweeps (levels rotated) and single-stream reps")
    p.add_argument("--max-batch-size", type=int, default=16, help="the server's --max-batch-size")
    p.add_argument("--r", type=int, default=16, help="rank of the random adapters")
    p.add_argument("--lora-std", type=float, default=0.02, help="std of the adapters' random B")
    p.add_argument("--seed", type=int, default=0, help="adapter i is seeded seed + i")
    p.add_argument("--single-prompts", type=int, default=2, help="prompts of the single-stream comparison")
    p.add_argument("--profile-steps", type=int, default=20, help="decode steps per profiled window")
    p.add_argument("--profile-batches", default="1,16", help="Engine batch sizes to profile")
    p.add_argument("--skip-reference", action="store_true", help="no alone answers beyond the 1-client level")
    p.add_argument("--skip-server", action="store_true", help="no server: only the in-process parts")
    p.add_argument("--skip-single", action="store_true", help="no in-process single-stream comparison")
    p.add_argument("--skip-generate", action="store_true", help="no generate (single stream, profile)")
    p.add_argument("--skip-profile", action="store_true", help="no profile")
    p.add_argument("--server-timeout", type=float, default=300, help="seconds to wait for /health")
    p.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    args = p.parse_args(argv)
    try:
        args.levels = sorted({int(c) for c in args.clients.split(",") if c.strip()})
        args.profile_batch_list = [int(b) for b in args.profile_batches.split(",") if b.strip()]
    except ValueError:
        p.error("--clients and --profile-batches are comma-separated integers")
    counts = {
        "--requests-per-client": args.requests_per_client,
        "--max-tokens": args.max_tokens,
        "--repeats": args.repeats,
        "--threads": args.threads,
        "--max-batch-size": args.max_batch_size,
        "--single-prompts": args.single_prompts,
        "--profile-steps": args.profile_steps,
    }
    bad = [flag for flag, value in counts.items() if value < 1]
    if not args.levels or min(args.levels) < 1 or bad:
        p.error(f"{', '.join(bad) or '--clients'}: must be at least 1")
    if args.single_prompts > len(PROMPTS) or max(args.profile_batch_list, default=1) > len(PROMPTS):
        p.error(f"--single-prompts and --profile-batches are at most {len(PROMPTS)} (the prompts)")
    return args


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


def machine() -> dict[str, Any]:
    from peftkit.threads import machine_cpus

    model = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), model
        )
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    return {
        "cpu_model": model,
        "avx512_bf16": "avx512_bf16" in flags.split(),
        "amx_bf16": "amx_bf16" in flags.split(),
        "cpus": machine_cpus(),
    }


def source_digest() -> dict[str, str]:
    """sha256 (first 12 hex digits) of each file of peftkit/serve/ and of the LoRA mixed-batch code:
    which version of the decode loop these numbers are for."""
    import hashlib

    import peftkit

    root = Path(peftkit.__file__).parent
    files = sorted((root / "serve").glob("*.py")) + [root / "methods" / "lora" / "mixed_batch.py"]
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()[:12]
        for f in files
        if f.is_file()
    }


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


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
    say = _say
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
        _say(f"reference pass: {len(missing)} requests alone, {tokens} tokens in {wall:.2f} s")
    return {"alone": alone, "reference": reference}


def same_outputs(levels: dict[str, Any], requests: dict[int, list], alone: dict[int, dict[str, Any]]) -> None:
    """Adds ``same_as_alone`` to each level: the fraction of its answers (checked ones) equal to
    the answer the same (prompt, model) got alone."""
    for n, rs in requests.items():
        checked = [r for r in rs if r["k"] in alone]
        same = sum(r["text"] == alone[r["k"]]["text"] for r in checked)
        levels[str(n)]["same_as_alone"] = same / len(checked) if checked else None
        levels[str(n)]["same_checked"] = len(checked)


# -- in process: generate vs the Engine, and the profile --------------------------------------------


def load_like_server(args: argparse.Namespace, adapter_dirs: dict[str, str]):
    """The model with every adapter, as ``peftkit serve`` loads it (its own CLI loader); returns
    (model, tokenizer, autocast dtype)."""
    from peftkit.cli import serve as serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    argv = ["--base-model", args.model, "--precision", args.dtype, "--threads", str(args.threads)]
    for name, directory in adapter_dirs.items():
        argv += ["--adapter", f"{name}={directory}"]
    ns = parser.parse_args(argv)
    ns.command = "serve"
    model, tokenizer, _ = serve_cli.load_model_with_adapters(ns)
    return model, tokenizer, ns.autocast_dtype


def chat_ids(tokenizer: Any, prompt: int) -> list[int]:
    from peftkit.serve.app import _chat_ids  # the server's own encoding of a chat request

    return _chat_ids(tokenizer, [{"role": "user", "content": PROMPTS[prompt]}])


def run_generate(
    model: Any, tokenizer: Any, ids: list[int], adapter: str, max_tokens: int, autocast, **kwargs: Any
) -> tuple:
    """One greedy generate call at batch 1: (seconds, new token ids up to and including eos).
    ``kwargs`` go to ``generate``."""
    from peftkit.evaluation import generate_token_ids
    from peftkit.serve.engine import BASE

    if adapter != BASE:
        model.set_adapter(adapter)
    scope = model.disable_adapter() if adapter == BASE else contextlib.nullcontext()
    with scope:
        start = time.perf_counter()
        (tokens,) = generate_token_ids(
            model,
            tokenizer,
            [ids],
            max_new_tokens=max_tokens,
            batch_size=1,
            autocast_dtype=autocast,
            progress=False,
            **kwargs,
        )
        return time.perf_counter() - start, tokens


def run_engine(engine: Any, ids: list[int], adapter: str, max_tokens: int) -> tuple:
    """One Sequence through a running Engine: (seconds, token ids, TTFT, per-token intervals)."""
    from peftkit.serve.sequence import SamplingParams, Sequence

    finished = threading.Event()
    arrivals: list[float] = []

    def sink(event: Any) -> None:  # called on the engine thread
        arrivals.append(time.perf_counter())
        if event.kind in ("done", "error"):
            finished.set()

    sequence = Sequence(
        prompt_ids=ids, adapter=adapter, params=SamplingParams(max_tokens=max_tokens), sink=sink
    )
    start = time.perf_counter()
    engine.submit([sequence])
    finished.wait()
    seconds = time.perf_counter() - start
    if sequence.finish_reason == "error":
        raise RuntimeError("the Engine failed a sequence (see its on_error output)")
    intervals = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return seconds, list(sequence.output_ids), arrivals[0] - start, intervals


def new_engine(model: Any, tokenizer: Any, autocast: Any, rows: int) -> Any:
    from peftkit.serve.engine import Engine

    return Engine(model, tokenizer, max_batch_size=rows, max_queue=max(rows, 64), autocast_dtype=autocast)


def single_stream(args: argparse.Namespace, model: Any, tokenizer: Any, autocast: Any) -> dict[str, Any]:
    """generate vs the Engine at batch 1, in turns (the first mover alternating by rep)."""
    from peftkit.serve.engine import BASE

    paths = ["engine"] if args.skip_generate else ["generate", "engine"]
    configs = {"base": BASE, "lora": ADAPTERS[0]}
    prompts = {p: chat_ids(tokenizer, p) for p in range(args.single_prompts)}
    engine = new_engine(model, tokenizer, autocast, 1) if "engine" in paths else None
    if engine is not None:
        engine.start()
    seconds = {(p, c): [] for p in paths for c in configs}
    tokens = {(p, c): [] for p in paths for c in configs}
    latency: dict[str, list[float]] = {c: [] for c in configs}
    ttft: dict[str, list[float]] = {c: [] for c in configs}
    outputs: dict[tuple[str, str, int], list[int]] = {}
    try:
        for path in paths:  # warm-up, untimed
            for adapter in configs.values():
                if path == "generate":
                    run_generate(model, tokenizer, prompts[0], adapter, 4, autocast)
                else:
                    run_engine(engine, prompts[0], adapter, 4)
        for rep in range(args.repeats):
            order = paths[rep % len(paths) :] + paths[: rep % len(paths)]
            for config, adapter in configs.items():
                for p, ids in prompts.items():
                    for path in order:
                        if path == "generate":
                            s, out = run_generate(model, tokenizer, ids, adapter, args.max_tokens, autocast)
                        else:
                            # generate may have switched the model's adapter behind the Engine's back
                            # (the server never does): make it set its own (one walk, before the clock).
                            engine.set_model(model)
                            s, out, first, intervals = run_engine(engine, ids, adapter, args.max_tokens)
                            ttft[config].append(first)
                            latency[config].extend(intervals)
                        seconds[path, config].append(s)
                        tokens[path, config].append(len(out))
                        outputs[path, config, p] = out
            _say(f"single stream rep {rep + 1}/{args.repeats} done")
    finally:
        if engine is not None:
            engine.stop()
    result: dict[str, Any] = {"prompts": len(prompts), "reps": args.repeats}
    for path in paths:
        every_s = sum(sum(seconds[path, c]) for c in configs)
        result[path] = {"all": {"tokens_per_s": sum(sum(tokens[path, c]) for c in configs) / every_s}}
        for config in configs:
            s, t = seconds[path, config], tokens[path, config]
            entry = {"tokens": sum(t), "seconds": sum(s), "tokens_per_s": sum(t) / sum(s)}
            # Paired by turn: the request just before or after it on the other path.
            if path == "engine" and "generate" in paths:
                ratios = [
                    (te / se) / (tg / sg)
                    for te, se, tg, sg in zip(t, s, tokens["generate", config], seconds["generate", config])
                ]
                entry["median_paired_ratio_to_generate"] = statistics.median(ratios)
                same = [outputs["engine", config, p] == outputs["generate", config, p] for p in prompts]
                entry["same_tokens_as_generate"] = sum(same) / len(same)
            if path == "engine":
                entry["ttft_s"] = percentiles(ttft[config])
                entry["token_latency_s"] = percentiles(latency[config])
            result[path][config] = entry
    if "generate" in paths:
        same = [outputs["generate", "base", p] == outputs["generate", "lora", p] for p in prompts]
        result["adapter_changes_answers"] = 1 - sum(same) / len(same)
    return result


class StepWindows:
    """Forward hooks counting the model's calls (call 1: the prefill, then one per decode step).
    After ``PROFILE_WARMUP`` decode steps it times ``steps`` steps (wall, the transformers model's
    forward, and ``outer``'s: the PEFT wrapper around it, which routes rows to adapters), then runs
    ``steps`` more under torch.profiler. Started and stopped inside the hook, so the windows are
    whole steps on whichever thread decodes."""

    def __init__(self, inner: Any, steps: int, outer: Any = None):
        self.steps = steps
        self.calls = 0
        self.marks: dict[str, float] = {}
        self.spent = {"inner": 0.0, "outer": 0.0}
        self.profiler = _profiler()
        self._started = {"inner": 0.0, "outer": 0.0}
        self._handles = [
            inner.register_forward_pre_hook(self._pre),
            inner.register_forward_hook(self._timer("inner", end=True)),
        ]
        if outer is not None and outer is not inner:
            self._handles += [
                outer.register_forward_pre_hook(self._timer("outer", end=False)),
                outer.register_forward_hook(self._timer("outer", end=True)),
            ]

    def _in_timed_window(self) -> bool:
        return "timed" in self.marks and "timed_end" not in self.marks

    def _pre(self, _module: Any, _args: Any) -> None:
        self.calls += 1
        first = 2 + PROFILE_WARMUP  # the first timed decode step
        if self.calls == first:
            self.marks["timed"] = time.perf_counter()
        elif self.calls == first + self.steps:
            self.marks["timed_end"] = time.perf_counter()
            self.profiler.start()
            self.marks["profiled"] = time.perf_counter()
        elif self.calls == first + 2 * self.steps:
            self.finish()
        self._started["inner"] = time.perf_counter()

    def _timer(self, which: str, *, end: bool):
        def hook(*_: Any) -> None:
            now = time.perf_counter()
            if not end:
                self._started[which] = now
            elif self._in_timed_window():  # a call whose end lies in the window: `steps` of them
                self.spent[which] += now - self._started[which]

        return hook

    def finish(self) -> None:
        if "profiled" in self.marks and "profiled_end" not in self.marks:
            self.marks["profiled_end"] = time.perf_counter()
            self.profiler.stop()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def result(self, rank: int) -> dict[str, Any]:
        if "profiled_end" not in self.marks:
            raise RuntimeError(f"the profiled run ended after {self.calls} forward calls, before its windows")
        step = (self.marks["timed_end"] - self.marks["timed"]) / self.steps
        inner, outer = self.spent["inner"] / self.steps, self.spent["outer"] / self.steps
        wrapper = max(0.0, outer - inner) if outer else 0.0
        profiled = self.marks["profiled_end"] - self.marks["profiled"]
        return {
            "ms_per_step": 1000 * step,
            "forward_ms_per_step": 1000 * inner,
            "wrapper_ms_per_step": 1000 * wrapper,
            "loop_ms_per_step": 1000 * (step - inner - wrapper),
            "profiled_ms_per_step": 1000 * profiled / self.steps,
            **op_shares(self.profiler, rank, profiled),
        }


def _profiler() -> Any:
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], record_shapes=True)


MM_OPS = ("aten::mm", "aten::addmm")
ATTENTION = "serve_throughput::attention"


def op_shares(prof: Any, rank: int, wall_s: float) -> dict[str, Any]:
    """Each event's self time in one bucket, by what it is and whether it runs inside attention."""
    buckets = {"weights_mm": 0.0, "lora_mm": 0.0, "attention": 0.0, "other_ops": 0.0}
    per_op: dict[str, float] = {}
    for event in prof.events():
        own = event.self_cpu_time_total / 1e6
        per_op[event.name] = per_op.get(event.name, 0.0) + own
        parent, inside = event, False
        while parent is not None:
            if parent.name == ATTENTION or "scaled_dot_product" in parent.name:
                inside = True
                break
            parent = parent.cpu_parent
        if inside:
            buckets["attention"] += own
        elif event.name in MM_OPS:
            shapes = event.input_shapes or []
            weight = shapes[-1] if shapes else []  # x @ W^T: the second operand (addmm: the last)
            buckets["lora_mm" if rank in (weight or []) else "weights_mm"] += own
        else:
            buckets["other_ops"] += own
    in_ops = sum(buckets.values())
    out = {f"{k}_pct": 100 * v / wall_s for k, v in buckets.items()}
    out["mm_pct"] = out["weights_mm_pct"] + out["lora_mm_pct"]
    out["outside_ops_pct"] = 100 * max(0.0, wall_s - in_ops) / wall_s
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:12]
    out["top_ops_ms_per_window"] = {name: round(1000 * s, 3) for name, s in top}
    return out


@contextlib.contextmanager
def attention_marked(inner: Any):
    """The model's eager attention function wrapped in a profiler label (its module's global,
    which the attention layers look up per call)."""
    import torch

    module = sys.modules.get(type(inner).__module__)
    original = getattr(module, "eager_attention_forward", None)
    if original is None:
        yield
        return

    def marked(*a: Any, **kw: Any) -> Any:
        with torch.profiler.record_function(ATTENTION):
            return original(*a, **kw)

    module.eager_attention_forward = marked
    try:
        yield
    finally:
        module.eager_attention_forward = original


def _release_when_done(finished: threading.Semaphore):
    def sink(event: Any) -> None:  # the engine thread
        if event.kind in ("done", "error"):
            finished.release()

    return sink


def profile_steps(args: argparse.Namespace, model: Any, tokenizer: Any, autocast: Any) -> dict[str, Any]:
    """The Engine's decode steps at each --profile-batches size, and generate's at batch 1."""
    from peftkit.serve.engine import BASE
    from peftkit.serve.sequence import SamplingParams, Sequence

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    tokens = 2 + PROFILE_WARMUP + 2 * args.profile_steps  # every window's steps, and one to spare
    out: dict[str, Any] = {}
    runs = []  # (name, each row's adapter): batch 1 with a1 and with the base; wider: mixed rows
    for batch in args.profile_batch_list:
        if batch == 1:
            runs += [("engine_b1_a1", [ADAPTERS[0]]), ("engine_b1_base", [BASE])]
        else:
            runs.append(
                (f"engine_b{batch}_mixed", [(BASE, *ADAPTERS)[i % len(MODELS)] for i in range(batch)])
            )
    with attention_marked(inner):
        for name, adapters in runs:
            engine = new_engine(model, tokenizer, autocast, len(adapters))
            engine.eos_ids = set()  # no row may end inside the windows: the batch keeps its size
            finished = threading.Semaphore(0)
            sink = _release_when_done(finished)
            params = SamplingParams(max_tokens=tokens)
            engine.submit(
                [
                    Sequence(prompt_ids=chat_ids(tokenizer, i), adapter=a, params=params, sink=sink)
                    for i, a in enumerate(adapters)
                ]
            )
            windows = StepWindows(inner, args.profile_steps, outer=model)
            # The Engine's own loop, run on this thread rather than its own: torch.profiler records
            # other threads only experimentally (profile_all_threads), and measured their small ops
            # several times slower than the same steps profiled here (same unprofiled ms/step).
            # Stopping before it runs makes the loop return once the queued rows are done.
            engine._stopping = True
            try:
                engine._run()
            finally:
                windows.remove()
            assert all(finished.acquire(blocking=False) for _ in adapters), "a profiled row did not finish"
            out[name] = {"batch": len(adapters), "adapters": adapters, **windows.result(args.r)}
            _say(f"profiled {name}")
        if not args.skip_generate:
            for name, adapter in (("generate_b1_a1", ADAPTERS[0]), ("generate_b1_base", BASE)):
                windows = StepWindows(inner, args.profile_steps)
                try:
                    # eos masked (one small logits op per step), as the Engine's rows ignore it
                    run_generate(
                        model,
                        tokenizer,
                        chat_ids(tokenizer, 0),
                        adapter,
                        tokens,
                        autocast,
                        min_new_tokens=tokens,
                    )
                finally:
                    windows.finish()
                    windows.remove()
                out[name] = {"batch": 1, "adapters": [adapter], **windows.result(args.r)}
                _say(f"profiled {name}")
    return out


# -- report ------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.0f}"


def _pcts(p: dict[str, float | None]) -> str:
    return " / ".join(_ms(p[k]) for k in ("p50", "p90", "p99"))


def table(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        f"peftkit serve, {s['model']}, {s['dtype']}, {s['threads']} threads, 4 LoRA adapters (r={s['r']}), "
        f"max_tokens {s['max_tokens']}, {s['requests_per_client']} requests per client, {s['repeats']} rep(s); "
        f"{results['machine']['cpu_model']} (avx512_bf16: {results['machine']['avx512_bf16']})",
    ]
    levels = results.get("levels", {})
    if levels:
        lines += [
            "",
            "| clients | requests | aggregate tok/s | x 1 client | TTFT ms p50/p90/p99 | per-token ms p50/p90/p99 "
            "| peak running | same as alone |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    one = levels.get("1", {}).get("tokens_per_s")
    for n, level in levels.items():
        same, checked = level.get("same_as_alone"), level.get("same_checked")
        ratio = f"{level['tokens_per_s'] / one:.2f}" if one else "-"
        lines.append(
            f"| {n} | {level['requests']} | {level['tokens_per_s']:.1f} | {ratio} | {_pcts(level['ttft_s'])} "
            f"| {_pcts(level['token_latency_s'])} | {level['peak_running']} "
            f"| {'-' if same is None else f'{same:.2f} of {checked}'} |"
        )
    if results.get("bar"):
        lines += ["", results["bar"]["text"]]
    if results.get("source_changed_during_run"):
        lines += ["", "warning: peftkit/serve's source changed while this ran (source_sha256 in the JSON)"]
    single = results.get("single_stream")
    if single:
        lines += [
            "",
            f"Single stream (batch 1; in process: {single.get('prompts', 0)} prompts x {single.get('reps', 0)} "
            "rep(s), base and LoRA a1, in turns; tokens/s include the prompt's processing):",
            "",
            "| path | base tok/s | LoRA a1 tok/s | all tok/s | x generate (paired; base / LoRA) "
            "| per-token ms p50 (base / LoRA) | same tokens as generate |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for path, label in (
            ("generate", "transformers generate, in process"),
            ("engine", "serve Engine, in process (no HTTP)"),
        ):
            if path not in single:
                continue
            b, lo = single[path]["base"], single[path]["lora"]
            ratio = same = latency = "-"
            if "median_paired_ratio_to_generate" in b:
                ratio = f"{b['median_paired_ratio_to_generate']:.2f} / {lo['median_paired_ratio_to_generate']:.2f}"
                same = f"{b['same_tokens_as_generate']:.2f} / {lo['same_tokens_as_generate']:.2f}"
            if "token_latency_s" in b:
                latency = f"{_ms(b['token_latency_s']['p50'])} / {_ms(lo['token_latency_s']['p50'])}"
            lines.append(
                f"| {label} | {b['tokens_per_s']:.1f} | {lo['tokens_per_s']:.1f} "
                f"| {single[path]['all']['tokens_per_s']:.1f} | {ratio} | {latency} | {same} |"
            )
        for key, label in (
            ("one_client", "server, 1 client (sweep level 1: base, a1, ...)"),
            ("reference", "server, 1 client (reference pass: all models)"),
        ):
            entry = (single.get("server") or {}).get(key)
            if entry:
                latency = _ms(entry.get("token_latency_p50_s"))
                lines.append(f"| {label} | | | {entry['tokens_per_s']:.1f} | | {latency} (all) | |")
    prof = results.get("profile")
    if prof:
        lines += [
            "",
            "Where a decode step goes (shares of the profiled step; ms/step measured without the profiler):",
            "",
            "| run | ms/step | model forward ms | PEFT wrapper ms | loop ms | profiled ms | weights mm % "
            "| LoRA mm % | attention % | other ops % | outside ops % |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, p in prof.items():
            lines.append(
                f"| {name} | {p['ms_per_step']:.1f} | {p['forward_ms_per_step']:.1f} "
                f"| {p['wrapper_ms_per_step']:.1f} | {p['loop_ms_per_step']:.1f} | {p['profiled_ms_per_step']:.1f} "
                f"| {p['weights_mm_pct']:.0f} | {p['lora_mm_pct']:.0f} | {p['attention_pct']:.0f} "
                f"| {p['other_ops_pct']:.0f} | {p['outside_ops_pct']:.0f} |"
            )
        lines.append(
            "model forward: the transformers model's forward; PEFT wrapper: the PeftModel call around it "
            "(adapter routing); loop: the rest of the step (token choice, text, cache and mask bookkeeping)"
        )
    return "\n".join(lines)


def _say(message: str) -> None:
    print(f"[serve_throughput] {message}", file=sys.stderr, flush=True)


def server_part(args: argparse.Namespace, adapter_dirs: dict[str, str], work: Path, results: dict) -> None:
    """The server's sweep and reference pass; fills ``results`` (levels, bar, answers, ...)."""
    _say(f"starting the server ({args.dtype}, {args.threads} threads) ...")
    server = ServerProcess(args, adapter_dirs, work / "server.log")
    try:
        sweep = run_sweep(args, server)
        alone = alone_answers(args, server, sweep["requests"])
    except BaseException:
        print(server.output()[-4000:], file=sys.stderr)
        raise
    finally:
        code = server.stop()
    results["server"] = {"argv": server.argv[1:], "exit_code": code}
    levels = sweep["levels"]
    same_outputs(levels, sweep["requests"], alone["alone"])
    results["levels"] = levels
    results["requests"] = {  # per request, without its text and token intervals
        str(n): [
            {k: r[k] for k in ("k", "prompt", "model", "tokens", "finish", "ttft_s", "seconds")} for r in rs
        ]
        for n, rs in sweep["requests"].items()
    }
    results["reference"] = alone["reference"]
    results["answers"] = {f"{r['prompt']}|{r['model']}": r["text"] for _, r in sorted(alone["alone"].items())}
    lo, hi = min(args.levels), max(args.levels)
    if lo == 1 and hi > 1:
        ratio = levels[str(hi)]["tokens_per_s"] / levels["1"]["tokens_per_s"]
        paired = statistics.median(
            a["tokens_per_s"] / b["tokens_per_s"]
            for a, b in zip(levels[str(hi)]["reps"], levels["1"]["reps"])
        )
        results["bar"] = {
            "clients": hi,
            "ratio": ratio,
            "median_paired_ratio": paired,
            "bar": BAR,
            "met": ratio >= BAR,
            "text": f"{hi} clients / 1 client aggregate tokens/s = {ratio:.2f} (bar >= {BAR:g}; "
            f"paired by rep: {paired:.2f})",
        }
    results["single_stream_server"] = {  # the server's rows of the single-stream table
        "one_client": {
            "tokens_per_s": levels["1"]["tokens_per_s"],
            "token_latency_p50_s": levels["1"]["token_latency_s"]["p50"],
        }
        if "1" in levels
        else None,
        "reference": alone["reference"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": {**machine(), "load_average_start": load_average()}}
    results["source_sha256"] = source_digest()
    threads_before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="serve-throughput-") as tmp:
        work = Path(tmp)
        adapter_dirs = save_adapters(args, work / "adapters")
        if not args.skip_server:
            server_part(args, adapter_dirs, work, results)
        if not (args.skip_single and args.skip_profile):
            model, tokenizer, autocast = load_like_server(args, adapter_dirs)
            try:
                if not args.skip_single:
                    results["single_stream"] = single_stream(args, model, tokenizer, autocast)
                    results["single_stream"]["server"] = results.get("single_stream_server")
                if not args.skip_profile:
                    results["profile"] = profile_steps(args, model, tokenizer, autocast)
            finally:
                results["torch_threads_in_process"] = torch.get_num_threads()
                torch.set_num_threads(threads_before)  # the loader set --threads: not for the caller
        results.pop("single_stream_server", None)
    results["settings"] = {
        "model": args.model,
        "dtype": args.dtype,
        "threads": args.threads,
        "clients": args.levels,
        "requests_per_client": args.requests_per_client,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "max_batch_size": args.max_batch_size,
        "r": args.r,
        "lora_std": args.lora_std,
        "seed": args.seed,
        "single_prompts": args.single_prompts,
        "profile_steps": args.profile_steps,
        "prompts": PROMPTS,
        "total_wall_s": time.perf_counter() - started,
    }
    results["machine"]["load_average_end"] = load_average()
    if source_digest() != results["source_sha256"]:  # edited while this ran: which parts saw which
        results["source_changed_during_run"] = source_digest()
    print(table(results))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results written to {out} ({results['settings']['total_wall_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
