"""Soft prompts (prompt tuning, prefix tuning, P-tuning, P-tuning v2) against Hugging Face PEFT.

Each parity case builds the same tiny model twice, wraps one with ``peft`` and one with
``peftkit``, copies PEFT's (randomised) prompt encoder into ours and compares logits, files and
greedy generation. P-tuning v2 has no PEFT name: its oracle is PEFT's prefix tuning.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from _peft_compat import let_peft_hand_over_prefix
from _tiny_models import (
    make_tiny_bloom,
    make_tiny_gpt2,
    tiny_bert_case,
    tiny_mlp_case,
    tiny_t5_case,
    tiny_vit_case,
)
from conftest import make_tiny_llama, make_tiny_tokenizer, train_tiny
from peftkit import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PTuningV2Config,
    get_peft_model,
)
from peftkit.errors import ModelLoadError, PeftkitError
from peftkit.methods import get_method
from peftkit.train.loss import lm_loss_sum
from peftkit.transformers_compat import cache_keyword

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")
ATOL = 1e-5

# method -> (PEFT config class name, extra kwargs) for the variants worth covering
VARIANTS = {
    "prompt_tuning": ("prompt_tuning", "PromptTuningConfig", {}),
    "prefix_tuning": ("prefix_tuning", "PrefixTuningConfig", {}),
    "prefix_projection": (
        "prefix_tuning",
        "PrefixTuningConfig",
        {"prefix_projection": True, "encoder_hidden_size": 8},
    ),
    "p_tuning_mlp": ("p_tuning", "PromptEncoderConfig", {"encoder_hidden_size": 8}),
    "p_tuning_lstm": ("p_tuning", "PromptEncoderConfig", {"encoder_reparameterization_type": "LSTM"}),
    "p_tuning_v2": ("p_tuning_v2", "PrefixTuningConfig", {}),
}
MODELS = {
    "llama": lambda: make_tiny_llama(vocab_size=100),
    "gpt2": make_tiny_gpt2,
    "bloom": make_tiny_bloom,
}
IDS = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])  # row 0 left-padded
MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


def build_pair(variant: str, build, task_type: str = "CAUSAL_LM", **more):
    """PEFT's and our model for ``variant``, ours holding PEFT's (randomised) prompt encoder."""
    method, peft_cls, extra = VARIANTS[variant]
    kwargs = dict(task_type=task_type, num_virtual_tokens=3, **extra, **more)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = let_peft_hand_over_prefix(peft.get_peft_model(build(), getattr(peft, peft_cls)(**kwargs)))
    ours = get_peft_model(build(), get_method(method).config_cls(**kwargs))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator))
    copy_into_ours(theirs, ours)
    return theirs.eval(), ours.eval()


def copy_into_ours(theirs, ours) -> None:
    """PEFT keeps the encoder at ``prompt_encoder.<name>`` and the user's model at ``base_model``;
    ours sits at ``base_model.prompt_encoder.<name>`` and ``base_model.model``."""
    state = {}
    for key, value in theirs.state_dict().items():
        if key.startswith("prompt_encoder."):
            state["base_model." + key] = value
        elif ".modules_to_save." in key:
            state["base_model.model." + key.removeprefix("base_model.")] = value
    result = ours.load_state_dict(state, strict=False)
    assert not result.unexpected_keys


def logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# -- forward parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_lm_logits_match_peft(variant, arch):
    theirs, ours = build_pair(variant, MODELS[arch])
    inputs = dict(input_ids=IDS, attention_mask=MASK, labels=IDS)
    expected, got = theirs(**inputs), ours(**inputs)
    # CAUSAL_LM logits include the virtual positions for input prompts, as in PEFT
    extra = 0 if variant.startswith(("prefix", "p_tuning_v2")) else 3
    assert got.logits.shape == (2, 5 + extra, 100)
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    with ours.disable_adapter():
        base = logits(ours, input_ids=IDS, attention_mask=MASK)
    assert not torch.allclose(base, got.logits[:, extra:], atol=1e-3)  # the prompt does change the output


@pytest.mark.parametrize("variant", VARIANTS)
def test_seq2seq_and_classifier_logits_match_peft(variant):
    for case_builder, task, more in (
        (tiny_t5_case, "SEQ_2_SEQ_LM", {}),
        (tiny_bert_case, "SEQ_CLS", {"modules_to_save": ["classifier"]}),
    ):
        theirs, ours = build_pair(variant, lambda b=case_builder: b().model, task, **more)
        inputs = case_builder().inputs
        torch.testing.assert_close(logits(ours, **inputs), logits(theirs, **inputs), atol=ATOL, rtol=0)
        if task == "SEQ_2_SEQ_LM":
            assert ours.peft_config["default"].num_transformer_submodules == 2


# -- files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_files_load_in_both_directions(variant, tmp_path):
    for build, task, more in (
        (MODELS["llama"], "CAUSAL_LM", {}),
        (lambda: tiny_bert_case().model, "SEQ_CLS", {"modules_to_save": ["classifier"]}),
    ):
        theirs, ours = build_pair(variant, build, task, **more)
        inputs = dict(input_ids=IDS, attention_mask=MASK)
        expected = logits(theirs, **inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs.save_pretrained(tmp_path / "theirs")
        ours.save_pretrained(tmp_path / "ours")
        file_theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
        file_ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
        assert file_ours.keys() == file_theirs.keys()
        assert "prompt_embeddings" in file_ours
        for key in file_theirs:
            torch.testing.assert_close(file_ours[key], file_theirs[key], atol=ATOL, rtol=0)
        config_theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
        config_ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        if variant != "p_tuning_v2":
            assert set(config_ours) == set(config_theirs) - {"peft_version"}
            for key in ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads"):
                assert config_ours[key] == config_theirs[key], key
        # PEFT's file -> peftkit, peftkit's file -> PEFT: same logits
        if variant == "p_tuning_v2":  # PEFT reads it as the prefix-tuning file it is
            config_ours["peft_type"] = "PREFIX_TUNING"
            (tmp_path / "ours" / "adapter_config.json").write_text(json.dumps(config_ours))
            config_theirs["peft_type"] = "P_TUNING_V2"
            (tmp_path / "theirs" / "adapter_config.json").write_text(json.dumps(config_theirs))
        loaded_ours = peftkit.PeftModel.from_pretrained(build(), tmp_path / "theirs")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded_theirs = let_peft_hand_over_prefix(
                peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
            )
        torch.testing.assert_close(logits(loaded_ours, **inputs), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(logits(loaded_theirs, **inputs), expected, atol=ATOL, rtol=0)
        # totals agree; PEFT leaves a loaded prompt encoder requires_grad=True, ours is frozen
        assert loaded_ours.get_nb_trainable_parameters() == (
            0,
            loaded_theirs.get_nb_trainable_parameters()[1],
        )


@pytest.mark.parametrize("variant", ["prefix_projection", "p_tuning_mlp"])
def test_reparameterized_file_refuses_a_trainable_encoder(variant, tmp_path):
    """The file holds the encoder's output; the MLP that made it cannot be rebuilt (PEFT refuses too)."""
    _, ours = build_pair(variant, MODELS["llama"])
    ours.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="is_trainable=False"):
        peftkit.PeftModel.from_pretrained(MODELS["llama"](), tmp_path, is_trainable=True)


