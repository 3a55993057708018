"""Generation speed of `peftkit export`'s Q8_0 GGUF in llama.cpp vs `peftkit generate` (issue 22).

What runs, on the same prompts (token ids, so both see the very same input) and greedy::

    adapter     --adapter DIR, or a random r=16 all-linear LoRA on --model (B ~ N(0, 0.02): trained-like)
    llama.cpp   export_gguf(adapter, outtype=q8_0) -> llama_cpp.Llama(n_threads=T) in a worker process
                (so the two OpenMP runtimes never compete for the cores); per prompt: reset, then
                generate() with the greedy sampler until eos or --max-new-tokens (one sequence at a
                time: llama-cpp-python's Llama has no batched decoding)
    peftkit     what `peftkit generate --adapter DIR [--batch-size B]` runs: load_model_from_args
                (fp32 weights, unmerged LoRA, --precision auto = bf16 autocast where the CPU has
                avx512_bf16), then generate_completions(batch_size=B); B = 16 (its default) and 1

    for rep in 1..R:                   in turns, so load from other processes hits all alike
        for config in configs, rotated by rep (each leads once): generate all prompts   <- timed

One untimed warm-up per configuration first. tokens/s = new tokens up to (not counting) the
first eos, over the wall time of the timed runs. Reported: tokens/s per configuration, the ratio
llama.cpp / peftkit for each peftkit configuration, and the share of prompts whose greedy tokens
agree (Q8_0 vs bf16 autocast: most, not all; a near-tie can go either way).

    python benchmarks/gguf_generate.py                           # 16 prompts, 64 new tokens, 3 reps
    python benchmarks/gguf_generate.py --threads 2 --reps 5 --json runs/benchmarks/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Helpers next to this script (benchmarks/ is on sys.path when it runs).
from generate_throughput import tweet_prompts

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "runs" / "benchmarks" / "gguf_generate.json"  # runs/ is git-ignored


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model alias or directory")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (default: a random r=16 adapter)")
    p.add_argument("--outtype", default="q8_0", choices=["f32", "f16", "bf16", "q8_0"])
    p.add_argument("--prompts", type=int, default=16, help="tweets used as prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--batch-sizes", default="16,1", help="peftkit generate batch sizes to run (default: 16,1)"
    )
    p.add_argument("--reps", type=int, default=3, help="timed repetitions, in turns")
    p.add_argument("--threads", type=int, default=None, help="threads for both (default: one per core)")
    p.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    args = p.parse_args(argv)
    args.batch_list = [int(b) for b in args.batch_sizes.split(",") if b]
    if args.reps < 1 or args.prompts < 1 or not args.batch_list or min(args.batch_list) < 1:
        p.error("--reps, --prompts and --batch-sizes must be at least 1")
    return args


def random_adapter(model_name: str, out: Path) -> Path:
    import torch

    from peftkit import LoraConfig, get_peft_model
    from peftkit.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(model_name)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B small but non-zero (PEFT inits it to 0)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    peft_model.save_pretrained(out)
    return out


def _llama_cpp_worker(conn: Any, path: str, threads: int, eos: list[int]) -> None:
    """A process of its own for llama.cpp: its OpenMP threads and torch's never share the cores
    while either runs (in one process, the idle runtime's spinning threads slow the other)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    stop = set(eos)
    while (request := conn.recv()) is not None:
        prompts, max_new_tokens = request
        out = []
        for prompt in prompts:
            llm.reset()  # no KV-cache reuse across prompts: each is decoded from scratch, as peftkit does
            tokens: list[int] = []
            for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
                if token in stop or len(tokens) == max_new_tokens:
                    break
                tokens.append(token)
            out.append(tokens)
        conn.send(out)
    llm.close()


class LlamaCpp:
    """Greedy decoding in llama.cpp (llama-cpp-python's sampler, temp 0), one prompt at a time."""

    def __init__(self, path: Path, threads: int, eos: list[int]):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_llama_cpp_worker, args=(child, str(path), threads, eos))
        self.process.start()

    def run(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        self.conn.send((prompts, max_new_tokens))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()


class Peftkit:
    """`peftkit generate --adapter DIR --batch-size B`: the command's loading and generation code."""

    def __init__(self, adapter: Path, threads: int | None):
        from peftkit.loading import load_model_from_args

        self.args = argparse.Namespace(
            base_model=None,
            adapter=str(adapter),
            dtype="float32",
            device="cpu",
            precision=None,
            threads=threads,
            trust_remote_code=False,
        )
        self.model, self.tokenizer = load_model_from_args(self.args)

    def run(self, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[list[int]]:
        from peftkit.evaluation import _eos_ids, generate_token_ids

        eos = _eos_ids(self.model, self.tokenizer, None)
        rows = generate_token_ids(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            eos_token_id=eos,
            autocast_dtype=self.args.autocast_dtype,
            progress=False,
        )
        return [row[: next((k for k, t in enumerate(row) if t in eos), len(row))] for row in rows]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from peftkit.export import export_gguf

    args = parse_args(argv)
    threads = args.threads or os.cpu_count() or 1  # the same for both, fixed (not load-dependent)
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="gguf-generate-"))
    adapter = Path(args.adapter) if args.adapter else random_adapter(args.model, work / "adapter")
    start = time.perf_counter()
    summary = export_gguf(adapter, work / "gguf", outtype=args.outtype)
    export_seconds = time.perf_counter() - start
    peftkit = Peftkit(adapter, threads)
    prompts = tweet_prompts(peftkit.tokenizer, args.prompts)
    from peftkit.evaluation import _eos_ids

    eos = _eos_ids(peftkit.model, peftkit.tokenizer, None)
    cpp = LlamaCpp(work / "gguf" / summary.files["model"], threads, eos)
    runners = {"llama.cpp": lambda n: cpp.run(prompts, n)}
    for b in args.batch_list:
        runners[f"peftkit batch {b}"] = lambda n, b=b: peftkit.run(prompts, n, b)
    for name, runner in runners.items():
        print(f"[gguf_generate] warm-up {name}", file=sys.stderr, flush=True)
        runner(min(8, args.max_new_tokens))
    seconds: dict[str, list[float]] = {k: [] for k in runners}
    outputs: dict[str, list[list[int]]] = {}
    names = list(runners)
    for rep in range(args.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            t = time.perf_counter()
            outputs[name] = runners[name](args.max_new_tokens)
            seconds[name].append(time.perf_counter() - t)
            print(
                f"[gguf_generate] rep {rep + 1} {name}: {seconds[name][-1]:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    cpp.close()
    results: dict[str, Any] = {
        "settings": {
            "model": args.model,
            "adapter": str(args.adapter or "random r=16 all-linear LoRA, B ~ N(0, 0.02)"),
            "outtype": args.outtype,
            "prompts": args.prompts,
            "max_new_tokens": args.max_new_tokens,
            "reps": args.reps,
            "threads": threads,
            "peftkit_precision": peftkit.args.precision_label,
            "cpu": platform.processor() or platform.machine(),
            "export_seconds": round(export_seconds, 1),
            "gguf_bytes": (work / "gguf" / summary.files["model"]).stat().st_size,
        },
        "configs": {},
    }
    reference = outputs["llama.cpp"]
    for name in names:
        tokens = sum(len(t) for t in outputs[name])
        total = sum(seconds[name])
        results["configs"][name] = {
            "tokens_per_s": tokens * args.reps / total,
            "tokens": tokens,
            "seconds": seconds[name],
            "same_tokens_as_llama_cpp": sum(a == b for a, b in zip(outputs[name], reference)) / len(prompts),
        }
    cpp_rate = results["configs"]["llama.cpp"]["tokens_per_s"]
    for name in names[1:]:
        config = results["configs"][name]
        config["llama_cpp_speedup"] = cpp_rate / config["tokens_per_s"]
        config["median_paired_speedup"] = statistics.median(
            (sum(len(t) for t in reference) / a) / (config["tokens"] / b)
            for a, b in zip(seconds["llama.cpp"], seconds[name])
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return results


def table(results: dict[str, Any]) -> str:
    lines = [f"{'configuration':24}{'tokens/s':>10}{'llama.cpp x':>13}{'paired':>8}{'tokens':>8}{'same':>7}"]
    for name, r in results["configs"].items():
        speedup = r.get("llama_cpp_speedup")
        paired = r.get("median_paired_speedup")
        lines.append(
            f"{name:24}{r['tokens_per_s']:>10.1f}{'-' if speedup is None else f'{speedup:.2f}':>13}"
            f"{'-' if paired is None else f'{paired:.2f}':>8}{r['tokens']:>8}{r['same_tokens_as_llama_cpp']:>7.2f}"
        )
    s = results["settings"]
    lines.append(
        f"{s['prompts']} prompts, max_new_tokens {s['max_new_tokens']}, {s['threads']} threads, {s['reps']} "
        f"reps in turns; llama.cpp: {s['outtype']} GGUF ({s['gguf_bytes'] / 2**20:.0f} MiB), peftkit: "
        f"{s['peftkit_precision']}, unmerged LoRA. 'llama.cpp x': its tokens/s over the row's; paired: "
        "median over reps; same: share of prompts with llama.cpp's greedy tokens"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
