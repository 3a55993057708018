"""peftkit score: the rewards a reward model (``objective: reward``) gives texts or answers.

    peftkit score --adapter runs/tweet-sentiment-reward/adapter --prompt "I love it" \
        --completion positive --completion negative
    peftkit score --adapter DIR --data answers.jsonl --json scores.json

Prompts and completions are rendered as training rendered its pairs (``peftkit.scoring``).
"""

from __future__ import annotations

import argparse

HELP = "Score texts, or answers to a prompt, with a reward model (an adapter trained with objective reward)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from peftkit.cli._model_args import add_model_arguments

    add_model_arguments(parser)
    what = parser.add_argument_group("what to score (one of)")
    what.add_argument(
        "--text",
        action="append",
        metavar="T",
        help="a text, scored exactly as given (for a chat model: already rendered); repeatable",
    )
    what.add_argument("--prompt", metavar="P", help="a prompt: each --completion is scored as its answer")
    what.add_argument("--completion", action="append", metavar="C", help="an answer to --prompt; repeatable")
    what.add_argument(
        "--data",
        metavar="FILE",
        help="rows with 'text', or 'prompt' and 'completion' (strings or [{role, content}] messages); "
        ".jsonl, .json, .csv, .tsv or .parquet",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="Rows per forward pass (default: 16).")
    parser.add_argument("--json", metavar="FILE", help="Also write every row and its score to FILE as JSON.")


def run(args: argparse.Namespace) -> int:
    from peftkit.configuration import ConfigError
    from peftkit.data.readers import Record, read_file
    from peftkit.io import write_json
    from peftkit.preflight import device_problem, writable_file_problem
    from peftkit.scoring import check_reward_model, load_reward_model

    given = [
        name
        for name, value in (("--text", args.text), ("--prompt", args.prompt), ("--data", args.data))
        if value
    ]
    problems = [device_problem(args.device, "--device")]
    if args.adapter is None:
        problems.append(
            "--adapter DIR is required: the directory of an adapter trained with objective: reward"
        )
    if len(given) != 1:
        problems.append(
            f"give exactly one of --text, --prompt (with --completion) or --data, got {', '.join(given) or 'none'}"
        )
    if bool(args.prompt) != bool(args.completion):
        problems.append("--prompt and --completion go together: the prompt and the answers to score")
    if args.batch_size < 1:
        problems.append(f"--batch-size must be at least 1, got {args.batch_size}")
    problems.append(writable_file_problem(args.json, "--json") if args.json else None)
    if any(problems):
        raise ConfigError([p for p in problems if p], "command line")
    check_reward_model(args.adapter)  # a clear refusal before any weight is read
    if args.data:
        rows = list(read_file(args.data))
    elif args.text:
        rows = [Record(f"--text {i + 1}", {"text": text}) for i, text in enumerate(args.text)]
    else:
        rows = [
            Record(f"--completion {i + 1}", {"prompt": args.prompt, "completion": c})
            for i, c in enumerate(args.completion)
        ]
    scorer = load_reward_model(
        args.adapter,
        base_model=args.base_model,
        device=args.device,
        precision=args.precision,
        dtype=args.dtype,
        threads=args.threads,
        trust_remote_code=args.trust_remote_code,
    )
    scores = scorer.score_rows(rows, batch_size=args.batch_size)
    for record, score in zip(rows, scores):
        print(f"{score:9.4f}  {_shown(record.data)}")
    if args.json:
        results = [{"origin": r.origin, **r.data, "score": s} for r, s in zip(rows, scores)]
        write_json(
            args.json, {"adapter": args.adapter, "precision": scorer.precision_label, "scores": results}
        )
    return 0


def _shown(row: dict) -> str:
    """One line for a scored row: the text, or the prompt's end and the completion."""
    if "text" in row and "completion" not in row:
        text = " ".join(str(row["text"]).split())
        return repr(text if len(text) <= 100 else text[:97] + "...")
    prompt, completion = (" ".join(str(row[k]).split()) for k in ("prompt", "completion"))
    prompt = prompt if len(prompt) <= 60 else "..." + prompt[-57:]
    return f"{prompt!r} -> {completion!r}"
