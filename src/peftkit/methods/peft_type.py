"""``PeftType``: the ``peft_type`` value of every registered method, as a ``str`` enum like PEFT's.

Configs store ``peft_type`` as a plain string (what ``adapter_config.json`` holds); a ``str``
enum compares equal to it, so ``config.peft_type == PeftType.LORA`` holds. The values of the
methods PEFT also has are PEFT's; the rest are peftkit's own. This module imports nothing from
peftkit: anything may import it without a cycle. ``tests/test_public_names.py`` checks that the
members are exactly the registered methods' ``peft_type`` values.
"""

from __future__ import annotations

from enum import Enum


class PeftType(str, Enum):
    """What ``adapter_config.json`` stores in ``peft_type``: a registered method's name, upper-cased."""

    # Also in PEFT (same values, PEFT's order).
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    ADALORA = "ADALORA"
    BOFT = "BOFT"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    # peftkit only.
    P_TUNING_V2 = "P_TUNING_V2"
    BOTTLENECK = "BOTTLENECK"
    ADAPTER_FUSION = "ADAPTER_FUSION"
    MAM = "MAM"
    UNIPELT = "UNIPELT"
    BITFIT = "BITFIT"
    PARTIAL = "PARTIAL"
    FULL = "FULL"


__all__ = ["PeftType"]
