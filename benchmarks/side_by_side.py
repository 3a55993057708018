"""What the peftkit-vs-TRL benchmarks run side by side share (preference_throughput.py,
grpo_throughput.py): the driver, the options every one of them takes, and the parts of their
workers that do not depend on the objective (train_throughput.py takes peftkit's schedule too).

    driver   run_benchmark: a temporary work dir, the benchmark's prepare (model, data files,
             workdir/settings.json), --rounds rounds, its conclusion (summary, ...), its table,
             the results JSON with the settings, load average, CPU count and total wall time
      |-- run_round  each framework in a fresh worker process (worker_argv), the workers taking
      |              turns (turns.py), the first mover alternating by round; load average and wall
      |              time; each worker's result.json; all must have trained on the same data
      '-- worker     the same script with --worker NAME: its WORKERS[NAME](args) -> result.json
    workers  peftkit_job (the job both frameworks take their settings from), StepClock (a
             timestamp per optimizer step on the turn clock, peak memory), trl_inputs (the TRL
             worker's model, tokenizer and peftkit's example order), trl_config_kwargs and
             trl_trainer (TRL set to match peftkit: optimizer, schedule, LoRA, precision, attention)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loss_parity import hf_training_kwargs, make_tiny, no_activation_checkpointing, write_results
from preference_measures import PeakMemory
from turns import Turn, run_in_turns

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # set before the benchmarks load tokenizers

HIDDEN = ("worker", "workdir", "run", "turn_fds", "out")  # options that are not settings
# loss_parity.py's Trainer settings that are peftkit's optimizer: AdamW, its betas / eps / weight
# decay, clipping; fused as peftkit's AdamW(fused=True) on CPU, the same update rule
OPTIMIZER_KWARGS = (
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "optim",
)


# -- options ------------------------------------------------------------------------------------------


def argument_parser(
    description: str, *, steps: int, rounds: int, batch_size: int, batch_unit: str
) -> argparse.ArgumentParser:
    """A benchmark's parser with the options every one of them starts with (the settings in the
    results keep the options' order): --steps, --rounds, --batch-size (``batch_unit`` per step)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--steps", type=int, default=steps, help="optimizer steps per run (>= 2; step 1 is warm-up)"
    )
    p.add_argument(
        "--rounds", type=int, default=rounds, help="fresh pairs of worker processes, one after another"
    )
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"{batch_unit} per optimizer step")
    return p


def add_shared_options(p: argparse.ArgumentParser, *, out: Path, workers: list[str], tiny: str) -> None:
    """The options every side-by-side benchmark ends with (after its own); ``workers``: what
    --worker may name, ``tiny``: --tiny's help."""
    precision = "both frameworks: auto = bf16 where the CPU has native bf16, else fp32"
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help=precision)
    attention = (
        "TRL's attention kernel: peftkit = the one peftkit picks (eager on CPU); sdpa = transformers' default"
    )
    p.add_argument("--trl-attention", choices=["peftkit", "sdpa", "eager"], default="peftkit", help=attention)
    p.add_argument("--turn-steps", type=int, default=1, help="optimizer steps per turn")
    p.add_argument("--tiny", action="store_true", help=tiny)
    p.add_argument("--out", default=str(out), help="JSON results file")
    p.add_argument("--worker", choices=workers, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)  # the worker's directory under --workdir
    p.add_argument("--turn-fds", help=argparse.SUPPRESS)


