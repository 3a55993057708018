"""Evaluation users can trust (issue 18): one precision and the same greedy answers in train-time
evaluation, `peftkit eval` and `peftkit generate`; every prediction kept, with the row's origin and
the prompt as written; baseline, spread and collapse lines; forgetting on general text; threads."""

from __future__ import annotations

import json

import pytest

from peftkit.cli import main as cli_main
from peftkit.train.config import build_job_config
from peftkit.train.loop import run_training

WORDS = ["good", "bad", "fine", "poor", "great", "awful", "nice", "vile", "calm", "sad", "glad", "grim"]
ROWS = [
    {"prompt": f"the word {w} is", "completion": "positive" if i % 2 == 0 else "negative"}
    for i, w in enumerate(WORDS)
]


def _job(model_dir, tmp_path, *, precision="bf16", **evaluation):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 2))
    raw = {
        "base_model": str(model_dir),
        "method": "lora",
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(data), "test_size": 6, "val_size": 4},
        "training": {
            "max_steps": 6,
            "batch_size": 4,
            "learning_rate": 5e-3,
            "precision": precision,
            "seed": 3,
        },
        "evaluation": {"accuracy_before": True, "max_new_tokens": 4, "batch_size": 16, **evaluation},
        "output_dir": str(tmp_path / "run"),
    }
    return raw


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One bf16 run (explicit: the same on CPUs with and without native bf16) with held-out
    evaluation before and after, and general-text perplexity."""
    tmp = tmp_path_factory.mktemp("trust")
    raw = _job(tiny_model_dir, tmp, general="builtin")
    (tmp / "job.yaml").write_text(json.dumps(raw))
    results = run_training(build_job_config(raw), progress=False)
    return tmp, raw, results


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_keeps_every_prediction_with_origin_and_the_prompt_as_written(trained):
    tmp, raw, results = trained
    for label in ("before", "after"):
        rows = _lines(tmp / "run" / f"predictions_{label}.jsonl")
        assert len(rows) == results[label]["n"] == 6
        for row in rows:
            assert set(row) == {"origin", "prompt", "expected", "predicted", "correct"}
            file, line = row["origin"].rsplit(":", 1)
            written = json.loads((tmp / "rows.jsonl").read_text().splitlines()[int(line) - 1])
            assert file.endswith("rows.jsonl") and written["prompt"] == row["prompt"]  # no template
            assert written["completion"] == row["expected"]
        assert sum(r["correct"] for r in rows) / len(rows) == pytest.approx(results[label]["accuracy"])
    summary = results["after"]["summary"]
    expected = [r["expected"] for r in _lines(tmp / "run" / "predictions_after.jsonl")]
    majority = max(expected.count("positive"), expected.count("negative")) / len(expected)
    assert summary["majority_baseline"] == pytest.approx(majority)
    assert set(summary["recall"]) <= {"positive", "negative"}
    saved = json.loads((tmp / "run" / "eval_results.json").read_text())
    assert "predictions" not in saved["after"] and saved["after"]["predictions_file"].endswith("after.jsonl")
    assert saved["precision"].startswith("bf16")


def test_train_eval_and_generate_give_the_same_greedy_answers(trained, capsys):
    """The same adapter, test split and batch size: identical predictions in all three."""
    tmp, raw, _ = trained
    after = _lines(tmp / "run" / "predictions_after.jsonl")
    out_json = tmp / "eval.json"
    code = cli_main.main(["eval", str(tmp / "job.yaml"), "--precision", "bf16", "--json", str(out_json)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "precision bf16" in printed and "majority baseline" in printed
    evaluated = _lines(tmp / "eval.predictions.jsonl")
    assert [r["predicted"] for r in evaluated] == [r["predicted"] for r in after]
    assert [r["origin"] for r in evaluated] == [r["origin"] for r in after]
    results = json.loads(out_json.read_text())
    assert results["precision"].startswith("bf16") and "predictions" not in results
    assert results["accuracy"] == pytest.approx(
        json.loads((tmp / "run" / "eval_results.json").read_text())["after"]["accuracy"]
    )

    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in after))
    argv = ["generate", "--adapter", str(tmp / "run" / "adapter"), "--prompts-file", str(prompts)]
    code = cli_main.main([*argv, "--precision", "bf16", "--max-new-tokens", "4", "--jsonl"])
    assert code == 0
    captured = capsys.readouterr()
    generated = [json.loads(line)["completion"] for line in captured.out.splitlines()]
    assert generated == [r["predicted"] for r in after]
    assert "precision: bf16" in captured.err


def test_eval_loss_equals_train_time_validation_in_the_same_precision_only(trained, capsys):
    """Greedy answers of a tiny model rarely flip between precisions; the loss shows any difference:
    `peftkit eval` on the validation split gives training's validation loss exactly in bf16 (the
    default: the config's precision), and a different one in fp32."""
    tmp, _, results = trained
    losses = {}
    for precision in ("bf16", "fp32"):
        out = tmp / f"val-{precision}.json"
        argv = ["eval", str(tmp / "job.yaml"), "--split", "validation", "--json", str(out)]
        assert cli_main.main([*argv, "--precision", precision] if precision == "fp32" else argv) == 0
        losses[precision] = json.loads(out.read_text())["loss"]
    assert losses["bf16"] == pytest.approx(results["validation"]["val_loss"], rel=1e-6, abs=0)
    assert losses["fp32"] != pytest.approx(losses["bf16"], rel=1e-5, abs=0)


