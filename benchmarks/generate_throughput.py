"""Generation throughput of `peftkit generate`: base model vs LoRA unmerged vs merged (issue 5).

Issue 5 asks for >= 0.95x the base model's tokens/s with a merged adapter and >= 0.8x with an
unmerged LoRA adapter. This script measures it (it asserts nothing about speed)::

    prompts   the first N tweets of builtin:tweet-sentiment, each a user message in the chat template
    base      the plain transformers model, as load_model_and_tokenizer returns it
    lora      get_peft_model(deepcopy(base), LoraConfig(r=16, alpha=32, all-linear)), eval mode,
              B random non-zero (or --adapter DIR loaded with PeftModel.from_pretrained)
    merged    deepcopy(lora).merge_and_unload(): a plain model again
    inplace   deepcopy(lora) after merge_adapter(): the wrapper stays, the layers skip LoRA

    for rep in 1..R:                   round-robin, so load from other processes hits all alike
        for config in configs, rotated by rep (each leads once):
            generate_completions(model, prompts, greedy, max_new_tokens, batch_size)   <- timed

Every configuration runs one untimed warm-up call first. generate_completions is the very code
`peftkit generate` runs; the model's ``generate`` is wrapped only to read the new token ids, which
are counted up to the first eos (tokens a finished row keeps padding are not counted, though
their compute is spent: that is what a user gets). tokens/s = counted tokens / wall time of the
timed calls. The merged models must produce the unmerged model's greedy tokens: the fraction of
prompts where they do is reported (fp32: all, bf16: most; a tie can flip a rounding).

    python benchmarks/generate_throughput.py                 # fp32, batch 8, 64 new tokens
    python benchmarks/generate_throughput.py --dtype bf16 --batch-size 1 --threads 2
    python benchmarks/generate_throughput.py --profile 5     # + the top 5 ops of one unmerged call
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "runs" / "benchmarks" / "generate_throughput.json"  # runs/ is git-ignored
CONFIGS = {
    "base": "base model",
    "lora": "base + LoRA, unmerged (get_peft_model, eval)",
    "merged": "merge_and_unload()",
    "inplace": "merge_adapter() (in place, wrapper kept)",
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model alias or directory")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (default: a random r=16 adapter)")
    p.add_argument("--r", type=int, default=16, help="rank of the random adapter")
    p.add_argument("--alpha", type=float, default=32, help="lora_alpha of the random adapter")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="weights dtype (bf16: stored bf16)"
    )
    p.add_argument("--prompts", type=int, default=16, help="tweets used as prompts")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (e.g. 8 or 1)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3, help="timed round-robin repetitions")
    p.add_argument(
        "--configs",
        default="base,lora,merged",
        help=f"comma-separated, from {','.join(CONFIGS)} (default: base,lora,merged; base always runs)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random adapter")
    p.add_argument("--profile", type=int, default=0, metavar="K", help="profile one unmerged call: top K ops")
    p.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    args = p.parse_args(argv)
    args.config_list = ["base"] + [c for c in dict.fromkeys(args.configs.split(",")) if c and c != "base"]
    unknown = [c for c in args.config_list if c not in CONFIGS]
    if unknown:
        p.error(f"unknown --configs {unknown}: choose from {', '.join(CONFIGS)}")
    if args.reps < 1 or args.prompts < 1 or args.batch_size < 1:
        p.error("--reps, --prompts and --batch-size must be at least 1")
    return args


def tweet_prompts(tokenizer: Any, n: int) -> list[list[int]]:
    """The first ``n`` tweets of the builtin, as `peftkit generate --prompt TWEET` encodes them."""
    from peftkit.data.builtin import get_builtin
    from peftkit.loading import encode_chat, encode_plain, has_chat_template

    path = get_builtin("builtin:tweet-sentiment").locate()
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        texts = [row["text"] for _, row in zip(range(n), csv.DictReader(f))]
    if has_chat_template(tokenizer):
        return [encode_chat(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    return [encode_plain(tokenizer, t) for t in texts]


def build_models(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    import torch

    from peftkit import LoraConfig, PeftModel, get_peft_model
    from peftkit.models import load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer(args.model, dtype=DTYPES[args.dtype])
    if args.adapter:
        lora = PeftModel.from_pretrained(copy.deepcopy(base), args.adapter)
    else:
        torch.manual_seed(args.seed)
        config = LoraConfig(
            r=args.r, lora_alpha=args.alpha, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        lora = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():  # a trained-looking adapter: B small but non-zero (PEFT inits it to 0)
            for name, param in lora.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.02)
    lora.eval()
    models = {"base": base, "lora": lora}
    if "merged" in args.config_list:
        models["merged"] = copy.deepcopy(lora).merge_and_unload().eval()
    if "inplace" in args.config_list:
        inplace = copy.deepcopy(lora)
        inplace.merge_adapter()
        models["inplace"] = inplace.eval()
    return {k: models[k] for k in args.config_list}, tokenizer


class TokenRecorder:
    """Wraps ``model.generate`` (an instance attribute) to keep each call's new token ids."""

    def __init__(self, model: Any):
        self.model, self.original = model, model.generate
        self.calls: list[tuple[int, list[list[int]]]] = []

    def __enter__(self) -> TokenRecorder:
        def generate(*a: Any, **kw: Any) -> Any:
            out = self.original(*a, **kw)
            width = kw["input_ids"].shape[1]
            self.calls.append((width, out[:, width:].tolist()))
            return out

        self.model.generate = generate
        return self

    def __exit__(self, *_: Any) -> None:
        del self.model.generate  # back to the class's method


