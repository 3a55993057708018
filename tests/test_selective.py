"""full, bitfit and partial: methods that train a chosen subset of the model's own parameters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from _tiny_models import make_tiny_bloom, make_tiny_gpt2
from conftest import make_tiny_llama, train_tiny
from peftkit import (
    BitFitConfig,
    FullFinetuneConfig,
    PartialFinetuneConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
)
from peftkit.configuration import ConfigError, from_dict
from peftkit.errors import PeftkitError, TargetModulesError
from peftkit.methods.selective import find_blocks

pytestmark = pytest.mark.usefixtures("single_thread")

PREFIX = "base_model.model."


def ids(vocab: int = 100) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs).logits


def trainable(model: PeftModel) -> set[str]:
    return {name.removeprefix(PREFIX) for name, p in model.named_parameters() if p.requires_grad}


def perturb(model: PeftModel) -> None:
    """Change every trainable parameter, as training would."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


# -- which parameters are trained ---------------------------------------------------------------


@pytest.mark.parametrize("make", [make_tiny_gpt2, make_tiny_bloom])
def test_bitfit_trains_exactly_the_biases(make):
    base = make()
    biases = {n for n, _ in base.named_parameters() if n.endswith(".bias")}
    assert biases
    model = get_peft_model(base, BitFitConfig())
    assert trainable(model) == biases
    direct = sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias"))
    assert model.get_nb_trainable_parameters() == (direct, sum(p.numel() for p in base.parameters()))


def test_bitfit_with_modules_to_save():
    model = get_peft_model(make_tiny_gpt2(), BitFitConfig(modules_to_save=["ln_f"]))
    biases = {n for n, _ in make_tiny_gpt2().named_parameters() if n.endswith(".bias")}
    assert trainable(model) == biases | {"transformer.ln_f.weight"}


def test_bitfit_on_a_model_without_biases_says_what_to_use():
    with pytest.raises(TargetModulesError, match="has none.*add_missing_biases: true.*'partial'"):
        get_peft_model(make_tiny_llama(), BitFitConfig())


# -- BitFit with added zero biases (bias-free models) ---------------------------------------------

# Tiny Llama: hidden 32, intermediate 64, 4 heads of 8, 2 key/value heads -> k/v project to 16.
LLAMA_BIAS_SIZES = {
    "self_attn.q_proj": 32,
    "self_attn.k_proj": 16,
    "self_attn.v_proj": 16,
    "self_attn.o_proj": 32,
    "mlp.gate_proj": 64,
    "mlp.up_proj": 64,
    "mlp.down_proj": 32,
}
LLAMA_ADDED = {f"model.layers.{i}.{m}.bias" for i in range(2) for m in LLAMA_BIAS_SIZES}


def test_added_biases_leave_the_output_unchanged_and_are_all_that_trains():
    inputs = ids(400)
    base = make_tiny_llama()
    base_total = sum(p.numel() for p in base.parameters())
    base_logits = logits(base, inputs)
    model = get_peft_model(base, BitFitConfig(add_missing_biases=True))
    assert torch.equal(logits(model, inputs), base_logits)  # zero biases: nothing changes at init
    assert trainable(model) == LLAMA_ADDED  # q/k/v/o and the MLP of both blocks; not lm_head
    added = 2 * sum(LLAMA_BIAS_SIZES.values())
    assert added == 2 * (32 + 16 + 16 + 32 + 64 + 64 + 32) == 512
    assert model.get_nb_trainable_parameters() == (added, base_total + added)
    layer = model.get_base_model().model.layers[0].self_attn.k_proj
    assert layer.bias.dtype == layer.weight.dtype and layer.bias.shape == (16,)
    assert model.get_base_model().lm_head.bias is None


def test_missing_bias_modules_restricts_which_layers_get_one():
    model = get_peft_model(
        make_tiny_llama(), BitFitConfig(add_missing_biases=True, missing_bias_modules=["q_proj", "v_proj"])
    )
    assert trainable(model) == {
        f"model.layers.{i}.self_attn.{m}.bias" for i in range(2) for m in ("q_proj", "v_proj")
    }
    assert model.get_nb_trainable_parameters()[0] == 2 * (32 + 16)
    regex = BitFitConfig(add_missing_biases=True, missing_bias_modules=r"model\.layers\.1\..*_proj")
    assert trainable(get_peft_model(make_tiny_llama(), regex)) == {
        n for n in LLAMA_ADDED if ".layers.1." in n
    }
    head = get_peft_model(
        make_tiny_llama(), BitFitConfig(add_missing_biases=True, missing_bias_modules=["lm_head"])
    )
    assert trainable(head) == {"lm_head.bias"}
    assert head.get_nb_trainable_parameters()[0] == 400  # the vocabulary
    with pytest.raises(TargetModulesError, match="matches no nn.Linear.*model.layers.0.self_attn.q_proj"):
        get_peft_model(
            make_tiny_llama(), BitFitConfig(add_missing_biases=True, missing_bias_modules=["nope"])
        )


