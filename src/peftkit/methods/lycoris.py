"""What the LyCORIS methods (LoHa, LoKr) share: config fields, the linear layer, the model hooks.

        x ──► base_layer (frozen) ──────────────┐
        │                                       + ──► y
        └─► F.linear(x, ΔW) ────────────────────┘

    ΔW (out, in) is built from the method's small factors on every forward pass (as PEFT does):
    LoHa  ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r
    LoKr  ΔW = kron(w1, w2) · alpha / r

A method subclasses :class:`LycorisLinear` (parameter shapes, init, ``delta_weight``) and
:class:`LycorisModel` (which layer class to inject). Parameters live in one
``nn.ParameterDict`` per factor keyed by adapter name, as in PEFT, so state-dict keys match:
``q_proj.hada_w1_a.default`` in the model, ``q_proj.hada_w1_a`` in files.

Training-time regularisers follow PEFT: ``module_dropout`` skips the whole update for a forward
pass with that probability; ``rank_dropout`` zeroes rows (output features) of ΔW. Only
``nn.Linear`` is adapted (PEFT's LoHa/LoKr do not take transformers' ``Conv1D`` either).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.methods.base import TargetingConfig
from peftkit.methods.layers import WrappedLayer, adapter_dtype
from peftkit.methods.lora.model import LORA_DEFAULT_TARGET_MODULES, pattern_value
from peftkit.methods.merging import add_to_weight
from peftkit.methods.tuner import InjectedAdapterModel


@dataclass(kw_only=True)
class LycorisConfig(TargetingConfig):
    """Fields of PEFT's ``LycorisConfig`` plus those LoHa and LoKr both have (same names, defaults)."""

    r: int = field(default=8, metadata={"help": "Rank of the factors; more rank, more capacity."})
    alpha: int | float = field(
        default=8, metadata={"help": "Scale of the update: it is multiplied by alpha / r."}
    )
    rank_dropout: float = field(
        default=0.0,
        metadata={
            "help": "While training, drop each row (output feature) of the update with this probability."
        },
    )
    module_dropout: float = field(
        default=0.0,
        metadata={"help": "While training, skip a layer's whole update with this probability per forward."},
    )
    use_effective_conv2d: bool = field(
        default=False,
        metadata={
            "help": "PEFT's CP decomposition for convolutions with kernels > 1. peftkit adapts linear layers "
            "only, where it has no effect; kept so PEFT files round-trip."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "true: one factor starts at zero so training starts from the base model (PEFT default); "
            "false: all factors random (for tests only)."
        },
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Per-module ranks: {regex matched against the end of the module name: r}."},
    )
    alpha_pattern: dict[str, int | float] = field(
        default_factory=dict,
        metadata={"help": "Per-module alpha: {regex matched against the end of the module name: alpha}."},
    )

    def validate(self) -> list[str]:
        problems = super().validate()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            problems.append(f"r must be a positive integer (the rank, typically 4-32), got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            problems.append(f"alpha must be a number, got {self.alpha!r}")
        for name in ("rank_dropout", "module_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                problems.append(f"{name} must be a probability in [0, 1), got {value!r}")
        for pattern, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                problems.append(f"rank_pattern[{pattern!r}] must be a positive integer rank, got {rank!r}")
        return problems


class LycorisLinear(WrappedLayer):
    """A frozen ``nn.Linear`` plus a full-weight update built from factors (an ``AdapterModule``).

    Subclasses name their factors in ``adapter_layer_names`` and implement ``parameter_shapes``,
    ``reset_parameters`` and ``delta_weight``.
    """

    adapter_layer_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Linear):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}

    # -- hooks ---------------------------------------------------------------------------------

    def parameter_shapes(self, r: int, config: LycorisConfig) -> dict[str, tuple[int, int]]:
        """``{factor name: shape}`` for one adapter of rank ``r``."""
        raise NotImplementedError

    def reset_parameters(self, adapter_name: str, init_weights: bool | str) -> None:
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The scaled update ΔW, shaped like the base weight (out, in)."""
        raise NotImplementedError

    @classmethod
    def rescales_rank_dropout(cls, config: LycorisConfig) -> bool:
        """Whether rows kept by rank dropout are scaled up by 1 / (fraction kept)."""
        return True

    # -- shared --------------------------------------------------------------------------------

    def update_layer(self, adapter_name: str, *, r: int, alpha: float, config: LycorisConfig) -> None:
        """Add (or replace) the adapter ``adapter_name`` with rank ``r``."""
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r} for adapter {adapter_name!r}")
        for name in self.adapter_layer_names:  # a new rank may change which factors exist
            if adapter_name in getattr(self, name):
                del getattr(self, name)[adapter_name]
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight.dtype)}
        for name, shape in self.parameter_shapes(r, config).items():
            getattr(self, name)[adapter_name] = nn.Parameter(torch.empty(shape, **factory))
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.rank_dropout_scale[adapter_name] = self.rescales_rank_dropout(config)
        self.module_dropout[adapter_name] = config.module_dropout
        self.reset_parameters(adapter_name, config.init_weights)

    def factor(self, name: str, adapter_name: str) -> torch.Tensor | None:
        """The factor ``name`` of ``adapter_name``, or None where this adapter does not have it."""
        factors = getattr(self, name)
        return factors[adapter_name] if adapter_name in factors else None

    def _training_delta(self, adapter_name: str) -> torch.Tensor:
        delta = self.delta_weight(adapter_name)  # (out, in)
        p = self.rank_dropout[adapter_name]
        if self.training and p:
            keep = (torch.rand(delta.shape[0], device=delta.device) > p).to(delta.dtype)  # (out,)
            if self.rank_dropout_scale[adapter_name]:
                keep = keep / keep.mean().clamp_min(1e-12)
            delta = delta * keep[:, None]
        return delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        adapter = self.active_adapter
        if adapter is None or adapter not in self.r:
            return result
        p = self.module_dropout[adapter]
        if self.training and p and torch.rand(1).item() <= p:
            return result
        delta = self._training_delta(adapter)
        result_dtype = result.dtype
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(delta.dtype)
        return (result + F.linear(x, delta)).to(result_dtype)

    def adapter_params(self, adapter_name: str) -> dict[str, str]:
        return {
            name: f"{name}.{adapter_name}"
            for name in self.adapter_layer_names
            if adapter_name in getattr(self, name)
        }

    def unwrap(self, merge: bool) -> nn.Module:
        adapter = self.active_adapter
        if merge and adapter is not None and adapter in self.r:
            with torch.no_grad():
                delta = self.delta_weight(adapter)
            add_to_weight(self.base_layer.weight, delta, adapter)
        return self.base_layer

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{name}: r={r}" for name, r in self.r.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=({ranks})"


class LycorisModel(InjectedAdapterModel):
    """Injects ``layer_cls`` layers into ``nn.Linear`` targets; PEFT's defaults are LoRA's targets."""

    layer_cls: ClassVar[type[LycorisLinear]] = LycorisLinear
    default_target_modules: ClassVar[dict[str, list[str]]] = LORA_DEFAULT_TARGET_MODULES
    peft_config: dict[str, LycorisConfig]

    @classmethod
    def is_supported(cls, module: nn.Module) -> bool:
        return isinstance(module, (cls.layer_cls, nn.Linear))

    def create_or_update(
        self, target: nn.Module, name: str, config: LycorisConfig, adapter_name: str
    ) -> nn.Module:
        layer = target if isinstance(target, self.layer_cls) else self.layer_cls(target)
        layer.update_layer(
            adapter_name,
            r=int(pattern_value(config.rank_pattern, name, config.r)),
            alpha=pattern_value(config.alpha_pattern, name, config.alpha),
            config=config,
        )
        return layer