# -- shared by the workers ---------------------------------------------------------------------------


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the driver prepared (workdir/settings.json): model, data files, precision."""
    return json.loads((Path(args.workdir) / "settings.json").read_text())


def peftkit_job(
    args: argparse.Namespace,
    output_dir: Path,
    *,
    objective: str,
    data_format: str,
    sections: dict[str, Any],
    training: dict[str, Any] | None = None,
    source: str,
) -> Any:
    """The peftkit job of a run (also what the TRL worker takes its settings and data from): the
    same LoRA (r 16, alpha 32, dropout 0, all linear layers) for every benchmark, ``objective``
    with its ``sections`` (preference, reward, sampling), the prepared data and precision, the
    options' steps, batch size, learning rate, seed and threads (and ``training``'s own), no
    evaluation, nothing saved during training."""
    from peftkit.train.config import build_job_config

    s = settings(args)
    raw = {
        "base_model": s["base_model"],
        "objective": objective,
        **sections,
        "method": "lora",
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": s["train"], "format": data_format, "max_seq_len": args.max_seq_len},
        "training": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "seed": args.seed,
            "precision": s["precision"],
            "num_threads": args.threads,
            **(training or {}),
            "eval_every": None,
            "save_every": None,
        },
        "evaluation": {"accuracy_before": False, "accuracy_after": False},
        "output_dir": str(output_dir),
    }
    return build_job_config(raw, source=source)


class StepClock:
    """A worker's optimizer steps: a timestamp after each on the turn clock (time spent waiting for
    a turn left out), and the peak memory once the last step is done (``peak_memory``: before any
    saving). ``on_step`` runs right after each timestamp."""

    def __init__(self, args: argparse.Namespace, on_step: Callable[[], None] | None = None):
        self.steps = args.steps
        self.turn = Turn(args.turn_fds, args.turn_steps)
        self.memory = PeakMemory()
        self.on_step = on_step
        self.stamps: list[float] = []
        self.peak_memory: dict[str, Any] = {}

    def start(self) -> None:
        """Training is about to start: wait for the first turn, then measure memory from here."""
        self.turn.ready()
        self.memory.start()

    def step(self, number: int | None = None) -> None:
        """After optimizer step ``number`` (default: the count of steps so far)."""
        self.stamps.append(self.turn.clock())
        if self.on_step is not None:
            self.on_step()
        number = len(self.stamps) if number is None else number
        if number == self.steps:
            self.peak_memory.update(self.memory.result())
        self.turn.after_step(number, self.steps)

    def trl_callback(self, logged: dict[str, list[float]]) -> Any:
        """A TrainerCallback that starts and steps this clock, and appends every logged value of
        ``logged``'s keys (e.g. "loss") to its list."""
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_train_begin(self, *_: Any, **__: Any) -> None:
                clock.start()

            def on_step_end(self, _args: Any, state: Any, *_: Any, **__: Any) -> None:
                clock.step(state.global_step)

            def on_log(self, _a: Any, _s: Any, _c: Any, logs: Any = None, **__: Any) -> None:
                for key, values in logged.items():
                    if logs and key in logs:
                        values.append(float(logs[key]))

        return Clock()


def peftkit_facts(session: Any) -> dict[str, Any]:
    """What peftkit's training session ran with: precision, attention kernel, optimizer."""
    return {
        "bf16": session.autocast_dtype is not None,
        "attention": session.model.get_base_model().config._attn_implementation,
        "optimizer": type(session.optimizer).__name__,
    }


def trl_facts(trainer: Any) -> dict[str, Any]:
    """What the TRL trainer ran with, as peftkit_facts."""
    optim = trainer.args.optim
    return {
        "bf16": bool(trainer.args.bf16),
        "attention": trainer.model.get_base_model().config._attn_implementation,
        "optimizer": optim if isinstance(optim, str) else optim.value,
    }


