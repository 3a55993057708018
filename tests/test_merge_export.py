"""Merged export (`peftkit merge`), AutoPeftModel, delete_adapter and all-or-nothing merging.

Every merged model is checked against the model with the adapter applied (fp32, <= 1e-4), loaded
back with transformers alone; counts after delete_adapter are compared with PEFT's.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import peftkit
import peftkit.auto
from conftest import make_tiny_llama
from peftkit.cli.main import main

pytestmark = pytest.mark.usefixtures("single_thread")

IDS = torch.tensor([[5, 17, 42, 99, 7, 3]])


def perturb(model: torch.nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def save_adapter(model_dir, out, config: peftkit.PeftConfig) -> torch.Tensor:
    """Train-like adapter on the tiny model dir saved to ``out``; returns its logits on IDS."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = peftkit.get_peft_model(base, config)
    perturb(model)
    model.eval()
    model.save_pretrained(out)
    return logits(model)


def lora() -> peftkit.LoraConfig:
    return peftkit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"
    )


@pytest.fixture(scope="module")
def lora_adapter(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    return out, save_adapter(tiny_model_dir, out, lora())


# -- peftkit merge ----------------------------------------------------------------------------


def test_cli_merge_writes_a_transformers_model(lora_adapter, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, expected = lora_adapter
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"} <= names
    assert not any("adapter" in n for n in names)
    merged = AutoModelForCausalLM.from_pretrained(out)  # transformers alone
    assert merged.dtype == torch.float32
    torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


def test_cli_merge_bf16_and_overwrite(lora_adapter, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    adapter, expected = lora_adapter
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["merge", str(adapter), str(out), "--dtype", "bf16"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").exists()  # refused: nothing touched
    assert main(["merge", str(adapter), str(out), "--dtype", "bf16", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        dtypes = {handle.get_slice(k).get_dtype() for k in handle.keys()}
    assert dtypes == {"BF16"}
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(merged), expected, atol=0.1, rtol=0.05)  # bf16 rounding only


def test_cli_merge_refuses_methods_that_cannot_merge(tiny_model_dir, tmp_path, capsys):
    adapter = tmp_path / "prompt"
    save_adapter(
        tiny_model_dir, adapter, peftkit.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    )
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), str(out)]) == 2
    assert "cannot be merged" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("merged")]  # no temporaries left


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_merge_never_writes_over_its_input(lora_adapter, tmp_path, capsys):
    """OUT_DIR that is, holds or lies inside ADAPTER_DIR (by real path) is refused, even with --overwrite."""
    import shutil

    run = tmp_path / "run"  # a `peftkit train` output_dir: OUTPUT_DIR/adapter + run files
    shutil.copytree(lora_adapter[0], run / "adapter")
    (run / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "link").symlink_to(run / "adapter")
    before = _tree(run)
    adapter = str(run / "adapter")
    for out, where in [
        (run, "contains"),
        (run / "adapter", "is"),
        (tmp_path / "link", "is"),
        (run / "adapter" / "merged", "is inside"),
    ]:
        assert main(["merge", adapter, str(out), "--overwrite"]) == 2
        assert f"{where} the input adapter directory {adapter}" in capsys.readouterr().err
    assert _tree(run) == before
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "metrics.jsonl"]  # no temporaries


