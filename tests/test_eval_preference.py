"""`peftkit eval` on adapters trained with a preference objective (tiny model, fp32): on preference
rows the objective's held-out metrics, against the reference the adapter was trained with (so
they equal the run's own after-training numbers); on prompt / completion rows accuracy by
generation, as for an SFT adapter; a reward model on other rows is refused."""

from __future__ import annotations

import json

import pytest

from peftkit.cli.main import main

PAIRS = [("good", "positive", "negative"), ("bad", "negative", "positive"), ("fox", "neutral", "positive")]
PAIR_ROWS = [{"prompt": f"word {w} is", "chosen": c, "rejected": r} for w, c, r in PAIRS] * 8
SFT_ROWS = [{"prompt": f"word {w} is", "completion": c} for w, c, _ in PAIRS] * 8


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(model_dir, root, name, data, precision="fp32", **job):
    from peftkit.train.config import build_job_config
    from peftkit.train.loop import run_training

    config = {
        "base_model": str(model_dir),
        "method": "lora",
        "lora": {"r": 4, "target_modules": "all-linear"},
        "data": {"train": str(data), "test_size": 6},
        "training": {
            "max_steps": 8,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "precision": precision,
            "seed": 5,
        },
        "evaluation": {"max_new_tokens": 2},
        "output_dir": str(root / name),
        **job,
    }
    return run_training(build_job_config(config), progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """An SFT adapter, DPO from scratch, DPO starting from the SFT adapter (fp32 and bf16), and a
    reward model."""
    root = tmp_path_factory.mktemp("preference-eval")
    pairs, sft = _write(root / "pairs.jsonl", PAIR_ROWS), _write(root / "sft.jsonl", SFT_ROWS)
    out = {"root": root, "pairs": pairs, "sft": sft}
    _train(tiny_model_dir, root, "sft", sft)
    out["dpo"] = _train(tiny_model_dir, root, "dpo", pairs, objective="dpo")
    init = str(root / "sft" / "adapter")
    out["dpo-init"] = _train(tiny_model_dir, root, "dpo-init", pairs, objective="dpo", init_adapter=init)
    # bf16 autocast: the reference pass swaps the starting weights in, and autocast's cache of cast
    # weights must carry neither into the other's pass (training would then measure another model)
    out["dpo-init-bf16"] = _train(
        tiny_model_dir, root, "dpo-init-bf16", pairs, "bf16", objective="dpo", init_adapter=init
    )
    out["reward"] = _train(tiny_model_dir, root, "reward", pairs, objective="reward")
    return out


def _eval(argv, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", *argv, "--json", str(out), "--device", "cpu"])
    printed = capsys.readouterr()
    return code, printed.out + printed.err, json.loads(out.read_text()) if code == 0 else None


@pytest.mark.parametrize("name", ["dpo", "dpo-init", "dpo-init-bf16", "reward"])
def test_preference_split_gives_the_runs_own_held_out_metrics(runs, name, tmp_path, capsys):
    """`peftkit eval RUN/train_config.yaml`: the same test split, the same reference (the base
    model for a new adapter, the starting adapter for dpo-init), so the same numbers."""
    config = runs["root"] / name / "train_config.yaml"
    code, printed, results = _eval([str(config)], tmp_path, capsys)
    assert code == 0, printed
    after = runs[name]["after"]
    keys = ["mean_margin"] + (
        ["pairwise_accuracy"] if name == "reward" else ["preference_accuracy", "likelihood_accuracy"]
    )
    assert {k: results[k] for k in keys} == pytest.approx({k: after[k] for k in keys}, abs=1e-5)
    assert results["objective"] == ("reward" if name == "reward" else "dpo") and results["n"] == 6
    if name == "dpo":
        assert "reference model: the base model (adapter disabled)" in printed
    if name.startswith("dpo-init"):
        assert (
            f"reference model: the adapter training started from ({runs['root'] / 'sft' / 'adapter'})"
            in printed
        )
        assert results["mean_margin"] != 0.0  # against itself every margin would be 0


def test_dpo_adapter_on_prompt_completion_rows_is_measured_by_generation(runs, tmp_path, capsys):
    adapter = str(runs["root"] / "dpo-init" / "adapter")
    code, printed, results = _eval(["--adapter", adapter, "--data", str(runs["sft"])], tmp_path, capsys)
    assert code == 0, printed
    assert "objective dpo" in printed and "evaluated as a causal LM" in printed
    assert results["task"] == "CAUSAL_LM" and results["objective"] == "dpo"
    assert {"accuracy", "accuracy_n", "loss", "perplexity"} <= set(results) and results["accuracy_n"] == 24
    # the DPO adapter is the one measured, not the SFT adapter it started from
    code, _, sft = _eval(
        ["--adapter", str(runs["root"] / "sft" / "adapter"), "--data", str(runs["sft"])], tmp_path, capsys
    )
    assert code == 0 and sft["loss"] != pytest.approx(results["loss"])


def test_the_sft_config_measures_a_dpo_adapter_on_its_test_split(runs, tmp_path, capsys):
    """The SFT run's config (prompt/completion rows, its test split) with the DPO adapter."""
    config = runs["root"] / "sft" / "train_config.yaml"
    adapter = str(runs["root"] / "dpo-init" / "adapter")
    code, printed, results = _eval([str(config), "--adapter", adapter], tmp_path, capsys)
    assert code == 0, printed
    assert results["n"] == 6 and results["accuracy_n"] == 6 and results["adapter"] == adapter


def test_reward_model_on_prompt_completion_rows_is_refused(runs, tmp_path, capsys):
    adapter = str(runs["root"] / "reward" / "adapter")
    code, printed, _ = _eval(["--adapter", adapter, "--data", str(runs["sft"])], tmp_path, capsys)
    assert code == 2
    assert "is a reward model (objective reward)" in printed and "prompt_completion rows" in printed
    assert "peftkit score" in printed


def test_missing_starting_adapter_is_named(runs, tmp_path, capsys):
    """dpo-init's reference is the SFT adapter it started from: without it there is no reference."""
    import shutil

    copy = tmp_path / "dpo-init"
    shutil.copytree(runs["root"] / "dpo-init" / "adapter", copy)
    meta = json.loads((copy / "peftkit_task.json").read_text())
    meta["init_adapter"] = str(tmp_path / "gone")
    (copy / "peftkit_task.json").write_text(json.dumps(meta))
    code, printed, _ = _eval(["--adapter", str(copy), "--data", str(runs["pairs"])], tmp_path, capsys)
    assert code == 2
    assert f"trained starting from the adapter in {tmp_path / 'gone'}, which is its reference" in printed
    # by generation it needs no reference
    code, printed, _ = _eval(["--adapter", str(copy), "--data", str(runs["sft"])], tmp_path, capsys)
    assert code == 0, printed


def test_task_file_records_the_reference_and_rendering(runs):
    meta = json.loads((runs["root"] / "dpo-init" / "adapter" / "peftkit_task.json").read_text())
    assert meta["init_adapter"] == str((runs["root"] / "sft" / "adapter").resolve())
    assert meta["rendering"] == {
        "system_prompt": None,
        "use_chat_template": True,
        "separator": "\n",
        "max_seq_len": 1024,
    }
    assert (
        json.loads((runs["root"] / "dpo" / "adapter" / "peftkit_task.json").read_text())["init_adapter"]
        is None
    )
