"""DPO training throughput: TRL DPOTrainer + PEFT vs `peftkit train` with `objective: dpo`.

Both train the same LoRA (r 16, alpha 32, dropout 0, all linear layers) with DPO (sigmoid loss,
beta 0.1, the reference = the base with the adapter disabled) on the SAME batches of the SAME
token ids in the same order, with the same learning rate and schedule, AdamW, clipping, seed and
precision; each in its own fresh subprocess, the two side by side taking turns one optimizer step
at a time (turns.py), for --rounds rounds (a fresh pair of processes each; the first mover
alternates)::

    pairs   built here from the built-in labelled tweets (CSV: sentiment, text): prompt = the tweet
            under the SFT built-in's system prompt, chosen = its label, rejected = one of the two
            wrong labels (alternating); training and held-out rows disjoint
      |
      |-- peftkit  setup + train, as `peftkit train` runs them (objective: dpo, format preference,
      |            chat template); its loop's length-grouped batch order
      |-- trl      DPOTrainer(model=<dir>, peft_config=LoraConfig(...)), handed peftkit's token ids
      |            (prompt_ids / chosen_ids / rejected_ids) in that batch order, sequential sampler,
      |            its own collator (right padding, max_length = max_seq_len), no gradient
      |            checkpointing (DPOConfig's default is on), matching bf16 / fp32
      '-- score    ONE function for both saved adapters: loaded by peftkit onto the same fp32 base,
                   merged; held-out preference accuracy = share of pairs whose implicit reward
                   margin beta * [(policy - base)(chosen) - (policy - base)(rejected)] is > 0

Tokens: real (non-pad) tokens of the chosen + rejected rows of each optimizer step, counted from
the collated batches both frameworks really trained on (their hashes must agree). Timing: a
timestamp after every optimizer step on a clock that stops while a worker waits for its turn;
step 1 is warm-up, the window is step 1's end to step N's end. Peak memory: peak RSS of each
worker process over its life (``ru_maxrss``), and since training started (VmHWM reset then).

Precision: bf16 for both where the CPU has native bf16 (TRL: bf16=True, fp32 weights under
autocast; peftkit: its bf16, frozen weights stored in bf16), else fp32 for both.

    python benchmarks/preference_throughput.py --steps 20 --rounds 2    # 22 min on a loaded 2-core CPU
    python benchmarks/preference_throughput.py --tiny --steps 3 --rounds 1  # smoke test, seconds

One thread per framework by default (a shared 2-core machine, as loss_parity.py). Writes
runs/benchmarks/preference_throughput.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Helpers next to this script (benchmarks/ is on sys.path when it runs).
from preference_measures import (
    FRAMEWORKS,
    PeakMemory,
    batch_record,
    score_adapters,
    step_records,
    summarise,
    table,
    timing_summary,
    toy_pairs,
    tweet_pairs,
    write_jsonl,
)
from turns import Turn, run_in_turns

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "runs" / "benchmarks" / "preference_throughput.json"  # runs/ is git-ignored
HIDDEN = ("worker", "workdir", "run", "turn_fds", "out")  # options that are not settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (>= 2; step 1 is warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="fresh pairs of worker processes, one after another")
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per optimizer step")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each worker")
    p.add_argument("--learning-rate", type=float, default=2e-4, help="peak learning rate (peftkit's default)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--max-seq-len", type=int, default=128, help="prompt + completion tokens at most")
    p.add_argument("--seed", type=int, default=42, help="training seed (LoRA init, batch order)")
    p.add_argument("--heldout", type=int, default=100, help="held-out pairs scored after training")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="both frameworks: auto = bf16 where the CPU has native bf16, else fp32",
    )
    p.add_argument(
        "--trl-attention",
        choices=["peftkit", "sdpa", "eager"],
        default="peftkit",
        help="TRL's attention kernel: peftkit = the one peftkit picks (eager on CPU); sdpa = transformers' default",
    )
    p.add_argument("--turn-steps", type=int, default=1, help="optimizer steps per turn")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama on toy pairs (smoke test)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results file")
    p.add_argument("--worker", choices=[*FRAMEWORKS, "score"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)  # the worker's directory under --workdir
    p.add_argument("--turn-fds", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (step 1 is warm-up, not timed)")
    if args.rounds < 1 or args.turn_steps < 1:
        p.error("--rounds and --turn-steps must be >= 1")
    return args


# -- shared by the workers ---------------------------------------------------------------------------


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the driver prepared (workdir/settings.json): model, data files, precision."""
    return json.loads((Path(args.workdir) / "settings.json").read_text())


