"""Shared fixtures: tiny random models and a tiny tokenizer, built offline from config classes."""

from __future__ import annotations

import os

import pytest
import torch

import _own_deprecations
import peftkit.threads

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_own_deprecations.install()

# Training and the CLI pick fewer threads on a loaded machine (peftkit.threads); in this process the
# load is mostly the suite itself, so the choice would vary from test to test: it sees an idle
# machine here (tests/test_threads.py sets the load it needs; subprocesses choose for themselves).
peftkit.threads.others_load = lambda: 0.0


@pytest.fixture(autouse=True)
def no_deprecated_calls_from_peftkit():
    """A deprecation warning that peftkit's own call caused is a bug (see _own_deprecations)."""
    _own_deprecations.caught.clear()
    yield
    found, _own_deprecations.caught[:] = list(_own_deprecations.caught), []
    assert not found, "peftkit called deprecated API:\n" + "\n".join(dict.fromkeys(found))


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "positive negative neutral sentiment tweet label answer question",
    "Instruction: Translate to French. Input: hello world. Output: bonjour le monde.",
    "0123456789 !?.,;:'\"()[]{}<>-_=+*/\\@#$%^&~`|",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def make_tiny_tokenizer():
    """A byte-level BPE tokenizer (~400 tokens) with ChatML special tokens and chat template."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(_CORPUS * 4, vocab_size=400, min_frequency=1, special_tokens=specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run fastest on one thread: thread start-up costs more than their matmuls."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


def sample_ids() -> torch.Tensor:
    """Token ids of two 9-token rows for the tiny Llama (fixed seed)."""
    return torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def ids() -> torch.Tensor:
    return sample_ids()


def make_tiny_llama(vocab_size: int = 400, seed: int = 0, **overrides):
    """A 2-layer Llama causal LM with random weights (a few hundred thousand parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs))
    model.eval()
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a model directory, for `peftkit train` runs.

    ``initializer_range=0.2`` makes logits sensitive enough to hidden-state changes that an
    adapter can lower the loss within a few steps (at 0.02 they are nearly uniform).
    """
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


def save_tiny_model_dir(path, **overrides):
    """Save a tiny Llama (``make_tiny_llama`` with ``overrides``) and the tiny tokenizer to ``path``."""
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.2,
        **overrides,
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


TINY_ROWS = [
    {"prompt": f"word {w} is", "completion": c} for w, c in [("good", "positive"), ("bad", "negative")]
] * 8


def train_tiny(model_dir, out, method: str, section: dict, **training) -> list[float]:
    """Run `run_training` for ``method`` on a toy prompt/completion task; return the step losses.

    ``training`` overrides the defaults below (12 steps of 4 examples, fp32, seed 7).
    """
    import json

    from peftkit.train.config import build_job_config
    from peftkit.train.loop import run_training

    data = out.parent / f"{out.name}-train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    settings = {"max_steps": 12, "batch_size": 4, "learning_rate": 1e-2, "precision": "fp32", "seed": 7}
    settings.update(training)
    job = build_job_config(
        {
            "base_model": str(model_dir),
            "method": method,
            method: section,
            "data": {"train": str(data), "test_size": 4},
            "training": settings,
            "evaluation": {"accuracy_after": False},
            "output_dir": str(out),
        }
    )
    run_training(job, progress=False)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in metrics if "loss" in r]


def load_benchmark(path):
    """Import a script of benchmarks/ (not a package) as a module, for its tests."""
    import importlib.util
    import sys

    if str(path.parent) not in sys.path:  # the scripts import their helpers (turns.py) by name
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
