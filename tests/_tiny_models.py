"""Tiny GPT-2 (Conv1D layers) and BLOOM (fused query_key_value) models for the adapter tests."""

from __future__ import annotations

import torch


def make_tiny_gpt2(vocab_size: int = 100, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def make_tiny_bloom(vocab_size: int = 100, seed: int = 0):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    config = BloomConfig(
        vocab_size=vocab_size, hidden_size=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return BloomForCausalLM(config).eval()
