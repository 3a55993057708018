"""Keeping the PEFT oracle usable on the transformers versions peftkit supports.

PEFT 0.21.2 hands a classifier's prefix to its backbone only if the backbone's forward lists
``past_key_values`` (``PeftModelForSequenceClassification._prefix_tuning_forward``); transformers
5.25 renamed that argument ``cache`` (the old name is still accepted, with a FutureWarning,
until 5.40), so PEFT refuses every BERT-style classifier with "Model does not support past key
values". :func:`let_peft_hand_over_prefix` gives the module one PEFT model hands its prefix to a forward
that lists the old name and passes it on under the new one, so PEFT's own code computes the reference.
"""

from __future__ import annotations

import inspect

from peftkit.transformers_compat import cache_keyword


def let_peft_hand_over_prefix(peft_model):
    """``peft_model`` (a PEFT prompt-learning model) with the module PEFT hands the prefix to (the
    model itself if its forward takes a cache, as before 5.25; else the classifier's backbone)
    accepting ``past_key_values``."""
    model = peft_model.base_model
    name = getattr(peft_model, "transformer_backbone_name", None)
    backbone = model.get_submodule(name) if name else None
    for module in (model, backbone):
        keyword = cache_keyword(module) if module is not None else None
        if keyword == "past_key_values":
            return peft_model
        if keyword is not None:
            _accept_old_name(module, keyword)
            return peft_model
    return peft_model


def _accept_old_name(module, keyword: str) -> None:
    original = module.forward

    def forward(*args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs[keyword] = past_key_values
        return original(*args, **kwargs)

    parameters = list(inspect.signature(original).parameters.values())
    extra = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    forward.__signature__ = inspect.Signature(
        [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
        + [extra]
        + [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    )
    module.forward = forward
