"""A PiSSA / OLoRA adapter rewritten as a plain LoRA adapter for the unchanged base model.

PiSSA and OLoRA move ``s B0 A0`` out of the base weight (``W = W_res + s B0 A0``, ``init.py``), so
the trained adapter only works on the residual model. Given ``A0, B0`` as saved right after
initialisation, the trained change is a LoRA of twice the rank on the original ``W`` (PEFT's
``path_initial_model_for_weight_conversion``; Meng et al., 2024, section 4)::

    W_res + s B A  =  W + s (B A - B0 A0)  =  W + s [B | -B0] [A ; A0]

so ``A' = cat(A, A0)`` along the rank, ``B' = cat(B, -B0)``, and ``r`` and ``lora_alpha`` double
(``alpha * sqrt(2)`` with rsLoRA), which keeps the scaling. Linear, embedding and conv layers
concatenate the same way; tensors that are not LoRA factors (biases, ``modules_to_save``, trained
token rows) are kept as trained.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from peftkit.errors import PeftkitError

# Saved names of LoRA factors: ...lora_A.weight / ...lora_embedding_B (PEFT's names).
_FACTOR = re.compile(r"\.lora_(embedding_)?(A|B)(\.weight)?$")


def as_plain_lora(
    tensors: dict[str, torch.Tensor], config: dict[str, Any], initial: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, config)`` of the equivalent plain LoRA adapter (``config`` as in adapter_config.json)."""
    if config.get("use_dora"):
        raise PeftkitError(
            "a DoRA adapter cannot be converted with path_initial_model_for_weight_conversion: its magnitude "
            "is relative to the changed base weight, not a difference of two LoRA products"
        )
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise PeftkitError(
            "path_initial_model_for_weight_conversion cannot keep rsLoRA's scaling with rank_pattern or "
            "alpha_pattern (PEFT refuses this too): drop one of them"
        )
    factors = [key for key in tensors if _FACTOR.search(key)]
    missing = [key for key in factors if key not in initial]
    if missing:
        raise PeftkitError(
            f"the initial adapter lacks {len(missing)} LoRA tensor(s) of this one (e.g. {missing[0]}): "
            "pass the directory saved right after get_peft_model, before training"
        )
    out = dict(tensors)
    for key in factors:
        trained, start = tensors[key], initial[key].to(tensors[key].dtype)
        if _FACTOR.search(key)[2] == "A":
            out[key] = torch.cat([trained, start], dim=0)
        else:
            out[key] = torch.cat([trained, -start], dim=1)
    plain = dict(config)
    plain["init_lora_weights"] = True
    plain["r"] = 2 * config["r"]
    plain["lora_alpha"] = config["lora_alpha"] * (math.sqrt(2) if config.get("use_rslora") else 2)
    for name in ("rank_pattern", "alpha_pattern"):
        plain[name] = {key: 2 * value for key, value in (config.get(name) or {}).items()}
    return out, plain