def test_eval_json_can_include_the_predictions(trained, capsys):
    tmp, _, _ = trained
    out_json, predictions = tmp / "with.json", tmp / "elsewhere.jsonl"
    argv = ["eval", str(tmp / "job.yaml"), "--json", str(out_json), "--json-predictions"]
    assert cli_main.main([*argv, "--predictions", str(predictions)]) == 0
    results = json.loads(out_json.read_text())
    assert results["predictions"] == _lines(predictions) and len(results["predictions"]) == 6
    assert not (tmp / "with.predictions.jsonl").exists()


def test_general_text_perplexity_before_and_after(trained, capsys):
    tmp, _, results = trained
    general = results["general"]
    assert general["before"]["source"] == "builtin" and general["before"]["tokens"] > 500
    assert general["after"]["tokens"] == general["before"]["tokens"]
    assert general["after"]["perplexity"] != general["before"]["perplexity"]  # the adapter changed it


def test_general_text_from_a_user_file_and_bad_sources(tiny_model_dir, tmp_path):
    from peftkit.configuration import ConfigError
    from peftkit.forgetting import general_pieces, read_texts

    text = tmp_path / "general.txt"
    text.write_text("First paragraph, two lines\nof text.\n\n\nSecond paragraph.\n")
    assert read_texts(str(text)) == [
        (f"{text}:1", "First paragraph, two lines\nof text."),
        (f"{text}:5", "Second paragraph."),
    ]
    rows = tmp_path / "general.jsonl"
    rows.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert [origin for origin, _ in read_texts(str(rows))] == [f"{rows}:1", f"{rows}:3"]
    rows.write_text('{"text": "one"}\n{"txt": "two"}\n')
    with pytest.raises(ValueError, match=rf"{rows}:2: expected an object with a \"text\" string"):
        read_texts(str(rows))

    class Chars:  # one token per character
        def __call__(self, text):
            return {"input_ids": [ord(c) for c in text]}

    pieces = general_pieces(str(text), Chars(), max_len=8)
    assert all(2 <= len(p.input_ids) <= 8 for p in pieces) and pieces[0].labels == pieces[0].input_ids
    for source, message in [
        (tmp_path / "missing.txt", "is not a file"),
        (tmp_path / "job.yaml", "must be a .txt"),
    ]:
        (tmp_path / "job.yaml").write_text("x")
        with pytest.raises(ConfigError, match=rf"evaluation.general.*{message}"):
            build_job_config(_job(tiny_model_dir, tmp_path, general=str(source)))


def test_threads_option(tiny_model_dir, tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    argv = ["generate", "--base-model", str(tiny_model_dir), "--prompt", "hi", "--max-new-tokens", "1"]
    try:
        assert cli_main.main([*argv, "--threads", "1"]) == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert cli_main.main([*argv, "--threads", "0"]) != 0
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err


def test_report_shows_the_prompt_as_written_and_the_summary(trained):
    """Sample lines show the user's prompt, not chat-template fragments (issue 18, point 8)."""
    from peftkit.tasks import get_task

    _, _, results = trained
    lines = get_task("CAUSAL_LM").report_lines(results)
    samples = lines[lines.index("sample predictions (prompt -> prediction):") + 1 :]
    assert samples and all(line.startswith("  'the word ") for line in samples)
    assert not any("im_start" in line or "assistant" in line for line in lines)
    assert any(line.strip().startswith("majority baseline 0.500") for line in lines)
