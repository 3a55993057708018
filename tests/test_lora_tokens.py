"""New tokens with LoRA, against PEFT: ``trainable_token_indices`` and full embeddings saved with the
adapter (``save_embedding_layers``), on tiny Llamas with and without tied input/output embeddings."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from conftest import make_tiny_llama
from peftkit.errors import ModelLoadError, TargetModulesError
from peftkit.methods.lora import LoraConfig

peft = pytest.importorskip("peft")

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("single_thread")
IDS = torch.tensor([[1, 3, 5, 7, 9, 3, 398, 399], [7, 7, 2, 400, 401, 5, 1, 0]])
EMBED_DELTA = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def _resized(tie: bool = False, vocab: int = 402, seed: int = 0):
    """A tiny Llama of 400 tokens, resized to ``vocab`` (new rows drawn by transformers' resize)."""
    model = make_tiny_llama(tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model.resize_token_embeddings(vocab)
    return model


def _peft(model, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**config))


def _out(model, ids=None):
    if ids is None:  # the new tokens' ids only where the model has them
        ids = IDS if model.get_input_embeddings().weight.shape[0] > 400 else IDS.clamp(max=399)
    with torch.no_grad():
        return model(input_ids=ids).logits


def _save_peft(model, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path, **kwargs)


def _load_peft(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(model, path)


TOKEN_CASES = {
    "untied-list": (False, dict(target_modules=["q_proj"], trainable_token_indices=[3, 400, 401])),
    "tied-list": (True, dict(target_modules=["q_proj", "v_proj"], trainable_token_indices=[400, 401])),
    "untied-dict-head": (
        False,
        dict(
            target_modules=["v_proj"], trainable_token_indices={"embed_tokens": [400, 401], "lm_head": [401]}
        ),
    ),
    "tied-dict-same": (
        True,
        dict(
            target_modules=["q_proj"],
            trainable_token_indices={"embed_tokens": [5, 400, 401], "lm_head": [5, 400, 401]},
        ),
    ),
    "dora-modules-to-save": (
        False,
        dict(
            target_modules=["k_proj"],
            use_dora=True,
            trainable_token_indices=[401],
            modules_to_save=["lm_head"],
        ),
    ),
}


@pytest.fixture(scope="module", params=list(TOKEN_CASES), ids=list(TOKEN_CASES))
def token_pair(request):
    """(peft model, peftkit model, tie, config) on resized tiny Llamas with identical random adapters."""
    tie, config = TOKEN_CASES[request.param]
    config = dict(config, task_type="CAUSAL_LM")
    theirs = _peft(_resized(tie), **config, init_lora_weights=False)
    ours = peftkit.get_peft_model(_resized(tie), LoraConfig(**config, init_lora_weights=False))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    ours.load_state_dict(theirs.state_dict())  # strict: identical layouts
    return theirs.eval(), ours.eval(), tie, config


def test_tokens_same_counts_names_and_keys(token_pair):
    theirs, ours, *_ = token_pair
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    assert set(ours.state_dict()) == set(theirs.state_dict())


def test_tokens_same_logits_and_merge(token_pair):
    theirs, ours, *_ = token_pair
    expected = _out(theirs)
    torch.testing.assert_close(_out(ours), expected, atol=ATOL, rtol=0)
    merged = copy.deepcopy(ours).merge_and_unload()
    torch.testing.assert_close(_out(merged), expected, atol=1e-4, rtol=0)


def test_tokens_files_load_both_ways(token_pair, tmp_path):
    """Without a recorded base model, "auto" saves no embedding: only the token rows travel."""
    theirs, ours, tie, _ = token_pair
    ours.save_pretrained(tmp_path / "ours")
    _save_peft(theirs, tmp_path / "theirs")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(saved) == set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert EMBED_DELTA in saved and not any(k.endswith(".base_layer.weight") for k in saved)
    # The token rows replace whatever a fresh resize drew, so another seed gives the same model
    # as long as the head rows are not new (tied, or covered by lm_head indices / modules_to_save).
    in_ours = peftkit.PeftModel.from_pretrained(_resized(tie, seed=1), tmp_path / "theirs")
    in_peft = _load_peft(_resized(tie, seed=1), tmp_path / "ours")
    torch.testing.assert_close(_out(in_ours), _out(in_peft), atol=ATOL, rtol=0)
    if tie:
        torch.testing.assert_close(_out(in_ours), _out(theirs), atol=ATOL, rtol=0)


def test_only_listed_rows_train():
    model = peftkit.get_peft_model(
        make_tiny_llama(tie_word_embeddings=True),
        LoraConfig(target_modules=["q_proj"], trainable_token_indices=[4, 9]),
    )
    embed = model.get_input_embeddings()
    before = embed.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=torch.tensor([[4, 9, 11, 12]]), labels=torch.tensor([[4, 9, 11, 12]])).loss.backward()
    optimizer.step()
    changed = (embed.weight.detach() - before).abs().sum(dim=1).nonzero().flatten().tolist()
    assert changed == [4, 9]
    torch.testing.assert_close(model.get_output_embeddings().weight, embed.weight)  # tied head follows


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(trainable_token_indices=[400]), ValueError, r"\[400\] are outside the embedding's 400 rows"),
        (dict(trainable_token_indices={"nope": [1]}), TargetModulesError, "'nope', which matches no module"),
        (
            dict(trainable_token_indices=[1], modules_to_save=["embed_tokens"]),
            ValueError,
            "both modules_to_save",
        ),
        (
            dict(trainable_token_indices=[1], target_modules=["embed_tokens"]),
            ValueError,
            "both a LoRA target",
        ),
    ],
)
def test_bad_token_targets_are_refused(kwargs, error, message):
    config = {"target_modules": ["q_proj"], **kwargs}
    with pytest.raises(error, match=message):
        peftkit.get_peft_model(make_tiny_llama(), LoraConfig(**config))


