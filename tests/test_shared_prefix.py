"""The shared prompt prefix run once per batch (train/shared_prefix.py): same loss, same gradients."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from _tiny_models import make_tiny_bloom, make_tiny_gpt2, make_tiny_gqa
from conftest import make_tiny_llama
from peftkit import LoraConfig, get_peft_model
from peftkit.train import shared_prefix as sp
from peftkit.train.batching import IGNORE_INDEX, collate
from peftkit.train.loss import lm_loss_sum

pytestmark = pytest.mark.usefixtures("single_thread")


@dataclass
class Ex:
    input_ids: list[int]
    labels: list[int]


def _examples(prefix: int = 6, lengths=(9, 4, 12, 7), answer: int = 2, seed: int = 0) -> list[Ex]:
    """``prefix`` shared tokens, then a prompt of its own and an ``answer``-token completion."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 100, (prefix,), generator=gen).tolist()
    out = []
    for n in lengths:
        own = torch.randint(3, 100, (n,), generator=gen).tolist()
        ids = shared + own
        out.append(Ex(ids, [IGNORE_INDEX] * (len(ids) - answer) + ids[-answer:]))
    return out


SUPPORTED = {
    "llama": lambda: make_tiny_llama(vocab_size=100),
    "qwen2": lambda: make_tiny_gqa("Qwen2"),
    "mistral": lambda: make_tiny_gqa("Mistral"),
    "gpt2": lambda: make_tiny_gpt2(vocab_size=100),
}
# ALiBi (Bloom) does not go through transformers' attention interface; a sliding window narrower
# than the batch cannot be laid out. Both must fall back to the usual path.
UNSUPPORTED = {
    "bloom": lambda: make_tiny_bloom(vocab_size=100),
    "mistral-window-4": lambda: make_tiny_gqa("Mistral", sliding_window=4),
}


def _lora(model):
    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )


def _loss_and_grads(model, batch, shared=None):
    model.zero_grad(set_to_none=True)
    loss, n = lm_loss_sum(model, batch, shared)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), n, grads