def trl_inputs(args: argparse.Namespace, job: Any) -> tuple[Path, Any, list[Any]]:
    """What the TRL worker takes from peftkit, once its torch threads are set to --threads: the
    model directory, the tokenizer, and the examples of the first --steps step batches in
    peftkit's loop order (its seeded, length-grouped MicroBatchStream), which TRL is then handed
    in order, unshuffled."""
    import torch
    from transformers import AutoTokenizer

    from peftkit.data import build_datasets
    from peftkit.models import ensure_pad_token, resolve_model_dir
    from peftkit.tasks import get_task
    from peftkit.train.batching import MicroBatchStream

    torch.set_num_threads(args.threads)
    t = job.training
    model_dir = resolve_model_dir(job.base_model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ensure_pad_token(tok)  # what peftkit's loader does: the same pad id on both sides
    task = get_task(job.task, job.objective, job.preference, job)
    task.prepare(job.data)
    data = build_datasets(job.data, tok, seed=t.seed, task=task)
    stream = MicroBatchStream(data.train, t.batch_size, seed=t.seed, group_by_length=t.group_by_length)
    ordered = [ex for step in range(args.steps) for ex in stream.get(step)]
    if len(ordered) != args.steps * t.batch_size:
        raise SystemExit("a step batch is short (epoch end): the sequential batches would shift")
    return model_dir, tok, ordered


def with_peftkit_schedule(trainer_class: type, training: Any) -> type:
    """``trainer_class`` on peftkit's warm-up + cosine of job section ``training`` (HF's warm-up
    starts at lr 0, peftkit's at peak / warmup)."""
    import torch

    from peftkit.train.schedule import lr_multiplier, warmup_steps

    t = training

    class PeftkitSchedule(trainer_class):
        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
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

    return PeftkitSchedule


def trl_trainer(
    trainer_class: type, job: Any, model_dir: Path, config: Any, rows: Any, tok: Any, callback: Any, **kw: Any
) -> Any:
    """``trainer_class`` (a TRL trainer) on peftkit's schedule, loading the model itself from
    ``model_dir`` with the job's LoRA (rank, alpha, dropout, target modules) as a PEFT config,
    given ``config``, ``rows`` in order, ``tok`` and ``callback`` (StepClock.trl_callback); ``kw``:
    the trainer's own arguments."""
    from peft import LoraConfig
    from transformers import PrinterCallback

    lc = job.method_config
    lora = {k: getattr(lc, k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
    trainer = with_peftkit_schedule(trainer_class, job.training)(
        model=str(model_dir),
        args=config,
        train_dataset=rows,
        processing_class=tok,
        peft_config=LoraConfig(**lora, task_type="CAUSAL_LM"),
        callbacks=[callback],
        **kw,
    )
    trainer.remove_callback(PrinterCallback)  # one dict per step on stdout
    return trainer


def trl_config_kwargs(args: argparse.Namespace, job: Any, run: Path) -> dict[str, Any]:
    """The TRL config settings that do not depend on the objective: peftkit's optimizer, precision,
    seed and attention kernel, no gradient checkpointing, a quiet CPU run that saves nothing."""
    import torch

    from peftkit.models import default_attention

    t = job.training
    attention = args.trl_attention
    if attention == "peftkit":
        attention = t.attention if t.attention != "auto" else default_attention(torch.device("cpu"))
    bf16 = settings(args)["precision"] == "bf16"
    hf = hf_training_kwargs(args, job, args.steps, bf16, str(run))
    return {
        "output_dir": str(run),
        "max_steps": args.steps,
        **{k: hf[k] for k in OPTIMIZER_KWARGS},
        "bf16": bf16,
        "seed": t.seed,
        **no_activation_checkpointing(),  # TRL checkpoints by default; peftkit does not
        "model_init_kwargs": {"dtype": "float32", "attn_implementation": attention},
        "report_to": [],
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 1,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "use_cpu": True,
    }


# -- driver -------------------------------------------------------------------------------------------


def prepare_settings(
    args: argparse.Namespace, work: Path, data: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """The model, the data files (``data()`` writes them and says where) and the precision every
    worker reads (workdir/settings.json)."""
    from peftkit.models import bf16_supported, resolve_model_dir

    if args.tiny:
        make_tiny(work / "tiny")  # the tiny random Llama with a ChatML template
        base_model = str(work / "tiny" / "tiny-llama")
    else:
        base_model = "smollm2-135m-instruct"  # peftkit's default base_model
        resolve_model_dir(base_model)  # unpacked once, here, not by both workers at once
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if bf16_supported("cpu") else "fp32"
    s = {"base_model": base_model, **data(), "precision": precision, "bf16_native": bf16_supported("cpu")}
    (work / "settings.json").write_text(json.dumps(s, indent=2))
    return s


@dataclass(frozen=True)
class Rounds:
    """How a benchmark's rounds run and are checked: ``frameworks``, one worker each (in this order
    in the first round, reversed in the second, ...); ``same_data``, the key of their results that
    must agree (a digest of what they trained on), else SystemExit(``mismatch``); ``ratios(round)``,
    the entries the benchmark adds to a round."""

    frameworks: list[str]
    same_data: str
    mismatch: str
    ratios: Callable[[dict[str, Any]], dict[str, Any]]


def worker_argv(script: str, argv: list[str], name: str, work: Path, run: str) -> list[str]:
    """The command of worker ``name`` of ``script`` (the benchmark's own file), in ``work / run``."""
    return [sys.executable, script, *argv, "--worker", name, "--workdir", str(work), "--run", run]


def run_round(script: str, argv: list[str], work: Path, index: int, rounds: Rounds) -> dict[str, Any]:
    """Every framework in a fresh process, taking turns; the first mover alternates by round."""
    frameworks = rounds.frameworks
    order = list(frameworks) if index % 2 == 0 else list(reversed(frameworks))
    label = Path(script).stem
    print(f"[{label}] round {index + 1}: {' / '.join(order)} in turns ...", file=sys.stderr)
    load_before = os.getloadavg()
    started = time.perf_counter()

    def command(name: str) -> Any:
        return lambda fds: [*worker_argv(script, argv, name, work, f"round{index}/{name}"), "--turn-fds", fds]

    run_in_turns({name: command(name) for name in order})
    out: dict[str, Any] = {
        "first": order[0],
        "wall_s": time.perf_counter() - started,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    for name in frameworks:
        out[name] = json.loads((work / f"round{index}" / name / "result.json").read_text())
    if len({out[name][rounds.same_data] for name in frameworks}) > 1:
        raise SystemExit(rounds.mismatch)
    out.update(rounds.ratios(out))
    return out


def run_benchmark(
    script: str,
    argv: list[str] | None,
    parse_args: Callable[[list[str]], argparse.Namespace],
    workers: dict[str, Callable[[argparse.Namespace], dict[str, Any]]],
    prepare: Callable[[argparse.Namespace, Path], dict[str, Any]],
    rounds_of: Rounds,
    conclude: Callable[..., tuple[dict[str, Any], dict[str, Any]]],
    table: Callable[[dict[str, Any]], str],
) -> dict[str, Any] | None:
    """The main of benchmark ``script`` (its __file__). As a worker (--worker NAME):
    ``workers[NAME](args)`` to its result.json. As the driver: ``prepare(args, work)``, --rounds
    rounds (run_round), then ``conclude(args, argv, work, rounds)`` -> (the results but their
    settings, settings of its own); prints ``table(results)`` and writes the results to --out."""
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)
    if args.worker:
        result = workers[args.worker](args)
        out = Path(args.workdir) / args.run / "result.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        return None
    label = Path(script).stem
    started = time.perf_counter()
    loadavg_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix=f"{label}-") as tmp:
        work = Path(tmp)
        prepared = prepare(args, work)
        rounds = [run_round(script, raw_argv, work, i, rounds_of) for i in range(args.rounds)]
        results, own_settings = conclude(args, raw_argv, work, rounds)
    results["settings"] = {
        **{k: v for k, v in vars(args).items() if k not in HIDDEN},
        **prepared,
        **own_settings,
        "cpu_count": os.cpu_count(),
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg(),
        "total_wall_s": time.perf_counter() - started,
    }
    print(table(results))
    out = Path(args.out)
    write_results(out, results)
    print(f"results written to {out} ({results['settings']['total_wall_s']:.0f} s)")
    return results
