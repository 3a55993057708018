"""Offline RLAIF: sample answers to prompts, let the judges score them, write preference pairs.

::

    data.format prompt rows (one split)  --k answers each, seeded per prompt-->  judges (section reward)
        --> per prompt: chosen = best answer, rejected = worst (objectives.grpo_loss.best_and_worst)
        --> OUT.jsonl, one ``preference`` row per kept prompt, trainable with ``objective: dpo``:

    {"prompt": <as in the data: text or messages>, "chosen": "...", "rejected": "...",
     "score_chosen": 0.9, "score_rejected": 0.1, "scores": [0.9, null, 0.1, 0.4], "origin": "file:line"}

A prompt gives no pair, and is counted, when its scored answers all tie (``ties``), when fewer
than two of its answers were scored (``unscored``: None from a function, an unreadable verdict),
when only empty answers kept it from two (``empty``: the preference reader refuses an empty
answer, so empty answers are never chosen or rejected) or when the best and the worst answer
are the same text (``identical``).

Answer g of the prompt at position i of the split is sampled with seed
``step_seed(step_seed(training.seed, i), g)`` (:mod:`peftkit.rlaif.sampling`): a prompt's answers
do not depend on which prompts share its batch, so a resumed run writes what a straight run
would have (batches start at multiples of the batch's prompt count, so they are even the same
batches unless ``limit`` stopped a run mid-batch).

Files: OUT is append-only, flushed and synced after each batch of prompts; ``OUT.state.json``
(written atomically after each batch) records how many prompts are done, OUT's length at that
point, the counts so far and the settings' fingerprint (model, adapter, judges, sampling, seed,
data). ``resume`` refuses a file made with other settings and cuts OUT back to the recorded
length (a kill mid-write leaves a half line after it); without ``resume`` an existing OUT is
refused unless ``overwrite``. While it runs the command holds a lock on OUT: a second run on the
same file is refused (:mod:`peftkit.rlaif.label_state`).

The job config is a normal peftkit job YAML (:func:`load_label_job`): whatever its objective,
it is validated as ``objective: online_dpo`` (the objective whose ``reward`` / ``sampling``
sections and ``prompt`` data this reads), with the options that concern only training set aside.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftkit.configuration import ConfigError
from peftkit.data.preference import ANNOTATION_COLUMNS

# The "X as X" imports re-export names that callers and tests import from this module, their
# home before the output's state and the report moved to modules of their own.
from peftkit.rlaif.label_report import DROP_REASONS as DROP_REASONS
from peftkit.rlaif.label_report import LabelReport
from peftkit.rlaif.label_state import STATE_FORMAT as STATE_FORMAT
from peftkit.rlaif.label_state import (
    check_settings,
    claim_output,
    cut_back,
    dir_digest,
    file_digest,
    locked_output,
    module_file,
    prompts_digest,
    write_state,
)
from peftkit.rlaif.label_state import state_path as state_path

SPLITS = ("train", "validation", "test")
#: The keys of an output row beside the preference fields (prompt, chosen, rejected).
EXTRA_KEYS = ANNOTATION_COLUMNS  # the data loader reads past them without a warning
# Sampling options that change which answers are sampled (batch_size only groups them).
_SAMPLING_KEYS = ("num_generations", "max_completion_length", "temperature", "top_p", "top_k")


# -- the config ------------------------------------------------------------------------------------


def load_label_job(path: str | os.PathLike, overrides: list[str] | None = None) -> Any:
    """The job in YAML file ``path`` (``--set`` ``overrides`` applied), validated for label-pairs.

    ``build_job_config`` refuses ``reward`` / ``sampling`` sections unless the objective samples
    answers, and the prompts are read by the online objectives' encoder; so the job is built with
    ``objective: online_dpo`` whatever the file says (a dpo or sft config that shares the data and
    judges works as it is). Options that only matter for training, and that online_dpo would
    refuse, are set aside first: ``preference`` (except ``max_prompt_len``, which cuts long
    prompts), ``distributed``, ``training.packing``, ``quantization`` and ``init_adapter`` (the
    model sampled from is ``base_model`` plus ``--adapter``). The job gets ``label_objective``
    (the file's objective) and ``ignored`` (what was set aside, for a note)."""
    from peftkit.train.config import build_job_config
    from peftkit.train.yaml_file import apply_overrides, read_yaml

    raw = apply_overrides(read_yaml(path), overrides or [])
    objective = raw.get("objective", "sft")
    problems: list[str] = []
    data = raw.get("data")
    fmt = data.get("format", "auto") if isinstance(data, dict) else "auto"
    if fmt not in ("auto", "prompt"):
        problems.append(
            f"'data.format' is {fmt}, but label-pairs samples answers to prompts: give rows {{prompt: text or "
            "messages, ...columns for the reward functions}} and set data.format: prompt "
            "(--set data.format=prompt)"
        )
    reward = raw.get("reward")
    if not isinstance(reward, dict) or not any(reward.get(k) for k in ("functions", "models", "judge")):
        problems.append(
            "section 'reward' names no judge: label-pairs scores the answers with reward.functions "
            "(module:function), reward.models (a reward model, or a classifier with its label) or "
            "reward.judge (an LLM judge)"
        )
    ignored = []
    preference = raw.get("preference")
    if isinstance(preference, dict):
        kept = {k: v for k, v in preference.items() if k == "max_prompt_len"}
        ignored += [f"preference.{k}" for k in preference if k not in kept]
        raw["preference"] = kept
    for key in ("distributed", "quantization", "init_adapter"):
        if raw.get(key) is not None:
            ignored.append(key)
        raw.pop(key, None)
    training = raw.get("training")
    if isinstance(training, dict) and training.pop("packing", None):
        ignored.append("training.packing")
    raw["objective"] = "online_dpo"
    job = None
    try:
        job = build_job_config(raw, source=str(path))
    except ConfigError as err:
        for problem in err.problems:
            if "section 'reward' names none" in problem:
                continue  # said above, in label-pairs' words
            problem = problem.replace(
                "objective online_dpo", "label-pairs (which reads the job as online_dpo)"
            )
            if problem not in problems:
                problems.append(problem)
    if problems:
        raise ConfigError(problems, str(path))
    assert job is not None
    job.source_dir = str(Path(path).resolve().parent)  # where reward functions' modules may lie
    job.label_objective = objective
    job.ignored = ignored
    return job


# -- the run ---------------------------------------------------------------------------------------


def label_pairs(
    job: Any,
    out_path: str | os.PathLike,
    *,
    adapter: str | None = None,
    base_model: str | None = None,
    num_generations: int | None = None,
    split: str = "train",
    limit: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    precision: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    trust_remote_code: bool = False,
    progress: bool | None = True,
    say: Callable[[str], None] | None = None,
) -> LabelReport:
    """Label the prompts of ``job``'s ``split`` (the first ``limit`` of them) into ``out_path``.

    ``job``: a job config (:func:`load_label_job`; or ``build_job_config`` with an online
    objective). The model is ``base_model`` (default: the job's) with ``adapter`` applied;
    ``device`` / ``precision`` / ``threads`` default to the job's ``training`` settings.
    ``num_generations`` overrides ``sampling.num_generations``. ``say`` prints the notes (default:
    to stderr). Returns the counts (``LabelReport.summary()`` reads them out)."""
    from peftkit.configuration import to_dict
    from peftkit.preflight import device_problem, writable_file_problem

    say = say or _stderr
    out = Path(out_path).expanduser()
    if num_generations is None:
        num_generations = job.sampling.num_generations
    sampling = dataclasses.replace(job.sampling, num_generations=num_generations)
    device = device or job.training.device
    precision = precision or job.training.precision
    threads = threads if threads is not None else job.training.num_threads
    base = base_model or job.base_model
    problems = [device_problem(device, "--device"), writable_file_problem(out, "--out")]
    problems += [
        p.replace("'sampling.num_generations'", "--num-generations (sampling.num_generations)")
        for p in sampling.validate()
    ]
    if split not in SPLITS:
        problems.append(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if limit is not None and limit < 1:
        problems.append(f"--limit must be at least 1, got {limit}")
    if resume and overwrite:
        problems.append("--resume continues OUT and --overwrite replaces it: give one of them")
    if adapter is not None and not Path(adapter).is_dir():
        problems.append(f"--adapter {adapter} is not a directory: give the directory an adapter was saved to")
    if any(problems):
        raise ConfigError([p for p in problems if p], "label-pairs")

    settings = {
        "base_model": base,
        # the adapter's files, not its path: a copy elsewhere is the same adapter
        "adapter_files": dir_digest(adapter) if adapter else None,
        "dtype": dtype,
        "seed": job.training.seed,
        "sampling": {k: v for k, v in to_dict(sampling).items() if k in _SAMPLING_KEYS},
        "reward": to_dict(job.reward),
        "data": {"split": split, **to_dict(job.data)},
    }
    report = LabelReport(str(out))
    state = claim_output(out, resume=resume, overwrite=overwrite)
    if state is not None:
        check_settings(state, settings, out)
        report.restore(state.get("counts", {}))
        report.resumed_at = int(state["prompts_done"])
    _warn_ignored(job, adapter, say)

    # Judges first: a bad reward function is refused before the model loads.
    from peftkit.data import build_datasets, check_sources
    from peftkit.judges import build_judges
    from peftkit.judges.functions import FunctionJudge
    from peftkit.loading import load_model_from_args
    from peftkit.models import resolve_device
    from peftkit.objectives import objective_task
    from peftkit.precision import resolve_autocast

    task = objective_task("online_dpo", job.preference, job)
    task.sampling = sampling
    check_sources(job.data, (split,), task=task)
    torch_device = resolve_device(device, "--device")
    autocast = None
    if dtype == "float32":
        autocast = resolve_autocast(precision, torch_device, key="--precision", note=lambda _: None)
    judges = build_judges(
        job.reward,
        base_dir=getattr(job, "source_dir", None),
        device=str(torch_device),
        autocast_dtype=autocast,
        threads=threads,
    )
    settings["reward_code"] = {
        spec: file_digest(module_file(j.fn))
        for spec, j in zip(job.reward.functions, judges.judges)
        if isinstance(j, FunctionJudge)
    }
    if state is not None:
        check_settings(state, settings, out)

    args = argparse.Namespace(
        base_model=base,
        adapter=adapter,
        device=device,
        precision=precision,
        dtype=dtype,
        threads=threads,
        trust_remote_code=trust_remote_code or job.trust_remote_code,
    )
    model, tokenizer = load_model_from_args(args)
    prompts = getattr(
        build_datasets(job.data, tokenizer, job.training.seed, splits=(split,), task=task), split
    )
    prompts = sorted(prompts, key=_data_order)  # the train split comes shuffled: label in the data's order
    settings["precision"] = args.precision_label
    settings["prompts"] = {"count": len(prompts), "digest": prompts_digest(prompts)}
    if state is not None:
        check_settings(state, settings, out)
    report.prompts_total = len(prompts)
    report.prompts_target = min(len(prompts), limit) if limit is not None else len(prompts)
    report.prompts_done = report.resumed_at
    if job.data.system_prompt is not None:
        report.notes.append(
            "data.system_prompt is not written into the rows' prompts: train on the pairs with the same "
            "data.system_prompt"
        )
    cut = sum(p.truncated for p in prompts)
    if cut:
        report.notes.append(
            f"{cut:,} prompts were longer than data.max_seq_len minus sampling.max_completion_length (or "
            "preference.max_prompt_len): their answers were sampled to their last tokens, their rows keep "
            "the whole prompt"
        )
    what = f"base {base}" + (f" + adapter {adapter}" if adapter else "")
    say(
        f"label-pairs: {max(0, report.prompts_target - report.resumed_at):,} of {len(prompts):,} {split} prompts "
        f"to label ({what}; precision {args.precision_label}; {sampling.num_generations} answers each; "
        f"judges: {', '.join(judges.names)})"
    )

    with locked_output(out) as handle:
        if state is not None:
            cut_back(handle, int(state["bytes"]), out, say)
        else:
            handle.truncate(0)
        write_state(out, settings, report, os.fstat(handle.fileno()).st_size)
        _label(
            model,
            tokenizer,
            prompts,
            judges,
            sampling,
            handle,
            report,
            settings,
            seed=job.training.seed,
            system_prompt=job.data.system_prompt,
            autocast=args.autocast_dtype,
            progress=progress,
        )
    return report


def _label(
    model: Any,
    tokenizer: Any,
    prompts: list[Any],
    judges: Any,
    sampling: Any,
    handle: Any,
    report: LabelReport,
    settings: dict[str, Any],
    *,
    seed: int,
    system_prompt: str | None,
    autocast: Any,
    progress: bool | None,
) -> None:
    """Sample, judge and write prompts ``report.prompts_done`` up to ``report.prompts_target``,
    one batch at a time; after each batch OUT is synced and then the state written."""
    from tqdm.auto import tqdm

    from peftkit.rlaif.sampling import sample_answers, step_seed

    per_batch = max(1, sampling.batch_size // sampling.num_generations)  # prompts per generate call
    bar = tqdm(
        total=report.prompts_target,
        initial=report.prompts_done,
        desc="label-pairs",
        unit="prompt",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=None if progress is None else not progress,
    )
    try:
        start = report.prompts_done
        while start < report.prompts_target:
            # Batches start at multiples of per_batch: a resumed run cuts the prompts as a straight one.
            end = min(report.prompts_target, (start // per_batch + 1) * per_batch)
            chunk = prompts[start:end]
            answers = sample_answers(
                model,
                tokenizer,
                [p.prompt_ids for p in chunk],
                sampling,
                seeds=[step_seed(seed, i) for i in range(start, end)],
                autocast_dtype=autocast,
            )
            columns: dict[str, list[Any]] = {}
            for name in sorted({k for p in chunk for k in p.columns}):
                columns[name] = [p.columns.get(name) for p in chunk]
            scored = judges.score_groups(
                [p.judge_prompt() for p in chunk],
                [[p.judge_answer(a) for a in group] for p, group in zip(chunk, answers)],
                columns,
            )
            for name, count in scored.unparseable.items():
                report.unparseable[name] = report.unparseable.get(name, 0) + count
            lines = []
            for prompt, group, scores in zip(chunk, answers, scored.total):
                row = pair_row(prompt, group, scores, report, system_prompt)
                if row is not None:
                    lines.append(json.dumps(row, ensure_ascii=False) + "\n")
            handle.write("".join(lines).encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
            report.prompts_done = end
            write_state(Path(report.out), settings, report, os.fstat(handle.fileno()).st_size)
            bar.update(end - start)
            bar.set_postfix(pairs=report.pairs, dropped=report.dropped, refresh=False)
            start = end
    finally:
        bar.close()


def pair_row(
    prompt: Any,
    answers: list[Any],
    scores: list[float | None],
    report: LabelReport,
    system_prompt: str | None = None,
) -> dict[str, Any] | None:
    """The output row of one prompt (a :class:`PromptExample`), its sampled answers and their
    total scores; None, counted in ``report``, where they give no pair."""
    from peftkit.objectives.grpo_loss import best_and_worst

    report.answers += len(answers)
    report.truncated_answers += sum(not a.finished for a in answers)
    empty = [not a.text.strip() for a in answers]
    report.empty_answers += sum(empty)
    usable = [None if blank else s for s, blank in zip(scores, empty)]
    found = best_and_worst(usable)
    if found is None:
        scored_usable = sum(s is not None for s in usable)
        if scored_usable >= 2:
            report.ties += 1
        elif sum(s is not None for s in scores) >= 2:
            report.empty += 1
        else:
            report.unscored += 1
        return None
    best, worst = found
    chosen, rejected = answers[best].text.strip(), answers[worst].text.strip()
    if chosen == rejected:
        report.identical += 1
        return None
    report.pairs += 1
    report.margin_sum += scores[best] - scores[worst]
    return {
        "prompt": data_prompt(prompt, system_prompt),
        "chosen": chosen,
        "rejected": rejected,
        "score_chosen": scores[best],
        "score_rejected": scores[worst],
        "scores": list(scores),
        "origin": prompt.origin,
    }


def data_prompt(prompt: Any, system_prompt: str | None = None) -> Any:
    """A prompt as its row gave it: the text, or the messages (``{role, content}``) without the
    system message ``data.system_prompt`` added (training with the same system_prompt adds it back;
    a row that began with that very message reads the same either way)."""
    if prompt.text_prompt:
        return prompt.judge_prompt()
    messages = [dict(m) for m in prompt.prompt]
    if system_prompt is not None and messages[:1] == [{"role": "system", "content": system_prompt}]:
        messages = messages[1:]
    return messages


def _data_order(prompt: Any) -> tuple[str, int]:
    """Sort key of a prompt in the data's order, from its origin (``file:line``, ``data.train[i]``)."""
    found = re.search(r"(\d+)\D*$", prompt.origin)
    if found is None:
        return prompt.origin, 0
    return prompt.origin[: found.start()], int(found.group(1))


def _warn_ignored(job: Any, adapter: str | None, say: Callable[[str], None]) -> None:
    ignored = list(getattr(job, "ignored", []))
    if "init_adapter" in ignored and adapter is None:
        say("note: the config's init_adapter is not loaded: give --adapter DIR to sample from an adapter")
    rest = [k for k in ignored if k != "init_adapter"]
    if rest:
        say(f"note: label-pairs does not use {', '.join(rest)} (training options); they are ignored")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
