"""Mixed-adapter batches (PEFT's ``adapter_names``): one LoRA adapter per row of one batch.

Each row of a mixed batch must equal that row run alone with its adapter active (``__base__``:
no adapter), and PEFT's mixed-batch output with the same weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

from _tiny_models import make_tiny_gpt2, tiny_t5_case
from conftest import make_tiny_llama
from peftkit import IA3Config, LoraConfig, get_peft_model
from peftkit.errors import PeftkitError

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ["one", "__base__", "two", "one"]

# (base builder, vocab, adapter "one" kwargs, adapter "two" kwargs): "two" leaves out some of "one"'s layers,
# whose rows then get no update there, as in PEFT.
CASES = {
    "llama": (
        make_tiny_llama,
        400,
        {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4},
        {"target_modules": ["v_proj", "o_proj"], "r": 2, "lora_alpha": 16},
    ),
    "gpt2_conv1d": (
        make_tiny_gpt2,
        100,
        {"target_modules": ["c_attn", "c_fc"], "r": 4, "fan_in_fan_out": True},
        {"target_modules": ["c_attn"], "r": 8, "use_rslora": True, "fan_in_fan_out": True},
    ),
    "llama_embedding": (
        make_tiny_llama,
        400,
        {"target_modules": ["embed_tokens", "q_proj"], "r": 4},
        {"target_modules": ["embed_tokens", "v_proj"], "r": 2, "lora_alpha": 4},
    ),
    # a trained copy of lm_head per adapter: each row's logits come from its adapter's copy
    "llama_modules_to_save": (
        make_tiny_llama,
        400,
        {"target_modules": ["q_proj"], "r": 4, "modules_to_save": ["lm_head"]},
        {"target_modules": ["v_proj"], "r": 2, "modules_to_save": ["lm_head"]},
    ),
    # trained embedding rows per adapter ("two" trains other rows than "one")
    "llama_trainable_tokens": (
        make_tiny_llama,
        400,
        {"target_modules": ["q_proj"], "r": 4, "trainable_token_indices": [5, 9, 11]},
        {"target_modules": ["v_proj"], "r": 2, "trainable_token_indices": [7, 9]},
    ),
}


def _lora(**kwargs) -> dict:
    return {"task_type": "CAUSAL_LM", "init_lora_weights": False, **kwargs}


def _build(case: str):
    builder, vocab, kwargs_a, kwargs_b = CASES[case]
    torch.manual_seed(0)
    model = get_peft_model(builder(), LoraConfig(**_lora(**kwargs_a)), adapter_name="one")
    torch.manual_seed(1)
    model.add_adapter("two", LoraConfig(**_lora(**kwargs_b)))
    with torch.no_grad():  # trained copies / rows start equal to the base: make each adapter's differ
        for name, param in model.named_parameters():
            if "modules_to_save." in name or "trainable_tokens_delta." in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    return model.eval(), builder, vocab


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 rows of 7 tokens, rows 1 and 2 left-padded (pad id 0)."""
    ids = torch.randint(3, vocab, (4, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    for row, pad in ((1, 2), (2, 3)):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


def _alone(model, name: str, run, **kwargs):
    """``run(**kwargs)`` with only adapter ``name`` active (``__base__``: none)."""
    if name == "__base__":
        with model.disable_adapter():
            return run(**kwargs)
    model.set_adapter(name)
    try:
        return run(**kwargs)
    finally:
        model.set_adapter("one")


@pytest.mark.parametrize("case", list(CASES))
def test_rows_equal_single_adapter_runs_and_peft(case):
    model, builder, vocab = _build(case)
    ids, mask = _batch(vocab)
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        for row, name in enumerate(NAMES):
            alone = _alone(
                model, name, model, input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]
            )
            keep = mask[row].bool()
            torch.testing.assert_close(mixed[row][keep], alone.logits[0][keep], atol=1e-5, rtol=0)
        assert model.active_adapter == "one"
        assert all(
            getattr(m, "row_adapters", None) is None for m in model.modules()
        )  # cleared after the call

        _, _, kwargs_a, kwargs_b = CASES[case]
        theirs = peft.get_peft_model(builder(), peft.LoraConfig(**_lora(**kwargs_a)), adapter_name="one")
        theirs.add_adapter("two", peft.LoraConfig(**_lora(**kwargs_b)))
        theirs.load_state_dict(model.state_dict())
        theirs.eval()
        expected = theirs(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)


def test_rows_differ_by_adapter():
    """Guard: the three adapters give three different outputs for the same row."""
    model, _, vocab = _build("llama")
    ids = _batch(vocab)[0][:1].repeat(3, 1)
    with torch.no_grad():
        logits = model(input_ids=ids, adapter_names=["one", "two", "__base__"]).logits
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert (logits[i] - logits[j]).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["llama", "gpt2_conv1d"])
def test_generate_greedy_equals_per_row(case):
    model, _, vocab = _build(case)
    ids, mask = _batch(vocab)
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **settings)
        for row, name in enumerate(NAMES):
            alone = _alone(
                model,
                name,
                model.generate,
                input_ids=ids[row : row + 1],
                attention_mask=mask[row : row + 1],
                **settings,
            )
            assert torch.equal(mixed[row], alone[0]), (row, name)


