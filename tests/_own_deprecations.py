"""Deprecation warnings caused by peftkit's own calls fail the test that caused them.

A dependency that renames an argument warns first (transformers 5.25: ``past_key_values`` ->
``cache``, removed in 5.40); a warning ignored today is tomorrow's broken fresh install. pytest's
own filters see only the frame a warning is attributed to, which for a model call is torch's
``Module.__call__``, so this looks at the whole stack instead: a ``FutureWarning`` or
``DeprecationWarning`` raised while peftkit code is on the stack, and no test oracle (PEFT, TRL)
is, is recorded and reported by the autouse fixture in ``conftest.py``. A warning a dependency's
module body raises while peftkit first imports it is not peftkit's call (and whether it shows
would depend on which test imported the module first).
"""

from __future__ import annotations

import sys
import warnings

_ORACLES = ("peft", "trl")
_CATEGORIES = (FutureWarning, DeprecationWarning)
caught: list[str] = []


def _module(frame) -> str:
    return frame.f_globals.get("__name__", "") or ""


def _ours(frame) -> str | None:
    """Where in peftkit the warning came from, or None if peftkit is not the caller."""
    where = None
    while frame is not None:
        name = _module(frame)
        if name.split(".")[0] in _ORACLES:
            return None
        if where is None and name.startswith("importlib"):
            return None  # raised by a dependency's module body while it is first imported
        if where is None and (name == "peftkit" or name.startswith("peftkit.")):
            where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return where


def install() -> None:
    """Wrap ``warnings.warn`` once (it is what transformers' deprecation helpers call)."""
    original = warnings.warn
    if getattr(original, "_peftkit_guard", False):
        return

    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        kind = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if isinstance(kind, type) and issubclass(kind, _CATEGORIES):
            where = _ours(sys._getframe(1))
            if where is not None:
                caught.append(f"{kind.__name__} from peftkit's call at {where}: {message}")
        return original(message, category, stacklevel + 1, source, **kwargs)

    warn._peftkit_guard = True
    warnings.warn = warn
