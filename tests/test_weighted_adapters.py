"""``add_weighted_adapter`` and ``peftkit combine`` against HF PEFT's LoraModel.add_weighted_adapter."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from torch import nn

import peftkit
from conftest import make_tiny_llama
from peftkit import IA3Config, LoraConfig, PeftModel, TaskType, get_peft_model
from peftkit.cli.main import main
from peftkit.errors import PeftkitError

pytestmark = pytest.mark.usefixtures("single_thread")

TYPES = [
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]
# adapter "p": rank 4 on q/v; adapter "q": rank 4 on v/o and the input embedding (a union of targets).
ADAPTERS = {
    "p": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "q": dict(r=4, lora_alpha=16, target_modules=["v_proj", "o_proj", "embed_tokens"]),
    "s": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
}


def build(lib, names=("p", "q")):
    """A tiny Llama with random-weight LoRA adapters ``names`` in ``lib`` (peftkit or peft)."""
    model = make_tiny_llama()
    first, *rest = names
    cfg = lambda n: lib.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **ADAPTERS[n])  # noqa: E731
    torch.manual_seed(0)
    wrapped = lib.get_peft_model(model, cfg(first), adapter_name=first)
    for name in rest:
        wrapped.add_adapter(name, cfg(name))
    return wrapped


def pair(names=("p", "q")):
    """The same adapters in peftkit and in PEFT (PEFT's weights copied from peftkit's)."""
    ours, theirs = build(peftkit, names), build(peft, names)
    own = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            param.copy_(own[name])
    return ours, theirs


def adapter_weights(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if f".{adapter}" in n.split("lora_", 1)[-1]}


def ids() -> torch.Tensor:
    return torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model, adapter):
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(input_ids=ids()).logits


def combine_both(ours, theirs, adapters, weights, **kwargs):
    for model in (ours, theirs):
        torch.manual_seed(123)  # dare_*: both libraries draw the same masks from the same seed
        model.add_weighted_adapter(adapters, weights, "mix", **kwargs)


@pytest.mark.parametrize("combination_type", TYPES)
def test_matches_peft(combination_type):
    ours, theirs = pair()
    density = 0.5 if combination_type not in ("linear", "cat", "svd") else None
    combine_both(ours, theirs, ["p", "q"], [0.7, -0.4], combination_type=combination_type, density=density)
    mine, peft_weights = adapter_weights(ours, "mix"), adapter_weights(theirs, "mix")
    assert mine.keys() == peft_weights.keys() and len(mine) == 2 * (
        2 * 3 + 1
    )  # (q, v, o) x 2 layers + embedding
    for name, weight in mine.items():
        torch.testing.assert_close(weight, peft_weights[name], atol=1e-5, rtol=1e-5, msg=name)
    assert ours.active_adapter == "p"  # added, not made active (as PEFT)
    assert not any(p.requires_grad for p in mine.values())
    config, peft_config = ours.peft_config["mix"], theirs.peft_config["mix"]
    assert (config.r, config.lora_alpha) == (peft_config.r, peft_config.lora_alpha)
    assert set(config.target_modules) == set(peft_config.target_modules)
    torch.testing.assert_close(logits(ours, "mix"), logits(theirs, "mix"), atol=1e-5, rtol=1e-5)


def test_dare_masks_have_the_asked_density():
    """The random part itself: about ``density`` of each factor survives, rescaled by 1/density."""
    ours = build(peftkit, ("p",))
    ours.add_adapter("p2", LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **ADAPTERS["p"]))
    torch.manual_seed(0)
    ours.add_weighted_adapter(["p", "p2"], [1.0, 0.0], "mix", combination_type="dare_linear", density=0.3)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    kept = layer.lora_A["mix"].weight != 0
    assert 0.2 < kept.float().mean().item() < 0.4
    scale = (layer.scaling["p"] * 1.0) ** 0.5 / 0.3
    torch.testing.assert_close(layer.lora_A["mix"].weight[kept], layer.lora_A["p"].weight[kept] * scale)


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_different_ranks_match_peft(combination_type):
    ours, theirs = pair(("p", "s"))
    combine_both(
        ours, theirs, ["p", "s"], [1.0, 0.5], combination_type=combination_type, svd_rank=3, svd_clamp=0.9
    )
    assert ours.peft_config["mix"].r == (6 if combination_type == "cat" else 3)
    for name, weight in adapter_weights(ours, "mix").items():
        torch.testing.assert_close(weight, adapter_weights(theirs, "mix")[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(ours, "mix"), logits(theirs, "mix"), atol=1e-5, rtol=1e-5)


def test_svd_of_one_full_rank_combination_is_exact():
    """svd with the rank of the sum reproduces the summed updates (a check independent of PEFT)."""
    ours = build(peftkit)
    ours.add_weighted_adapter(["p", "q"], [1.0, 1.0], "cat", combination_type="cat")
    ours.add_weighted_adapter(["p", "q"], [1.0, 1.0], "svd", combination_type="svd", svd_rank=8)
    torch.testing.assert_close(logits(ours, "cat"), logits(ours, "svd"), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(adapters=["p", "zz"], weights=[1, 1]), "no adapter.*'zz'"),
        (dict(weights=[1.0]), "1 weight.*2 adapter"),
        (dict(combination_type="mean"), "unknown combination_type"),
        (dict(adapters=["p", "s"], combination_type="linear"), "same r value.*'cat'"),
        (dict(combination_type="ties"), "needs density"),
        (dict(combination_type="ties", density=0.5, majority_sign_method="max"), "majority_sign_method"),
        (dict(adapter_name="p"), "already exists"),
        (dict(svd_rank=17), r"svd_rank=17 is more than .* 16 x 32 update has; use svd_rank <= 16"),
        (dict(svd_rank=-1), "svd_rank must be a positive number"),
    ],
)
def test_errors(kwargs, match):
    ours = build(peftkit, ("p", "q", "s"))
    args = dict(adapters=["p", "q"], weights=[0.5, 0.5], adapter_name="mix") | kwargs
    with pytest.raises(PeftkitError, match=match):
        ours.add_weighted_adapter(**args)
    assert "mix" not in ours.peft_config


def test_mixed_target_kinds_and_other_methods_are_refused():
    ours = build(peftkit, ("p",))
    ours.add_adapter("r", LoraConfig(task_type="CAUSAL_LM", target_modules=r".*\.q_proj"))
    with pytest.raises(PeftkitError, match="same target modules type"):
        ours.add_weighted_adapter(["p", "r"], [1, 1], "mix")
    ia3 = get_peft_model(make_tiny_llama(), IA3Config(task_type=TaskType.CAUSAL_LM))
    with pytest.raises(PeftkitError, match="only LoRA adapters"):
        ia3.add_weighted_adapter(["default"], [1.0], "mix")


def test_regex_targets_are_joined_as_peft():
    ours = get_peft_model(make_tiny_llama(), LoraConfig(target_modules=r".*\.q_proj"), adapter_name="x")
    ours.add_adapter("y", LoraConfig(target_modules=r".*\.v_proj"))
    ours.add_weighted_adapter(["x", "y"], [1, 1], "mix", combination_type="cat")
    assert ours.peft_config["mix"].target_modules == r"(.*\.q_proj)|(.*\.v_proj)"


# -- peftkit combine -------------------------------------------------------------------------------


def _save_adapter(model_dir, out, name, seed):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, init_lora_weights=False, **ADAPTERS[name])
    get_peft_model(base, cfg).save_pretrained(out)
    return out


def test_cli_combine(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    a = _save_adapter(tiny_model_dir, tmp_path / "p", "p", 1)
    b = _save_adapter(tiny_model_dir, tmp_path / "q", "q", 2)
    out = tmp_path / "mix"
    argv = ["combine", str(a), str(b), "--weights", "0.6", "0.4", "--type", "ties_svd", "--density", "0.5"]
    assert main([*argv, "--svd-rank", "3", "--out", str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3

    # The Python API on the same adapters gives the same weights.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = PeftModel.from_pretrained(base, a, adapter_name="p")
    expected.load_adapter(b, "q")
    expected.add_weighted_adapter(
        ["p", "q"], [0.6, 0.4], "mix", combination_type="ties_svd", density=0.5, svd_rank=3
    )
    expected.set_adapter("mix")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    with torch.no_grad():
        want = expected(input_ids=ids()).logits
        torch.testing.assert_close(loaded(input_ids=ids()).logits, want, atol=1e-5, rtol=1e-5)
        in_peft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
        torch.testing.assert_close(in_peft(input_ids=ids()).logits, want, atol=1e-5, rtol=1e-5)


def test_cli_combine_errors(tiny_model_dir, tmp_path, capsys):
    a = _save_adapter(tiny_model_dir, tmp_path / "p", "p", 1)
    assert main(["combine", str(a), str(a), "--weights", "1", "--out", str(tmp_path / "o")]) == 2
    assert "1 weight(s) for 2 adapter(s)" in capsys.readouterr().err

    other = tmp_path / "other"
    config = json.loads((a / "adapter_config.json").read_text())
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "elsewhere"}))
    assert main(["combine", str(a), str(other), "--weights", "1", "1", "--out", str(tmp_path / "o")]) == 2
    assert "base model" in capsys.readouterr().err

    from transformers import AutoModelForCausalLM

    ia3 = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), IA3Config(task_type="CAUSAL_LM")
    )
    ia3.save_pretrained(tmp_path / "ia3")
    assert (
        main(["combine", str(a), str(tmp_path / "ia3"), "--weights", "1", "1", "--out", str(tmp_path / "o")])
        == 2
    )
    assert "only LoRA adapters" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_combine_output_directory(tiny_model_dir, tmp_path, capsys):
    a = _save_adapter(tiny_model_dir, tmp_path / "p", "p", 1)
    b = _save_adapter(tiny_model_dir, tmp_path / "s", "s", 2)
    argv = ["combine", str(a), str(b), "--weights", "0.5", "0.5", "--svd-rank", "4"]
    before = (a / "adapter_model.safetensors").read_bytes()
    for out in (a, tmp_path, a / "sub"):  # is, holds, is inside an input: refused even with --overwrite
        assert main([*argv, "--out", str(out), "--overwrite"]) == 2
        assert f"the input adapter directory {a}" in capsys.readouterr().err
    assert (a / "adapter_model.safetensors").read_bytes() == before and not (a / "sub").exists()

    out = tmp_path / "mix"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main([*argv, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("mix.")]  # no temporaries left


def test_cli_combine_svd_rank_bounds(tiny_model_dir, tmp_path, capsys):
    a = _save_adapter(tiny_model_dir, tmp_path / "p", "p", 1)
    argv = ["combine", str(a), str(a), "--weights", "0.5", "0.5", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--svd-rank", "0"])
    assert exit_info.value.code == 2 and "--svd-rank: must be at least 1" in capsys.readouterr().err
    assert main([*argv, "--svd-rank", "100"]) == 2
    assert "use svd_rank <= 16" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)  # a 3x3 kernel: updates flattened to (out, in * 9) for the SVD
        self.point = nn.Conv2d(8, 4, 1)  # 1x1

    def forward(self, x):
        return self.point(self.conv(x))


@pytest.mark.parametrize("combination_type", ["cat", "svd", "ties", "dare_ties_svd"])
def test_conv_layers_match_peft(combination_type):
    models = []
    for lib in (peftkit, peft):
        torch.manual_seed(0)
        net = ConvNet()
        model = lib.get_peft_model(
            net, lib.LoraConfig(r=2, target_modules=["conv", "point"], init_lora_weights=False), "p"
        )
        model.add_adapter(
            "q", lib.LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "point"], init_lora_weights=False)
        )
        models.append(model)
    ours, theirs = models
    with torch.no_grad():
        own = dict(ours.named_parameters())
        for name, param in theirs.named_parameters():
            param.copy_(own[name])
    combine_both(
        ours, theirs, ["p", "q"], [0.5, 1.5], combination_type=combination_type, density=0.5, svd_rank=3
    )
    for name, weight in adapter_weights(ours, "mix").items():
        torch.testing.assert_close(weight, adapter_weights(theirs, "mix")[name], atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 3, 8, 8)
    for model in models:
        model.set_adapter("mix")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_shared_modules_to_save_are_refused():
    model = get_peft_model(
        make_tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    model.add_adapter("other", LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(PeftkitError, match="modules_to_save"):
        model.add_weighted_adapter(["default", "other"], [1, 1], "mix")