def test_cli_merge_of_a_run_directory_or_a_truncated_adapter(lora_adapter, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_adapter[0], run / "adapter")
    assert main(["merge", str(run), str(tmp_path / "out")]) == 2
    assert f"did you mean {run / 'adapter'}?" in capsys.readouterr().err
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy cut short
    assert main(["merge", str(run / "adapter"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{weights} is not a readable safetensors file (incomplete metadata" in err
    assert "truncated or still being copied" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_load_adapter_weights_names_an_unreadable_file(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from peftkit.auto import saved_num_labels
    from peftkit.errors import ModelLoadError
    from peftkit.serialization import load_adapter_weights

    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"not a readable safetensors file \(header too small\)"):
        load_adapter_weights(tmp_path)
    # a classifier's head size is read from the file before the weights are loaded
    with pytest.raises(ModelLoadError, match=r"not a readable safetensors file"):
        saved_num_labels(tmp_path, tmp_path, AutoModelForSequenceClassification)


def test_cli_merge_keeps_a_classifiers_label_names(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    model = peftkit.get_peft_model(
        base, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    )
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "peftkit_task.json").write_text(
        json.dumps({"task_type": "SEQ_CLS", "labels": ["neg", "pos"]})
    )
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    config = AutoConfig.from_pretrained(tmp_path / "merged")
    assert config.id2label == {0: "neg", 1: "pos"} and config.label2id == {"neg": 0, "pos": 1}


# -- AutoPeftModel ----------------------------------------------------------------------------


def test_auto_peft_model_for_causal_lm(lora_adapter):
    adapter, expected = lora_adapter
    model = peftkit.AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert isinstance(model, peftkit.PeftModelForCausalLM)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    model = peftkit.AutoPeftModel.from_pretrained(adapter)  # head from task_type
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)


def test_auto_peft_model_without_task_type_uses_auto_mapping(tiny_model_dir, tmp_path):
    config = peftkit.LoraConfig(r=4, target_modules=["q_proj"])
    expected = save_adapter(tiny_model_dir, tmp_path, config)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"
    model = peftkit.AutoPeftModel.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)


def test_auto_peft_model_names_mismatched_modules(lora_adapter, tmp_path, tiny_tokenizer):
    adapter, _ = lora_adapter
    other = tmp_path / "wider"
    make_tiny_llama(vocab_size=len(tiny_tokenizer), hidden_size=48).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    with pytest.raises(peftkit.errors.PeftkitError, match=r"q_proj\.lora_A"):
        peftkit.AutoPeftModelForCausalLM.from_pretrained(adapter, base_model=other)


def test_adapter_with_added_tokens_grows_the_base(tiny_model_dir, tmp_path):
    """An adapter trained after adding tokens saved its tokenizer: the base is resized to load it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<tool>", "</tool>"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.resize_token_embeddings(len(tokenizer))
    model = peftkit.get_peft_model(base, lora())
    perturb(model)
    model.eval()
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    expected = logits(model)
    loaded, loaded_tokenizer = peftkit.auto.load_adapter_with_base(adapter)
    assert len(loaded_tokenizer) == len(tokenizer)
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=1e-5)
    assert main(["merge", str(adapter), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == len(tokenizer)
    torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=1e-4)


# -- merge_and_unload options, delete_adapter -------------------------------------------------


def test_merge_several_adapters_adds_their_updates():
    base = make_tiny_llama()
    reference = make_tiny_llama()
    model = peftkit.get_peft_model(base, lora(), "a")
    model.add_adapter("b", lora())
    for name in ("a", "b"):
        model.set_adapter(name)
        perturb(model, seed={"a": 1, "b": 2}[name])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = (
        reference.model.layers[0].self_attn.q_proj.weight + layer.delta_weight("a") + layer.delta_weight("b")
    )
    merged = model.merge_and_unload(adapter_names=["a", "b"])
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected)


def test_safe_merge_catches_overflow_in_the_merged_weights():
    """A finite update that overflows fp16 once added: safe_merge refuses it and changes nothing."""
    model = peftkit.get_peft_model(make_tiny_llama().half(), lora())
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.lora_A["default"].weight.fill_(300.0)
        layer.lora_B["default"].weight.fill_(300.0)  # delta = 4 * 300 * 300 * 2 = 720000 > 65504
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj"):
        model.merge_and_unload(safe_merge=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    merged = model.merge_and_unload()  # PEFT's default: no check of the sum
    assert torch.isinf(merged.model.layers[1].mlp.down_proj.weight).any()


def test_delete_adapter_matches_peft():
    import peft

    ours = peftkit.get_peft_model(make_tiny_llama(), lora(), "one")
    ours.add_adapter("two", lora())
    theirs = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(**_peft_kwargs()), "one")
    theirs.add_adapter("two", peft.LoraConfig(**_peft_kwargs()))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with pytest.warns(UserWarning, match="now active"):
        ours.delete_adapter("one")
    with pytest.warns(UserWarning):
        theirs.delete_adapter("one")
    assert ours.active_adapters == theirs.active_adapters == ["two"]
    assert list(ours.peft_config) == list(theirs.peft_config) == ["two"]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert not [k for k in ours.state_dict() if ".one." in k]
    with pytest.raises(ValueError, match="no adapter named"):
        ours.delete_adapter("one")


def _peft_kwargs() -> dict:
    return {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "task_type": "CAUSAL_LM",
    }
