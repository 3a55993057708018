"""What the online objectives (``online_dpo``, ``grpo``) share: prompts in, a sampling phase in
every optimizer step, judges' rewards, held-out rewards and KL.

::

    data.format prompt  {prompt, ...other columns}  -> PromptExample (prompt ids; columns for the judges)
    each optimizer step, on each process (Task.sample_step, called by the loop before its micro-batches):
        this step's prompts --sample_answers--> num_generations answers each (one batched generate,
        KV cache, adapters unmerged, the policy in eval mode: no dropout), each answer seeded by
        (training.seed, step, its prompt's place in the step's global batch, its number):
        resume, accumulation and processes reproduce them (rlaif/sampling.py)
        --judges (peftkit.judges)--> one reward per answer (None: no judge scored it)
        --training_examples (the objective)--> the step's micro-batches of training rows
    logged: reward, reward_std (mean of the groups' stds), rewards/<judge>/mean, completion_length,
            completions/truncated, frac_reward_zero_std, rewards/skipped, pairs_fraction (online_dpo),
            time/generate_s, time/score_s, time/train_s (this process's; averaged over processes)

``training.batch_size`` counts prompts per micro-batch: a grpo micro-batch trains on
batch_size x num_generations answers (TRL's per_device_train_batch_size counts answers).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from peftkit.data.preference import Messages
from peftkit.data.preference_encode import _keep_last, _Tokens  # private: the same rendering as pairs
from peftkit.objectives.base import PreferenceTask
from peftkit.objectives.config import PreferenceConfig
from peftkit.objectives.sequence import AdapterOff, completion_token_logps
from peftkit.rlaif.config import RewardConfig, SamplingConfig
from peftkit.rlaif.sampling import SampledAnswer, sample_answers, step_seed
from peftkit.tasks.base import TaskEncoder, inference

EVAL_SEED = 1234  # held-out answers are sampled with a fixed seed: before and after compare alike


@dataclass
class PromptExample:
    """A prompt to answer: its tokens, the row as the judges see it, and where it came from."""

    prompt_ids: list[int]
    prompt: Messages
    text_prompt: bool  # the row gave a string: judges receive strings, else messages
    columns: dict[str, Any]
    origin: str
    room: int = 0  # most answer tokens: batching sorts and sizes by prompt + room
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.prompt_ids) + self.room

    def judge_prompt(self) -> Any:
        if not self.text_prompt:
            return self.prompt
        return next(m["content"] for m in reversed(self.prompt) if m["role"] == "user")

    def judge_answer(self, answer: SampledAnswer) -> Any:
        return answer.text if self.text_prompt else [{"role": "assistant", "content": answer.text}]


class PromptEncoder(TaskEncoder):
    """``prompt`` rows -> :class:`PromptExample`; a prompt longer than max_seq_len minus
    max_completion_length (and than preference.max_prompt_len) keeps its last tokens."""

    def __init__(self, task: OnlineTask, tokenizer: Any, cfg: Any):
        super().__init__(task, tokenizer, cfg)
        self.tokens = _Tokens(tokenizer, cfg.use_chat_template, cfg.separator)
        task.rendering = {
            "system_prompt": cfg.system_prompt,
            "use_chat_template": cfg.use_chat_template,
            "separator": cfg.separator,
            "max_seq_len": cfg.max_seq_len,
        }

    def encode_fields(self, rows: list[dict[str, Any]]) -> list[Any]:
        room = self.task.sampling.max_completion_length
        limits = [self.task.preference.max_prompt_len]
        if self.cfg.max_seq_len is not None:
            limits.append(self.cfg.max_seq_len - room)
        keep = min((x for x in limits if x is not None), default=None)
        out: list[Any] = []
        for fields in rows:
            try:
                ids = self.tokens._ids(self.tokens._render(fields["prompt"], None))
            except ValueError as err:  # RowError: what is wrong with the row
                out.append(str(err))
                continue
            cut = ids if keep is None else _keep_last(ids, keep, self.tokens.bos)
            self.stats.truncated += cut != ids
            out.append(
                PromptExample(
                    cut, fields["prompt"], fields["text_prompt"], fields["columns"], "", room, cut != ids
                )
            )
        return out


@dataclass
class StepSamples:
    """One step's sampled answers on this process, with their rewards."""

    prompts: list[PromptExample]
    answers: list[list[SampledAnswer]]
    rewards: list[list[float | None]]
    per_judge: dict[str, list[list[float | None]]] = field(default_factory=dict)
    advantages: list[list[float | None]] | None = None  # grpo: per answer, over the whole step


