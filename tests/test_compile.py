"""training.compile: decoder layers compiled by torch.compile in training steps (train/compile.py)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit.train.loop as loop
from peftkit.errors import PeftkitError
from peftkit.train.compile import CompiledLayers
from test_shared_prefix import _job  # rows that share a long prompt prefix, 4 steps of 4

pytestmark = pytest.mark.usefixtures("single_thread")


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out) -> list[float]:
    return [r["loss"] for r in _records(out) if "loss" in r]


@pytest.mark.slow  # compiling takes about a minute on a 2-core CPU
def test_compiled_training_equals_eager_and_evaluation_runs_eager(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj"]}  # fewer operations to trace than all-linear

    def job(name: str, **training):  # with a validation split, evaluated at step 2 and at the end
        job = _job(tiny_model_dir, tmp_path, name, section=lora, eval_every=2, **training)
        return dataclasses.replace(job, data=dataclasses.replace(job.data, val_size=2))

    eager = loop.setup(job("eager"))
    loop.train(eager, progress=False)

    entered = []
    original = CompiledLayers.__enter__
    monkeypatch.setattr(CompiledLayers, "__enter__", lambda self: entered.append(1) or original(self))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = loop.setup(job("compiled", compile=True))
    loop.train(compiled, progress=False)

    assert len(entered) == 4  # one training forward per step; validation (step 2 and the end) is not
    assert len(compiled.data.validation) == 2
    assert len([r for r in _records(tmp_path / "compiled") if "val_loss" in r]) == 2
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    layers = compiled.compiled.layers
    assert len(layers) == compiled.model.config.num_hidden_layers
    assert not any("forward" in vars(layer) for layer in layers)  # the eager forward is back
    assert "training.shared_prefix: off" not in capsys.readouterr().err  # the compiled path shared it

    torch.testing.assert_close(
        _losses(tmp_path / "compiled"), _losses(tmp_path / "eager"), rtol=1e-4, atol=1e-5
    )
    a = load_file(str(tmp_path / "eager" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_model_without_layer_classes_is_refused():
    with pytest.raises(PeftkitError, match="declares no decoder layer classes"):
        CompiledLayers(nn.Sequential(nn.Linear(2, 2)))


def test_refused_under_torchrun(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(
        loop.World, "from_environment", staticmethod(lambda: SimpleNamespace(distributed=True))
    )
    with pytest.raises(PeftkitError, match="one process only"):
        loop.setup(_job(tiny_model_dir, tmp_path, "run", compile=True))
