"""BOFT: what is specific to it (butterfly permutations, orthogonality, init, training, config errors).

Parity with Hugging Face PEFT (counts, logits, files both ways, merging) over a config matrix,
butterfly factors included, is in ``test_peft_oracle_methods.py``.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import peftkit
from _tiny_models import make_tiny_gpt2
from conftest import make_tiny_llama, train_tiny
from peftkit.errors import ModelLoadError, TargetModulesError
from peftkit.methods.boft.layer import block_layout, butterfly_perm

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

IDS = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"boft_block_size": 0, "boft_block_num": 8},
        {"boft_n_butterfly_factor": 2},
        {"boft_n_butterfly_factor": 3, "boft_dropout": 0.2},
    ],
    ids=["block4", "block-num8", "butterfly2", "butterfly3-dropout"],
)
def test_default_init_leaves_logits_unchanged(extra):
    config = peftkit.BOFTConfig(target_modules="all-linear", **{"boft_block_size": 4, **extra})
    base = make_tiny_llama(attention_bias=True)
    expected = _logits(base)
    model = peftkit.get_peft_model(base, config)
    torch.testing.assert_close(_logits(model), expected, atol=1e-6, rtol=0)
    assert model.get_nb_trainable_parameters()[0] > 0


def test_butterfly_permutations_by_hand():
    # 8 features, blocks of 2: level 1 swaps the middle half-blocks of each chunk of 4 features,
    # level 2 lists the even then the odd half-blocks of all 8 (as in PEFT's block_butterfly_perm).
    assert butterfly_perm(8, 0, 4, 2).tolist() == list(range(8))
    assert butterfly_perm(8, 1, 4, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert butterfly_perm(8, 2, 4, 2).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert butterfly_perm(16, 1, 4, 4).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    from peft.tuners.boft.layer import BOFTLayer  # the oracle's own permutation for a bigger case

    for level in range(4):
        theirs = BOFTLayer.block_butterfly_perm(None, 64, 16 // 2**level, 2, 3)
        assert butterfly_perm(64, level, 16, 4).tolist() == theirs.tolist()


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_rotation_is_orthogonal_and_rotate_matches_the_dense_matrix(factor):
    config = peftkit.BOFTConfig(
        target_modules=["q_proj"], boft_block_size=4, boft_n_butterfly_factor=factor, init_weights=False
    )
    layer = _q_proj(peftkit.get_peft_model(make_tiny_llama(), config)).eval()
    rotation = layer.rotation_matrix("default").detach()  # (32, 32)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(32), atol=1e-5, rtol=0)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer.rotate(x, "default"), x @ rotation, atol=1e-5, rtol=0)
    # more factors: each feature mixes with more others (a denser rotation)
    assert int((rotation.abs() > 1e-6).sum(dim=1).min()) == min(4 * 2 ** (factor - 1), 32)


def test_training_step_changes_only_adapter_and_lowers_loss():
    config = peftkit.BOFTConfig(
        target_modules="all-linear", boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.25
    )
    model = peftkit.get_peft_model(make_tiny_llama(), config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    torch.manual_seed(0)
    losses = []
    for _ in range(6):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param)
        assert changed == param.requires_grad, name
        assert param.requires_grad == (".boft_R." in name or ".boft_s." in name), name


def test_dropout_replaces_blocks_by_identity_in_training_only():
    config = peftkit.BOFTConfig(
        target_modules=["q_proj"], boft_block_size=4, boft_dropout=0.5, init_weights=False
    )
    layer = _q_proj(peftkit.get_peft_model(make_tiny_llama(), config))
    identity = torch.eye(4)
    layer.train()
    rotations = layer.rotations("default").detach()  # (1, 8, 4, 4)
    assert sum(torch.equal(block, identity) for block in rotations[0]) == 4  # int(0.5 * 8)
    layer.eval()
    assert not any(torch.equal(block, identity) for block in layer.rotations("default")[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(boft_block_num=8),
            r"set only one of boft_block_size \(4\) and boft_block_num \(8\).*block_size: 0",
        ),
        (
            dict(boft_block_size=0, boft_block_num=0),
            "either boft_block_size or boft_block_num must be non-zero",
        ),
    ],
)
def test_block_size_and_num_are_exclusive_as_in_peft(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peftkit.BOFTConfig(**kwargs)
    with pytest.raises(ValueError):  # PEFT refuses the same combinations
        peft.BOFTConfig(**kwargs)


def test_bad_config_says_what_to_change():
    with pytest.raises(ValueError, match="boft_block_size must be a non-negative integer"):
        peftkit.BOFTConfig(boft_block_size=-4)
    with pytest.raises(ValueError, match="boft_block_num must be a non-negative integer"):
        peftkit.BOFTConfig(boft_block_size=0, boft_block_num=2.5)
    with pytest.raises(ValueError, match="boft_n_butterfly_factor must be a positive integer"):
        peftkit.BOFTConfig(boft_n_butterfly_factor=0)
    with pytest.raises(ValueError, match="boft_dropout must be a probability"):
        peftkit.BOFTConfig(boft_dropout=1.0)
    with pytest.raises(ValueError, match="bias must be 'none', 'all' or 'boft_only'"):
        peftkit.BOFTConfig(bias="oft_only")
    with pytest.raises(ValueError, match="init_weights must be true or false"):
        peftkit.BOFTConfig(init_weights="gaussian")
    config = peftkit.BOFTConfig(target_modules=["c_attn"])
    with pytest.raises(TargetModulesError, match="cannot adapt.*Conv1D"):  # PEFT refuses Conv1D too
        peftkit.get_peft_model(make_tiny_gpt2(), config)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(boft_block_size=5), "boft_block_size=5 does not divide in_features=32: choose a divisor"),
        (dict(boft_block_size=0, boft_block_num=3), "boft_block_num=3 does not divide in_features=32"),
        (
            dict(boft_block_size=8, boft_n_butterfly_factor=4),
            r"boft_n_butterfly_factor=4 is too large for boft_block_size=8.*= 64 must divide.*lower the factor",
        ),
        (
            dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=4),
            r"boft_n_butterfly_factor=4 is too large for boft_block_num=4.*2\^\(factors-1\) = 8",
        ),
        (
            dict(boft_block_size=0, boft_block_num=32, boft_n_butterfly_factor=2),
            r"with boft_n_butterfly_factor=2 > 1, the block size \(1\).*even",
        ),
    ],
)
def test_layer_sizes_that_do_not_fit_say_what_to_change(kwargs, message):
    config = peftkit.BOFTConfig(target_modules=["q_proj"], **kwargs)
    with pytest.raises(ValueError, match=f"cannot adapt 'model.layers.0.self_attn.q_proj': {message}"):
        peftkit.get_peft_model(make_tiny_llama(), config)


def test_block_layout():
    assert block_layout(32, peftkit.BOFTConfig(boft_block_size=4)) == (1, 8, 4)
    assert block_layout(64, peftkit.BOFTConfig(boft_block_size=0, boft_block_num=4)) == (1, 4, 16)
    assert block_layout(32, peftkit.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=5)) == (5, 16, 2)


def test_file_from_peft_without_cuda_extension_needs_factor_one(tmp_path, monkeypatch):
    """PEFT without its CUDA extension (any CPU) silently trains ONE factor whatever the config says;
    its files then hold (1, D, H, H) rotations. peftkit refuses them with the shapes; with the factor
    set to 1 in adapter_config.json (what PEFT really ran) they load and agree with PEFT."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)
    kwargs = dict(target_modules=["q_proj", "v_proj"], boft_block_size=4, boft_n_butterfly_factor=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_tiny_llama(), peft.BOFTConfig(init_weights=False, **kwargs)).eval()
        theirs.save_pretrained(tmp_path)
    with pytest.raises(
        ModelLoadError, match=r"wrong shape.*boft_R \(file \(1, 8, 4, 4\), model \(2, 8, 4, 4\)\)"
    ):
        peftkit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "boft_n_butterfly_factor": 1}))
    ours = peftkit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=0)


