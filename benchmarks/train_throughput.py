"""Training throughput of the default job: transformers Trainer + HF PEFT vs peftkit (issue 5).

One run, on one machine, in one subprocess per worker (so every peak RSS belongs to one
configuration); the training configurations run side by side and take turns, one optimizer step
each (``--turn-steps``), so the machine's drift over minutes hits them alike (turns.py)::

    peak   square fp32 / bf16 matmuls (best of N, all threads): the machine's ceiling in GFLOP/s
    a      transformers Trainer + HF PEFT LoRA, bf16=True (what a Trainer user would pick; on a CPU
           without native bf16, where emulated bf16 would crawl, bf16=False, as peftkit's fp32)
    b      peftkit's training loop with the job's defaults (what `peftkit train` runs)
    score  both saved adapters loaded by peftkit on the same fp32 base, merged: held-out loss

    data  (built ONCE per process by peftkit.data from the job's DataConfig -> identical ids)
      |
      v
      |--> (a) the Trainer shuffles the training examples itself (its default random sampler,
      |        seeded), as a Trainer user gets them: batches of mixed lengths, padded
      '--> (b) peftkit's loop draws its own batches (its default: length-grouped, or packed)

    (a_same) is (a) reading peftkit's micro-batches for steps 1..N, in order
    (train_sampling_strategy="sequential"), and a hash of the ids proves both saw the same batches:
    the comparison with the batching difference taken out.

Timing: a timestamp after every optimizer step, on a clock that stops while the worker waits for
its turn; steps 1-2 are warm-up, the window is step 2's end to step N's end. Tokens are
non-padding tokens of the timed steps. ``--sequential`` runs the configurations one after another.

Model FLOPs of one example of ``s`` tokens, ``l`` of which carry a label (PaLM-style MFU)::

    6 * P_trained * s                      LoRA A/B: forward 2, backward (input + weight grads) 4
  + 4 * P_frozen_body * s                  frozen linear layers: forward 2, input grads 2
  + 4 * P_head * l   (mfu)                 LM head only where a loss is taken (the job needs no more)
    4 * P_head * s   (mfu_dense_head)      ... or on every token, as dense causal-LM MFU counts it
  + 12 * n_layers * d_attn * s^2           attention scores and mix, 2 * 2 * s^2 * d forward, x3 train

The embedding lookup costs no FLOPs (SmolLM2 ties the head to it: the head matmul is counted, the
lookup is not); norms, activations and softmax are left out. MFU = achieved model FLOP/s / the
measured bf16 matmul peak, or the fp32 one where that is higher (a CPU without AVX512-BF16 or AMX
emulates bf16, and peftkit then trains in fp32).

    python benchmarks/train_throughput.py           # 20 steps; writes runs/benchmarks/train_throughput.json
    python benchmarks/train_throughput.py --steps 100 --json /tmp/tp.json
    python benchmarks/train_throughput.py --only b --threads 2
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Helpers next to this script (benchmarks/ is on sys.path when it runs).
from side_by_side import with_peftkit_schedule
from train_measures import heldout_loss, matmul_peak, param_counts, peak_rss_mb, timing_summary
from turns import Turn, run_in_turns

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "examples" / "tweet-sentiment-lora.yaml"
DEFAULT_JSON = REPO / "runs" / "benchmarks" / "train_throughput.json"  # runs/ is git-ignored
CONFIGS = {
    "a": "transformers Trainer + HF PEFT (bf16=True where native), the Trainer's own shuffled batches",
    "a_same": "transformers Trainer + HF PEFT (bf16=True where native), on peftkit's batches",
    "b": "peftkit train (defaults)",
}
BASELINES = ("a", "a_same")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="peftkit job YAML (default: the default job)"
    )
    p.add_argument("--model", default=None, help="base model alias or directory (default: the job's)")
    p.add_argument("--data", default=None, help="training data source, overrides data.train")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="job override, repeatable")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per configuration (>= 3)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (default: the job's)")
    p.add_argument("--max-seq-len", type=int, default=None, help="default: the job's data.max_seq_len")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument(
        "--only",
        choices=list(CONFIGS),
        action="append",
        default=None,
        help="run this configuration (repeatable)",
    )
    p.add_argument("--heldout", type=int, default=64, help="test-split examples scored after training")
    p.add_argument("--matmul-size", type=int, default=2048, help="side of the square peak matmuls")
    p.add_argument("--matmul-reps", type=int, default=5, help="timed matmuls per dtype (best is kept)")
    p.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    p.add_argument(
        "--inprocess",
        action="store_true",
        help="run every configuration in this process (for tests: peak RSS is then not per configuration)",
    )
    p.add_argument(
        "--turn-steps",
        type=int,
        default=1,
        help="optimizer steps per turn: the configurations train in turns, so drift hits all alike",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="train the configurations one after another instead of in turns",
    )
    p.add_argument("--worker", choices=["peak", *CONFIGS, "score"], help=argparse.SUPPRESS)
    p.add_argument("--turn-fds", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error("--steps must be >= 3 (two warm-up steps are not timed)")
    if args.turn_steps < 1:
        p.error("--turn-steps must be >= 1")
    return args


# -- shared by the workers ---------------------------------------------------------------------------


def build_job(args: argparse.Namespace, output_dir: str) -> Any:
    """The job as `peftkit train CONFIG --set ...` would build it, minus evaluation and checkpoints."""
    from peftkit.train.config import apply_overrides, build_job_config, read_yaml

    sets = list(args.set)
    if args.model:
        sets.append(f"base_model={args.model}")
    if args.data:
        sets.append(f"data.train={args.data}")
    if args.batch_size:
        sets.append(f"training.batch_size={args.batch_size}")
    if args.max_seq_len:
        sets.append(f"data.max_seq_len={args.max_seq_len}")
    if args.threads:
        sets.append(f"training.num_threads={args.threads}")
    sets += [
        f"training.max_steps={args.steps}",
        "training.eval_every=null",
        "training.save_every=null",
        "evaluation.accuracy_before=false",
        "evaluation.accuracy_after=false",
        f"output_dir={output_dir}",
    ]
    return build_job_config(apply_overrides(read_yaml(args.config), sets), source=args.config)


def load_tokenizer(base_model: str) -> Any:
    from transformers import AutoTokenizer

    from peftkit.models import ensure_pad_token, resolve_model_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(base_model))
    ensure_pad_token(tok)  # what load_model_and_tokenizer does: the same pad id on both sides
    return tok


def build_data(job: Any, tokenizer: Any) -> Any:
    from peftkit.data import build_datasets
    from peftkit.tasks import get_task

    task = get_task(job.task)
    task.prepare(job.data)
    return build_datasets(job.data, tokenizer, seed=job.training.seed, task=task)


def step_batches(job: Any, train: list[Any], n: int) -> list[list[Any]]:
    """Micro-batches 0..n-1 of peftkit's loop, in the order it draws them."""
    from peftkit.train.batching import MicroBatchStream

    t = job.training
    stream = MicroBatchStream(train, t.batch_size, seed=t.seed, group_by_length=t.group_by_length)
    return [stream.get(i) for i in range(n)]


