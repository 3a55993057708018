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
import subprocess
import sys
from pathlib import Path
from typing import Any

# Helpers next to this script (benchmarks/ is on sys.path when it runs).
import side_by_side
from preference_measures import (
    FRAMEWORKS,
    batch_record,
    round_ratios,
    score_adapters,
    step_records,
    summarise,
    table,
    timing_summary,
    toy_pairs,
    tweet_pairs,
    write_jsonl,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "runs" / "benchmarks" / "preference_throughput.json"  # runs/ is git-ignored


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    description = __doc__.split("\n")[0]
    p = side_by_side.argument_parser(
        description, steps=20, rounds=3, batch_size=8, batch_unit="preference pairs"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads of each worker")
    p.add_argument("--learning-rate", type=float, default=2e-4, help="peak learning rate (peftkit's default)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--max-seq-len", type=int, default=128, help="prompt + completion tokens at most")
    p.add_argument("--seed", type=int, default=42, help="training seed (LoRA init, batch order)")
    p.add_argument("--heldout", type=int, default=100, help="held-out pairs scored after training")
    tiny = "a tiny random Llama on toy pairs (smoke test)"
    side_by_side.add_shared_options(p, out=DEFAULT_OUT, workers=[*FRAMEWORKS, "score"], tiny=tiny)
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (step 1 is warm-up, not timed)")
    if args.rounds < 1 or args.turn_steps < 1:
        p.error("--rounds and --turn-steps must be >= 1")
    return args


# -- shared by the workers ---------------------------------------------------------------------------


def build_job(args: argparse.Namespace, output_dir: Path) -> Any:
    """The peftkit job (also what the TRL worker takes its settings and token ids from)."""
    preference = {"beta": args.beta, "loss_type": "sigmoid", "reference": "auto"}
    return side_by_side.peftkit_job(
        args,
        output_dir,
        objective="dpo",
        data_format="preference",
        sections={"preference": preference},
        source="preference_throughput.py",
    )


def run_results(
    args: argparse.Namespace,
    run: Path,
    losses: list[float],
    records: list[tuple[str, int]],
    clock: side_by_side.StepClock,
) -> dict[str, Any]:
    """What both training workers report alike: the losses, where the adapter is saved, the digest
    of the batches trained on (the same?), peak memory, and each step's tokens and timing."""
    steps = step_records(records, args.steps)
    return {
        "losses": losses,
        "final_train_loss": losses[-1] if losses else None,
        "adapter_dir": str(run / "adapter"),
        "batches_digest": steps["batches_digest"],
        **clock.peak_memory,
        **timing_summary(clock.stamps, steps["step_tokens"]),
    }


# -- workers ------------------------------------------------------------------------------------------


def worker_peftkit(args: argparse.Namespace) -> dict[str, Any]:
    """peftkit's own setup + train, as `peftkit train` runs them; only timestamps are added."""
    from peftkit.train.loop import setup, train

    run = Path(args.workdir) / args.run
    job = build_job(args, run)
    session = setup(job, overwrite=True)
    task = session.task
    records: list[tuple[str, int]] = []

    def recording(examples: Any, *a: Any, **kw: Any) -> Any:
        batch = type(task).collate(task, examples, *a, **kw)
        records.append(batch_record(batch["input_ids"], batch["attention_mask"]))
        return batch

    task.collate = recording  # an instance attribute: the loop reads task.collate
    clock = side_by_side.StepClock(args)  # peak memory before saving
    session.optimizer.register_step_post_hook(lambda *_: clock.step())
    clock.start()
    train(session, progress=False)
    del task.collate
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    return {
        "name": FRAMEWORKS["peftkit"],
        **side_by_side.peftkit_facts(session),
        **run_results(args, run, losses, records, clock),
    }


def worker_trl(args: argparse.Namespace) -> dict[str, Any]:
    """TRL's DPOTrainer with a PEFT LoRA config, handed peftkit's tokenized pairs in peftkit's
    batch order; everything else is TRL's own (model loading, collator, loss, reference pass)."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    run = Path(args.workdir) / args.run
    job = build_job(args, run / "peftkit-job")
    t = job.training
    model_dir, tok, ordered = side_by_side.trl_inputs(args, job)
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

    clock = side_by_side.StepClock(args)  # peak memory before saving
    logged: dict[str, list[float]] = {"loss": []}
    config = DPOConfig(
        **side_by_side.trl_config_kwargs(args, job, run),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        train_sampling_strategy="sequential",
        beta=job.preference.beta_for("dpo"),
        loss_type=["sigmoid"],
        max_length=job.data.max_seq_len,
        truncation_mode="keep_start",
        precompute_ref_log_probs=False,
    )
    trainer = side_by_side.trl_trainer(
        Pretokenized, job, model_dir, config, rows, tok, clock.trl_callback(logged)
    )
    records: list[tuple[str, int]] = []
    collator = trainer.data_collator

    def recording(examples: list[dict]) -> dict:
        batch = collator(examples)
        records.append(batch_record(batch["input_ids"], batch["attention_mask"]))
        return batch

    trainer.data_collator = recording
    trainer.train()
    trainer.model.save_pretrained(run / "adapter")
    return {
        "name": FRAMEWORKS["trl"],
        **side_by_side.trl_facts(trainer),
        **run_results(args, run, logged["loss"], records, clock),
    }


def worker_score(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    s = side_by_side.settings(args)
    rows = [json.loads(x) for x in Path(s["heldout"]).read_text().splitlines() if x.strip()]
    adapters = {name: Path(args.workdir) / args.run / name / "adapter" for name in FRAMEWORKS}
    return score_adapters(s["base_model"], rows, adapters, beta=args.beta, max_seq_len=args.max_seq_len)


WORKERS = {"peftkit": worker_peftkit, "trl": worker_trl, "score": worker_score}


# -- driver -------------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The model, the data files and the precision every worker reads (workdir/settings.json)."""

    def pairs() -> dict[str, Any]:
        n_train = args.steps * args.batch_size
        train, heldout = (toy_pairs if args.tiny else tweet_pairs)(n_train, args.heldout)
        return {
            "train": str(write_jsonl(work / "train.jsonl", train)),
            "heldout": str(write_jsonl(work / "heldout.jsonl", heldout)),
            "train_pairs": len(train),
            "heldout_pairs": len(heldout),
        }

    return side_by_side.prepare_settings(args, work, pairs)


def conclude(
    args: argparse.Namespace, argv: list[str], work: Path, rounds: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The last round's adapters scored on the held-out pairs, in a worker of their own; the rounds
    (less their adapters' paths), the score and the summary; the scored round as a setting."""
    last = f"round{args.rounds - 1}"
    print(f"[preference_throughput] scoring the {last} adapters ...", file=sys.stderr)
    if subprocess.run(side_by_side.worker_argv(__file__, argv, "score", work, last)).returncode != 0:
        raise SystemExit("[preference_throughput] the score worker failed (its traceback is above)")
    score = json.loads((work / last / "result.json").read_text())
    for r in rounds:
        for name in FRAMEWORKS:
            r[name].pop("adapter_dir")  # in the work dir, gone with it
    results = {"rounds": rounds, "score": score, "summary": summarise(rounds, score)}
    return results, {"scored_round": args.rounds}


ROUNDS = side_by_side.Rounds(
    list(FRAMEWORKS),
    same_data="batches_digest",
    mismatch="TRL and peftkit trained on different batches: the comparison is invalid",
    ratios=round_ratios,
)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    return side_by_side.run_benchmark(__file__, argv, parse_args, WORKERS, prepare, ROUNDS, conclude, table)


if __name__ == "__main__":
    main()