@pytest.mark.parametrize("value", [[], [1, 1], [-1], {"embed_tokens": "3"}])
def test_invalid_token_indices(value):
    with pytest.raises(ValueError, match="trainable_token_indices"):
        LoraConfig(target_modules=["q_proj"], trainable_token_indices=value)


# -- save_embedding_layers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A saved tiny Llama (400 tokens): models loaded from it record it as their base model."""
    path = tmp_path_factory.mktemp("base")
    make_tiny_llama().save_pretrained(path)
    return path


def _from_dir(base_dir, vocab: int | None = None, seed: int = 0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if vocab is not None:
        torch.manual_seed(seed)
        model.resize_token_embeddings(vocab)
    return model


def _randomised(theirs, ours):
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    ours.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize(
    "config, expected",
    [
        (
            dict(target_modules=["embed_tokens", "v_proj"]),
            {"base_model.model.model.embed_tokens.base_layer.weight"},
        ),
        (
            dict(target_modules=r".*\.(embed_tokens|q_proj)"),
            {"base_model.model.model.embed_tokens.base_layer.weight"},
        ),
        (dict(target_modules=["lm_head"]), {"base_model.model.lm_head.base_layer.weight"}),
    ],
)
def test_targeted_embeddings_are_saved_as_peft_saves_them(config, expected, tmp_path):
    config = dict(config, task_type="CAUSAL_LM", init_lora_weights=False)
    theirs = _peft(make_tiny_llama(), **config)
    ours = peftkit.get_peft_model(make_tiny_llama(), LoraConfig(**config))
    _randomised(theirs, ours)
    ours.save_pretrained(tmp_path / "ours")
    _save_peft(theirs, tmp_path / "theirs")
    saved = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert saved == set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert {k for k in saved if "lora_" not in k} == expected
    ours.save_pretrained(tmp_path / "small", save_embedding_layers=False)
    small = set(load_file(tmp_path / "small" / "adapter_model.safetensors"))
    assert small == saved - expected
    # PEFT's file, with the base embedding, loads into ours and vice versa
    torch.testing.assert_close(
        _out(peftkit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "theirs")),
        _out(theirs),
        atol=ATOL,
        rtol=0,
    )
    torch.testing.assert_close(
        _out(_load_peft(make_tiny_llama(), tmp_path / "ours")), _out(ours), atol=ATOL, rtol=0
    )