@pytest.mark.parametrize("returned", [1, 2])
def test_generate_beam_search_expands_names_per_prompt(returned):
    """Beam search repeats each prompt num_beams times (and returns num_return_sequences rows per
    prompt): those rows keep the prompt's adapter."""
    model, _, vocab = _build("llama")
    ids, mask = _batch(vocab)
    ids, mask = ids[[0, 2]], mask[[0, 2]]
    settings = {
        "max_new_tokens": 4,
        "num_beams": 2,
        "num_return_sequences": returned,
        "do_sample": False,
        "pad_token_id": 0,
    }
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=["two", "one"], **settings)
        for row, name in enumerate(["two", "one"]):
            alone = _alone(
                model,
                name,
                model.generate,
                input_ids=ids[row : row + 1],
                attention_mask=mask[row : row + 1],
                **settings,
            )
            assert torch.equal(mixed[row * returned : (row + 1) * returned], alone), (row, name)


def test_errors():
    model, _, vocab = _build("llama")
    ids, mask = _batch(vocab)
    with pytest.raises(ValueError, match="4 rows"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["one", "two"])
    with pytest.raises(ValueError, match="4 rows"):
        model.generate(input_ids=ids, attention_mask=mask, adapter_names=["one"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['c'\]"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["one", "c", "two", "one"])
    with pytest.raises(TypeError, match="list of adapter names"):
        model(input_ids=ids, adapter_names="one")
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        model(input_ids=ids, adapter_names=NAMES)
    model.eval()
    # the layers are left as they were after a refused or failed call
    assert all(getattr(m, "row_adapters", None) is None for m in model.modules())

    expected = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    model.merge_adapter()
    with pytest.raises(PeftkitError, match=r"cannot be used while adapter\(s\) one are merged"):
        model(input_ids=ids, attention_mask=mask, adapter_names=NAMES)
    model.unmerge_adapter()
    torch.testing.assert_close(
        model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits, expected
    )

    model.add_adapter("d", LoraConfig(**_lora(target_modules=["q_proj"], use_dora=True)))
    with pytest.raises(ValueError, match="DoRA"):
        model(input_ids=ids, adapter_names=["one", "d", "two", "one"])


def test_other_methods_refuse_adapter_names():
    model = get_peft_model(
        make_tiny_llama(),
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    ids = torch.randint(3, 400, (2, 5))
    with pytest.raises(ValueError, match="does not support adapter_names"):
        model(input_ids=ids, adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="does not support adapter_names"):
        model.generate(input_ids=ids, adapter_names=["default", "default"], max_new_tokens=2)


def test_failed_call_clears_row_adapters():
    model, _, vocab = _build("llama")
    ids, _ = _batch(vocab)
    bad = copy.deepcopy(ids)
    bad[0, 0] = 10_000  # out of the vocabulary: the embedding lookup fails inside the call
    with pytest.raises(IndexError):
        model(input_ids=bad, adapter_names=NAMES)
    assert all(getattr(m, "row_adapters", None) is None for m in model.modules())


def test_seq2seq_beam_search_encoder_keeps_original_rows():
    """T5 + beam search: the encoder sees the prompts, the decoder num_beams copies of each; both
    must use each prompt's adapter (PEFT re-hooks the encoder for this; here each layer call fits
    the names to the batch it sees)."""
    model = tiny_t5_case().model
    torch.manual_seed(0)
    model = get_peft_model(
        model, LoraConfig(**_lora(task_type="SEQ_2_SEQ_LM", target_modules=["q", "v"])), "one"
    )
    torch.manual_seed(1)
    model.add_adapter("two", LoraConfig(**_lora(task_type="SEQ_2_SEQ_LM", target_modules=["k", "wo"], r=2)))
    model.eval()
    ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(3))
    names = ["two", "__base__", "one"]
    settings = {"max_new_tokens": 4, "num_beams": 2, "do_sample": False}
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **settings)
        for row, name in enumerate(names):
            alone = _alone(model, name, model.generate, input_ids=ids[row : row + 1], **settings)
            assert torch.equal(mixed[row, : alone.shape[1]], alone[0]), (row, name)