def test_multiple_adapters_switch():
    config = peftkit.BOFTConfig(target_modules=["q_proj"], boft_block_size=4, init_weights=False)
    base = make_tiny_llama()
    expected = _logits(base)
    model = peftkit.get_peft_model(base, config)
    first = _logits(model)
    model.add_adapter("other", peftkit.BOFTConfig(target_modules=["q_proj"], boft_block_size=8))
    model.set_adapter("other")  # identity init: the base model's outputs
    torch.testing.assert_close(_logits(model), expected, atol=1e-6, rtol=0)
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model), first, atol=0, rtol=0)


def test_training_run_lowers_loss(tiny_model_dir, tmp_path):
    section = {"boft_block_size": 4, "boft_n_butterfly_factor": 2, "target_modules": "all-linear"}
    losses = train_tiny(tiny_model_dir, tmp_path / "out", "boft", section, learning_rate=2e-2, warmup_steps=1)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOFT"


class TinyConvNet(torch.nn.Module):
    """Two convs (filters of 3·3·3 = 27 and 8·3·3 = 72 features) and a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 4, 3, stride=2, padding=1, bias=False)
        self.head = torch.nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.head(self.conv2(torch.relu(self.conv1(x))).flatten(1))


CONV_CASES = {
    "both-block9": dict(target_modules=["conv1", "conv2"], boft_block_size=9),
    "conv2-butterfly2-bias": dict(
        target_modules=["conv2", "head"], boft_block_size=4, boft_n_butterfly_factor=2, bias="boft_only"
    ),
}


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv2d_matches_peft(name, tmp_path):
    from test_peft_oracle_methods import boft_oracle

    kwargs = {"init_weights": False, **CONV_CASES[name]}
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with boft_oracle(kwargs), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(TinyConvNet(), peft.BOFTConfig(**kwargs))
        ours = peftkit.get_peft_model(TinyConvNet(), peftkit.BOFTConfig(**kwargs))
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
        assert set(ours.state_dict()) == set(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict())
        with torch.no_grad():
            expected = theirs(images)
            torch.testing.assert_close(ours(images), expected, atol=1e-5, rtol=0)
            ours.save_pretrained(tmp_path / "ours")
            theirs.save_pretrained(tmp_path / "theirs")
            in_peft = peft.PeftModel.from_pretrained(TinyConvNet(), tmp_path / "ours")
            in_ours = peftkit.PeftModel.from_pretrained(TinyConvNet(), tmp_path / "theirs")
            torch.testing.assert_close(in_peft(images), expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(in_ours(images), expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(ours.merge_and_unload()(images), expected, atol=1e-4, rtol=0)
            torch.testing.assert_close(theirs.merge_and_unload()(images), expected, atol=1e-4, rtol=0)


def test_conv2d_that_peft_cannot_adapt_is_refused():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=1 and a square kernel only.*groups=2"):
        peftkit.get_peft_model(model, peftkit.BOFTConfig(target_modules=["0"], boft_block_size=2))