def test_saved_base_embedding_is_loaded(tmp_path):
    """The embedding in the file wins over the base model's (e.g. one changed before training)."""
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2)
    ours = peftkit.get_peft_model(model, LoraConfig(target_modules=["embed_tokens"], init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    torch.testing.assert_close(_out(loaded), _out(ours), atol=ATOL, rtol=0)


@pytest.mark.parametrize("tokens", [False, True], ids=["lora", "lora+trainable-tokens"])
def test_resized_vocabulary_saves_embeddings_both_ways(tokens, base_dir, tmp_path):
    config = dict(target_modules=["q_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
    if tokens:
        config["trainable_token_indices"] = [400, 401]
    theirs = _peft(_from_dir(base_dir, 402), **config)
    ours = peftkit.get_peft_model(_from_dir(base_dir, 402), LoraConfig(**config))
    _randomised(theirs, ours)
    assert ours.peft_config["default"].base_model_name_or_path == str(base_dir)
    ours.save_pretrained(tmp_path / "ours")
    _save_peft(theirs, tmp_path / "theirs")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(saved) == set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    embed = "embed_tokens.token_adapter.base_layer.weight" if tokens else "embed_tokens.weight"
    assert saved[f"base_model.model.model.{embed}"].shape == (402, 32)
    assert saved["base_model.model.lm_head.weight"].shape == (402, 32)
    # a base resized with other random rows: the saved embeddings make the models equal again
    in_ours = peftkit.PeftModel.from_pretrained(_from_dir(base_dir, 402, seed=7), tmp_path / "theirs")
    in_peft = _load_peft(_from_dir(base_dir, 402, seed=7), tmp_path / "ours")
    torch.testing.assert_close(_out(in_ours), _out(theirs), atol=ATOL, rtol=0)
    torch.testing.assert_close(_out(in_peft), _out(ours), atol=ATOL, rtol=0)


def test_unresized_base_gets_a_clear_error(base_dir, tmp_path):
    ours = peftkit.get_peft_model(_from_dir(base_dir, 402), LoraConfig(target_modules=["q_proj"]))
    ours.save_pretrained(tmp_path)
    with pytest.raises(
        ModelLoadError,
        match=r"vocabulary of 402 tokens .* base model has 400.*resize_token_embeddings\(402\)",
    ):
        peftkit.PeftModel.from_pretrained(_from_dir(base_dir), tmp_path)


def test_save_embedding_layers_is_checked(tmp_path):
    ours = peftkit.get_peft_model(make_tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="save_embedding_layers must be"):
        ours.save_pretrained(tmp_path, save_embedding_layers="always")
    ours.save_pretrained(tmp_path, save_embedding_layers=True)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys


# -- a training job that adds tokens (tokens: section) -----------------------------------------

NEW_TOKENS = ["<pos>", "<neg>"]
TOKEN_ROWS = [
    {"prompt": f"word {w} is", "completion": label}
    for w, label in [("good", "<pos>"), ("bad", "<neg>"), ("great", "<pos>"), ("awful", "<neg>")]
] * 6


def _token_job(tiny_model_dir, tmp_path, train: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    import json

    from peftkit.train.config import build_job_config

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TOKEN_ROWS))
    return build_job_config(
        {
            "base_model": str(tiny_model_dir),
            "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
            "tokens": {"add": NEW_TOKENS, "special": True, "train": train},
            "data": {"train": str(data), "test_size": 4},
            "training": {
                "max_steps": 6,
                "batch_size": 4,
                "learning_rate": 1e-2,
                "precision": "fp32",
                "seed": 3,
            },
            "evaluation": {"accuracy_after": False},
            "output_dir": str(tmp_path / "run"),
        }
    )


@pytest.mark.parametrize("train", ["rows", "embeddings"])
def test_training_with_new_tokens_reloads_with_the_same_logits(train, tiny_model_dir, tmp_path):
    from argparse import Namespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.loading import load_model_from_args
    from peftkit.train.loop import setup
    from peftkit.train.loop import train as run

    base_vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    session = setup(_token_job(tiny_model_dir, tmp_path, train))
    new_ids = session.tokenizer.convert_tokens_to_ids(NEW_TOKENS)
    assert new_ids == [base_vocab, base_vocab + 1]
    assert session.model.get_input_embeddings().weight.shape[0] == base_vocab + 2
    initial = {n: p.detach().clone() for n, p in session.model.named_parameters() if p.requires_grad}
    run(session, progress=False)
    trained = session.model.eval()
    now = dict(trained.named_parameters())
    assert any(not torch.equal(now[n], p) for n, p in initial.items() if "token" in n or "embed" in n)

    adapter = tmp_path / "run" / "adapter"
    saved = load_file(adapter / "adapter_model.safetensors")
    if train == "rows":  # untied tiny Llama: the rows of embed_tokens and lm_head both train
        assert saved[EMBED_DELTA].shape == (2, 32)
        assert saved["base_model.model.lm_head.token_adapter.trainable_tokens_delta"].shape == (2, 32)
        assert trained.peft_config["default"].trainable_token_indices == {
            "model.embed_tokens": new_ids,
            "lm_head": new_ids,
        }
    # the vocabulary grew, so the full embeddings are saved too (PEFT's "auto")
    embed_keys = [k for k in saved if k.endswith("weight") and "embed_tokens" in k and "delta" not in k]
    assert embed_keys and all(saved[k].shape[0] == base_vocab + 2 for k in embed_keys)
    assert len(AutoTokenizer.from_pretrained(adapter)) == base_vocab + 2

    # `peftkit generate --adapter` path: resizes a fresh base from the saved tokenizer
    args = Namespace(
        base_model=None,
        adapter=str(adapter),
        dtype="float32",
        trust_remote_code=False,
        device="cpu",
        precision="fp32",  # as the job trained
    )
    reloaded, tokenizer = load_model_from_args(args)
    assert tokenizer.convert_tokens_to_ids(NEW_TOKENS) == new_ids
    ids = torch.tensor([[5, 9, new_ids[0], 12, new_ids[1]]])
    torch.testing.assert_close(_out(reloaded, ids), _out(trained, ids), atol=ATOL, rtol=0)
    if train == "rows":  # PEFT reads the same directory onto a resized base
        their_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        their_base.resize_token_embeddings(base_vocab + 2)
        torch.testing.assert_close(
            _out(_load_peft(their_base, adapter), ids), _out(trained, ids), atol=ATOL, rtol=0
        )

    with pytest.raises(ModelLoadError, match=rf"vocabulary of {base_vocab + 2} tokens .* has {base_vocab}"):
        peftkit.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)


def test_tokens_section_is_checked(tiny_model_dir, tmp_path):
    from peftkit.configuration import ConfigError
    from peftkit.errors import PeftkitError
    from peftkit.train.config import build_job_config
    from peftkit.train.loop import setup

    with pytest.raises(ConfigError, match="lists a token twice"):
        build_job_config({"tokens": {"add": ["<a>", "<a>"]}})
    with pytest.raises(ConfigError, match="tokens.train"):
        build_job_config({"tokens": {"add": ["<a>"], "train": "all"}})
    job = build_job_config(
        {
            "method": "ia3",
            "tokens": {"add": ["<a>"]},
            "base_model": str(tiny_model_dir),
            "output_dir": str(tmp_path),
        }
    )
    with pytest.raises(PeftkitError, match="tokens.train: rows needs the method's trainable_token_indices"):
        setup(job)


def test_resumed_run_with_new_tokens_ends_with_the_same_adapter(tiny_model_dir, tmp_path):
    """Checkpoints carry the token rows and the resized embeddings, so a resume continues exactly."""
    import dataclasses

    from peftkit.train.loop import run_training

    straight = _token_job(tiny_model_dir, tmp_path / "a", "rows")
    straight.training.save_every = 3
    run_training(straight, progress=False)
    interrupted = dataclasses.replace(straight, output_dir=str(tmp_path / "b" / "run"))
    assert run_training(interrupted, progress=False, stop_after_step=4) == {"interrupted_at": 4}
    run_training(interrupted, resume=True, progress=False)
    first = load_file(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors")
    second = load_file(tmp_path / "b" / "run" / "adapter" / "adapter_model.safetensors")
    assert set(first) == set(second)
    for key in first:
        torch.testing.assert_close(second[key], first[key], atol=1e-6, rtol=0, msg=key)