def build_job(args: argparse.Namespace, output_dir: Path) -> Any:
    """The peftkit job (also what the TRL worker takes its settings and token ids from)."""
    from peftkit.train.config import build_job_config

    s = settings(args)
    raw = {
        "base_model": s["base_model"],
        "objective": "dpo",
        "preference": {"beta": args.beta, "loss_type": "sigmoid", "reference": "auto"},
        "method": "lora",
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": s["train"], "format": "preference", "max_seq_len": args.max_seq_len},
        "training": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "seed": args.seed,
            "precision": s["precision"],
            "num_threads": args.threads,
            "eval_every": None,
            "save_every": None,
        },
        "evaluation": {"accuracy_before": False, "accuracy_after": False},
        "output_dir": str(output_dir),
    }
    return build_job_config(raw, source="preference_throughput.py")


# -- workers ------------------------------------------------------------------------------------------


def worker_peftkit(args: argparse.Namespace) -> dict[str, Any]:
    """peftkit's own setup + train, as `peftkit train` runs them; only timestamps are added."""
    from peftkit.train.loop import setup, train

    run = Path(args.workdir) / args.run
    job = build_job(args, run)
    memory = PeakMemory()
    session = setup(job, overwrite=True)
    task = session.task
    records: list[tuple[str, int]] = []

    def recording(examples: Any, *a: Any, **kw: Any) -> Any:
        batch = type(task).collate(task, examples, *a, **kw)
        records.append(batch_record(batch["input_ids"], batch["attention_mask"]))
        return batch

    task.collate = recording  # an instance attribute: the loop reads task.collate
    stamps: list[float] = []
    turn = Turn(args.turn_fds, args.turn_steps)
    result: dict[str, Any] = {}

    def clock(*_: Any) -> None:
        stamps.append(turn.clock())
        if len(stamps) == args.steps:
            result.update(memory.result())  # before saving
        turn.after_step(len(stamps), args.steps)

    session.optimizer.register_step_post_hook(clock)
    turn.ready()
    memory.start()
    train(session, progress=False)
    del task.collate
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    steps = step_records(records, args.steps)
    return {
        "name": FRAMEWORKS["peftkit"],
        "bf16": session.autocast_dtype is not None,
        "attention": session.model.get_base_model().config._attn_implementation,
        "optimizer": type(session.optimizer).__name__,
        "losses": losses,
        "final_train_loss": losses[-1] if losses else None,
        "adapter_dir": str(run / "adapter"),
        "batches_digest": steps["batches_digest"],
        **result,
        **timing_summary(stamps, steps["step_tokens"]),
    }


