"""What differs between the transformers releases peftkit supports, in one place.

transformers 5.25 renamed the models' KV-cache forward argument ``past_key_values`` to ``cache``
(the old name is a deprecated alias, to be removed in 5.40), and the key that
``prepare_inputs_for_generation`` returns with it. Code that hands a cache to a model asks
``cache_keyword(model)`` instead of naming either, so it works on both sides of the rename
without deprecation warnings.
"""

from __future__ import annotations

import inspect

from torch import nn

# Newest name first: a forward that still lists both takes the new one without a warning.
CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_keyword(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` takes a KV cache, or ``None`` if it takes none."""
    forward = getattr(module, "forward", None)
    if forward is None:
        return None
    parameters = inspect.signature(forward).parameters
    return next((name for name in CACHE_KEYWORDS if name in parameters), None)


def generation_cache(inputs: dict, model: nn.Module) -> tuple[str, object]:
    """The cache in ``prepare_inputs_for_generation``'s output as ``(key, cache or None)``; with
    no cache there, the key is the one ``model``'s forward takes (where a cache must go)."""
    for name in CACHE_KEYWORDS:
        if name in inputs:
            return name, inputs[name]
    return cache_keyword(model) or CACHE_KEYWORDS[-1], None