class OnlineTask(PreferenceTask):
    """Base of online_dpo and grpo: the sampling phase and the held-out rewards."""

    formats = ("prompt",)
    progress_metrics = ("reward", "kl")
    samples_online = True

    def __init__(
        self,
        preference: PreferenceConfig | None = None,
        reward: RewardConfig | None = None,
        sampling: SamplingConfig | None = None,
        base_dir: str | None = None,
    ) -> None:
        super().__init__(preference)
        self.reward = reward or RewardConfig()
        self.sampling = sampling or SamplingConfig()
        self.base_dir = base_dir
        self.judges: Any = None
        self.tokenizer: Any = None
        self.autocast_dtype: torch.dtype | None = None
        self.seed = 0
        self._judged_at: float | None = None  # when this step's sampling phase ended

    def metadata(self) -> dict[str, Any]:
        from peftkit.configuration import to_dict

        return {
            **super().metadata(),
            "reward": to_dict(self.reward),
            "sampling": to_dict(self.sampling),
            "base_dir": self.base_dir,
        }

    def restore_metadata(self, meta: dict[str, Any]) -> None:
        from peftkit.configuration import from_dict

        super().restore_metadata(meta)
        if meta.get("reward") is not None:
            self.reward = from_dict(RewardConfig, meta["reward"], where="reward")
        if meta.get("sampling") is not None:
            self.sampling = from_dict(SamplingConfig, meta["sampling"], where="sampling")
        self.base_dir = meta.get("base_dir")

    def encoder(self, tokenizer: Any, cfg: Any) -> PromptEncoder:
        return PromptEncoder(self, tokenizer, cfg)

    # -- set-up -----------------------------------------------------------------------------------
    def start_reference(
        self, model: Any, *, init_adapter: str | bool | None = None, **run: Any
    ) -> str | None:
        line = super().start_reference(model, init_adapter=init_adapter, **run)
        self.tokenizer = run.get("tokenizer")
        self.autocast_dtype = run.get("autocast_dtype")
        self.seed = int(run.get("seed") or 0)
        self.load_judges(model)
        return line

    def start_evaluation(self, model: Any, adapter_dir: str | None) -> str | None:
        line = super().start_evaluation(model, adapter_dir) if self.uses_reference else None
        if self.reference is None and hasattr(model, "disable_adapter"):
            self.reference = AdapterOff()  # held-out KL to the base
        return line

    def load_judges(self, model: Any) -> None:
        if self.judges is None:
            from peftkit.judges import build_judges

            device = next(model.parameters()).device
            self.judges = build_judges(
                self.reward, base_dir=self.base_dir, device=str(device), autocast_dtype=self.autocast_dtype
            )

    # -- the sampling phase ------------------------------------------------------------------------
    def sample_step(
        self,
        model: Any,
        shards: list[tuple[list[Any], bool]],
        *,
        step: int,
        world: Any,
        global_batch_size: int,
    ) -> list[tuple[list[Any], bool]]:
        """This step's micro-batches of prompts -> micro-batches of training rows (and whether
        each counts: a process's padding share, or a placeholder where no answer could train)."""
        prompts = [p for examples, _ in shards for p in examples]
        # Each prompt's seed from its place in the step's global batch (micro-batch i, position
        # rank + k * size, as world.shard deals them): the answers do not depend on accumulation
        # or processes.
        seeds = [
            step_seed(self.seed, step, i * global_batch_size + world.rank + k * world.size)
            for i, (examples, _) in enumerate(shards)
            for k in range(len(examples))
        ]
        started = time.perf_counter()
        answers = sample_answers(
            model,
            self.tokenizer,
            [p.prompt_ids for p in prompts],
            self.sampling,
            seeds=seeds,
            autocast_dtype=self.autocast_dtype,
        )
        sampled = time.perf_counter()
        samples = self.judge(prompts, answers)
        self.whole_step(samples, [counts for examples, counts in shards for _ in examples], world)
        self._judged_at = time.perf_counter()
        self.keep_metrics(
            {"time/generate_s": sampled - started, "time/score_s": self._judged_at - sampled}, 1.0
        )
        parts, start = [], 0
        for examples, _ in shards:
            parts.append(_slice(samples, start, start + len(examples)))
            start += len(examples)
        # Metrics over the prompts that count: not a process's padding share (train/distributed.py).
        self.keep_sampling_metrics(_join([part for part, (_, counts) in zip(parts, shards) if counts]))
        out = []
        for part, (_, counts) in zip(parts, shards):
            rows, placeholder = self.training_examples(part)
            out.append((rows, counts and not placeholder))
        return out

    def step_metrics(self, world: Any, device: torch.device) -> dict[str, float]:
        """The step's metrics, with ``time/train_s``: from the judges' last verdict to the end of
        the optimizer step (forward, backward, reference pass, optimizer)."""
        if self._judged_at is not None:
            self.keep_metrics({"time/train_s": time.perf_counter() - self._judged_at}, 1.0)
            self._judged_at = None
        return super().step_metrics(world, device)

    def judge(self, prompts: list[PromptExample], answers: list[list[SampledAnswer]]) -> StepSamples:
        columns: dict[str, list[Any]] = {}
        for name in {k for p in prompts for k in p.columns}:
            columns[name] = [p.columns.get(name) for p in prompts]
        scored = self.judges.score_groups(
            [p.judge_prompt() for p in prompts],
            [[p.judge_answer(a) for a in group] for p, group in zip(prompts, answers)],
            columns,
        )
        for name, count in scored.unparseable.items():
            if count:
                self.keep_metrics({f"judges/{name}/unparseable": float(count)}, 1.0)
        return StepSamples(prompts, answers, scored.total, scored.per_judge)

    def whole_step(self, samples: StepSamples, counts: list[bool], world: Any) -> None:
        """What the objective computes over all of this step's answers before they are cut into
        micro-batches (``counts``: per prompt, whether it is real; see :meth:`sample_step`)."""

    def training_examples(self, samples: StepSamples) -> tuple[list[Any], bool]:
        """One micro-batch of training rows from its prompts' answers, and whether it is only a
        placeholder (no answer could train: weight 0, so every process still runs its passes)."""
        raise NotImplementedError

    def keep_sampling_metrics(self, samples: StepSamples) -> None:
        answers = [a for group in samples.answers for a in group]
        if not answers:
            return
        self.keep_metrics(
            {
                "completion_length": sum(len(a.ids) for a in answers) / len(answers),
                "completions/truncated": sum(not a.finished for a in answers) / len(answers),
            },
            len(answers),
        )
        scored = [r for group in samples.rewards for r in group if r is not None]
        self.keep_metrics({"rewards/skipped": 1 - len(scored) / len(answers)}, len(answers))
        if scored:
            self.keep_metrics({"reward": sum(scored) / len(scored)}, len(scored))
        stds = [_std([r for r in group if r is not None]) for group in samples.rewards]
        stds = [s for s in stds if s is not None]
        if stds:
            self.keep_metrics(
                {
                    "reward_std": sum(stds) / len(stds),
                    "frac_reward_zero_std": sum(s == 0 for s in stds) / len(stds),
                },
                len(stds),
            )
        for name, groups in samples.per_judge.items():
            values = [v for group in groups for v in group if v is not None]
            if values:
                self.keep_metrics({f"rewards/{name}/mean": sum(values) / len(values)}, len(values))
            # As reward_std: the mean of the groups' stds, which processes and micro-batches cannot
            # change (TRL's per-judge std is over its whole batch).
            spreads = [_std([v for v in group if v is not None]) for group in groups]
            spreads = [x for x in spreads if x is not None]
            if spreads:
                self.keep_metrics({f"rewards/{name}/std": sum(spreads) / len(spreads)}, len(spreads))

    # -- held-out evaluation -----------------------------------------------------------------------
    def validation(
        self,
        model: Any,
        examples: Sequence[Any],
        *,
        batch_size: int,
        pad_token_id: int,
        autocast_dtype: torch.dtype | None,
    ) -> dict[str, float]:
        """The validation prompts' mean reward of greedy answers (no loss: the answers are new)."""
        out = self.held_out(model, examples, autocast_dtype, kl=False)
        return {f"val_{k}": v for k, v in out.items() if isinstance(v, float)}

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        examples: Sequence[Any],
        *,
        eval_cfg: Any,
        autocast_dtype: torch.dtype | None,
        batch_size: int | None = None,
    ) -> dict[str, Any]:
        """Held-out prompts: the judges' mean reward of greedy answers and of answers sampled as
        in training (fixed seed), and the KL to the reference estimated on the sampled answers."""
        self.tokenizer = self.tokenizer or tokenizer
        if self.judges is None:  # `peftkit eval`, or "before" evaluation: judges compute as the model does
            self.autocast_dtype = autocast_dtype
        self.load_judges(model)
        if self.reference is None and not self.uses_reference and hasattr(model, "disable_adapter"):
            self.reference = AdapterOff()  # grpo with beta 0: the KL to the base, as start_evaluation's
        return self.held_out(model, examples, autocast_dtype, kl=True)

    def held_out(
        self, model: Any, examples: Sequence[Any], autocast_dtype: torch.dtype | None, *, kl: bool
    ) -> dict[str, Any]:
        kept = self._sums, self._weights, self._extremes  # a step's metrics, kept apart
        self._sums, self._weights, self._extremes = {}, {}, {}
        try:
            out = self._held_out(model, examples, autocast_dtype, kl=kl)
            unparseable = {k: v for k, v in self._sums.items() if k.endswith("/unparseable")}
            return {**out, **unparseable}
        finally:
            self._sums, self._weights, self._extremes = kept

    def _held_out(
        self, model: Any, examples: Sequence[Any], autocast_dtype: torch.dtype | None, *, kl: bool
    ) -> dict[str, Any]:
        prompts = list(examples)
        ids = [p.prompt_ids for p in prompts]
        greedy = sample_answers(
            model, self.tokenizer, ids, self.sampling, greedy=True, autocast_dtype=autocast_dtype
        )
        judged = self.judge(prompts, greedy)
        out: dict[str, Any] = {"n": len(prompts)}
        out.update(_means("reward", judged.rewards))
        for name, groups in judged.per_judge.items():
            out.update(_means(f"rewards/{name}/mean", groups))
        out["completion_length"] = sum(len(g[0].ids) for g in greedy) / max(1, len(greedy))
        if kl:
            sampled = sample_answers(
                model,
                self.tokenizer,
                ids,
                self.sampling,
                seeds=[step_seed(EVAL_SEED, i) for i in range(len(ids))],
                num_generations=1,
                autocast_dtype=autocast_dtype,
            )
            out.update(_means("sampled_reward", self.judge(prompts, sampled).rewards))
            if self.reference is not None:
                out["kl"] = self.sequence_kl(model, prompts, sampled, autocast_dtype)
        out["predictions"] = [
            {
                "origin": p.origin,
                "prompt": p.judge_prompt() if p.text_prompt else p.prompt[-1]["content"],
                "expected": None,
                "predicted": g[0].text,
                "reward": r[0],
                "scores": {name: groups[i][0] for name, groups in judged.per_judge.items()},
            }
            for i, (p, g, r) in enumerate(zip(prompts, greedy, judged.rewards))
        ]
        return out

    def sequence_kl(
        self,
        model: Any,
        prompts: list[PromptExample],
        answers: list[list[SampledAnswer]],
        autocast_dtype: Any,
    ) -> float:
        """KL(policy || reference) per answer, estimated on answers sampled from the policy: the sum
        over each answer's tokens of the k3 estimator exp(ref - logp) - (ref - logp) - 1 (Schulman
        2020; unbiased and never negative, unlike the plain log-ratio), averaged over answers;
        0 for the starting model."""
        from peftkit.data.preference_collate import collate_rows

        rows = [(p.prompt_ids, g[0].ids) for p, g in zip(prompts, answers) if g[0].ids]
        total, size = 0.0, 16
        pad = self.tokenizer.pad_token_id
        with inference(model, autocast_dtype):
            for start in range(0, len(rows), size):
                batch = self.to_device(collate_rows(rows[start : start + size], pad), model)
                ref = self.reference.token_logps(model, batch)
                policy = completion_token_logps(model, batch)[0]
                log_ratio = ref - policy
                total += float((log_ratio.exp() - log_ratio - 1).sum())
        return total / max(1, len(rows))

    def metric_lines(self, metrics: dict[str, Any]) -> list[str]:
        parts = [f"mean reward {metrics['reward']:.4f} (greedy answers)"] if "reward" in metrics else []
        if "sampled_reward" in metrics:
            parts.append(f"{metrics['sampled_reward']:.4f} (sampled)")
        if "kl" in metrics:
            parts.append(f"KL to the reference {metrics['kl']:.4f} nats per answer")
        judges = [
            f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("rewards/") and isinstance(v, float)
        ]
        return [", ".join(parts) or "no answer was scored", *([", ".join(judges)] if judges else [])]


def _std(values: list[float]) -> float | None:
    """Sample std (Bessel), as TRL; None with fewer than two values."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _means(name: str, groups: list[list[float | None]]) -> dict[str, float]:
    values = [v for group in groups for v in group if v is not None]
    return {name: sum(values) / len(values)} if values else {}


def _slice(samples: StepSamples, start: int, end: int) -> StepSamples:
    return StepSamples(
        samples.prompts[start:end],
        samples.answers[start:end],
        samples.rewards[start:end],
        {name: groups[start:end] for name, groups in samples.per_judge.items()},
        None if samples.advantages is None else samples.advantages[start:end],
    )


def _join(parts: list[StepSamples]) -> StepSamples:
    joined = StepSamples([], [], [], {name: [] for name in (parts[0].per_judge if parts else {})})
    for part in parts:
        joined.prompts += part.prompts
        joined.answers += part.answers
        joined.rewards += part.rewards
        for name, groups in part.per_judge.items():
            joined.per_judge[name] += groups
    return joined