def test_prompt_tuning_file_can_continue_training(tmp_path):
    _, ours = build_pair("prompt_tuning", MODELS["llama"])
    ours.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(MODELS["llama"](), tmp_path, is_trainable=True)
    assert loaded.get_nb_trainable_parameters()[0] == 3 * 32
    torch.testing.assert_close(logits(loaded, input_ids=IDS), logits(ours, input_ids=IDS), atol=0, rtol=0)


# -- generation -------------------------------------------------------------------------------------


def argmax_loop(model, ids, mask, steps: int, prefix: bool) -> torch.Tensor:
    """Greedy decoding without a cache: the whole sequence through the full forward at each step."""
    for _ in range(steps):
        # generate numbers positions by the attention mask; prefix methods take position_ids
        # (and shift them past the prefix, as PEFT does); input prompts ignore them, as in PEFT
        kwargs = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if prefix else {}
        next_token = logits(model, input_ids=ids, attention_mask=mask, **kwargs)[:, -1].argmax(
            -1, keepdim=True
        )
        ids = torch.cat([ids, next_token], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
    return ids


def peft_reads_the_cache(peft_model) -> bool:
    """Whether PEFT's generation finds the KV cache: it reads ``past_key_values``, which
    transformers 5.25 renamed ``cache``. Where it does not, the oracle for generation is the
    step-by-step argmax over our forward (whose logits are checked against PEFT's above)."""
    return cache_keyword(peft_model.get_base_model()) == "past_key_values"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", ["prompt_tuning", "prefix_tuning", "p_tuning_lstm", "p_tuning_v2"])
def test_greedy_generate_on_left_padded_batch(variant, arch):
    theirs, ours = build_pair(variant, MODELS[arch])
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = ours.generate(input_ids=IDS, attention_mask=MASK, use_cache=True, **options)
    without_cache = ours.generate(input_ids=IDS, attention_mask=MASK, use_cache=False, **options)
    prefix = variant in ("prefix_tuning", "p_tuning_v2")
    reference = argmax_loop(ours, IDS, MASK, 6, prefix)
    assert with_cache.shape == (2, 11)
    assert torch.equal(with_cache, reference)
    assert torch.equal(without_cache, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if peft_reads_the_cache(theirs):
            assert torch.equal(with_cache, theirs.generate(input_ids=IDS, attention_mask=MASK, **options))
        elif not prefix:
            # PEFT 0.21.2 looks for the cache under its pre-5.25 name, finds none and injects the
            # prompt again at every cached step; without a cache its generation is still right.
            expected = theirs.generate(input_ids=IDS, attention_mask=MASK, use_cache=False, **options)
            assert torch.equal(with_cache, expected)
    with ours.disable_adapter():
        base = ours.generate(input_ids=IDS, attention_mask=MASK, **options)
    assert not torch.equal(base, with_cache)  # the prompt steers generation
    assert "prepare_inputs_for_generation" not in ours.get_base_model().__dict__  # patch removed


@pytest.mark.parametrize("variant", ["prompt_tuning", "prefix_tuning"])
def test_seq2seq_generate_matches_peft(variant):
    theirs, ours = build_pair(variant, lambda: tiny_t5_case().model, "SEQ_2_SEQ_LM")
    options = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # On transformers >= 5.25 PEFT's cached decoding misses the cache (see peft_reads_the_cache).
        cached = peft_reads_the_cache(theirs)
        expected = theirs.generate(**options) if cached else theirs.generate(use_cache=False, **options)
    assert torch.equal(ours.generate(**options), expected)
    assert torch.equal(ours.generate(use_cache=False, **options), expected)


# -- training hooks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_fast_path_equals_full_forward(variant):
    """train/loss.py's body_hidden_states path gives the loss the full forward (logits) gives."""
    _, ours = build_pair(variant, MODELS["llama"])
    labels = IDS.masked_fill(MASK == 0, -100)
    batch = {"input_ids": IDS, "attention_mask": MASK, "labels": labels}
    with torch.no_grad():
        fast, n_fast = lm_loss_sum(ours, batch)
        full = ours(input_ids=IDS, attention_mask=MASK).logits[:, -IDS.shape[1] : -1]
        mask = labels[:, 1:] != -100
        slow = torch.nn.functional.cross_entropy(full[mask], labels[:, 1:][mask], reduction="sum")
    assert n_fast == int(mask.sum())
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-5)


# -- init, errors, unload ---------------------------------------------------------------------------


def test_text_init_uses_the_tokens_of_the_init_text(tmp_path):
    tokenizer = make_tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    text = "good word"
    kwargs = dict(
        task_type="CAUSAL_LM",
        num_virtual_tokens=7,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tmp_path / "tok"),
    )
    model = get_peft_model(make_tiny_llama(), PromptTuningConfig(**kwargs))
    ids = tokenizer(text)["input_ids"]
    expected_ids = (ids * 7)[:7]  # repeated, then cut to num_virtual_tokens
    table = model.base_model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(table, model.get_input_embeddings().weight[expected_ids], atol=0, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_tiny_llama(), peft.PromptTuningConfig(**kwargs))
    torch.testing.assert_close(table, theirs.prompt_encoder["default"].embedding.weight, atol=0, rtol=0)