def digest(batches: list[list[Any]]) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for ex in batch:
            h.update(json.dumps([ex.input_ids, ex.labels]).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


# -- workers ------------------------------------------------------------------------------------------


def worker_peak(args: argparse.Namespace) -> dict[str, Any]:
    return matmul_peak(args.threads, args.matmul_size, args.matmul_reps)


def worker_a(args: argparse.Namespace, same_batches: bool = False) -> dict[str, Any]:
    """transformers Trainer + HF PEFT: on its own shuffled batches, or on exactly peftkit's."""
    import torch
    from peft import LoraConfig as HFLoraConfig
    from peft import get_peft_model as hf_get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from peftkit.models import bf16_supported, resolve_model_dir
    from peftkit.train.batching import collate

    work = Path(args.workdir)
    name = "a_same" if same_batches else "a"
    job = build_job(args, str(work / name))
    t = job.training
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    tok = load_tokenizer(job.base_model)
    data = build_data(job, tok)
    if same_batches:
        micro = step_batches(job, data.train, args.steps * t.gradient_accumulation_steps)
        if any(len(b) != t.batch_size for b in micro):
            raise SystemExit(
                "a step batch is short (epoch end): the Trainer's sequential batches would shift"
            )
        train_examples = [ex for b in micro for ex in b]
    else:  # the Trainer's own shuffled batches of the same training examples
        train_examples = list(data.train)

    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(job.base_model))  # transformers defaults
    lc = job.method_config
    torch.manual_seed(t.seed)
    model = hf_get_peft_model(
        model,
        HFLoraConfig(
            r=lc.r,
            lora_alpha=lc.lora_alpha,
            lora_dropout=lc.lora_dropout,
            target_modules=lc.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    counts = param_counts(model.get_base_model())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)

    class Examples(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(train_examples)

        def __getitem__(self, i: int) -> Any:
            return train_examples[i]

    stamps: list[float] = []
    losses: list[float] = []
    seen: list[list[Any]] = []  # the batches the Trainer really asked for, in its order
    turn = Turn(args.turn_fds, args.turn_steps)

    def collator(examples: list[Any]) -> dict[str, Any]:
        seen.append(list(examples))
        return collate(examples, tok.pad_token_id)

    class Clock(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            turn.ready()

        def on_step_end(self, _args: Any, state: Any, *_: Any, **__: Any) -> None:
            stamps.append(turn.clock())
            turn.after_step(state.global_step, args.steps)

        def on_log(self, _args: Any, _state: Any, _control: Any, logs: Any = None, **__: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    use_bf16 = t.precision != "fp32" and bf16_supported("cpu")
    targs = TrainingArguments(
        output_dir=str(work / name),
        max_steps=args.steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_betas[0],
        adam_beta2=t.adam_betas[1],
        adam_epsilon=t.adam_eps,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm is not None else 0.0,
        bf16=use_bf16,
        seed=t.seed,
        train_sampling_strategy="sequential" if same_batches else "random",
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = with_peftkit_schedule(Trainer, t)(  # peftkit's warm-up and schedule, as (b)
        model=model,
        args=targs,
        train_dataset=Examples(),
        data_collator=collator,
        callbacks=[Clock()],
    )
    trainer.train()
    rss = peak_rss_mb()
    model.save_pretrained(work / name / "adapter")
    accum = t.gradient_accumulation_steps
    # The dataloader may fetch a batch ahead of the last step: only the trained ones count.
    del seen[args.steps * accum :]
    batches = [sum(seen[i : i + accum], []) for i in range(0, len(seen), accum)]
    return {
        "name": CONFIGS[name],
        "bf16": use_bf16,
        "optimizer": targs.optim if isinstance(targs.optim, str) else targs.optim.value,
        "attention": model.config._attn_implementation,
        "peak_rss_mb": rss,
        "final_train_loss": losses[-1] if losses else None,
        "batches_digest": digest(seen),
        "adapter_dir": str(work / name / "adapter"),
        **timing_summary(stamps, batches, counts, trained),
    }


def worker_b(args: argparse.Namespace) -> dict[str, Any]:
    """peftkit's own setup + train, as `peftkit train` runs them; only timestamps are added."""
    from peftkit.train.loop import setup, train

    work = Path(args.workdir)
    job = build_job(args, str(work / "b"))
    session = setup(job, overwrite=True)
    session.data.validation = []  # held-out loss is scored by the `score` worker for both
    seen: list[list[Any]] = []  # the batches the loop really collated (or packed), in its order
    task = session.task

    def recording(hook: Any) -> Any:
        def record(examples: Any, *args: Any, **kwargs: Any) -> Any:
            seen.append(list(examples))
            return hook(examples, *args, **kwargs)

        return record

    task.collate, task.pack = recording(task.collate), recording(task.pack)  # instance attributes
    counts = param_counts(session.model.get_base_model())
    trained = sum(p.numel() for p in session.model.parameters() if p.requires_grad)
    stamps: list[float] = []
    turn = Turn(args.turn_fds, args.turn_steps)

    def clock(*_: Any) -> None:
        stamps.append(turn.clock())
        turn.after_step(len(stamps), args.steps)

    session.optimizer.register_step_post_hook(clock)
    turn.ready()
    train(session, progress=False)
    rss = peak_rss_mb()
    del task.collate, task.pack  # back to the class's methods
    # With gradient accumulation 1 (the default job) one collate call is one optimizer step.
    accum = job.training.gradient_accumulation_steps
    batches = [sum(seen[i : i + accum], []) for i in range(0, len(seen), accum)]
    metrics = [json.loads(x) for x in (work / "b" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    return {
        "name": CONFIGS["b"],
        "bf16": session.autocast_dtype is not None,
        "packing": job.training.packing,
        "group_by_length": job.training.group_by_length,
        "optimizer": type(session.optimizer).__name__,
        "attention": session.model.get_base_model().config._attn_implementation,
        "peak_rss_mb": rss,
        "final_train_loss": losses[-1] if losses else None,
        "batches_digest": digest(batches),
        "adapter_dir": str(work / "b" / "adapter"),
        **timing_summary(stamps, batches, counts, trained),
    }


def worker_score(args: argparse.Namespace) -> dict[str, Any]:
    """Held-out loss of the base model and of each saved adapter, on the same fp32 base.

    Both adapters are loaded by peftkit (each library reads the other's files, see
    tests/test_peft_parity.py) and merged, so one code path scores both.
    """
    from peftkit import PeftModel
    from peftkit.models import load_model_and_tokenizer

    work = Path(args.workdir)
    job = build_job(args, str(work / "score"))
    base, tok = load_model_and_tokenizer(job.base_model, dtype="float32", attn_implementation="eager")
    data = build_data(job, tok)
    examples = data.test[: args.heldout]
    if not examples:
        raise SystemExit("no test examples to score: set data.test_size")
    out: dict[str, Any] = {
        "heldout_examples": len(examples),
        "heldout_loss_base": heldout_loss(base, examples, tok.pad_token_id),
    }
    for name in args.only_list:
        model = PeftModel.from_pretrained(copy.deepcopy(base), work / name / "adapter")
        merged = model.merge_and_unload()  # fp32 merge: W + s * B @ A, differences ~1e-7
        out[f"heldout_loss_{name}"] = heldout_loss(merged, examples, tok.pad_token_id)
    return out


WORKERS = {
    "peak": worker_peak,
    "a": worker_a,
    "a_same": lambda args: worker_a(args, same_batches=True),
    "b": worker_b,
    "score": worker_score,
}


# -- driver -------------------------------------------------------------------------------------------


def run_worker(name: str, argv: list[str], workdir: Path, inprocess: bool) -> dict[str, Any]:
    result = workdir / f"{name}.json"
    worker_argv = [*argv, "--worker", name, "--workdir", str(workdir)]
    print(f"[train_throughput] running {name} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    if inprocess:
        main(worker_argv)
    elif subprocess.run([sys.executable, __file__, *worker_argv]).returncode != 0:
        raise SystemExit(f"[train_throughput] worker {name} failed (its traceback is above)")
    data = json.loads(result.read_text())
    data["wall_s"] = time.perf_counter() - started
    return data


def run_in_turns_workers(names: list[str], argv: list[str], workdir: Path) -> dict[str, Any]:
    """The training configurations side by side, taking turns (turns.py); each in its own process."""
    print(f"[train_throughput] running {', '.join(names)} in turns ...", file=sys.stderr, flush=True)
    started = time.perf_counter()

    def command(name: str) -> Any:
        worker = [sys.executable, __file__, *argv, "--worker", name, "--workdir", str(workdir)]
        return lambda fds: [*worker, "--turn-fds", fds]

    run_in_turns({name: command(name) for name in names})
    wall = time.perf_counter() - started
    return {name: {**json.loads((workdir / f"{name}.json").read_text()), "wall_s": wall} for name in names}


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict[str, Any]) -> str:
    runs = {k: results[k] for k in CONFIGS if k in results}
    ratios = [a for a in BASELINES if a in runs and "b" in runs]
    rows = [
        ("tokens/s (non-pad)", "tokens_per_s", ".1f"),
        ("step time s", "step_time_s", ".3f"),
        ("peak RSS MB", "peak_rss_mb", ".0f"),
        ("held-out loss", "heldout_loss", ".4f"),
        (f"MFU % of {results['peak'].get('ceiling', 'bf16')} peak", "mfu_pct", ".2f"),
        ("MFU % (dense head)", "mfu_dense_head_pct", ".2f"),
        ("final train loss", "final_train_loss", ".4f"),
    ]
    head = f"{'':24}" + "".join(f"{k:>12}" for k in runs) + "".join(f"{'b/' + a:>10}" for a in ratios)
    lines = [head]
    for label, key, spec in rows:
        line = f"{label:24}" + "".join(f"{fmt(r.get(key), spec):>12}" for r in runs.values())
        for a in ratios:
            if runs[a].get(key) and runs["b"].get(key) is not None:
                line += f"{runs['b'][key] / runs[a][key]:>10.3f}"
        lines.append(line)
    peak = results["peak"]
    lines.append(
        f"matmul peak ({peak['threads']} threads): fp32 {peak['fp32_gflops']:.1f} GFLOP/s "
        f"({peak.get('fp32_matmul_size', peak['matmul_size'])}^2), bf16 {peak['bf16_gflops']:.1f} GFLOP/s "
        f"({peak.get('bf16_matmul_size', peak['matmul_size'])}^2)"
    )
    for k, r in runs.items():
        precision = "bf16" if r["bf16"] else "fp32"
        lines.append(
            f"{k}: {r['name']}; {r['timed_steps']} timed steps, {precision}, attention {r['attention']}"
        )
    lines.append(f"trained {results['settings']['schedule']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)
    names = [n for n in CONFIGS if n in (args.only or CONFIGS)]
    if args.worker:
        args.only_list = names
        result = WORKERS[args.worker](args)
        Path(args.workdir, f"{args.worker}.json").write_text(json.dumps(result, indent=2))
        return
    started = time.perf_counter()
    in_turns = not (args.inprocess or args.sequential) and len(names) > 1
    with tempfile.TemporaryDirectory(prefix="train_throughput-") as tmp:
        workdir = Path(tmp)
        results: dict[str, Any] = {"peak": run_worker("peak", raw_argv, workdir, args.inprocess)}
        if in_turns:
            results.update(run_in_turns_workers(names, raw_argv, workdir))
        else:
            for name in names:
                results[name] = run_worker(name, raw_argv, workdir, args.inprocess)
        results["score"] = run_worker("score", raw_argv, workdir, args.inprocess)
    if (
        "a_same" in names
        and "b" in names
        and results["a_same"]["batches_digest"] != results["b"]["batches_digest"]
    ):
        raise SystemExit("(a_same) and (b) trained on different token sequences: the benchmark is invalid")
    peak = results["peak"]
    peak["ceiling"] = "bf16" if peak["bf16_gflops"] >= peak["fp32_gflops"] else "fp32"
    ceiling = peak[f"{peak['ceiling']}_gflops"] * 1e9
    for name in names:
        r = results[name]
        r.pop("adapter_dir")
        r["heldout_loss"] = results["score"][f"heldout_loss_{name}"]
        r["model_flops_per_s"] = r["model_flops_timed"] / r["timed_s"]
        r["mfu_pct"] = 100 * r["model_flops_per_s"] / ceiling
        r["mfu_dense_head_pct"] = 100 * r["model_flops_timed_dense_head"] / r["timed_s"] / ceiling
    for a in BASELINES:
        if a in names and "b" in names:
            results[f"ratios_b_over_{a}"] = {
                k: results["b"][k] / results[a][k]
                for k in ("tokens_per_s", "step_time_s", "peak_rss_mb", "heldout_loss", "mfu_pct")
            }
    results["settings"] = {
        "config": args.config,
        "model": args.model,
        "data": args.data,
        "set": args.set,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_seq_len": args.max_seq_len,
        "threads": args.threads,
        "heldout": args.heldout,
        "schedule": f"in turns of {args.turn_steps} step(s)" if in_turns else "one after another",
        "cpu_count": os.cpu_count(),
        "total_wall_s": time.perf_counter() - started,
    }
    print(table(results))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results written to {out} ({results['settings']['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