def _compare(model, batch) -> sp.SharedPrefix:
    shared = sp.SharedPrefix()
    loss_u, n_u, grads_u = _loss_and_grads(model, batch)
    for _ in range(2):  # the first call also checks against the usual path, the second does not
        loss_s, n_s, grads_s = _loss_and_grads(model, batch, shared)
        assert n_s == n_u
        torch.testing.assert_close(loss_s, loss_u, rtol=1e-5, atol=1e-5)
        for name, grad in grads_u.items():
            torch.testing.assert_close(grads_s[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    return shared


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", sorted(SUPPORTED))
def test_loss_and_gradients_equal_the_padded_batch(arch, attention, monkeypatch):
    base = SUPPORTED[arch]()
    base.set_attn_implementation(attention)
    calls = []
    original = sp.segment_attention
    monkeypatch.setattr(sp, "segment_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    sp._register()
    shared = _compare(_lora(base), collate(_examples(), pad_token_id=0))
    assert shared.enabled and shared.note is None
    # 2 layers x 2 training forwards (the first also checked against the usual path): the segment
    # layout really ran.
    assert len(calls) == 2 * 2
    monkeypatch.undo()
    sp._register()


@pytest.mark.parametrize("arch", sorted(UNSUPPORTED))
def test_unsupported_models_fall_back_with_a_note(arch, capsys):
    shared = _compare(_lora(UNSUPPORTED[arch]()), collate(_examples(), pad_token_id=0))
    assert not shared.enabled
    assert "training.shared_prefix: off" in capsys.readouterr().out


def test_full_fine_tuning_equals_the_padded_batch():
    model = make_tiny_llama(vocab_size=100)
    assert _compare(model, collate(_examples(), pad_token_id=0)).enabled


def test_the_check_switches_off_a_wrong_attention(monkeypatch, capsys):
    """The comparison can fail: an attention that lets suffixes ignore the prefix is caught."""
    original = sp.lay_out

    def without_prefix(batch, prefix):
        shared = original(batch, prefix)
        shared.layout.mask[1:, :, :, :prefix] = float("-inf")  # suffix queries miss the prefix keys
        shared.layout.mask[1:, :, :, prefix] = 0.0  # one key left per query: no NaN
        return shared

    monkeypatch.setattr(sp, "lay_out", without_prefix)
    model = _lora(make_tiny_llama(vocab_size=100))
    shared = _compare(model, collate(_examples(), pad_token_id=0))
    assert not shared.enabled
    assert "gives different outputs" in capsys.readouterr().out


class _NoKeywords(torch.nn.Module):
    """A causal LM body whose forward takes no extra keyword arguments."""

    def __init__(self):
        super().__init__()
        self.inner = make_tiny_llama(vocab_size=100).model
        self.config = self.inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.inner(input_ids, attention_mask=attention_mask, position_ids=position_ids)


class _Failing(_NoKeywords):
    def forward(self, input_ids, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'Tensor' and 'NoneType'")  # a bug


def test_a_forward_without_the_keyword_switches_off_and_other_type_errors_raise():
    batch = collate(_examples(), pad_token_id=0)
    notes = []
    shared = sp.SharedPrefix(say=notes.append)  # the loop passes its rank-0-only `say`
    assert shared.hidden_and_targets(_NoKeywords(), batch) is None
    assert not shared.enabled and notes == [shared.note] and "does not take" in shared.note
    with pytest.raises(TypeError, match="unsupported operand"):
        sp.SharedPrefix(say=notes.append).hidden_and_targets(_Failing(), batch)


def test_the_loop_gives_its_say():
    from types import SimpleNamespace

    training = SimpleNamespace(shared_prefix=True, packing=False)
    shared = sp.shared_prefix_for(training, "ddp", _lora(make_tiny_llama(vocab_size=100)), say=len)
    assert shared.say is len


def test_prefix_length():
    batch = collate(_examples(prefix=6), pad_token_id=0)
    assert sp.shared_prefix_length(batch) >= 6
    one_row = {k: v[:1] for k, v in batch.items()}
    assert sp.shared_prefix_length(one_row) == 0
    short = collate(_examples(prefix=2, seed=3), pad_token_id=0)
    assert sp.shared_prefix_length(short) in (0, sp.MIN_SHARED_TOKENS, 5)  # 2 + chance agreement
    # A label inside the shared tokens: the prefix stops before the position that predicts it.
    labelled = collate(_examples(prefix=8), pad_token_id=0)
    labelled["labels"][:, 6] = labelled["input_ids"][:, 6]
    assert sp.shared_prefix_length(labelled) == 5


def test_layout():
    examples = [Ex([1, 2, 3, 4, 5, 6], [-100] * 5 + [6]), Ex([1, 2, 3, 4, 7, 8], [-100] * 5 + [8])]
    shared = sp.lay_out(collate(examples, pad_token_id=0), prefix=4)
    assert shared.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert shared.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 4, 5]]
    # 6 is predicted from token 5 (row position 4), 8 from token 7 (row position 6).
    assert shared.targets.tolist() == [6, 8]
    assert shared.hidden_index.tolist() == [4, 6]
    layout = shared.layout
    assert (layout.segments, layout.query_slots, layout.key_slots) == (3, 4, 6)
    keys = layout.key_index.view(3, -1)
    for query, expected in [(0, [0, 1, 2, 3, 6]), (1, [0, 1, 2, 3, 6, 7])]:  # tokens 7 and 8
        allowed = (layout.mask[2, 0, query] == 0).nonzero().flatten()
        assert sorted(keys[2][allowed].tolist()) == expected  # the prefix and itself, not suffix 1
    assert layout.query_index.view(3, -1)[layout.unscatter // 4, layout.unscatter % 4].tolist() == list(
        range(8)
    )


def test_not_under_fsdp():
    from types import SimpleNamespace

    model = _lora(make_tiny_llama(vocab_size=100))
    training = SimpleNamespace(shared_prefix=True, packing=False)
    assert sp.shared_prefix_for(training, "ddp", model) is not None
    assert sp.shared_prefix_for(training, "fsdp", model) is None


def test_no_sharing_with_dropout():
    assert sp.can_share(_lora(make_tiny_llama(vocab_size=100)))
    dropout = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1)
    assert not sp.can_share(get_peft_model(make_tiny_llama(vocab_size=100), dropout))
    assert not sp.can_share(make_tiny_llama(vocab_size=100, attention_dropout=0.1))


ROWS = [
    {"prompt": f"please tell me the sentiment of this: word {w} number {i} is", "completion": c}
    for i in range(6)
    for w, c in [("good", "positive"), ("bad", "negative")]
]


def _job(model_dir, tmp_path, name: str, method: str = "lora", section=None, **training):
    import json

    from peftkit.train.config import build_job_config

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    settings = {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "precision": "fp32", "seed": 7}
    settings.update(training)
    return build_job_config(
        {
            "base_model": str(model_dir),
            "method": method,
            method: section if section is not None else {"r": 4, "target_modules": "all-linear"},
            "data": {"train": str(data), "test_size": 2},
            "training": settings,
            "evaluation": {"accuracy_after": False, "accuracy_before": False},
            "output_dir": str(tmp_path / name),
        }
    )


def test_training_with_a_shared_prefix_ends_with_the_same_adapter(tiny_model_dir, tmp_path, monkeypatch):
    """The whole loop, shared prefix on vs off: the same updates (fp32), and it really shared."""
    from safetensors.torch import load_file

    from peftkit.train.loop import run_training

    used = []
    original = sp.SharedPrefix.hidden_and_targets

    def spy(self, body, batch):
        out = original(self, body, batch)
        used.append(out is not None)
        return out

    monkeypatch.setattr(sp.SharedPrefix, "hidden_and_targets", spy)
    adapters = {}
    for on in (False, True):
        job = _job(tiny_model_dir, tmp_path, f"shared-{on}", shared_prefix=on)
        run_training(job, progress=False)
        adapters[on] = load_file(tmp_path / f"shared-{on}" / "adapter" / "adapter_model.safetensors")
    assert used and all(used)  # every step of the second run took the shared path
    for key, tensor in adapters[False].items():
        torch.testing.assert_close(adapters[True][key], tensor, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize(
    "method,section,training,expected",
    [
        ("lora", None, {}, True),
        ("lora", None, {"shared_prefix": False}, False),
        ("lora", None, {"packing": True}, False),
        ("lora", {"r": 4, "target_modules": "all-linear", "lora_dropout": 0.1}, {}, False),
        ("prompt_tuning", {"num_virtual_tokens": 4}, {}, False),  # adds virtual tokens
        ("ia3", {}, {}, True),
    ],
)
def test_when_the_loop_shares(tiny_model_dir, tmp_path, method, section, training, expected):
    from peftkit.train.loop import setup

    session = setup(_job(tiny_model_dir, tmp_path, "run", method, section, **training))
    assert (session.task.shared_prefix is not None) is expected
