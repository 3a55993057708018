"""Sample packing (train/packing.py): the packed loss and gradients are the unpacked ones."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from _tiny_models import make_tiny_gpt2, make_tiny_gqa
from conftest import make_tiny_llama, train_tiny
from peftkit import LoraConfig, get_peft_model
from peftkit.errors import PeftkitError
from peftkit.train.batching import IGNORE_INDEX, collate
from peftkit.train.config import ConfigError, build_job_config
from peftkit.train.loss import lm_loss_sum
from peftkit.train.packing import check_isolation, first_fit_decreasing, pack

pytestmark = pytest.mark.usefixtures("single_thread")


@dataclass
class Ex:
    input_ids: list[int]
    labels: list[int]


def _examples(vocab: int, lengths=(7, 3, 9, 5, 2, 6), seed: int = 0) -> list[Ex]:
    """Mixed labelling: odd examples are completion-only, even ones learn every token (so the
    first token of an example carries a label, which packing must drop at the boundary)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        labels = list(ids) if i % 2 == 0 else [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]
        out.append(Ex(ids, labels))
    return out


ARCHITECTURES = {
    "llama": lambda: make_tiny_llama(vocab_size=100),
    "gpt2": lambda: make_tiny_gpt2(vocab_size=100),
    "qwen2": lambda: make_tiny_gqa("Qwen2"),
    "mistral": lambda: make_tiny_gqa("Mistral"),
}


def _lora(model):
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)  # kept in eval mode: GPT-2's dropout would differ per layout


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, n = lm_loss_sum(model, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), n, grads


def check_packed_equals_unpacked(model, capacity: int, device: str = "cpu") -> None:
    examples = _examples(100)
    unpacked = {k: v.to(device) for k, v in collate(examples, pad_token_id=0).items()}
    packed = {k: v.to(device) for k, v in pack(examples, pad_token_id=0, capacity=capacity).items()}
    assert packed["input_ids"].shape[0] < len(examples)  # several examples really share rows
    loss_u, n_u, grads_u = _loss_and_grads(model, unpacked)
    loss_p, n_p, grads_p = _loss_and_grads(model, packed)
    assert n_p == n_u
    assert int(packed["attention_mask"].sum()) == int(unpacked["attention_mask"].sum())
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-5)
    for name, grad in grads_u.items():
        torch.testing.assert_close(grads_p[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("capacity", [9, 16, 1000])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_packed_loss_and_gradients_equal_unpacked(arch, capacity, attention):
    base = ARCHITECTURES[arch]()
    base.set_attn_implementation(attention)
    check_packed_equals_unpacked(_lora(base), capacity)


def test_packing_without_boundary_labels_would_differ():
    """The test above can fail: keeping the label of each example's first token lets the packed
    loss predict it from the previous example's last token."""
    model = _lora(make_tiny_llama(vocab_size=100))
    examples = _examples(100)
    packed = pack(examples, pad_token_id=0, capacity=1000)
    leaky = dict(packed)
    leaky["labels"] = packed["labels"].clone()
    row, start = 0, 0
    for ex in sorted(examples, key=lambda e: -len(e.input_ids))[:-1]:
        start += len(ex.input_ids)
        leaky["labels"][row, start] = packed["input_ids"][row, start]
    loss_u, n_u = lm_loss_sum(model, collate(examples, pad_token_id=0))
    loss_leaky, n_leaky = lm_loss_sum(model, leaky)
    assert n_leaky > n_u and not torch.allclose(loss_leaky, loss_u)


def test_layout():
    examples = [Ex([5, 6, 7], [5, 6, 7]), Ex([8, 9], [-100, 9]), Ex([4], [4])]
    batch = pack(examples, pad_token_id=0, capacity=4)
    # first-fit decreasing: [3 tokens + 1 token], [2 tokens + padding]
    assert batch["input_ids"].tolist() == [[5, 6, 7, 4], [8, 9, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [-100, 9, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


@pytest.mark.parametrize("capacity", [1, 5, 8, 100])
def test_first_fit_decreasing_places_every_example_once(capacity):
    lengths = [5, 1, 4, 4, 3, 2, 8, 1]
    rows = first_fit_decreasing(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:
        assert len(row) == 1 or sum(lengths[i] for i in row) <= capacity


def test_isolation_check_passes_and_catches_a_leaking_attention(monkeypatch):
    model = _lora(make_tiny_llama(vocab_size=100))
    check_isolation(model, torch.device("cpu"))
    import transformers.masking_utils as masking

    # An attention that ignores restarting position ids: every packed row is one sequence.
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(PeftkitError, match="does not keep packed examples apart"):
        check_isolation(model, torch.device("cpu"))


def _job(**changes):
    raw = {
        "base_model": "x",
        "method": "lora",
        "data": {"train": "x.jsonl"},
        "training": {"packing": True},
        "output_dir": "out",
    }
    for key, value in changes.items():
        raw[key] = value
    return raw


def test_config_refuses_packing_for_other_tasks_and_prompt_methods():
    with pytest.raises(ConfigError, match="task SEQ_CLS has no packed form"):
        build_job_config(_job(task="SEQ_CLS"))
    with pytest.raises(ConfigError, match="method 'prompt_tuning' adds virtual tokens.*use one of .*lora"):
        build_job_config(_job(method="prompt_tuning", prompt_tuning={"num_virtual_tokens": 4}))
    assert build_job_config(_job()).training.packing is True


@pytest.mark.parametrize("method,section", [("lora", {"r": 4, "target_modules": "all-linear"}), ("ia3", {})])
def test_training_with_packing_ends_with_the_same_adapter(tiny_model_dir, tmp_path, method, section):
    """The whole loop, packed vs not: same examples per step, so the same updates (fp32)."""
    from safetensors.torch import load_file

    runs = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        losses = train_tiny(
            tiny_model_dir, out, method, section, max_steps=4, packing=packing, group_by_length=False
        )
        runs[packing] = (losses, load_file(out / "adapter" / "adapter_model.safetensors"))
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-5, atol=1e-6)
    for key, tensor in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], tensor, rtol=1e-4, atol=1e-5, msg=key)