def run_once(
    model: Any, tokenizer: Any, prompts: list[list[int]], args: argparse.Namespace
) -> tuple[float, list[list[int]]]:
    """One timed generate_completions call over all prompts: (seconds, new tokens per prompt up to eos)."""
    from peftkit.evaluation import _eos_ids, generate_completions

    eos = _eos_ids(model, tokenizer, None)
    with TokenRecorder(model) as rec:
        start = time.perf_counter()
        generate_completions(
            model,
            tokenizer,
            prompts,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            progress=False,
        )
        seconds = time.perf_counter() - start
    # generate_completions sorts prompts longest first (a stable sort); undo it.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    rows = [row for _, batch in rec.calls for row in batch]
    tokens: list[list[int]] = [[] for _ in prompts]
    for i, row in zip(order, rows):
        cut = next((k for k, t in enumerate(row) if t in eos), len(row))
        tokens[i] = row[:cut]
    return seconds, tokens


def profile_lora(
    model: Any, tokenizer: Any, prompts: list[list[int]], args: argparse.Namespace
) -> dict[str, Any]:
    """Where one unmerged-LoRA call spends its time: top ops, and the share of LoRA's own matmuls.

    LoRA's matmuls are the ``aten::mm`` / ``aten::addmm`` calls whose second operand has the rank
    as a dimension (x @ A^T: A^T is (in, r); result + s * h @ B^T: h is (tokens, r)); with
    SmolLM2 (576 / 192 / 1536 wide) no frozen weight has one.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run_once(model, tokenizer, prompts[: args.batch_size], args)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    mm = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::mm", "aten::addmm")]
    lora = [e for e in mm if len(e.input_shapes) > 1 and args.r in (e.input_shapes[1] or [])]
    return {
        "self_cpu_us_total": total,
        "mm_us": sum(e.self_cpu_time_total for e in mm),
        "mm_calls": sum(e.count for e in mm),
        "lora_mm_us": sum(e.self_cpu_time_total for e in lora),
        "lora_mm_calls": sum(e.count for e in lora),
        "table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile),
    }


def table(results: dict[str, Any]) -> str:
    runs = results["configs"]
    head = f"{'configuration':50}{'tokens/s':>10}{'x base':>8}{'best rep':>10}{'x base':>8}{'paired':>8}"
    lines = [head + f"{'tokens':>8}{'same as lora':>14}"]
    for key, r in runs.items():
        same = r.get("same_tokens_as_lora")
        lines.append(
            f"{key + ': ' + r['name']:50}{r['tokens_per_s']:>10.1f}{r['ratio_to_base']:>8.3f}"
            f"{r['best_tokens_per_s']:>10.1f}{r['best_ratio_to_base']:>8.3f}"
            f"{r['median_paired_ratio_to_base']:>8.3f}"
            f"{r['tokens']:>8}{'-' if same is None else f'{same:.2f}':>14}"
        )
    s = results["settings"]
    lines.append(
        f"{s['prompts']} prompts, batch {s['batch_size']}, max_new_tokens {s['max_new_tokens']}, "
        f"{s['dtype']}, {s['threads']} threads, {s['reps']} reps (round-robin); tokens/s: all reps, "
        "best rep: the fastest rep of each configuration; paired: median over reps of the ratio to the "
        "base model's run in the same rep"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    models, tokenizer = build_models(args)
    prompts = tweet_prompts(tokenizer, args.prompts)
    for name, model in models.items():  # warm-up: allocator, thread pool, kernels
        print(f"[generate_throughput] warm-up {name} ...", file=sys.stderr, flush=True)
        warm = argparse.Namespace(**{**vars(args), "max_new_tokens": min(8, args.max_new_tokens)})
        run_once(model, tokenizer, prompts[: args.batch_size], warm)
    times: dict[str, list[float]] = {k: [] for k in models}
    counts: dict[str, list[int]] = {k: [] for k in models}
    outputs: dict[str, list[list[int]]] = {}
    names = list(models)
    for rep in range(args.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # each config leads once
            model = models[name]
            seconds, tokens = run_once(model, tokenizer, prompts, args)
            times[name].append(seconds)
            counts[name].append(sum(len(t) for t in tokens))
            outputs[name] = tokens  # greedy: the same every rep
            print(
                f"[generate_throughput] rep {rep + 1}/{args.reps} {name}: {counts[name][-1]} tokens "
                f"in {seconds:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    configs: dict[str, Any] = {}
    for name in models:
        total_s, total_tokens = sum(times[name]), sum(counts[name])
        configs[name] = {
            "name": CONFIGS[name],
            "tokens": counts[name][-1],
            "tokens_timed": total_tokens,
            "timed_s": total_s,
            "rep_times_s": times[name],
            "tokens_per_s": total_tokens / total_s,
            "best_tokens_per_s": max(c / t for c, t in zip(counts[name], times[name])),
        }
    for name, r in configs.items():
        r["ratio_to_base"] = r["tokens_per_s"] / configs["base"]["tokens_per_s"]
        r["best_ratio_to_base"] = r["best_tokens_per_s"] / configs["base"]["best_tokens_per_s"]
        # Paired within each rep (the configurations ran back to back), then the median: drift in
        # the machine's speed over minutes cancels, which totals over all reps do not do.
        paired = sorted(
            (c / t) / (cb / tb)
            for c, t, cb, tb in zip(counts[name], times[name], counts["base"], times["base"])
        )
        r["median_paired_ratio_to_base"] = statistics.median(paired)
        if name != "lora" and "lora" in outputs:  # base: how much the adapter changes the output
            same = sum(a == b for a, b in zip(outputs[name], outputs["lora"]))
            r["same_tokens_as_lora"] = same / len(prompts)
    results: dict[str, Any] = {"configs": configs}
    if args.profile and "lora" in models:
        results["profile_lora"] = profile_lora(models["lora"], tokenizer, prompts, args)
    results["settings"] = {
        "model": args.model,
        "adapter": args.adapter or f"random LoRA r={args.r} alpha={args.alpha} all-linear",
        "dtype": args.dtype,
        "prompts": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "total_wall_s": time.perf_counter() - started,
    }
    print(table(results))
    if "profile_lora" in results:
        p = results["profile_lora"]
        print(p["table"])
        print(
            f"profile of one unmerged call: matmuls {p['mm_us'] / p['self_cpu_us_total']:.1%} of CPU time "
            f"({p['mm_calls']} calls); LoRA's own matmuls {p['lora_mm_us'] / p['self_cpu_us_total']:.1%} "
            f"({p['lora_mm_calls']} calls)"
        )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results written to {out} ({results['settings']['total_wall_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