def test_sample_vocab_init_takes_rows_of_the_vocabulary():
    config = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB"
    )
    model = get_peft_model(make_tiny_llama(), config)
    table = model.base_model.prompt_encoder["default"].embedding.weight
    vocab = model.get_input_embeddings().weight
    assert all((vocab == row).all(dim=1).any() for row in table)


@pytest.mark.parametrize(
    "config_cls, kwargs, message",
    [
        (PromptTuningConfig, dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
        (PrefixTuningConfig, dict(), "num_virtual_tokens must be a positive integer"),
        (PromptTuningConfig, dict(num_virtual_tokens=4, prompt_tuning_init="TEXT"), "tokenizer_name_or_path"),
        (
            PromptTuningConfig,
            dict(num_virtual_tokens=4, prompt_tuning_init="TEXT", tokenizer_name_or_path="x"),
            "prompt_tuning_init_text is empty",
        ),
        (
            PromptTuningConfig,
            dict(num_virtual_tokens=4, prompt_tuning_init="WORDS"),
            "RANDOM, TEXT, SAMPLE_VOCAB",
        ),
        (
            PromptEncoderConfig,
            dict(num_virtual_tokens=4, encoder_reparameterization_type="GRU"),
            "MLP or LSTM",
        ),
        (PrefixTuningConfig, dict(num_virtual_tokens=4, init_weights="ones"), "'zero' or null"),
        (PTuningV2Config, dict(num_virtual_tokens=4, num_transformer_submodules=3), "1 .* or null"),
    ],
)
def test_bad_configs_say_what_to_change(config_cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config_cls(task_type="CAUSAL_LM", **kwargs)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning", "p_tuning_v2"])
def test_models_without_word_embeddings_are_refused(method):
    for case in (tiny_vit_case(), tiny_mlp_case()):
        with pytest.raises(PeftkitError, match="token embeddings"):
            get_peft_model(
                case.model, get_method(method).config_cls(task_type="SEQ_CLS", num_virtual_tokens=2)
            )


class NoCacheLM(torch.nn.Module):
    """A language model whose forward cannot take past key/values."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.head = torch.nn.Linear(8, 10)
        self.config = {"num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2}

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None):
        return self.head(self.embed(input_ids) if inputs_embeds is None else inputs_embeds)


@pytest.mark.parametrize("method", ["prefix_tuning", "p_tuning_v2"])
def test_prefix_needs_a_model_that_takes_past_key_values(method):
    with pytest.raises(PeftkitError, match="takes no KV cache.*prompt_tuning"):
        get_peft_model(
            NoCacheLM(), get_method(method).config_cls(task_type="CAUSAL_LM", num_virtual_tokens=2)
        )
    # input prompts need no cache: prompt tuning works on it
    model = get_peft_model(NoCacheLM(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert model(input_ids=torch.tensor([[1, 2, 3]])).shape == (1, 5, 10)


def test_task_type_is_required():
    with pytest.raises(PeftkitError, match="task_type"):
        get_peft_model(make_tiny_llama(), PromptTuningConfig(num_virtual_tokens=2))


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_is_refused_and_unload_gives_the_base_model(variant):
    base_logits = logits(MODELS["llama"](), input_ids=IDS)
    _, ours = build_pair(variant, MODELS["llama"])
    with pytest.raises(PeftkitError, match="cannot be merged.*unload"):
        ours.merge_and_unload()
    plain = ours.unload()
    assert type(plain).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(plain, input_ids=IDS), base_logits, atol=0, rtol=0)


def test_config_round_trips_through_the_peft_json(tmp_path):
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_reparameterization_type="lstm"
    )
    model = get_peft_model(make_tiny_llama(), config)
    model.save_pretrained(tmp_path)
    again = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(again, PromptEncoderConfig)
    assert again.encoder_reparameterization_type == "LSTM"
    assert (again.token_dim, again.encoder_hidden_size, again.num_layers) == (32, 32, 2)


def test_file_with_wrong_prompt_shape_is_refused(tmp_path):
    _, ours = build_pair("prompt_tuning", MODELS["llama"])
    ours.save_pretrained(tmp_path)
    save_file({"prompt_embeddings": torch.zeros(5, 32)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ModelLoadError, match="wrong shape"):
        peftkit.PeftModel.from_pretrained(MODELS["llama"](), tmp_path)


@pytest.mark.parametrize(
    "method, section",
    [
        ("prompt_tuning", {"num_virtual_tokens": 4}),
        ("prefix_tuning", {"num_virtual_tokens": 4, "prefix_projection": True}),
        ("p_tuning", {"num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM"}),
        ("p_tuning_v2", {"num_virtual_tokens": 4}),
    ],
)
def test_short_training_run(method, section, tiny_model_dir, tmp_path):
    """`peftkit train`'s loop (loss fast path, saving, evaluation by generate) with a YAML-style section."""
    losses = train_tiny(
        tiny_model_dir, tmp_path / "out", method, section, max_steps=16, learning_rate=3e-2, warmup_steps=1
    )
    assert sum(losses[-4:]) / 4 < 0.95 * sum(losses[:4]) / 4, losses  # a random tiny model: a slow start
    saved = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert list(saved) == ["prompt_embeddings"]
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper() and config["task_type"] == "CAUSAL_LM"
    loaded = peftkit.PeftModel.from_pretrained(
        make_tiny_llama(vocab_size=len(make_tiny_tokenizer())), tmp_path / "out" / "adapter"
    )
    assert loaded.get_nb_trainable_parameters()[0] == 0
