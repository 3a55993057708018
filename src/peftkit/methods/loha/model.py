"""LoHa's model wrapper: which layer ``LycorisModel`` injects."""

from __future__ import annotations

from typing import ClassVar

from peftkit.methods.loha.layer import LoHaLinear
from peftkit.methods.lycoris import LycorisModel


class LoHaModel(LycorisModel):
    """Injects :class:`LoHaLinear` layers into ``nn.Linear`` targets."""

    method_name: ClassVar[str] = "LoHa"
    layer_cls = LoHaLinear