def worker_trl(args: argparse.Namespace) -> dict[str, Any]:
    """TRL's DPOTrainer with a PEFT LoRA config, handed peftkit's tokenized pairs in peftkit's
    batch order; everything else is TRL's own (model loading, collator, loss, reference pass)."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from peftkit.data import build_datasets
    from peftkit.models import default_attention, ensure_pad_token, resolve_model_dir
    from peftkit.tasks import get_task
    from peftkit.train.batching import MicroBatchStream
    from peftkit.train.schedule import lr_multiplier, warmup_steps

    torch.set_num_threads(args.threads)
    run = Path(args.workdir) / args.run
    memory = PeakMemory()
    job = build_job(args, run / "peftkit-job")
    t = job.training
    model_dir = resolve_model_dir(job.base_model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ensure_pad_token(tok)  # what peftkit's loader does: the same pad id on both sides
    task = get_task(job.task, job.objective, job.preference)
    task.prepare(job.data)
    data = build_datasets(job.data, tok, seed=t.seed, task=task)
    stream = MicroBatchStream(data.train, t.batch_size, seed=t.seed, group_by_length=t.group_by_length)
    ordered = [ex for step in range(args.steps) for ex in stream.get(step)]
    if len(ordered) != args.steps * t.batch_size:
        raise SystemExit("a step batch is short (epoch end): the sequential batches would shift")
    rows = datasets.Dataset.from_dict(
        {
            "prompt_ids": [ex.prompt_ids for ex in ordered],
            "chosen_ids": [ex.chosen_ids for ex in ordered],
            "rejected_ids": [ex.rejected_ids for ex in ordered],
        }
    )

    class Pretokenized(DPOTrainer):
        """Takes the rows as tokenized (TRL's own tokenization would add the newline after each
        completion's end-of-turn token, which peftkit leaves out)."""

        def _prepare_dataset(self, dataset: Any, *_: Any, **__: Any) -> Any:
            return dataset

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            """peftkit's warm-up + cosine (HF's warm-up starts at lr 0, peftkit's at peak / warmup)."""
            if self.lr_scheduler is None:
                warm = warmup_steps(t, num_training_steps)
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer,
                    lambda s: lr_multiplier(
                        s,
                        total=num_training_steps,
                        warmup=warm,
                        kind=t.lr_scheduler,
                        min_ratio=t.min_lr_ratio,
                    ),
                )
            return self.lr_scheduler

    stamps: list[float] = []
    losses: list[float] = []
    result: dict[str, Any] = {}
    turn = Turn(args.turn_fds, args.turn_steps)

    class Clock(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            turn.ready()
            memory.start()

        def on_step_end(self, _args: Any, state: Any, *_: Any, **__: Any) -> None:
            stamps.append(turn.clock())
            if state.global_step == args.steps:
                result.update(memory.result())  # before saving
            turn.after_step(state.global_step, args.steps)

        def on_log(self, _a: Any, _s: Any, _c: Any, logs: Any = None, **__: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    attention = args.trl_attention
    if attention == "peftkit":
        attention = t.attention if t.attention != "auto" else default_attention(torch.device("cpu"))
    bf16 = settings(args)["precision"] == "bf16"
    config = DPOConfig(
        output_dir=str(run),
        max_steps=args.steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_betas[0],
        adam_beta2=t.adam_betas[1],
        adam_epsilon=t.adam_eps,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm is not None else 0.0,
        optim="adamw_torch_fused",  # peftkit's AdamW(fused=True) on CPU: the same update rule
        bf16=bf16,
        seed=t.seed,
        train_sampling_strategy="sequential",
        activation_checkpointing=False,  # TRL defaults gradient_checkpointing to True; peftkit does not checkpoint
        beta=job.preference.beta_for("dpo"),
        loss_type=["sigmoid"],
        max_length=job.data.max_seq_len,
        truncation_mode="keep_start",
        precompute_ref_log_probs=False,
        model_init_kwargs={"dtype": "float32", "attn_implementation": attention},
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=True,
    )
    lc = job.method_config
    trainer = Pretokenized(
        model=str(model_dir),
        args=config,
        train_dataset=rows,
        processing_class=tok,
        peft_config=LoraConfig(
            r=lc.r,
            lora_alpha=lc.lora_alpha,
            lora_dropout=lc.lora_dropout,
            target_modules=lc.target_modules,
            task_type="CAUSAL_LM",
        ),
        callbacks=[Clock()],
    )
    trainer.remove_callback(PrinterCallback)  # one dict per step on stdout
    records: list[tuple[str, int]] = []
    collator = trainer.data_collator

    def recording(examples: list[dict]) -> dict:
        batch = collator(examples)
        records.append(batch_record(batch["input_ids"], batch["attention_mask"]))
        return batch

    trainer.data_collator = recording
    trainer.train()
    trainer.model.save_pretrained(run / "adapter")
    steps = step_records(records, args.steps)
    return {
        "name": FRAMEWORKS["trl"],
        "bf16": bool(trainer.args.bf16),
        "attention": trainer.model.get_base_model().config._attn_implementation,
        "optimizer": config.optim if isinstance(config.optim, str) else config.optim.value,
        "losses": losses,
        "final_train_loss": losses[-1] if losses else None,
        "adapter_dir": str(run / "adapter"),
        "batches_digest": steps["batches_digest"],
        **result,
        **timing_summary(stamps, steps["step_tokens"]),
    }


def worker_score(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    s = settings(args)
    rows = [json.loads(x) for x in Path(s["heldout"]).read_text().splitlines() if x.strip()]
    adapters = {name: Path(args.workdir) / args.run / name / "adapter" for name in FRAMEWORKS}
    return score_adapters(s["base_model"], rows, adapters, beta=args.beta, max_seq_len=args.max_seq_len)


WORKERS = {"peftkit": worker_peftkit, "trl": worker_trl, "score": worker_score}


# -- driver -------------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The model, the data files and the precision every worker reads (workdir/settings.json)."""
    from peftkit.models import bf16_supported, resolve_model_dir

    n_train = args.steps * args.batch_size
    if args.tiny:
        from loss_parity import make_tiny  # the tiny random Llama with a ChatML template

        make_tiny(work / "tiny")
        base_model = str(work / "tiny" / "tiny-llama")
        train, heldout = toy_pairs(n_train, args.heldout)
    else:
        base_model = "smollm2-135m-instruct"  # peftkit's default base_model
        resolve_model_dir(base_model)  # unpacked once, here, not by both workers at once
        train, heldout = tweet_pairs(n_train, args.heldout)
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if bf16_supported("cpu") else "fp32"
    s = {
        "base_model": base_model,
        "train": str(write_jsonl(work / "train.jsonl", train)),
        "heldout": str(write_jsonl(work / "heldout.jsonl", heldout)),
        "train_pairs": len(train),
        "heldout_pairs": len(heldout),
        "precision": precision,
        "bf16_native": bf16_supported("cpu"),
    }
    (work / "settings.json").write_text(json.dumps(s, indent=2))
    return s


def worker_argv(argv: list[str], name: str, work: Path, run: str) -> list[str]:
    return [sys.executable, __file__, *argv, "--worker", name, "--workdir", str(work), "--run", run]


def run_round(argv: list[str], work: Path, index: int) -> dict[str, Any]:
    """Both frameworks in fresh processes, taking turns; the first mover alternates by round."""
    order = list(FRAMEWORKS) if index % 2 == 0 else list(reversed(FRAMEWORKS))
    print(f"[preference_throughput] round {index + 1}: {' / '.join(order)} in turns ...", file=sys.stderr)
    load_before = os.getloadavg()
    started = time.perf_counter()

    def command(name: str) -> Any:
        return lambda fds: [*worker_argv(argv, name, work, f"round{index}/{name}"), "--turn-fds", fds]

    run_in_turns({name: command(name) for name in order})
    out: dict[str, Any] = {
        "first": order[0],
        "wall_s": time.perf_counter() - started,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    for name in FRAMEWORKS:
        out[name] = json.loads((work / f"round{index}" / name / "result.json").read_text())
    if out["trl"]["batches_digest"] != out["peftkit"]["batches_digest"]:
        raise SystemExit("TRL and peftkit trained on different batches: the comparison is invalid")
    for key in ("tokens_per_s", "peak_rss_mb", "train_peak_rss_mb", "step_time_s"):
        if out["trl"].get(key) and out["peftkit"].get(key) is not None:
            out[f"ratio_{key}"] = out["peftkit"][key] / out["trl"][key]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)
    if args.worker:
        result = WORKERS[args.worker](args)
        out = Path(args.workdir) / args.run / ("score.json" if args.worker == "score" else "result.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        return None
    started = time.perf_counter()
    loadavg_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="preference_throughput-") as tmp:
        work = Path(tmp)
        prepared = prepare(args, work)
        rounds = [run_round(raw_argv, work, i) for i in range(args.rounds)]
        last = f"round{args.rounds - 1}"
        print(f"[preference_throughput] scoring the {last} adapters ...", file=sys.stderr)
        if subprocess.run(worker_argv(raw_argv, "score", work, last)).returncode != 0:
            raise SystemExit("[preference_throughput] the score worker failed (its traceback is above)")
        score = json.loads((work / last / "score.json").read_text())
    for r in rounds:
        for name in FRAMEWORKS:
            r[name].pop("adapter_dir")
    results = {
        "rounds": rounds,
        "score": score,
        "summary": summarise(rounds, score),
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in HIDDEN},
            **prepared,
            "scored_round": args.rounds,
            "cpu_count": os.cpu_count(),
            "loadavg_start": loadavg_start,
            "loadavg_end": os.getloadavg(),
            "total_wall_s": time.perf_counter() - started,
        },
    }
    print(table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results written to {out} ({results['settings']['total_wall_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
