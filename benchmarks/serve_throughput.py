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
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Helpers next to this script (benchmarks/ is on sys.path when it runs).
from serve_clients import PROMPTS, ServerProcess, alone_answers, run_sweep, same_outputs, save_adapters, say
from serve_engine_measures import load_like_server, profile_steps, single_stream

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "runs" / "benchmarks" / "serve_throughput.json"  # runs/ is git-ignored
BAR = 4.0  # 16 clients / 1 client aggregate tokens/s


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


def server_part(args: argparse.Namespace, adapter_dirs: dict[str, str], work: Path, results: dict) -> None:
    """The server's sweep and reference pass; fills ``results`` (levels, bar, answers, ...)."""
    say(f"starting the server ({args.dtype}, {args.threads} threads) ...")
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
