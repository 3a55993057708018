"""peftkit eval: the metrics of the adapter's task on held-out data.

Causal LM: loss / perplexity and answer accuracy by generation; classification: accuracy, macro-F1
and per-class scores; token classification: token accuracy, macro-F1, entity F1; QA: exact
match and F1; seq2seq: loss / perplexity and exact match. The task is the adapter's (its
``peftkit_task.json`` or ``task_type``), else the config's ``task``. An adapter trained with a
preference objective gets its objective's metrics on preference rows, and is measured by
generation like an SFT adapter on prompt / completion rows (``peftkit.objectives.evaluation``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "Evaluate a base model or base + adapter with its task's metrics (accuracy, F1, loss, ...)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from peftkit.cli._model_args import add_model_arguments
    from peftkit.cli.train import add_config_arguments

    add_config_arguments(parser, required=False)
    add_model_arguments(parser)
    parser.add_argument("--data", metavar="FILE", help="Evaluate on this file instead of the config's split.")
    parser.add_argument(
        "--split", choices=["test", "validation"], default="test", help="Config split (default: test)."
    )
    parser.add_argument("--no-adapter", action="store_true", help="Evaluate the base model alone.")
    parser.add_argument(
        "--max-new-tokens", type=int, help="Tokens generated per prompt (default: the config's)."
    )
    parser.add_argument("--batch-size", type=int, help="Examples per batch (default: the config's).")
    parser.add_argument("--json", metavar="FILE", help="Also write the results as JSON to FILE.")
    parser.add_argument(
        "--predictions",
        metavar="FILE",
        help="Write every prediction (origin file:line, prompt, expected, predicted, correct) to FILE as "
        "JSON lines (default with --json: FILE.predictions.jsonl next to it).",
    )
    parser.add_argument(
        "--json-predictions", action="store_true", help="Include every prediction in the --json results too."
    )


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from peftkit.configuration import ConfigError
    from peftkit.data import check_sources, count_rows, load_split
    from peftkit.io import write_json
    from peftkit.loading import load_model_from_args, read_adapter_config
    from peftkit.objectives.config import ONLINE_OBJECTIVES
    from peftkit.objectives.evaluation import evaluation_task
    from peftkit.preflight import device_problem, writable_file_problem
    from peftkit.tasks import get_task, load_task
    from peftkit.train.config import build_job_config, load_job_config

    problems = [device_problem(args.device, "--device")]
    problems.append(writable_file_problem(args.json, "--json") if args.json else None)
    if args.json and not args.predictions:
        args.predictions = str(Path(args.json).with_suffix("")) + ".predictions.jsonl"
    problems.append(writable_file_problem(args.predictions, "--predictions") if args.predictions else None)
    for option, value in [("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)]:
        problems.append(
            f"{option} must be at least 1, got {value}" if value is not None and value < 1 else None
        )
    if any(problems):  # before anything is read or loaded
        raise ConfigError([p for p in problems if p], "command line")
    job = (
        load_job_config(args.config, args.overrides, for_training=False)
        if args.config
        else build_job_config({})
    )
    data_cfg = job.data
    split = args.split
    if args.data:
        data_cfg = dataclasses.replace(
            data_cfg, train=None, validation=None, test=args.data, test_size=None, val_size=None
        )
        split = "test"
    if args.no_adapter:
        args.adapter = None
    elif args.adapter is None and args.config and (Path(job.output_dir) / "adapter").is_dir():
        args.adapter = str(Path(job.output_dir) / "adapter")
    if args.base_model is None and not args.adapter:
        args.base_model = job.base_model
    args.trust_remote_code = args.trust_remote_code or job.trust_remote_code
    args.precision = args.precision or job.training.precision  # as training evaluated
    args.threads = args.threads or job.training.num_threads

    if args.adapter and Path(args.adapter).is_dir():
        read_adapter_config(args.adapter)  # an unreadable adapter_config.json, named
    task = load_task(args.adapter, default=job.task) if args.adapter else get_task(job.task)
    objective = getattr(task, "objective", None)  # the adapter's preference objective, if any
    if args.config and job.objective in ONLINE_OBJECTIVES and objective not in ONLINE_OBJECTIVES:
        # An online job's config: its held-out prompts and judges measure any causal-LM adapter
        # (the offline pairs + DPO route against the online one) or the base model.
        task = get_task(job.task, job.objective, job.preference, job)
        note = "measured as the config's objective measures: answers to its prompts, scored by its judges"
    else:  # a dpo / orpo / simpo / kto adapter on prompt/completion rows: measured by generation
        task, note = evaluation_task(task, data_cfg, split)
    check_sources(data_cfg, (split,), task=task)  # before the model loads
    if task.labels is None:
        task.prepare(job.data)  # a classifier's label names: read from the training data as training did
    # the base with the task's head (sized by its labels), the adapter applied, on --device
    model, tokenizer = load_model_from_args(args, task=task.loader_task, **task.model_kwargs())
    reference = task.start_evaluation(model, args.adapter)  # dpo / kto: the reference trained against
    examples = load_split(data_cfg, tokenizer, split, seed=job.training.seed, task=task)
    autocast_dtype = args.autocast_dtype  # --precision, else the config's training.precision
    batch_size = args.batch_size if args.batch_size is not None else job.evaluation.batch_size
    # count_rows: a QA row split into several windows is one example
    what = f"{'base + adapter ' + args.adapter if args.adapter else 'base model'} on {count_rows(examples)} {split} examples"
    kind = f"task {task.task_type.value}" + (f", objective {objective}" if objective else "")
    print(f"Evaluating {what} ({kind}; precision {args.precision_label})")
    for line in (note, reference and f"reference model: {reference}"):
        if line:
            print(line)
    eval_cfg = job.evaluation
    if args.max_new_tokens is not None:
        eval_cfg = dataclasses.replace(eval_cfg, max_new_tokens=args.max_new_tokens)
    metrics = task.eval_metrics(
        model, tokenizer, examples, eval_cfg=eval_cfg, autocast_dtype=autocast_dtype, batch_size=batch_size
    )
    predictions = metrics.pop("predictions", None)
    for line in task.metric_lines(metrics):
        print(line)
    if predictions is not None and args.predictions:
        from peftkit.train.held_out import write_predictions

        write_predictions(args.predictions, predictions)
        print(f"predictions: {args.predictions}")
    results: dict = {
        "split": split,
        "adapter": args.adapter,
        "task": task.task_type.value,
        **({"objective": objective} if objective else {}),
        "precision": args.precision_label,
        "n": metrics.get("n", count_rows(examples)),
    }
    results.update({k: v for k, v in metrics.items() if k not in ("samples", "summary_lines", "n")})
    if predictions is not None and args.json_predictions:
        results["predictions"] = predictions
    if args.json:
        write_json(args.json, results)
    else:
        print(json.dumps({k: v for k, v in results.items() if k != "adapter"}))
    return 0
