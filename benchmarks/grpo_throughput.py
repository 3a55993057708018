"""GRPO step time: TRL GRPOTrainer + PEFT vs `peftkit train` with `objective: grpo`.

Both train the same LoRA (r 16, alpha 32, dropout 0, all linear layers) with GRPO on the SAME
prompts in the same order, with the same reward function, sampling settings, loss (TRL 1.16's
default "dapo": the summed token losses over the step's answer tokens; clip epsilon 0.2; rewards
scaled by their group's std), learning rate, AdamW, clipping, seed and precision; each in its own
fresh subprocess, the two side by side taking turns one optimizer step at a time (turns.py), for
--rounds rounds (a fresh pair of processes each; the first mover alternates)::

    prompts  seeded arithmetic problems built here ("What is 37 + 48? Answer with the number only.",
             a chat prompt; the expected number in column `answer`); each step: --batch-size
             prompts x --num-generations answers of at most --max-completion-length tokens,
             temperature 1.0, top-p 1, no top-k; ONE reward function (grpo_measures.py:
             arithmetic_reward) given to both
      |
      |-- peftkit  setup + train, as `peftkit train` runs them (objective: grpo, data.format prompt,
      |            training.batch_size = prompts per step); its loop's length-grouped prompt order
      |-- trl      GRPOTrainer(model=<dir>, peft_config=LoraConfig(...)), the rows in peftkit's order,
      |            no shuffling; per_device_train_batch_size = prompts x num_generations (TRL counts
      |            answers); one generation per optimizer step; no gradient checkpointing (GRPOConfig's
      |            default is on); bf16 / fp32 as peftkit
      '-- check    both sampled from the same prompt token ids step by step (their hashes must agree)

Sampling draws differ (each framework has its own random streams), so answers, their lengths and
rewards differ: compare time per step and per generated token, not losses. Each step's phases are
timed inside each framework: generation (peftkit: `sample_answers`; TRL: `_generate`, i.e.
tokenizing the prompts, `model.generate`, decoding), scoring (the reward function), the reference
pass (beta > 0) and the rest (training forward + backward + optimizer). Timing: a timestamp after
every optimizer step on a clock that stops while a worker waits for its turn; step 1 is warm-up,
the window is step 1's end to step N's end. Peak memory: peak RSS over each worker's life.

beta: 0.0 by default, the default of both TRL 1.16's GRPOConfig and peftkit's grpo (no reference
pass); --beta 0.04 adds the KL term and each framework's reference pass (the adapter disabled).

    python benchmarks/grpo_throughput.py --steps 10 --rounds 2     # 12-25 min on a loaded 2-core CPU
    python benchmarks/grpo_throughput.py --tiny --steps 3 --rounds 1   # smoke test, seconds

One thread per framework by default (a shared 2-core machine). Writes
runs/benchmarks/grpo_throughput.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

# Helpers next to this script (benchmarks/ is on sys.path when it runs).
import side_by_side
from grpo_measures import (
    FRAMEWORKS,
    StepLog,
    arithmetic_reward,
    arithmetic_rows,
    prompts_digest,
    round_ratios,
    summarise,
    table,
    timing_summary,
)
from preference_measures import write_jsonl

REPO = Path(__file__).resolve().parent.parent
MEASURES = Path(__file__).resolve().parent / "grpo_measures.py"
DEFAULT_OUT = REPO / "runs" / "benchmarks" / "grpo_throughput.json"  # runs/ is git-ignored


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    description = __doc__.split("\n")[0]
    p = side_by_side.argument_parser(description, steps=10, rounds=2, batch_size=4, batch_unit="prompts")
    p.add_argument("--num-generations", type=int, default=4, help="answers per prompt (G)")
    p.add_argument("--max-completion-length", type=int, default=32, help="most tokens per answer")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--beta", type=float, default=0.0, help="KL weight (0: no reference pass, both defaults)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each worker")
    p.add_argument(
        "--learning-rate",
        type=float,
        default=1e-5,
        help="peak learning rate (small: both policies stay near the start, so answer lengths stay alike)",
    )
    p.add_argument(
        "--max-seq-len", type=int, default=256, help="peftkit's data.max_seq_len (prompts are short)"
    )
    p.add_argument("--seed", type=int, default=42, help="training seed (LoRA init, prompt order, sampling)")
    tiny = "a tiny random Llama (smoke test)"
    side_by_side.add_shared_options(p, out=DEFAULT_OUT, workers=list(FRAMEWORKS), tiny=tiny)
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (step 1 is warm-up, not timed)")
    if args.rounds < 1 or args.turn_steps < 1 or args.batch_size < 1:
        p.error("--rounds, --turn-steps and --batch-size must be >= 1")
    if args.num_generations < 2:
        p.error("--num-generations must be >= 2 (GRPO compares the answers to a prompt)")
    return args


# -- shared by the workers ---------------------------------------------------------------------------


def build_job(args: argparse.Namespace, output_dir: Path) -> Any:
    """The peftkit job (also what the TRL worker takes its settings and prompt order from)."""
    sections = {
        "preference": {"beta": args.beta, "epsilon": 0.2, "scale_rewards": "group"},
        "reward": {"functions": [f"{MEASURES}:arithmetic_reward"]},
        "sampling": {
            "num_generations": args.num_generations,
            "max_completion_length": args.max_completion_length,
            "temperature": args.temperature,
            "top_p": 1.0,
            "batch_size": args.batch_size * args.num_generations,  # one generate per step, as TRL
        },
    }
    return side_by_side.peftkit_job(
        args,
        output_dir,
        objective="grpo",
        data_format="auto",
        sections=sections,
        training={"log_every": 1},
        source="grpo_throughput.py",
    )


def output_layer(model: Any) -> Any:
    return model.get_base_model().get_output_embeddings()


def activation_checkpointing(model: Any) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5.x, 4.x
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def step_results(
    args: argparse.Namespace, prompts_seen: list[list[int]], log: StepLog, clock: side_by_side.StepClock
) -> dict[str, Any]:
    """What both workers report alike: the digest of the prompts sampled from (the same data?),
    the generation logits' dtype, peak memory, and each step's phases and timing."""
    return {
        "prompts_digest": prompts_digest(prompts_seen[: args.steps * args.batch_size]),
        "generation_logits_dtype": next(
            (s["generation_logits_dtype"] for s in log.steps if "generation_logits_dtype" in s), None
        ),
        "answers_per_step": args.batch_size * args.num_generations,
        **clock.peak_memory,
        **timing_summary(clock.stamps, log.steps),
    }


# -- workers ------------------------------------------------------------------------------------------


def worker_peftkit(args: argparse.Namespace) -> dict[str, Any]:
    """peftkit's own setup + train, as `peftkit train` runs them; only timers are added."""
    import peftkit.objectives.online as online
    from peftkit.train.loop import setup, train

    run = Path(args.workdir) / args.run
    job = build_job(args, run)
    session = setup(job, overwrite=True)
    task = session.task
    log = StepLog()
    prompts_seen: list[list[int]] = []
    sample = online.sample_answers

    def sampling(model: Any, tokenizer: Any, prompts: Any, *a: Any, **kw: Any) -> Any:
        prompts_seen.extend(list(p) for p in prompts)
        started = time.perf_counter()
        log.generating = True
        try:
            groups = sample(model, tokenizer, prompts, *a, **kw)
        finally:
            log.generating = False
        log.add("generate_s", time.perf_counter() - started)
        answers = [a for group in groups for a in group]
        log.add("completions", len(answers))
        log.add("completion_tokens", sum(len(a.ids) for a in answers))
        return groups

    online.sample_answers = sampling  # what OnlineTask.sample_step calls
    task.judge = log.timed("score_s", task.judge)  # instance attributes: the loop reads them
    if task.uses_reference and task.reference is not None:
        task.reference.token_logps = log.timed("reference_s", task.reference.token_logps)

    def recording(examples: Any, *a: Any, **kw: Any) -> Any:
        batch = type(task).collate(task, examples, *a, **kw)
        log.add("trained_tokens", int(batch["attention_mask"].sum()))
        return batch

    task.collate = recording
    log.watch_logits(output_layer(session.model))
    clock = side_by_side.StepClock(args, on_step=log.close)
    session.optimizer.register_step_post_hook(lambda *_: clock.step())
    clock.start()
    train(session, progress=False)
    online.sample_answers = sample
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [m for m in metrics if "loss" in m]
    rewards = [m["reward"] for m in steps if "reward" in m]
    return {
        "name": FRAMEWORKS["peftkit"],
        **side_by_side.peftkit_facts(session),
        "gradient_checkpointing": activation_checkpointing(session.model.get_base_model()),
        "losses": [m["loss"] for m in steps],
        "rewards": rewards,
        "mean_reward": sum(rewards) / len(rewards) if rewards else None,
        "metrics_generate_s": [m.get("time/generate_s") for m in steps],
        "metrics_completion_length": [m.get("completion_length") for m in steps],
        **step_results(args, prompts_seen, log, clock),
    }


