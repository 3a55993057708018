"""The bottleneck adapter layer: wraps a whole sub-layer (attention block, feed-forward block, or
a single projection) and adds a small two-layer network to its output.

    sequential (Houlsby, Pfeiffer):   x ──► sub ──► h ──┬──────────────────────────► + ──► h'
                                                        └─► down ─► f ─► up ─────────┘
    parallel (He et al. 2022):        x ──► sub ──────────────────────────► + ──► h'
                                      └───► down ─► f ─► up ─► × s ───────┘

    down: (hidden ─► bottleneck), up: (bottleneck ─► hidden), up starts at zero.

Sub-layers that return tuples (attention blocks: ``(output, weights)``) get the adapter on the
first element; the rest is passed through. Adapter weights stay fp32 on half-precision models.

:meth:`BottleneckLayer.delta` is the composable piece: "the adapter's additive output, given the
sub-layer's output (and input)". AdapterFusion mixes several adapters' deltas with it; methods
that combine adapters with other techniques (MAM, UniPELT) can do the same.

AdapterDrop's robust variant: the model sets ``skip_below`` to a number n drawn per training
forward pass; in training mode a layer whose ``layer_index`` < n passes the sub-layer's output
through unchanged. In eval mode nothing is skipped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.targeting import is_conv1d, is_linear_like

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}
MERGE_ERROR = "bottleneck adapters add layers and cannot be merged into the weights; use unload()"


def _linear_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear layer or transformers' Conv1D (weight stored as (in, out))."""
    rows, cols = module.weight.shape
    return (rows, cols) if is_conv1d(module) else (cols, rows)


def sub_layer_features(module: nn.Module) -> tuple[int, int] | None:
    """(input, output) width of a sub-layer: the first linear's input and the last linear's output.

    Holds for the usual blocks (q..o_proj, gate..down_proj, c_attn..c_proj) and a bare linear;
    ``None`` when the module holds no linear layer.
    """
    linears = [m for m in module.modules() if is_linear_like(m)]
    if not linears:
        return None
    return _linear_features(linears[0])[0], _linear_features(linears[-1])[1]


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for value in (*args, kwargs.get("hidden_states"), *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise PeftkitError("a parallel bottleneck adapter needs the sub-layer's input, but it got no tensor")


class BottleneckLayer(nn.Module):
    """A sub-layer followed by (or run beside) bottleneck adapters (an ``AdapterModule``)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        features = sub_layer_features(base_layer)
        if features is None:
            raise PeftkitError(
                f"cannot size a bottleneck adapter for {type(base_layer).__name__}: it holds no linear layer"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = features
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        # Per adapter: does it read the sub-layer's input (parallel) or output; s; activation name.
        self.parallel: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.non_linearity: dict[str, str] = {}
        self.active_adapter: str | None = None
        # AdapterDrop: this sub-layer's transformer layer number, and (robust variant, training
        # mode only) the sampled number of lowest layers to skip in the current forward pass.
        self.layer_index: int | None = None
        self.skip_below = 0

    def update_layer(
        self,
        adapter_name: str,
        *,
        bottleneck: int,
        parallel: bool,
        scaling: float,
        non_linearity: str,
        init: str,
    ) -> None:
        """Add (or replace) ``adapter_name``; ``init="zero"`` zeroes the up-projection (a no-op adapter)."""
        width = self.in_features if parallel else self.out_features
        weight = next(m for m in self.base_layer.modules() if is_linear_like(m)).weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        factory = {"device": weight.device, "dtype": dtype}
        down = nn.Linear(width, bottleneck, **factory)
        up = nn.Linear(bottleneck, self.out_features, **factory)
        if init == "zero":
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.adapter_down[adapter_name] = down
        self.adapter_up[adapter_name] = up
        self.parallel[adapter_name] = parallel
        self.scaling[adapter_name] = scaling
        self.non_linearity[adapter_name] = non_linearity

    def adapter(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``up(f(down(x)))`` in the adapter's dtype."""
        down = self.adapter_down[adapter_name]
        hidden = ACTIVATIONS[self.non_linearity[adapter_name]](down(x.to(down.weight.dtype)))
        return self.adapter_up[adapter_name](hidden)

    def delta(self, adapter_name: str, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """What adapter ``adapter_name`` adds to the sub-layer output ``h`` (batch, seq, hidden),
        in the adapter's dtype: ``up(f(down(h)))``, or ``s * up(f(down(x)))`` for a parallel adapter,
        where ``x`` is the sub-layer's input (the first tensor among ``args`` / ``kwargs``)."""
        if self.parallel[adapter_name]:
            return self.scaling[adapter_name] * self.adapter(adapter_name, _first_tensor(args, kwargs))
        return self.adapter(adapter_name, h)

    def skipped(self) -> bool:
        """Whether robust AdapterDrop skips this layer's adapter in the current (training) pass."""
        return self.training and self.layer_index is not None and self.layer_index < self.skip_below

    def forward(self, *args, **kwargs):
        output = self.base_layer(*args, **kwargs)
        adapter = self.active_adapter
        if adapter is None or adapter not in self.adapter_down or self.skipped():
            return output
        h = output[0] if isinstance(output, tuple) else output  # (batch, seq, hidden)
        h = (h + self.delta(adapter, h, args, kwargs)).to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def adapter_params(self, adapter_name: str) -> dict[str, str]:
        if adapter_name not in self.adapter_down:
            return {}
        return {
            f"{kind}.{param}": f"{kind}.{adapter_name}.{param}"
            for kind in ("adapter_down", "adapter_up")
            for param in ("weight", "bias")
        }

    def unwrap(self, merge: bool) -> nn.Module:
        if merge:
            raise PeftkitError(MERGE_ERROR)
        return self.base_layer

    def extra_repr(self) -> str:
        kinds = ", ".join(
            f"{name}: {'parallel' if p else 'sequential'} {self.adapter_down[name].out_features}"
            for name, p in self.parallel.items()
        )
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=({kinds})"
