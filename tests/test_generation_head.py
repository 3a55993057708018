"""Generation hands the output layer a contiguous input (evaluation._contiguous_head_input): a
strided ``hidden[:, -1:]`` would make torch's matmul expand the vocab x hidden weight once per
row (a 0.9 GB copy for 16 rows of SmolLM2). Same tokens, and the hook is gone afterwards."""

from __future__ import annotations

import contextlib

import torch

from conftest import make_tiny_llama, make_tiny_tokenizer
from peftkit import evaluation
from peftkit.evaluation import generate_token_ids


def test_the_output_layer_sees_contiguous_rows_and_the_tokens_do_not_change(monkeypatch):
    torch.manual_seed(0)
    model, tokenizer = make_tiny_llama(), make_tiny_tokenizer()
    prompts = [tokenizer(text)["input_ids"] for text in ("word good is", "hello there friend word", "bad")]
    head = model.get_output_embeddings()
    seen: list[bool] = []
    recorder = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    try:
        ids = generate_token_ids(model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
        assert seen and all(seen)
        assert not head._forward_pre_hooks  # removed once generation ends
        seen.clear()
        monkeypatch.setattr(evaluation, "_contiguous_head_input", lambda _model: contextlib.nullcontext())
        plain = generate_token_ids(model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    finally:
        recorder.remove()
    assert not all(seen)  # the test can fail: without the hook the head gets a strided view
    assert ids == plain
