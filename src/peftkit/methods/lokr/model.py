"""LoKr's model wrapper: which layer ``LycorisModel`` injects."""

from __future__ import annotations

from typing import ClassVar

from peftkit.methods.lokr.layer import LoKrLinear
from peftkit.methods.lycoris import LycorisModel


class LoKrModel(LycorisModel):
    """Injects :class:`LoKrLinear` layers into ``nn.Linear`` targets."""

    method_name: ClassVar[str] = "LoKr"
    layer_cls = LoKrLinear
