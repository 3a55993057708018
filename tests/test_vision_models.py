"""LoRA on vision models without token embeddings (Segformer, ViT, ConvNeXt), PEFT as the oracle.

These models' ``get_input_embeddings`` raises NotImplementedError (Segformer, ConvNeXt) or returns
a patch embedding (ViT); adapters must still be created, saved, loaded (from either library) and
merged. The setup is PEFT's semantic-segmentation / image-classification tutorials': LoRA on the
attention projections, the task head in ``modules_to_save``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.methods.lora import LoraLinear

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")


def make_segformer() -> nn.Module:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=3,
    )
    return SegformerForSemanticSegmentation(config).eval()


def make_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    return ViTForImageClassification(config).eval()


def make_convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(0)
    config = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    return ConvNextForImageClassification(config).eval()


# name -> (base model builder, LoRA settings)
CASES: dict[str, tuple[Callable[[], nn.Module], dict]] = {
    "segformer": (make_segformer, dict(target_modules=["q_proj", "v_proj"], modules_to_save=["decode_head"])),
    "vit": (make_vit, dict(target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])),
    "convnext": (make_convnext, dict(target_modules=["pwconv1", "pwconv2"], modules_to_save=["classifier"])),
}
ARCHS = pytest.mark.parametrize("arch", list(CASES))
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0)


def pixel_values() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # (batch, channels, h, w)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixel_values()).logits


def ours(arch: str) -> peftkit.PeftModel:
    make, settings = CASES[arch]
    return peftkit.get_peft_model(make(), peftkit.LoraConfig(**LORA, **settings))


def theirs(arch: str):
    make, settings = CASES[arch]
    return peft.get_peft_model(make(), peft.LoraConfig(**LORA, **settings))


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Stand-in for training: move every trainable tensor (lora_B starts at zero) away from its init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model.eval()


@ARCHS
def test_trainable_parameters_match_peft(arch):
    model, reference = ours(arch), theirs(arch)
    assert model.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n, p in reference.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in names) and any("modules_to_save" in n for n in names)


@ARCHS
def test_peftkit_adapter_loads_in_peft(arch, tmp_path):
    model = perturbed(ours(arch))
    expected = logits(model)
    assert not torch.allclose(expected, logits(CASES[arch][0]()))  # the adapter changes the output
    model.save_pretrained(tmp_path / "ours")
    theirs(arch).save_pretrained(tmp_path / "theirs")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert saved.keys() == load_file(tmp_path / "theirs" / "adapter_model.safetensors").keys()
    loaded = peft.PeftModel.from_pretrained(CASES[arch][0](), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded), expected)


@ARCHS
def test_peft_adapter_loads_in_peftkit(arch, tmp_path):
    reference = perturbed(theirs(arch))
    expected = logits(reference)
    assert not torch.allclose(expected, logits(CASES[arch][0]()))
    reference.save_pretrained(tmp_path / "adapter")
    loaded = peftkit.PeftModel.from_pretrained(CASES[arch][0](), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded), expected)


@ARCHS
def test_peft_adapter_loads_with_load_adapter(arch, tmp_path):
    reference = perturbed(theirs(arch))
    expected = logits(reference)
    reference.save_pretrained(tmp_path / "adapter")
    model = ours(arch)  # a second adapter next to a fresh one
    model.load_adapter(tmp_path / "adapter", adapter_name="loaded")
    model.set_adapter("loaded")
    torch.testing.assert_close(logits(model.eval()), expected)


@ARCHS
def test_merge_and_unload_keeps_outputs(arch):
    model = perturbed(ours(arch))
    expected = logits(model)
    merged = model.merge_and_unload()
    assert type(merged) is type(CASES[arch][0]())
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)
