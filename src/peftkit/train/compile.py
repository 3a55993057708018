"""``training.compile``: the decoder layers run compiled by ``torch.compile`` in training steps.

Every decoder layer (the model's ``_no_split_modules`` classes) runs one forward function, so
Dynamo traces it once with dynamic shapes and every layer reuses the graph (regional
compilation): on SmolLM2-135M, 3 graphs for 30 layers, with no graph break, the shared-prefix
attention included. Inductor fuses the norms, activations and rotary embeddings around the
matmuls, and saves fewer activations for the backward. On the default job (2-core CPU, fp32, in
turns with an eager run on the same batches; docs/performance.md) steps were 1.05x faster and peak
memory 0.82x, after 103 s of compiling with an empty cache. So it pays for speed only in runs of
well over a thousand steps, and it is off by default.

Only the training forward and backward run compiled. Validation and generation run the layers
as they are: a generation step's key/value cache would make new graphs, and their compile time
would not pay back.

One Python process that trains several models in turn (a notebook, a sweep) shares Dynamo's cache
for the layer code, whose recompile limit (8) can leave later runs eager with only a logged warning;
``torch._dynamo.reset()`` between runs gives each its own graphs. ``peftkit train`` trains one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.train.fsdp import decoder_layers


class CompiledLayers:
    """A context in which every decoder layer of ``model`` runs its compiled forward."""

    def __init__(self, model: nn.Module):
        self.layers = decoder_layers(model)
        if not self.layers:
            raise PeftkitError(
                f"training.compile: {type(model).__name__} declares no decoder layer classes "
                "(transformers' _no_split_modules), so there is nothing to compile: set training.compile "
                "to false"
            )
        # An instance attribute ``forward`` shadows the class's; deleting it gives the eager one back.
        self.compiled = [torch.compile(layer.forward, dynamic=True) for layer in self.layers]

    def __enter__(self) -> CompiledLayers:
        for layer, forward in zip(self.layers, self.compiled):
            layer.forward = forward
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers:
            del layer.forward