def test_added_biases_join_existing_ones():
    """On a model with some biases (BLOOM: every linear has one) nothing is added; existing ones train."""
    base = make_tiny_bloom()
    biases = {n for n, _ in base.named_parameters() if n.endswith(".bias")}
    model = get_peft_model(base, BitFitConfig(add_missing_biases=True))
    assert trainable(model) == biases
    llama = make_tiny_llama(mlp_bias=True)  # the MLP has biases, attention does not
    model = get_peft_model(llama, BitFitConfig(add_missing_biases=True))
    assert trainable(model) == LLAMA_ADDED


def test_a_refused_config_leaves_the_model_without_added_biases():
    base = make_tiny_llama()
    with pytest.raises(TargetModulesError):
        get_peft_model(base, BitFitConfig(add_missing_biases=True, modules_to_save=["no_such_module"]))
    assert all(m.bias is None for m in base.modules() if isinstance(m, nn.Linear))


def test_missing_bias_config_checks():
    with pytest.raises(ValueError, match="only used with add_missing_biases"):
        BitFitConfig(missing_bias_modules=["q_proj"])
    with pytest.raises(ConfigError, match="valid regular expression"):
        from_dict(BitFitConfig, {"add_missing_biases": True, "missing_bias_modules": "("})
    with pytest.raises(ConfigError, match="non-empty list"):
        from_dict(BitFitConfig, {"add_missing_biases": True, "missing_bias_modules": []})


def test_added_biases_while_off_unloaded_and_merged(tmp_path):
    inputs = ids(400)
    base_logits = logits(make_tiny_llama(), inputs)
    model = get_peft_model(make_tiny_llama(), BitFitConfig(add_missing_biases=True))
    perturb(model)
    tuned = logits(model, inputs)
    layer = model.get_base_model().model.layers[0].mlp.down_proj
    bias = layer.bias
    with model.disable_adapter():
        assert layer.bias is None  # off: the layer runs bias-free, exactly as the base model
        assert torch.equal(logits(model, inputs), base_logits)
    assert layer.bias is bias  # the same Parameter object: an optimizer keeps training it
    assert torch.equal(logits(model, inputs), tuned)

    unloaded = model.unload()
    assert all(m.bias is None for m in unloaded.modules() if isinstance(m, nn.Linear))
    assert sum(p.numel() for p in unloaded.parameters()) == sum(
        p.numel() for p in make_tiny_llama().parameters()
    )
    assert torch.equal(logits(unloaded, inputs), base_logits)

    model = get_peft_model(make_tiny_llama(), BitFitConfig(add_missing_biases=True))
    perturb(model)
    merged = model.merge_and_unload()
    assert {n for n, _ in merged.named_parameters() if n.endswith(".bias")} == LLAMA_ADDED
    assert torch.equal(logits(merged, inputs), tuned)
    # Its config still says "no bias": transformers would drop the biases on reloading. Saying
    # that Llama's attention and MLP have biases makes the merged model load as it is.
    merged.config.attention_bias = merged.config.mlp_bias = True
    merged.save_pretrained(tmp_path / "merged")
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(logits(reloaded, inputs), tuned)


def test_added_biases_train_with_an_optimizer_across_disable():
    model = get_peft_model(make_tiny_llama(), BitFitConfig(add_missing_biases=True)).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = torch.randint(0, 400, (4, 12), generator=torch.Generator().manual_seed(2))
    losses = []
    for step in range(6):
        if step == 3:
            with model.disable_adapter(), torch.no_grad():
                model(input_ids=inputs)  # e.g. a reference pass in between
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n.removeprefix(PREFIX) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == LLAMA_ADDED


@pytest.mark.parametrize(
    ("make", "blocks"), [(make_tiny_llama, "model.layers"), (make_tiny_gpt2, "transformer.h")]
)
def test_partial_top_n_trains_exactly_the_top_blocks(make, blocks):
    base = make()
    assert find_blocks(base)[0] == blocks
    model = get_peft_model(base, PartialFinetuneConfig(train_top_n_layers=1))
    assert trainable(model) == {n for n, _ in base.named_parameters() if n.startswith(f"{blocks}.1.")}
    everything = get_peft_model(
        make(), PartialFinetuneConfig(train_top_n_layers=2, layers_pattern="h" if "h" in blocks else "layers")
    )
    assert trainable(everything) == {n for n, _ in make().named_parameters() if n.startswith(f"{blocks}.")}
    with pytest.raises(TargetModulesError, match="at most 2"):
        get_peft_model(make(), PartialFinetuneConfig(train_top_n_layers=3))


