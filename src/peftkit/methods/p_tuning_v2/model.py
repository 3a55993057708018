"""P-tuning v2 (Liu et al., 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning
Universally Across Scales and Tasks").

    layer 1 .. L:  [K_prompt,i ; K], [V_prompt,i ; V]       deep prompts = per-layer key/values

Deep prompt tuning is prefix tuning without the reparameterization MLP, so this reuses the
prefix machinery unchanged; only the name (and ``peft_type``) differ.
"""

from __future__ import annotations

from peftkit.methods.p_tuning_v2.config import PTuningV2Config
from peftkit.methods.prefix_tuning.model import PrefixTuningModel


class PTuningV2Model(PrefixTuningModel):
    method_name = "P-tuning v2"
    config_cls = PTuningV2Config
