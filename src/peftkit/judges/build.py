"""Judges from the job config's ``reward`` section (:class:`peftkit.rlaif.config.RewardConfig`):
its functions, then its models, then its LLM judge, weighted by ``reward.weights`` in that order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.judges.base import Judge, Judges, precision_name
from peftkit.judges.functions import FunctionJudge, function_name, load_reward_function
from peftkit.rlaif.config import RewardConfig, RewardModelSpec


def build_judges(
    cfg: RewardConfig,
    *,
    base_dir: str | Path | None = None,
    device: str = "auto",
    autocast_dtype: Any = None,
    threads: int | None = None,
) -> Judges:
    """Load every judge ``cfg`` names (models on ``device``) and weigh them.

    ``base_dir``: the YAML config's directory, where a reward function's module file and a model
    directory given relative to the config may lie. ``autocast_dtype``: how the model judges
    compute, as the model being trained does: None is fp32, ``torch.bfloat16`` is bf16 autocast
    (base weights stored in bf16); a precision name (``auto``, ``bf16``, ``fp32``) also works.
    ``threads``: CPU threads (None: peftkit's choice, see :mod:`peftkit.threads`).
    """
    if cfg.count() == 0:
        raise PeftkitError(
            "the reward section names no judge: give at least one of reward.functions (Python functions "
            "module:function), reward.models (reward models or classifiers: their directories) or "
            "reward.judge (an LLM judge, e.g. {model: smollm2-135m-instruct})"
        )
    problems = list(cfg.validate())
    for i, spec in enumerate(cfg.models):
        if isinstance(spec, RewardModelSpec):
            problems += [p.replace("reward.models[]", f"reward.models[{i}]") for p in spec.validate()]
    if cfg.judge is not None:
        problems += cfg.judge.validate()
    if problems:
        from peftkit.configuration import ConfigError

        raise ConfigError(problems)
    precision = precision_name(autocast_dtype)
    judges: list[Judge] = []
    for spec in cfg.functions:
        fn = load_reward_function(spec, base_dir)
        judges.append(FunctionJudge(fn, function_name(fn, fallback=spec.rpartition(":")[2])))
    if cfg.models:
        from peftkit.judges.reward_model import load_model_judge

        for spec in cfg.models:
            judges.append(
                load_model_judge(
                    spec,
                    base_dir=base_dir,
                    device=device,
                    precision=precision,
                    threads=threads,
                    batch_size=cfg.batch_size,
                )
            )
    if cfg.judge is not None:
        from peftkit.judges.llm_judge import load_llm_judge

        judges.append(
            load_llm_judge(
                cfg.judge, device=device, precision=precision, threads=threads, batch_size=cfg.batch_size
            )
        )
    return Judges(judges, cfg.weights)
