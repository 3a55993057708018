"""The training job's YAML config: typed sections, checked before any model loads.

Layout of a job file::

    base_model: smollm2-135m-instruct
    task: CAUSAL_LM     # or SEQ_CLS, TOKEN_CLS, QUESTION_ANS, SEQ_2_SEQ_LM (peftkit.tasks)
    objective: sft      # or dpo, kto, orpo, simpo, reward (peftkit.objectives)
    preference: {beta: 0.1}   # options of the preference objectives, objectives/config.py
    init_adapter: runs/sft/adapter   # optional: start from a trained adapter (SFT -> DPO)
    method: lora
    lora:               # options of the chosen method (its config class's fields)
      r: 16
    quantization: {bits: 4}   # optional: QLoRA, peftkit.quantization.QuantizationConfig
    tokens: {add: [...]}  # optional: new vocabulary tokens, peftkit.train.tokens.TokensConfig
    data: {...}         # peftkit.data.DataConfig
    training: {...}     # TrainingConfig
    evaluation: {...}   # EvaluationConfig
    logging: {report_to: [tensorboard]}  # optional: peftkit.train.reporting.LoggingConfig
    output_dir: runs/my-run

The section named after the method is validated against that method's config class, found
through the method registry, so a new method needs no change here.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peftkit.configuration import ConfigError, closest, from_dict, to_dict, unknown_key_message
from peftkit.data import DataConfig
from peftkit.methods.base import TaskType
from peftkit.objectives.config import (
    Objective,
    PreferenceConfig,
    objective_fit,
    objective_problems,
    online_problems,
)
from peftkit.quantization import QuantizationConfig
from peftkit.rlaif.config import RewardConfig, SamplingConfig
from peftkit.train.evaluation_config import EvaluationConfig
from peftkit.train.method_fit import fsdp_problems, methods_with, packing_problems
from peftkit.train.reporting import LoggingConfig, reporter_problems
from peftkit.train.tokens import TokensConfig
from peftkit.train.yaml_file import apply_overrides, read_yaml

# numpy's seed range; torch's is 2**64, but the data order seeds it with seed * 1_000_003 + epoch
SEED_LIMIT = 2**32
MANY_STEPS = 10_000_000  # more optimizer steps than this in one run is a warning: surely a mistyped value


@dataclass
class TrainingConfig:
    """How to optimise: steps, batch, learning-rate schedule, precision, checkpoints."""

    max_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps to run; if unset, `epochs` decides."}
    )
    epochs: float = field(
        default=1.0, metadata={"help": "Passes over the training split (used when max_steps is unset)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Examples per micro-batch."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "Micro-batches per optimizer step; the loss is normalised over all their label tokens "
            "(or examples, for classification and QA), as one large batch would be."
        },
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate of AdamW."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay."})
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas."})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    lr_scheduler: Literal["cosine", "linear", "constant"] = field(
        default="cosine",
        metadata={"help": "Decay after warm-up: cosine or linear to `min_lr_ratio`, or constant."},
    )
    warmup_steps: int | None = field(
        default=None, metadata={"help": "Linear warm-up steps (overrides warmup_ratio)."}
    )
    warmup_ratio: float = field(default=0.05, metadata={"help": "Warm-up as a fraction of all steps."})
    min_lr_ratio: float = field(
        default=0.0, metadata={"help": "Final learning rate as a fraction of the peak."}
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip the global gradient norm to this value (null: no clipping)."}
    )
    precision: Literal["auto", "bf16", "fp32"] = field(
        default="auto",
        metadata={
            "help": "auto: bf16 autocast where the hardware supports it (CPU with AMX/AVX512-BF16, recent GPUs), "
            "else fp32. bf16: always (a CPU without native bf16 emulates it, slower). fp32: never."
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N."})
    attention: Literal["auto", "eager", "sdpa"] = field(
        default="auto",
        metadata={
            "help": "Attention kernel. auto: sdpa on GPUs; eager on CPUs, where torch's SDPA backward is "
            "slow for short sequences (measured 1.4x faster training for SmolLM2-135M at 64 tokens)."
        },
    )
    seed: int = field(
        default=42, metadata={"help": "Seed for adapter init, data order and dropout: 0 .. 2**32 - 1."}
    )
    group_by_length: bool = field(
        default=True,
        metadata={"help": "Batch examples of similar length together (less padding), order still seeded."},
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Causal LM: lay each micro-batch's examples end to end in rows of up to data.max_seq_len "
            "tokens (position ids restart per example, attention stays within it): no padding. On the default "
            "job length grouping already leaves 1% padding and packing measured no faster; with "
            "group_by_length off it recovered 7% (see README, Benchmarks)."
        },
    )
    shared_prefix: bool = field(
        default=True,
        metadata={
            "help": "Causal LM: run the prompt prefix that every example of a micro-batch shares (a chat "
            "template's system turn) once per micro-batch instead of once per example; same loss and "
            "gradients. Applies where the method acts per position, no dropout is active and packing is "
            "off; checked against the usual path on the first batch (1.23x faster steps on the default "
            "job, see docs/performance.md). Preference pairs (dpo, orpo, simpo): under the same conditions "
            "(and eager or sdpa attention) each pair runs as one row, prompt + chosen + rejected, the "
            "prompt computed once (objectives/pair_layout.py). false turns both off."
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "Run the decoder layers compiled by torch.compile in training steps (one graph for all "
            "layers; needs a C++ compiler on CPU). On the default job steps were 1.05x faster and peak "
            "memory 0.82x, after 103 s of compiling: it pays only for long runs. One process only (not "
            "under torchrun); validation and generation run uncompiled. See docs/performance.md."
        },
    )
    log_every: int = field(default=1, metadata={"help": "Write a metrics line every N steps."})
    eval_every: int | None = field(
        default=None,
        metadata={"help": "Evaluate loss on the validation split every N steps (null: only at the end)."},
    )
    save_every: int | None = field(
        default=None,
        metadata={"help": "Write a resumable checkpoint every N steps (null: no intermediate checkpoints)."},
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "How many recent checkpoints to keep."})
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch CPU threads. null: torch's default (OMP_NUM_THREADS, else one per core) lowered "
            "to the cores the machine's load average leaves free, with a note (threads sharing busy cores "
            "slowed steps 10x for a user); a run also warns when its steps slow down on a loaded machine."
        },
    )
    collective_timeout_minutes: float = field(
        default=30.0,
        metadata={
            "help": "Under torchrun: a collective operation (gradient reduction, barrier) that waits longer "
            "fails and stops the job, e.g. when another process died or hangs. It must outlast rank 0's "
            "evaluation, which the others wait for under DDP."
        },
    )

    def validate(self) -> list[str]:
        problems = []
        positive = ["batch_size", "gradient_accumulation_steps", "log_every", "keep_checkpoints"]
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"'training.{name}' must be >= 1, got {getattr(self, name)}")
        for name in ["max_steps", "eval_every", "save_every", "warmup_steps", "num_threads"]:
            value = getattr(self, name)
            if value is not None and value < (0 if name == "warmup_steps" else 1):
                problems.append(f"'training.{name}' must be positive, got {value}")
        if self.epochs <= 0:  # refused with max_steps too: it decides nothing there, so it is a slip
            problems.append(f"'training.epochs' must be > 0, got {self.epochs:g}")
        problems.extend(self._length_problems())
        if self.learning_rate <= 0:
            problems.append(f"'training.learning_rate' must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"'training.warmup_ratio' must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"'training.min_lr_ratio' must be in [0, 1], got {self.min_lr_ratio}")
        if self.collective_timeout_minutes <= 0:
            problems.append(
                f"'training.collective_timeout_minutes' must be > 0, got {self.collective_timeout_minutes}"
            )
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            problems.append(
                f"'training.max_grad_norm' must be > 0, got {self.max_grad_norm}; "
                "use null to turn gradient clipping off"
            )
        if self.weight_decay < 0:
            problems.append(
                f"'training.weight_decay' must be >= 0 (0: no weight decay), got {self.weight_decay}"
            )
        if self.adam_eps < 0:
            problems.append(f"'training.adam_eps' must be >= 0, got {self.adam_eps}")
        if len(self.adam_betas) != 2:
            problems.append(f"'training.adam_betas' must have two values, got {self.adam_betas}")
        elif not all(0 <= beta < 1 for beta in self.adam_betas):
            problems.append(f"'training.adam_betas' must both be in [0, 1), got {self.adam_betas}")
        return problems

    def _length_problems(self) -> list[str]:
        """Seed range and run length: what type-checks but cannot be meant."""
        problems = []
        if isinstance(self.seed, int) and not 0 <= self.seed < SEED_LIMIT:
            problems.append(
                f"'training.seed' must be in 0 .. 2**32 - 1, got {self.seed} (it seeds torch, numpy and "
                "the data order; there is no 'random seed' value: pick any number in that range)"
            )
        steps, warmup = self.max_steps, self.warmup_steps
        if isinstance(steps, int) and steps >= 1:
            if isinstance(warmup, int) and warmup > steps:
                problems.append(
                    f"'training.warmup_steps' ({warmup}) is more than 'training.max_steps' ({steps}): the "
                    "learning rate would still be warming up when the run ends; lower warmup_steps or "
                    "use warmup_ratio"
                )
            if steps > MANY_STEPS:
                warnings.warn(
                    f"'training.max_steps' is {steps:,}, more than {MANY_STEPS:,} optimizer steps: "
                    "check the value (e.g. a missing unit or extra zeros)",
                    stacklevel=2,
                )
        return problems


@dataclass
class TrainJobConfig:
    """A whole fine-tuning job: base model, method, data, optimisation, evaluation, output."""

    base_model: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "Built-in model name, local Hugging Face model directory, or hub id."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow a hub model to run its own Python code (off unless you trust it)."},
    )
    task: TaskType = field(
        default=TaskType.CAUSAL_LM,
        metadata={
            "help": "What the model learns (PEFT's TaskType): CAUSAL_LM (generate answers), SEQ_CLS "
            "(a label per text), TOKEN_CLS (a tag per word), QUESTION_ANS (extractive answer spans) or "
            "SEQ_2_SEQ_LM (encoder-decoder, source -> target); lower case is accepted. It picks the "
            "model head, the data formats, the loss and the evaluation metrics."
        },
    )
    objective: Objective = field(
        default="sft",
        metadata={
            "help": "What the loss optimises. sft: next-token prediction on the answers (or the task's own "
            "loss). dpo, kto, orpo, simpo: preference optimisation on data.format preference (prompt, "
            "chosen, rejected; kto: prompt, completion, label) with the options in `preference`. reward: a "
            "reward model, a one-output sequence-classification head trained on preference pairs "
            "(task SEQ_CLS). online_dpo, grpo: learning from AI feedback on data.format prompt: every step "
            "samples answers (section sampling), the judges in section reward score them, and the model "
            "learns from the best vs the worst (online_dpo) or from group-relative advantages (grpo)."
        },
    )
    preference: PreferenceConfig = field(
        default_factory=PreferenceConfig,
        metadata={"help": "Options of the preference objectives (beta, loss_type, reference, ...)."},
    )
    reward: RewardConfig = field(
        default_factory=RewardConfig,
        metadata={
            "help": "online_dpo / grpo: the judges of the sampled answers (functions, models, judge, "
            "weights); see rlaif/config.py."
        },
    )
    sampling: SamplingConfig = field(
        default_factory=SamplingConfig,
        metadata={
            "help": "online_dpo / grpo: how answers are sampled (num_generations, max_completion_length, "
            "temperature, top_p, top_k)."
        },
    )
    init_adapter: str | None = field(
        default=None,
        metadata={
            "help": "Start training from this saved adapter (its directory, e.g. runs/sft/adapter) instead "
            "of a new one: its method and options replace the method section. With dpo / kto it is also "
            "the reference, frozen. null: a new adapter."
        },
    )
    method: str = field(
        default="lora", metadata={"help": "Fine-tuning method; its options go in a section of the same name."}
    )
    quantization: QuantizationConfig | None = field(
        default=None,
        metadata={
            "help": "Load the frozen base weights quantized with bitsandbytes (QLoRA), e.g. {bits: 4}; "
            "null: unquantized."
        },
    )
    tokens: TokensConfig = field(
        default_factory=TokensConfig,
        metadata={"help": "New vocabulary tokens and how their embeddings train (see train/tokens.py)."},
    )
    data: DataConfig = field(
        default_factory=DataConfig, metadata={"help": "Where the data comes from and how it is formatted."}
    )
    training: TrainingConfig = field(
        default_factory=TrainingConfig, metadata={"help": "Optimisation settings."}
    )
    evaluation: EvaluationConfig = field(
        default_factory=EvaluationConfig, metadata={"help": "Held-out evaluation."}
    )
    logging: LoggingConfig = field(
        default_factory=LoggingConfig,
        metadata={"help": "Where the per-step metrics also go, e.g. {report_to: [tensorboard]}."},
    )
    output_dir: str = field(
        default="runs/peftkit", metadata={"help": "Where checkpoints, metrics, plots and the adapter go."}
    )
    distributed: Literal["auto", "ddp", "fsdp"] = field(
        default="auto",
        metadata={
            "help": "Under torchrun (or --nproc): ddp keeps a whole copy of the model in every process; fsdp "
            "shards parameters, gradients and optimizer states over them (FSDP2). auto: fsdp when at least "
            "half the parameters train (full fine-tuning), else ddp. Ignored in a single process."
        },
    )
    method_config: Any = field(
        default=None, metadata={"help": "The method's config object (built from its section)."}
    )

    def to_yaml_dict(self) -> dict[str, Any]:
        data = to_dict(dataclasses.replace(self, method_config=None))
        data.pop("method_config")
        if self.method_config is not None:
            settable = {f.name for f in dataclasses.fields(self.method_config) if f.init}
            data[self.method] = {
                k: _yaml_safe(v) for k, v in to_dict(self.method_config).items() if k in settable
            }
        return data


def _yaml_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_yaml_safe(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):
        return value.value
    return value


def build_job_config(raw: dict[str, Any], *, source: str | None = None) -> TrainJobConfig:
    """Validate a job mapping (YAML data after overrides); every problem is reported at once."""
    from peftkit.methods import get_method, list_methods

    raw = dict(raw)
    methods = list(list_methods())
    method = raw.get("method", "lora")
    problems: list[str] = []
    method_section: dict[str, Any] = {}
    spec = None
    if not isinstance(method, str) or method not in methods:
        near = closest(str(method), methods)
        hint = f"did you mean {near[0]!r}?" if near else f"available: {', '.join(methods)}"
        problems.append(f"'method' is {method!r}, which is not a known method: {hint}")
    else:
        spec = get_method(method)
    for name in methods:
        if name in raw:
            section = raw.pop(name)
            if name != method:
                problems.append(
                    f"section '{name}' is given but 'method' is {method!r}: rename the section or set method: {name}"
                )
            elif section is not None and not isinstance(section, dict):
                problems.append(f"section '{name}' must be a mapping of {name} options")
            else:
                method_section = section or {}
    problems.extend(_normalise_task(raw))
    # Options set to other than their defaults (a recorded train_config.yaml lists every option).
    defaults = to_dict(PreferenceConfig())
    given = raw.get("preference") if isinstance(raw.get("preference"), dict) else {}
    preference_keys = {k for k, v in given.items() if k not in defaults or v != defaults[k]}
    online_sections = {  # as for preference: a recorded train_config.yaml lists every default
        name
        for name, cls in (("reward", RewardConfig), ("sampling", SamplingConfig))
        if isinstance(raw.get(name), dict)
        and any(to_dict(cls()).get(k, object()) != v for k, v in raw[name].items())
    }
    if raw.get("objective") == "reward" and "task" not in raw:
        raw["task"] = TaskType.SEQ_CLS.value  # a reward model is a one-output classifier
    top_fields = {f.name for f in dataclasses.fields(TrainJobConfig) if f.name != "method_config"}
    for key in list(raw):
        if key not in top_fields:
            problems.append(unknown_key_message(str(key), "", top_fields | set(methods)))
            raw.pop(key)
    job = None
    try:
        job = from_dict(TrainJobConfig, raw)
    except ConfigError as err:
        problems.extend(err.problems)
    method_config = None
    if spec is not None:
        try:
            method_config = from_dict(spec.config_cls, method_section, where=method)
        except ConfigError as err:
            problems.extend(err.problems)
    if job is not None and method_config is not None:
        declared = getattr(method_config, "task_type", None)
        if declared is not None and declared != job.task:
            problems.append(
                f"'{method}.task_type' is {getattr(declared, 'value', declared)} but 'task' is {job.task.value}: "
                f"remove {method}.task_type (the job's task sets it) or make them equal"
            )
    if job is not None and job.quantization is not None and spec is not None:
        if not getattr(spec.model_cls, "supports_quantized_base", False):
            able = methods_with("supports_quantized_base", methods)
            problems.append(
                f"'quantization' is set but method {method!r} cannot train on a quantized base model "
                f"(its layers need full-precision weights): use one of {', '.join(able) or 'none'}, "
                "or set quantization: null"
            )
    if job is not None:
        problems.extend(objective_problems(job.objective, job.preference, preference_keys))
        problems.extend(objective_fit(job, method))
        problems.extend(online_problems(job.objective, job.reward, online_sections))
    if job is not None and not job.output_dir.strip():
        problems.append(
            "'output_dir' is empty, which would write the run into the current directory: set it to a "
            "directory such as runs/my-run (or '.' to mean the current directory)"
        )
    if job is not None and job.training.packing:
        problems.extend(packing_problems(job, method, spec, methods))
    if job is not None and job.distributed == "fsdp":
        problems.extend(fsdp_problems(job, method, spec, methods))
    if problems:
        raise ConfigError(problems, source)
    assert job is not None
    job.method_config = method_config
    return job


def _normalise_task(raw: dict[str, Any]) -> list[str]:
    """Accept ``task`` in any case; an unknown or untrainable value is a problem naming the valid ones."""
    from peftkit.tasks import NOT_TRAINABLE, TASKS

    if "task" not in raw or raw["task"] is None:
        raw.pop("task", None)
        return []
    value = raw["task"]
    valid = [t.value for t in TASKS]
    name = value.strip().upper() if isinstance(value, str) else value
    if isinstance(name, str) and name in [t.value for t in NOT_TRAINABLE]:
        raw.pop("task")
        return [f"'task' is {value!r}: {NOT_TRAINABLE[TaskType(name)]}"]
    if name not in valid:
        raw.pop("task")
        near = closest(str(name), valid)
        hint = f"did you mean {near[0]!r}?" if near else f"use one of {', '.join(valid)}"
        return [f"'task' is {value!r}, which is not a trainable task type: {hint}"]
    raw["task"] = name
    return []


def load_job_config(
    path: str | Path, overrides: list[str] | None = None, *, for_training: bool = True
) -> TrainJobConfig:
    """The job in YAML file ``path`` with ``--set`` ``overrides``, validated before any model loads;
    ``for_training`` also checks this machine (``peftkit.preflight``; ``peftkit eval`` skips it)."""
    job = build_job_config(apply_overrides(read_yaml(path), overrides or []), source=str(path))
    job.source_dir = str(Path(path).resolve().parent)  # where reward functions' modules may lie
    if for_training:
        from peftkit.preflight import training_machine_problems

        problems = training_machine_problems(job.training.device, job.output_dir)
        if problems := problems + reporter_problems(job.logging, job.output_dir):
            raise ConfigError(problems, str(path))
    return job
