"""LoRA variants against Hugging Face PEFT (the oracle): DoRA, PiSSA / OLoRA init, embedding and conv LoRA.

Parity cases build the same tiny model twice, wrap one with ``peft`` and one with ``peftkit``,
copy PEFT's randomised adapter weights into ours, and compare counts, outputs, files and merging.
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from _tiny_models import make_tiny_gpt2
from conftest import make_tiny_llama
from peftkit.methods.lora import LoraConfig

peft = pytest.importorskip("peft")

ATOL = 1e-5
MERGE_ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("single_thread")


class TinyMixed(nn.Module):
    """Embedding -> Conv1d -> Conv2d -> Linear: one of each layer type LoRA can adapt."""

    def __init__(self, vocab_size: int = 50):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 8, padding_idx=0)
        self.conv1 = nn.Conv1d(8, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, (3, 3), stride=(1, 2), padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(self.emb(input_ids).transpose(1, 2))  # (batch, 6, seq)
        hidden = self.conv2(hidden.unsqueeze(-1).expand(-1, -1, -1, 4))  # (batch, 4, seq, 2)
        return SimpleNamespace(logits=self.head(hidden.flatten(2).transpose(1, 2)))  # (batch, 2 * seq, 5)


def make_tiny_mixed(seed: int = 0) -> TinyMixed:
    torch.manual_seed(seed)
    return TinyMixed().eval()


def biased_llama():
    return make_tiny_llama(attention_bias=True, mlp_bias=True)


LLAMA = dict(task_type="CAUSAL_LM")
# (model builder, LoraConfig kwargs shared by both libraries)
CASES = {
    "dora-qv": (make_tiny_llama, dict(LLAMA, target_modules=["q_proj", "v_proj"], use_dora=True)),
    "dora-all-linear-rslora": (
        make_tiny_llama,
        dict(LLAMA, target_modules="all-linear", use_dora=True, use_rslora=True, r=4, lora_alpha=16),
    ),
    "dora-bias-patterns": (
        biased_llama,
        dict(
            LLAMA,
            target_modules=["q_proj", "o_proj", "up_proj"],
            use_dora=True,
            bias="lora_only",
            rank_pattern={"o_proj": 2},
            alpha_pattern={"up_proj": 3},
        ),
    ),
    "dora-dropout": (
        make_tiny_llama,
        dict(LLAMA, target_modules=["q_proj", "v_proj"], use_dora=True, lora_dropout=0.2),
    ),
    "dora-gpt2-conv1d": (
        make_tiny_gpt2,
        dict(LLAMA, target_modules=["c_attn", "c_fc"], use_dora=True, fan_in_fan_out=True),
    ),
    "embedding-conv-linear": (make_tiny_mixed, dict(target_modules=["emb", "conv1", "conv2", "head"])),
    "embedding-conv-rslora": (
        make_tiny_mixed,
        dict(target_modules=["emb", "conv2"], r=3, lora_alpha=7, use_rslora=True, lora_dropout=0.1),
    ),
    "dora-modules-to-save": (
        make_tiny_llama,
        dict(LLAMA, target_modules=["q_proj", "k_proj"], use_dora=True, modules_to_save=["lm_head"]),
    ),
    "llama-embed-tokens": (make_tiny_llama, dict(LLAMA, target_modules=["embed_tokens", "v_proj"])),
    "dora-embedding-conv-linear": (
        make_tiny_mixed,
        dict(target_modules=["emb", "conv1", "conv2", "head"], use_dora=True),
    ),
    "dora-embedding-conv-dropout-rslora": (
        make_tiny_mixed,
        dict(target_modules=["emb", "conv1", "conv2"], use_dora=True, lora_dropout=0.2, use_rslora=True, r=3),
    ),
    "dora-llama-embed-tokens": (
        make_tiny_llama,
        dict(
            LLAMA, target_modules=["embed_tokens", "q_proj"], use_dora=True, rank_pattern={"embed_tokens": 2}
        ),
    ),
}


def _ids(builder, gen: torch.Generator) -> torch.Tensor:
    vocab = 400 if builder in (make_tiny_llama, biased_llama) else 50 if builder is make_tiny_mixed else 100
    return torch.randint(1, vocab, (2, 9), generator=gen)


def _peft(model: nn.Module, **config) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**config))


def _out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def pair(request):
    """(peft model, peftkit model, input ids, builder) with identical, randomised adapter weights."""
    builder, config = CASES[request.param]
    base = builder()
    ours_base = copy.deepcopy(base)
    theirs = _peft(base, **config, init_lora_weights=False)
    ours = peftkit.get_peft_model(ours_base, LoraConfig(**config, init_lora_weights=False))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    ours.load_state_dict(theirs.state_dict())  # strict: the state-dict layouts are identical
    theirs.eval()
    ours.eval()
    return theirs, ours, _ids(builder, gen), builder


def test_same_counts_names_and_state_dict_keys(pair):
    theirs, ours, *_ = pair
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    their_trainable = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == their_trainable
    assert set(ours.state_dict()) == set(theirs.state_dict())


def test_same_outputs(pair):
    theirs, ours, ids, _ = pair
    torch.testing.assert_close(_out(ours, ids), _out(theirs, ids), atol=ATOL, rtol=0)


def test_same_outputs_in_training_mode_with_dropout(pair):
    """With dropout DoRA recomputes W x on the dropped-out input (PEFT's branch); same RNG, same result."""
    theirs, ours, ids, _ = copy.deepcopy(pair)
    theirs.train()
    ours.train()
    torch.manual_seed(3)
    expected = _out(theirs, ids)
    torch.manual_seed(3)
    torch.testing.assert_close(_out(ours, ids), expected, atol=ATOL, rtol=1e-6)  # kernels' rounding


def test_files_load_both_ways(pair, tmp_path):
    theirs, ours, ids, builder = pair
    ours.save_pretrained(tmp_path / "ours", save_embedding_layers=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Adapter tensors only: files with the base embedding are tested in test_lora_tokens.py.
        theirs.save_pretrained(tmp_path / "theirs", save_embedding_layers=False)
        in_peft = peft.PeftModel.from_pretrained(builder(), tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    )
    in_ours = peftkit.PeftModel.from_pretrained(builder(), tmp_path / "theirs")
    torch.testing.assert_close(_out(in_peft, ids), _out(ours, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(_out(in_ours, ids), _out(theirs, ids), atol=ATOL, rtol=0)


def test_merged_equals_unmerged_and_peft_merged(pair):
    theirs, ours, ids, _ = copy.deepcopy(pair)
    unmerged = _out(ours, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        their_merged = _out(theirs.merge_and_unload(), ids)
    ours_merged = _out(ours.merge_and_unload(), ids)
    torch.testing.assert_close(ours_merged, unmerged, atol=MERGE_ATOL, rtol=0)
    torch.testing.assert_close(ours_merged, their_merged, atol=MERGE_ATOL, rtol=0)


def test_peft_file_with_base_embedding_loads(tmp_path):
    """PEFT's default ("auto") saves the base embedding when embed_tokens is a target; it loads."""
    config = dict(LLAMA, target_modules=["embed_tokens"], use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _peft(make_tiny_llama(), **config)
        theirs.save_pretrained(tmp_path)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(
        tmp_path / "adapter_model.safetensors"
    )
    ours = peftkit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    ids = torch.randint(0, 400, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_out(ours, ids), _out(theirs, ids), atol=ATOL, rtol=0)


def test_dora_saves_magnitude_under_peft_key(tmp_path):
    model = peftkit.get_peft_model(make_tiny_llama(), LoraConfig(target_modules=["q_proj"], use_dora=True))
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    assert len(keys) == 2 * 3


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_default_inits_start_at_base_model_with_dora(init):
    base = make_tiny_llama()
    ids = torch.randint(0, 400, (1, 7), generator=torch.Generator().manual_seed(0))
    expected = _out(base, ids)
    model = peftkit.get_peft_model(
        base, LoraConfig(target_modules="all-linear", use_dora=True, init_lora_weights=init)
    )
    torch.testing.assert_close(_out(model, ids), expected, atol=ATOL, rtol=0)


# -- PiSSA / OLoRA: the base weight gives the adapter its start ----------------------------------

INIT_CASES = {
    "pissa-llama": (
        make_tiny_llama,
        dict(LLAMA, target_modules=["q_proj", "up_proj"], init_lora_weights="pissa"),
    ),
    "pissa-niter-llama": (
        make_tiny_llama,
        dict(LLAMA, target_modules=["v_proj", "down_proj"], r=4, init_lora_weights="pissa_niter_4"),
    ),
    "pissa-gpt2-conv1d": (
        make_tiny_gpt2,
        dict(LLAMA, target_modules=["c_attn"], fan_in_fan_out=True, lora_alpha=16, init_lora_weights="pissa"),
    ),
    "olora-llama": (
        make_tiny_llama,
        dict(LLAMA, target_modules=["q_proj", "o_proj"], lora_alpha=4, init_lora_weights="olora"),
    ),
    "olora-dora-rslora": (
        make_tiny_llama,
        dict(LLAMA, target_modules=["k_proj"], use_dora=True, use_rslora=True, init_lora_weights="olora"),
    ),
    "pissa-dora": (
        make_tiny_llama,
        dict(LLAMA, target_modules=["gate_proj"], use_dora=True, init_lora_weights="pissa"),
    ),
}


@pytest.mark.parametrize("case", list(INIT_CASES))
def test_weight_moving_init_matches_peft(case, tmp_path):
    builder, config = INIT_CASES[case]
    ids = _ids(builder, torch.Generator().manual_seed(1))
    original = _out(builder(), ids)
    torch.manual_seed(5)  # pissa_niter uses torch.svd_lowrank, which draws random numbers
    theirs = _peft(builder(), **config)
    torch.manual_seed(5)
    ours = peftkit.get_peft_model(builder(), LoraConfig(**config))
    their_state = theirs.state_dict()
    for key, value in ours.state_dict().items():  # modified base weights and A, B (and magnitudes)
        torch.testing.assert_close(value, their_state[key], atol=ATOL, rtol=0, msg=key)
    torch.testing.assert_close(_out(ours, ids), _out(theirs, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(_out(ours, ids), original, atol=MERGE_ATOL, rtol=0)  # output preserved
    before = {f"base_model.model.{k}": v for k, v in builder().state_dict().items()}
    moved = [k for k in their_state if k.endswith("base_layer.weight")]
    assert moved and all(not torch.equal(their_state[k], before[k.replace(".base_layer", "")]) for k in moved)
    ours.save_pretrained(tmp_path)  # saved like any adapter; the config keeps the init name
    assert peftkit.PeftConfig.from_pretrained(tmp_path).init_lora_weights == config["init_lora_weights"]


# -- what is refused ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(init_lora_weights="pissa_niter_"), "init_lora_weights='pissa_niter_' is not supported"),
        (dict(init_lora_weights="corda"), "'pissa', 'pissa_niter_<iterations>', 'olora'"),
        (dict(use_dora="yes"), "use_dora must be true or false"),
    ],
)
def test_invalid_variant_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(target_modules=["q_proj"], **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_modules=["conv2"], init_lora_weights="pissa"), "does not work on Conv2d"),
    ],
)
def test_unsupported_layer_combinations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peftkit.get_peft_model(make_tiny_mixed(), LoraConfig(**kwargs))


def test_grouped_conv_is_refused():
    model = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2 is not supported"):
        peftkit.get_peft_model(model, LoraConfig(target_modules=["0"]))


def test_dora_config_round_trips_through_peft_json(tmp_path):
    config = LoraConfig(target_modules=["q_proj"], use_dora=True, init_lora_weights="olora")
    config.save_pretrained(tmp_path)
    loaded = peft.LoraConfig.from_pretrained(tmp_path)
    assert loaded.use_dora is True and loaded.init_lora_weights == "olora"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_trains_magnitude_and_merges_on_any_dtype(dtype):
    base = make_tiny_llama().to(dtype)
    config = LoraConfig(target_modules=["q_proj", "down_proj"], use_dora=True, lora_dropout=0.1)
    model = peftkit.get_peft_model(base, config)
    ids = torch.randint(0, 400, (2, 7), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    magnitudes = [n for n in grads if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 4 and all(grads[n] is not None for n in magnitudes)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    model.eval()
    unmerged = _out(model, ids).float()
    merged = _out(model.merge_and_unload(), ids).float()
    torch.testing.assert_close(merged, unmerged, atol=MERGE_ATOL if dtype == torch.float32 else 0.1, rtol=0)
