"""Held-out loss parity: peftkit vs transformers Trainer + PEFT vs TRL SFTTrainer on identical batches.

Every framework trains the default job's LoRA (rank, alpha, targets, dropout, learning rate, warm-up
and schedule, batch size, gradient accumulation, AdamW betas / eps / weight decay, clipping) from
the SAME initial adapter on the SAME batches in the same order, so any difference in held-out loss
comes from what the frameworks compute, not from data order or init::

    job (examples/tweet-sentiment-lora.yaml + --set)    built once per (seed, steps, precision)
      |
      |-- peftkit  run_training's setup + train, as `peftkit train` runs them; its initial LoRA A/B
      |            are kept, and every batch its loop collates is hashed
      |
      |-- batches  micro-batches 0..steps*accum-1 of peftkit's MicroBatchStream (its seeded,
      |            length-grouped order), collated ONCE by peftkit's collate (same input_ids, labels,
      |            right padding) -> a pre-batched dataset, one prepared batch per "row"
      |
      |-- trainer  transformers Trainer + peft get_peft_model       per_device_train_batch_size=1,
      |-- sft      trl SFTTrainer(peft_config=...)                  sequential sampler, a collator that
      |            returns the prepared batch; peftkit's initial A/B copied in before training; every
      |            batch reaching training_step is hashed
      |
      '-- score    ONE function for all: each trained A/B merged (W + scaling * B @ A, fp32) into the
                   same fp32 base, token-weighted next-token loss on the held-out split, and
                   generation accuracy on the test split (peftkit.evaluation.evaluate_generation)

Settings that can differ on purpose (the knobs used to find the cause of a gap):

    --schedule matched   the Trainers use peftkit's LR multiplier (train/schedule.py) (default)
    --schedule own       the Trainers' own scheduler, warmup_steps = the job's warmup_ratio
                         (transformers rounds ratio * steps UP and starts warm-up at lr 0; peftkit
                         rounds down and starts at peak / warmup)
    --init own           each framework's own seeded LoRA init instead of peftkit's copied in
    --hf-frozen-bf16     bf16 runs: store the Trainers' frozen weights in bf16 as peftkit does
                         (train/precision.py) instead of autocasting fp32 weights
    --peftkit-set K=V    a job override for peftkit only (e.g. training.shared_prefix=false)

Per run it records the loss, learning rate, gradient norm and batch hash of every optimizer step;
the table shows held-out loss and accuracy as mean +- std over seeds, and the largest per-step
training-loss difference from peftkit on the same batches (the parity check: in fp32 on the default
job, 5e-7 / 7e-6 at step 1 and 2e-5 / 2e-4 over 14 steps for the Trainer / SFTTrainer; in bf16 the
frameworks round differently, 1e-2 at step 1, and short runs then drift apart as different seeds do;
even one framework's bf16 run changes with the thread count, hence --threads is pinned).

    python benchmarks/loss_parity.py --threads 1 --accuracy-min-steps 100   # 3 seeds x {20, 100} x {fp32, bf16}
    python benchmarks/loss_parity.py --threads 1 --frameworks trainer --schedule own   # the Trainer's own warm-up
    python benchmarks/loss_parity.py --steps 14 --seeds 42 --precision fp32 --no-accuracy   # the reported case
    python benchmarks/loss_parity.py --tiny --steps 3 --seeds 0 --precision fp32   # smoke test

(One thread on a shared 2-core machine: with two, each step waits for the busier core, 4x slower
under load here.) Writes runs/benchmarks/loss_parity.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "examples" / "tweet-sentiment-lora.yaml"
DEFAULT_OUT = REPO / "runs" / "benchmarks" / "loss_parity.json"  # runs/ is git-ignored
FRAMEWORKS = {
    "peftkit": "peftkit (setup + train, as `peftkit train`)",
    "trainer": "transformers Trainer + peft get_peft_model",
    "sft": "trl SFTTrainer with peft_config",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="peftkit job YAML (default: the default job)"
    )
    p.add_argument("--model", default=None, help="base model alias or directory (default: the job's)")
    p.add_argument("--data", default=None, help="training data source, overrides data.train")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="job override (all frameworks)"
    )
    p.add_argument(
        "--peftkit-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="job override for peftkit only",
    )
    p.add_argument("--steps", type=int, nargs="+", default=[20, 100], help="optimizer steps (horizons)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training.seed values")
    p.add_argument("--frameworks", nargs="+", choices=list(FRAMEWORKS), default=list(FRAMEWORKS))
    p.add_argument(
        "--precision",
        nargs="+",
        choices=["fp32", "bf16"],
        default=["fp32", "bf16"],
        help="fp32: the parity baseline; bf16: autocast (skipped where the CPU has no native bf16)",
    )
    p.add_argument(
        "--schedule", choices=["matched", "own"], default="matched", help="see the module docstring"
    )
    p.add_argument("--init", choices=["shared", "own"], default="shared", help="see the module docstring")
    p.add_argument("--hf-frozen-bf16", action="store_true", help="see the module docstring")
    p.add_argument(
        "--heldout-split",
        choices=["validation", "test"],
        default="validation",
        help="split scored by the held-out loss (default: validation, what `peftkit train` reports)",
    )
    p.add_argument("--heldout", type=int, default=None, help="score only the first N held-out examples")
    p.add_argument(
        "--accuracy-min-steps",
        type=int,
        default=0,
        help="measure generation accuracy on the test split only for runs of at least this many steps",
    )
    p.add_argument("--no-accuracy", action="store_true", help="skip generation accuracy")
    p.add_argument("--test-examples", type=int, default=None, help="generate for the first N test examples")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for every run (default: torch's at start). Pinned because peftkit would "
        "otherwise pick them by load, and bf16 sums, hence short runs, depend on the thread count",
    )
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama on toy data (smoke test)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the cells already in --out (written after every cell) and run only the others",
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results file")
    args = p.parse_args(argv)
    if min(args.steps) < 1:
        p.error("--steps must be >= 1")
    return args


# -- the job, data and batches --------------------------------------------------------------------


def build_job(
    args: argparse.Namespace, *, seed: int, steps: int, precision: str, output_dir: str, extra=()
) -> Any:
    """The job as `peftkit train CONFIG --set ...` would build it, minus evaluation and checkpoints."""
    from peftkit.train.config import build_job_config
    from peftkit.train.yaml_file import apply_overrides, read_yaml

    sets = list(args.tiny_sets) + list(args.set)
    if args.model:
        sets.append(f"base_model={args.model}")
    if args.data:
        sets.append(f"data.train={args.data}")
    if args.threads:
        sets.append(f"training.num_threads={args.threads}")
    sets += [
        f"training.max_steps={steps}",
        f"training.seed={seed}",
        f"training.precision={precision}",
        "training.eval_every=null",
        "training.save_every=null",
        "evaluation.accuracy_before=false",
        "evaluation.accuracy_after=false",
        f"output_dir={output_dir}",
        *extra,
    ]
    return build_job_config(apply_overrides(read_yaml(args.config), sets), source=args.config)


def build_data(job: Any, tokenizer: Any) -> Any:
    from peftkit.data import build_datasets
    from peftkit.tasks import get_task

    task = get_task(job.task)
    task.prepare(job.data)
    return build_datasets(job.data, tokenizer, seed=job.training.seed, task=task)


def prepared_batches(job: Any, train: list[Any], pad_id: int, steps: int) -> list[dict[str, Any]]:
    """Micro-batches 0..steps*accum-1 of peftkit's loop, in its order, collated by peftkit."""
    from peftkit.train.batching import MicroBatchStream, collate

    t = job.training
    stream = MicroBatchStream(train, t.batch_size, seed=t.seed, group_by_length=t.group_by_length)
    return [collate(stream.get(i), pad_id) for i in range(steps * t.gradient_accumulation_steps)]


