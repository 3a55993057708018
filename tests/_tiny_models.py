"""Tiny random models for the adapter tests: GPT-2 (Conv1D layers), BLOOM (fused query_key_value),
and one case per architecture of the method x architecture matrix."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def make_tiny_gpt2(vocab_size: int = 100, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def make_tiny_gqa(name: str, **config: Any):
    """A tiny Qwen2 / Mistral causal LM (grouped-query attention, RoPE); ``config`` overrides."""
    import transformers

    torch.manual_seed(0)
    settings = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    settings.update(config)
    model_cls = getattr(transformers, f"{name}ForCausalLM")
    return model_cls(getattr(transformers, f"{name}Config")(**settings)).eval()


def make_tiny_bloom(vocab_size: int = 100, seed: int = 0):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    config = BloomConfig(
        vocab_size=vocab_size, hidden_size=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return BloomForCausalLM(config).eval()


# -- the architecture matrix (tests/test_architectures.py) ------------------------------------------
#
# One small function per architecture: a tiny random model (built under the caller's default
# device, so ``with torch.device("meta")`` gives a weightless copy), a fixed batch, and the loss
# on that batch. Batches are made on the CPU with their own generator, so they never depend on
# the global seed or on the device the model was built on.


@dataclass
class TinyCase:
    """A tiny model with a fixed batch: ``model(**inputs)`` runs it, ``loss(output)`` scores it."""

    model: nn.Module
    inputs: dict[str, torch.Tensor]
    loss: Callable[[Any], torch.Tensor]


def _ids(vocab: int, shape: tuple[int, ...] = (2, 9), seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed), device="cpu")


def _hf_loss(output: Any) -> torch.Tensor:
    return output.loss


def _lm_case(model: nn.Module, vocab: int) -> TinyCase:
    ids = _ids(vocab)
    return TinyCase(model, {"input_ids": ids, "labels": ids}, _hf_loss)


def tiny_llama_case(seed: int = 0) -> TinyCase:
    from conftest import make_tiny_llama

    return _lm_case(make_tiny_llama(vocab_size=100, seed=seed), 100)


def tiny_bloom_case(seed: int = 0) -> TinyCase:
    return _lm_case(make_tiny_bloom(seed=seed), 100)


def tiny_gpt2_case(seed: int = 0) -> TinyCase:
    return _lm_case(make_tiny_gpt2(seed=seed), 100)


def _t5_kwargs() -> dict[str, Any]:
    return dict(
        vocab_size=100,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def _seq2seq_case(model: nn.Module) -> TinyCase:
    return TinyCase(model, {"input_ids": _ids(100), "labels": _ids(100, (2, 5), seed=2)}, _hf_loss)


def tiny_t5_case(seed: int = 0) -> TinyCase:
    """T5 encoder-decoder (ReLU feed-forward ``wi``/``wo``, LM head tied to the embeddings)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    return _seq2seq_case(T5ForConditionalGeneration(T5Config(**_t5_kwargs())).eval())


def tiny_mt5_case(seed: int = 0) -> TinyCase:
    """mT5 encoder-decoder (gated-GELU feed-forward ``wi_0``/``wi_1``/``wo``, untied LM head)."""
    from transformers import MT5Config, MT5ForConditionalGeneration

    torch.manual_seed(seed)
    config = MT5Config(**_t5_kwargs(), feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return _seq2seq_case(MT5ForConditionalGeneration(config).eval())


def _encoder_kwargs() -> dict[str, Any]:
    return dict(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )


def _classification_case(model: nn.Module, vocab: int) -> TinyCase:
    labels = torch.tensor([0, 2], device="cpu")
    inputs = {
        "input_ids": _ids(vocab),
        "attention_mask": torch.ones(2, 9, dtype=torch.long),
        "labels": labels,
    }
    return TinyCase(model, inputs, _hf_loss)


def tiny_bert_case(seed: int = 0) -> TinyCase:
    """BERT encoder with a sequence-classification head (``classifier``, on the pooler)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, max_position_embeddings=32, **_encoder_kwargs())
    return _classification_case(BertForSequenceClassification(config).eval(), 100)


def tiny_roberta_case(seed: int = 0) -> TinyCase:
    """RoBERTa encoder with its two-layer ``classifier`` head (dense + out_proj)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=100, max_position_embeddings=40, pad_token_id=1, **_encoder_kwargs())
    return _classification_case(RobertaForSequenceClassification(config).eval(), 100)


def tiny_vit_case(seed: int = 0) -> TinyCase:
    """ViT image classifier on 8x8 RGB images (four 4x4 patches + CLS)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, **_encoder_kwargs())
    model = ViTForImageClassification(config).eval()
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), device="cpu")
    return TinyCase(model, {"pixel_values": pixels, "labels": torch.tensor([1, 0], device="cpu")}, _hf_loss)


class TinyMLPBlock(nn.Module):
    """A residual feed-forward block: ``x + fc2(gelu(fc1(x)))``."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


class TinyMLP(nn.Module):
    """A user's own model (no transformers ``config``): blocks of MLPs and a linear ``head``."""

    def __init__(self, width: int = 16, n_blocks: int = 2, n_classes: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(TinyMLPBlock(width) for _ in range(n_blocks))
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)  # (batch, n_classes)


def tiny_mlp_case(seed: int = 0) -> TinyCase:
    torch.manual_seed(seed)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1), device="cpu")
    labels = torch.arange(8, device="cpu") % 4
    return TinyCase(TinyMLP().eval(), {"x": x}, lambda logits: nn.functional.cross_entropy(logits, labels))