def worker_trl(args: argparse.Namespace) -> dict[str, Any]:
    """TRL's GRPOTrainer with a PEFT LoRA config, handed the prompts in peftkit's order; everything
    else is TRL's own (model loading, chat template, generation, rewards, loss)."""
    import datasets
    import torch
    from trl import GRPOConfig, GRPOTrainer

    run = Path(args.workdir) / args.run
    job = build_job(args, run / "peftkit-job")
    t = job.training
    model_dir, tok, ordered = side_by_side.trl_inputs(args, job)
    rows = datasets.Dataset.from_list(
        [{"prompt": ex.prompt, "answer": ex.columns["answer"]} for ex in ordered]
    )
    g = args.num_generations
    log = StepLog()
    clock = side_by_side.StepClock(args, on_step=log.close)
    logged: dict[str, list[float]] = {"loss": [], "reward": []}
    config = GRPOConfig(
        **side_by_side.trl_config_kwargs(args, job, run),
        per_device_train_batch_size=t.batch_size * g,  # TRL counts answers, peftkit prompts
        gradient_accumulation_steps=1,
        num_generations=g,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        epsilon=job.preference.epsilon,
        scale_rewards=job.preference.scale_rewards,
        loss_type="dapo",  # TRL 1.16's default; peftkit's normalisation
        shuffle_dataset=False,  # peftkit's order, as given
    )
    callback = clock.trl_callback(logged)
    trainer = side_by_side.trl_trainer(
        GRPOTrainer, job, model_dir, config, rows, tok, callback, reward_funcs=[arithmetic_reward]
    )
    prompts_seen: list[list[int]] = []

    # Phase timers on TRL's own methods (instance attributes shadow the class's).
    trainer._generate = log.timed("generate_s", trainer._generate, generation=True)
    single_turn = trainer._generate_single_turn

    def generate_only(prompt_ids: Any, *a: Any, **kw: Any) -> Any:
        prompts_seen.extend(list(p) for p in prompt_ids[::g])  # each prompt repeated g times
        started = time.perf_counter()
        completion_ids, logprobs = single_turn(prompt_ids, *a, **kw)
        log.add("generate_only_s", time.perf_counter() - started)
        log.add("completions", len(completion_ids))
        log.add("completion_tokens", sum(len(c) for c in completion_ids))
        return completion_ids, logprobs

    trainer._generate_single_turn = generate_only
    trainer._calculate_rewards = log.timed("score_s", trainer._calculate_rewards)
    logps = trainer._get_per_token_logps_and_entropies

    def per_token_logps(*a: Any, **kw: Any) -> Any:
        if torch.is_grad_enabled():  # the policy's pass of the loss
            return logps(*a, **kw)
        started = time.perf_counter()  # without gradients: the reference pass (beta > 0)
        try:
            return logps(*a, **kw)
        finally:
            log.add("reference_s", time.perf_counter() - started)

    trainer._get_per_token_logps_and_entropies = per_token_logps
    generate_and_score = trainer._generate_and_score_completions

    def sampling_phase(inputs: Any) -> Any:
        out = generate_and_score(inputs)
        log.add("trained_tokens", int(out["prompt_mask"].sum()) + int(out["completion_mask"].sum()))
        return out

    trainer._generate_and_score_completions = sampling_phase
    log.watch_logits(output_layer(trainer.model))
    trainer.train()
    rewards = logged["reward"]
    return {
        "name": FRAMEWORKS["trl"],
        **side_by_side.trl_facts(trainer),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing)
        or activation_checkpointing(trainer.model.get_base_model()),
        "losses": logged["loss"],
        "rewards": rewards,
        "mean_reward": sum(rewards) / len(rewards) if rewards else None,
        **step_results(args, prompts_seen, log, clock),
    }


WORKERS = {"peftkit": worker_peftkit, "trl": worker_trl}


# -- driver -------------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The model, the prompts file and the precision every worker reads (workdir/settings.json)."""

    def prompts() -> dict[str, Any]:
        rows = arithmetic_rows(args.steps * args.batch_size, seed=args.seed)
        return {"train": str(write_jsonl(work / "train.jsonl", rows)), "prompts": len(rows)}

    return side_by_side.prepare_settings(args, work, prompts)


def conclude(
    args: argparse.Namespace, argv: list[str], work: Path, rounds: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rounds and their summary; no settings of its own."""
    return {"rounds": rounds, "summary": summarise(rounds)}, {}


ROUNDS = side_by_side.Rounds(
    list(FRAMEWORKS),
    same_data="prompts_digest",
    mismatch="TRL and peftkit sampled from different prompt tokens: the comparison is invalid",
    ratios=lambda r: {"ratios": round_ratios(r)},
)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    return side_by_side.run_benchmark(__file__, argv, parse_args, WORKERS, prepare, ROUNDS, conclude, table)


if __name__ == "__main__":
    main()