def batch_hash(batch: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for key in ("input_ids", "attention_mask", "labels"):
        tensor = batch[key].detach().cpu().long().contiguous()
        h.update(f"{key}{tuple(tensor.shape)}".encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()[:16]


def step_hashes(micro: list[str], accum: int) -> list[str]:
    return ["+".join(micro[i : i + accum]) for i in range(0, len(micro), accum)]


def lora_key(name: str) -> str:
    """A LoRA parameter's name without the PEFT wrapper prefix, the same in peftkit and PEFT."""
    return name.removeprefix("base_model.model.")


def lora_state(model: Any) -> dict[str, Any]:
    return {
        lora_key(n): p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad
    }


def load_lora(model: Any, state: dict[str, Any]) -> None:
    import torch

    params = {lora_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        raise SystemExit(
            f"LoRA parameters differ between frameworks: missing {missing[:3]}, extra {extra[:3]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.dtype))


# -- peftkit ----------------------------------------------------------------------------------------


def run_peftkit(args: argparse.Namespace, job: Any) -> dict[str, Any]:
    from peftkit.train.loop import setup, train

    session = setup(job, overwrite=True)
    init = lora_state(session.model)
    micro: list[str] = []
    task = session.task

    def recording(examples: Any, *a: Any, **kw: Any) -> Any:
        batch = type(task).collate(task, examples, *a, **kw)
        micro.append(batch_hash(batch))
        return batch

    task.collate = recording  # an instance attribute: the loop reads task.collate
    started = time.perf_counter()
    try:
        results = train(session, progress=False)
    finally:
        del task.collate
    train_s = time.perf_counter() - started
    metrics = [json.loads(x) for x in (Path(job.output_dir) / "metrics.jsonl").read_text().splitlines() if x]
    steps = [m for m in metrics if "loss" in m]
    return {
        "init": init,
        "final": lora_state(session.model),
        "losses": [m["loss"] for m in steps],
        "lrs": [m["lr"] for m in steps],
        "grad_norms": [m.get("grad_norm") for m in steps],
        "step_hashes": step_hashes(micro, job.training.gradient_accumulation_steps),
        "own_val_loss": (results.get("validation") or {}).get("val_loss"),
        # whether peftkit ran the shared prompt prefix once per batch (train/shared_prefix.py)
        "shared_prefix": bool(getattr(getattr(task, "shared_prefix", None), "enabled", False)),
        "bf16": session.autocast_dtype is not None,
        "train_s": train_s,
    }


# -- transformers Trainer / TRL SFTTrainer --------------------------------------------------------


def hf_lora_config(job: Any) -> Any:
    from peft import LoraConfig

    lc = job.method_config
    return LoraConfig(
        r=lc.r,
        lora_alpha=lc.lora_alpha,
        lora_dropout=lc.lora_dropout,
        target_modules=lc.target_modules,
        use_rslora=lc.use_rslora,
        bias=lc.bias,
        init_lora_weights=lc.init_lora_weights,
        task_type="CAUSAL_LM",
    )


def no_activation_checkpointing() -> dict[str, bool]:
    """TRL's configs checkpoint activations by default; off, under the installed transformers' name
    (``activation_checkpointing`` since 5.2x, ``gradient_checkpointing`` before: the old one warns)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    return {
        "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False
    }


def hf_training_kwargs(args: argparse.Namespace, job: Any, steps: int, bf16: bool, output_dir: str) -> dict:
    t = job.training
    kwargs = dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=1,  # one prepared batch per dataset row
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_betas[0],
        adam_beta2=t.adam_betas[1],
        adam_epsilon=t.adam_eps,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm is not None else 0.0,
        optim="adamw_torch_fused",  # peftkit's AdamW(fused=True) on CPU: the same update rule
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(t.lr_scheduler, t.lr_scheduler),
        warmup_steps=t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio,
        bf16=bf16,
        seed=t.seed,
        train_sampling_strategy="sequential",
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=True,
    )
    if t.min_lr_ratio and t.lr_scheduler == "cosine":
        kwargs["lr_scheduler_type"] = "cosine_with_min_lr"
        kwargs["lr_scheduler_kwargs"] = {"min_lr_rate": t.min_lr_ratio}
    return kwargs


def recording_trainer(base_cls: type, args: argparse.Namespace, job: Any, record: dict[str, Any]) -> type:
    """``base_cls`` (Trainer or SFTTrainer) that hashes every batch it trains on, sums its step
    losses, and (``--schedule matched``) uses peftkit's learning-rate multiplier."""
    import torch

    from peftkit.train.schedule import lr_multiplier, warmup_steps

    t = job.training

    class Recording(base_cls):
        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            record["micro"].append(batch_hash(inputs))
            loss = super().training_step(model, inputs, num_items_in_batch)
            record["micro_losses"].append(float(loss))
            return loss

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if args.schedule == "own" or self.lr_scheduler is not None:
                return super().create_scheduler(num_training_steps, optimizer)
            warm = warmup_steps(t, num_training_steps)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer,
                lambda s: lr_multiplier(
                    s, total=num_training_steps, warmup=warm, kind=t.lr_scheduler, min_ratio=t.min_lr_ratio
                ),
            )
            return self.lr_scheduler

    return Recording


def run_hf(args: argparse.Namespace, job: Any, name: str, batches: list[dict], init: dict | None) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback

    from peftkit.models import resolve_model_dir
    from peftkit.train.precision import split_precision

    t = job.training
    steps = t.max_steps
    bf16 = job.training.precision == "bf16"
    record: dict[str, Any] = {"micro": [], "micro_losses": [], "lrs": [], "grad_norms": []}

    class Log(TrainerCallback):
        def on_log(self, _a: Any, _s: Any, _c: Any, logs: Any = None, **__: Any) -> None:
            if logs and "learning_rate" in logs and "loss" in logs:
                record["lrs"].append(float(logs["learning_rate"]))
                record["grad_norms"].append(float(logs["grad_norm"]) if "grad_norm" in logs else None)

    # One row per prepared batch, holding its index (TRL insists on a datasets.Dataset); the
    # collator hands over that batch as it is.
    rows = datasets.Dataset.from_dict({"batch_index": list(range(len(batches)))})

    def collator(items: list[dict]) -> dict:
        assert len(items) == 1, "per_device_train_batch_size must be 1: each row is a whole batch"
        return {k: v.clone() for k, v in batches[items[0]["batch_index"]].items()}

    model_dir = resolve_model_dir(job.base_model)
    attention = t.attention if t.attention != "auto" else "eager"  # peftkit's choice on a CPU
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attention
    )
    torch.manual_seed(t.seed)
    out = str(Path(job.output_dir).parent / name)
    if name == "trainer":
        from peft import get_peft_model
        from transformers import Trainer, TrainingArguments

        model = get_peft_model(model, hf_lora_config(job))
        targs = TrainingArguments(**hf_training_kwargs(args, job, steps, bf16, out))
        cls = recording_trainer(Trainer, args, job, record)
        trainer = cls(model=model, args=targs, train_dataset=rows, data_collator=collator, callbacks=[Log()])
    else:
        from transformers import AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        from peftkit.models import ensure_pad_token

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ensure_pad_token(tokenizer)
        sargs = SFTConfig(
            **hf_training_kwargs(args, job, steps, bf16, out),
            **no_activation_checkpointing(),  # TRL's default is on: slower, same maths
            max_length=None,
            packing=False,
            padding_free=False,
            loss_type="nll",
            dataset_kwargs={"skip_prepare_dataset": True},
        )
        cls = recording_trainer(SFTTrainer, args, job, record)
        trainer = cls(
            model=model,
            args=sargs,
            train_dataset=rows,
            data_collator=collator,
            processing_class=tokenizer,
            peft_config=hf_lora_config(job),
            callbacks=[Log()],
        )
    trainer.remove_callback(PrinterCallback)  # one dict per step on stdout
    if init is not None:
        load_lora(trainer.model, init)
    if bf16 and args.hf_frozen_bf16:
        split_precision(trainer.model, torch.bfloat16)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    train_s = time.perf_counter() - started
    accum = t.gradient_accumulation_steps
    micro_losses = record["micro_losses"]
    return {
        "final": lora_state(trainer.model),
        "losses": [sum(micro_losses[i : i + accum]) for i in range(0, len(micro_losses), accum)],
        "lrs": record["lrs"],
        "grad_norms": record["grad_norms"],
        "step_hashes": step_hashes(record["micro"], accum),
        "bf16": bool(trainer.args.bf16),
        "train_s": train_s,
    }


# -- scoring: one function for all ----------------------------------------------------------------


def merged(base: Any, state: dict[str, Any], scaling: float) -> Any:
    """A copy of the fp32 ``base`` with every ``W += scaling * B @ A`` of ``state`` folded in."""
    import torch

    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in state.items():
            if ".lora_A." not in key:
                continue
            path = key.split(".lora_A.")[0]
            b = state[key.replace(".lora_A.", ".lora_B.")]
            weight = modules[path].weight
            weight += (scaling * (b.double() @ a.double())).to(weight.dtype)
    return model


def heldout_loss(model: Any, examples: list[Any], pad_id: int, batch_size: int = 16) -> float:
    """Token-weighted mean next-token cross-entropy over the label tokens, fp32, no autocast."""
    import torch
    import torch.nn.functional as F

    from peftkit.train.batching import collate

    model.float().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            total += float(F.cross_entropy(logits[:, :-1][mask].float(), labels[mask], reduction="sum"))
            count += int(mask.sum())
    return total / max(1, count)


def score(args: argparse.Namespace, ctx: dict[str, Any], state: dict[str, Any], steps: int) -> dict[str, Any]:
    from peftkit.evaluation import evaluate_generation

    model = merged(ctx["base"], state, ctx["scaling"])
    out: dict[str, Any] = {"heldout_loss": heldout_loss(model, ctx["heldout"], ctx["pad_id"])}
    if ctx["test"] and not args.no_accuracy and steps >= args.accuracy_min_steps:
        ev = ctx["job"].evaluation
        res = evaluate_generation(
            model,
            ctx["tokenizer"],
            ctx["test"],
            max_new_tokens=ev.max_new_tokens,
            batch_size=ev.batch_size,
            match=ev.match,
            progress=False,
        )
        out["accuracy"] = res["accuracy"]
    return out


# -- tiny model (smoke test) ----------------------------------------------------------------------

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny(directory: Path) -> list[str]:
    """A tiny random Llama + byte-level BPE tokenizer + toy prompt/completion data; the job overrides."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = ["word good bad fine is positive negative neutral", "abcdefghijklmnopqrstuvwxyz 0123456789"] * 4
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus,
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.2,
    )
    model_dir = directory / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    words = [("good", "positive"), ("bad", "negative"), ("fine", "neutral")]
    rows = [{"prompt": f"word {w} {'x' * (i % 5)} {i}", "completion": c} for i in range(40) for w, c in words]
    data = directory / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [
        f"base_model={model_dir}",
        f"data.train={data}",
        "data.test_size=12",
        "data.val_size=12",
        "data.max_train_examples=null",
        "training.batch_size=4",
    ]


# -- driver ----------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_ms(pair: tuple[float, float] | None, spec: str = ".4f") -> str:
    return "-" if pair is None else f"{pair[0]:{spec}} ± {pair[1]:{spec}}"


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    keys = sorted(
        {(r["precision"], r["steps"], r["framework"]) for r in runs},
        key=lambda k: (k[0], k[1], list(FRAMEWORKS).index(k[2])),
    )
    for precision, steps, fw in keys:
        group = [r for r in runs if (r["precision"], r["steps"], r["framework"]) == (precision, steps, fw)]
        rows.append(
            {
                "precision": precision,
                "steps": steps,
                "framework": fw,
                "seeds": [r["seed"] for r in group],
                "heldout_loss": mean_std([r["heldout_loss"] for r in group]),
                "accuracy": mean_std([r.get("accuracy") for r in group]),
                "final_train_loss": mean_std([r["losses"][-1] for r in group]),
                "max_step_loss_diff": max((r.get("max_step_loss_diff") or 0.0) for r in group),
                "first_step_loss_diff": max((r.get("first_step_loss_diff") or 0.0) for r in group),
                "train_s": mean_std([r["train_s"] for r in group]),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| precision | steps | framework | held-out loss | accuracy | final train loss | max |Δ step loss| vs peftkit (step 1) | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = (
            "-"
            if r["framework"] == "peftkit"
            else f"{r['max_step_loss_diff']:.1e} ({r['first_step_loss_diff']:.1e})"
        )
        lines.append(
            f"| {r['precision']} | {r['steps']} | {r['framework']} | {fmt_ms(r['heldout_loss'])} | "
            f"{fmt_ms(r['accuracy'], '.3f')} | {fmt_ms(r['final_train_loss'])} | {diff} | {fmt_ms(r['train_s'], '.0f')} |"
        )
    return "\n".join(lines)


def run_cell(
    args: argparse.Namespace, shared: dict[str, Any], precision: str, steps: int, seed: int, cell: Path
) -> dict[str, dict[str, Any]]:
    """Every framework of ``args.frameworks`` on one (precision, steps, seed): the same batches, the
    same initial adapter (peftkit's), scored by the same function."""
    tokenizer = shared["tokenizer"]
    job = build_job(args, seed=seed, steps=steps, precision=precision, output_dir=str(cell / "peftkit"))
    data = build_data(job, tokenizer)
    heldout = (data.validation if args.heldout_split == "validation" else data.test) or data.test
    test = data.test or []
    ctx = {
        **shared,
        "job": job,
        "pad_id": tokenizer.pad_token_id,
        "heldout": heldout[: args.heldout] if args.heldout else heldout,
        "test": test[: args.test_examples] if args.test_examples else test,
    }
    shared["heldout_examples"], shared["test_examples"] = len(ctx["heldout"]), len(ctx["test"])
    batches = prepared_batches(job, data.train, tokenizer.pad_token_id, steps)
    expected = step_hashes([batch_hash(b) for b in batches], job.training.gradient_accumulation_steps)
    init = None
    runs: dict[str, dict[str, Any]] = {}
    for fw in args.frameworks:
        print(f"[loss_parity] {precision} {steps} steps seed {seed}: {fw} ...", file=sys.stderr, flush=True)
        if fw == "peftkit":
            pk_job = build_job(
                args,
                seed=seed,
                steps=steps,
                precision=precision,
                output_dir=str(cell / "peftkit"),
                extra=args.peftkit_set,
            )
            result = run_peftkit(args, pk_job)
            init = result.pop("init")
        else:
            if init is None and args.init == "shared":
                init = peftkit_init(job)
            result = run_hf(args, job, fw, batches, init if args.init == "shared" else None)
        result.update(score(args, ctx, result.pop("final"), steps))
        result.update(framework=fw, seed=seed, steps=steps, precision=precision)
        result["batches_match"] = result["step_hashes"] == expected
        runs[fw] = result
    bad = [fw for fw, r in runs.items() if not r["batches_match"]]
    if bad:
        raise SystemExit(
            f"{', '.join(bad)} trained on other batches than prepared: the comparison is invalid"
        )
    ref = runs.get("peftkit")
    for fw, result in runs.items():
        if ref is not None and fw != "peftkit":
            diffs = [abs(a - b) for a, b in zip(result["losses"], ref["losses"])]
            result["step_loss_diffs"] = diffs
            result["max_step_loss_diff"] = max(diffs)
            result["first_step_loss_diff"] = diffs[0]
    held = ", ".join(f"{fw} {r['heldout_loss']:.4f}" for fw, r in runs.items())
    print(f"[loss_parity]   held-out loss: {held}", file=sys.stderr, flush=True)
    return runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from peftkit.models import bf16_supported, ensure_pad_token, load_model_and_tokenizer, resolve_model_dir

    args = parse_args(argv)
    started = time.perf_counter()
    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    precisions = list(args.precision)
    notes = []
    if "bf16" in precisions and not bf16_supported("cpu"):
        precisions.remove("bf16")
        notes.append("bf16 skipped: this CPU has no native bf16 (AVX512-BF16 / AMX), emulation would crawl")
    with tempfile.TemporaryDirectory(prefix="loss_parity-") as tmp:
        work = Path(tmp)
        args.tiny_sets = make_tiny(work) if args.tiny else []
        probe = build_job(args, seed=args.seeds[0], steps=1, precision="fp32", output_dir=str(work / "probe"))
        base, tokenizer = load_model_and_tokenizer(
            resolve_model_dir(probe.base_model), dtype="float32", attn_implementation="eager"
        )
        ensure_pad_token(tokenizer)
        lc = probe.method_config
        shared = {
            "base": base,  # the fp32 base every trained adapter is merged into for scoring
            "tokenizer": tokenizer,
            "scaling": lc.lora_alpha / (math.sqrt(lc.r) if lc.use_rslora else lc.r),
        }
        out = Path(args.out)
        runs = previous_runs(args, out) if args.resume else []
        done = {(r["precision"], r["steps"], r["seed"]) for r in runs}
        for precision in precisions:
            for steps in args.steps:
                for seed in args.seeds:
                    if (precision, steps, seed) in done:
                        print(
                            f"[loss_parity] {precision} {steps} steps seed {seed}: kept from {out}",
                            file=sys.stderr,
                        )
                        continue
                    cell = work / f"{precision}-{steps}-{seed}"
                    runs.extend(run_cell(args, shared, precision, steps, seed, cell).values())
                    # a long benchmark (hours on a CPU) must survive an interruption: --resume
                    write_results(
                        out, results_of(args, runs, precisions, notes, shared, started, complete=False)
                    )
    results = results_of(args, runs, precisions, notes, shared, started, complete=True)
    print(table(results["table"]))
    for note in notes:
        print(note)
    write_results(out, results)
    print(f"results written to {out} ({results['settings']['total_wall_s']:.0f} s)")
    return results


# settings a kept cell must share with the current run to be comparable
RESUME_KEYS = (
    "config",
    "set",
    "peftkit_set",
    "tiny",
    "frameworks",
    "schedule",
    "init",
    "hf_frozen_bf16",
    "heldout_split",
    "threads",
)


def previous_runs(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    previous = json.loads(out.read_text())
    now = vars(args)
    differ = [k for k in RESUME_KEYS if previous["settings"].get(k) != now.get(k)]
    if differ:
        raise SystemExit(
            f"--resume: {out} was made with other settings ({', '.join(differ)}); "
            "use another --out or the same options"
        )
    kept = [
        r
        for r in previous["runs"]
        if r["precision"] in args.precision and r["steps"] in args.steps and r["seed"] in args.seeds
    ]
    cells: dict[tuple, set] = {}
    for r in kept:
        cells.setdefault((r["precision"], r["steps"], r["seed"]), set()).add(r["framework"])
    whole = {c for c, fws in cells.items() if fws == set(args.frameworks)}
    return [r for r in kept if (r["precision"], r["steps"], r["seed"]) in whole]


def write_results(out: Path, results: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out)


def results_of(
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    precisions: list[str],
    notes: list[str],
    shared: dict[str, Any],
    started: float,
    complete: bool,
) -> dict[str, Any]:
    from peftkit.models import bf16_supported

    return {
        "complete": complete,
        "table": summarise(runs),
        "runs": runs,
        "settings": {
            "config": args.config,
            "set": args.set,
            "peftkit_set": args.peftkit_set,
            "tiny": args.tiny,
            "steps": args.steps,
            "seeds": args.seeds,
            "frameworks": args.frameworks,
            "precision": precisions,
            "schedule": args.schedule,
            "init": args.init,
            "hf_frozen_bf16": args.hf_frozen_bf16,
            "heldout_split": args.heldout_split,
            "heldout_examples": shared.get("heldout_examples"),
            "test_examples": shared.get("test_examples"),
            "bf16_native": bf16_supported("cpu"),
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "notes": notes,
            "total_wall_s": time.perf_counter() - started,
        },
    }


def peftkit_init(job: Any) -> dict[str, Any]:
    """peftkit's initial LoRA A/B for ``job`` without training (when peftkit itself is not run):
    the same seed, config and model as train/loop.py's setup, right before get_peft_model."""
    import dataclasses

    import torch

    from peftkit import get_peft_model
    from peftkit.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(job.base_model)
    torch.manual_seed(job.training.seed)
    return lora_state(get_peft_model(model, dataclasses.replace(job.method_config, task_type=job.task)))


if __name__ == "__main__":
    main()