def test_partial_patterns_and_extra_parts():
    base = make_tiny_llama()
    names = [n for n, _ in base.named_parameters()]
    model = get_peft_model(base, PartialFinetuneConfig(trainable_patterns=[r"mlp\.", r"layers\.0\.input"]))
    assert trainable(model) == {n for n in names if ".mlp." in n or n.startswith("model.layers.0.input")}
    model = get_peft_model(
        make_tiny_llama(),
        PartialFinetuneConfig(train_top_n_layers=1, also_train=["embeddings", "norms", "head"]),
    )
    expected = {n for n in names if n.startswith("model.layers.1.")}
    expected |= {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert trainable(model) == expected
    with pytest.raises(TargetModulesError, match="matches no parameter.*model.embed_tokens.weight"):
        get_peft_model(make_tiny_llama(), PartialFinetuneConfig(trainable_patterns=["no_such_thing"]))


def test_partial_config_checks():
    with pytest.raises(ValueError, match="trains nothing"):
        PartialFinetuneConfig()
    with pytest.raises(ConfigError, match="positive integer"):
        from_dict(PartialFinetuneConfig, {"train_top_n_layers": 0})
    with pytest.raises(ConfigError, match="valid regular expression"):
        from_dict(PartialFinetuneConfig, {"trainable_patterns": ["("]})
    with pytest.raises(ValueError, match="meaningless"):
        FullFinetuneConfig(modules_to_save=["lm_head"])


def test_full_trains_every_parameter_once_with_tied_weights():
    base = make_tiny_gpt2()  # lm_head.weight is tied to transformer.wte.weight
    model = get_peft_model(base, FullFinetuneConfig())
    assert "lm_head.weight" not in trainable(model)
    trainable_count, total = model.get_nb_trainable_parameters()
    assert trainable_count == total == sum(p.numel() for p in base.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert set(model.base_model.adapter_state_keys("default")) == {
        f"model.{n}" for n, _ in base.named_parameters()
    }


def test_counts_on_the_meta_device():
    with torch.device("meta"):
        base = make_tiny_gpt2()
    model = get_peft_model(base, BitFitConfig())
    with torch.device("meta"):
        direct = sum(p.numel() for n, p in make_tiny_gpt2().named_parameters() if n.endswith(".bias"))
    assert model.get_nb_trainable_parameters()[0] == direct
    with model.disable_adapter():  # swapping values is a no-op on meta
        pass


def test_one_adapter_per_model():
    model = get_peft_model(make_tiny_gpt2(), BitFitConfig())
    with pytest.raises(PeftkitError, match="fresh base model"):
        model.add_adapter("other", BitFitConfig())


# -- saving, loading, switching off ---------------------------------------------------------------

CASES = [
    (make_tiny_gpt2, BitFitConfig(), "BITFIT"),
    (make_tiny_bloom, BitFitConfig(modules_to_save=["ln_f"]), "BITFIT"),
    (make_tiny_llama, PartialFinetuneConfig(train_top_n_layers=1, also_train=["head"]), "PARTIAL"),
    (make_tiny_llama, BitFitConfig(add_missing_biases=True), "BITFIT"),
    (make_tiny_gpt2, FullFinetuneConfig(), "FULL"),
]


@pytest.mark.parametrize(("make", "config", "peft_type"), CASES)
def test_save_load_disable_unload(make, config, peft_type, tmp_path):
    inputs = ids()
    base_logits = logits(make(), inputs)
    model = get_peft_model(make(), config)
    perturb(model)
    trained = trainable(model)
    tuned = logits(model, inputs)
    assert not torch.equal(tuned, base_logits)

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == {PREFIX + n for n in trained}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == peft_type
    assert PeftConfig.from_pretrained(tmp_path).peft_type == peft_type

    loaded = PeftModel.from_pretrained(make(), tmp_path)
    assert torch.equal(logits(loaded, inputs), tuned)
    with loaded.disable_adapter():
        assert torch.equal(logits(loaded, inputs), base_logits)
    assert torch.equal(logits(loaded, inputs), tuned)

    with model.disable_adapter():
        assert torch.equal(logits(model, inputs), base_logits)
    assert torch.equal(logits(model, inputs), tuned)
    assert torch.equal(logits(model.unload(), inputs), base_logits)
    assert torch.equal(logits(loaded.merge_and_unload(), inputs), tuned)


def test_a_training_step_changes_only_the_chosen_parameters():
    model = get_peft_model(make_tiny_llama(), PartialFinetuneConfig(train_top_n_layers=1)).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = torch.randint(0, 400, (4, 12), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(5):
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n.removeprefix(PREFIX) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable(model)
    assert all(n.startswith("model.layers.1.") for n in changed)


# -- the training loop -----------------------------------------------------------------------------

ROWS = [
    {"prompt": f"word {w} is", "completion": label}
    for w, label in [("good", "positive"), ("bad", "negative")]
] * 8


@pytest.mark.parametrize(
    ("method", "section", "lr"),
    [
        ("partial", {"train_top_n_layers": 1, "also_train": ["head"]}, 1e-2),
        ("full", {}, 1e-3),
        ("bitfit", {"add_missing_biases": True}, 3e-2),  # bias-only training needs a large step
    ],
)
def test_run_training_reduces_loss(method, section, lr, tiny_model_dir, tmp_path):
    losses = train_tiny(tiny_model_dir, tmp_path / "out", method, section, learning_rate=lr)
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper()
