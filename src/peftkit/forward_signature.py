"""``PeftModel.forward`` as seen by code that inspects it: the wrapped model's parameters.

transformers' ``Trainer`` and ``Seq2SeqTrainer`` (and TRL's trainers) keep only the data columns
whose names ``inspect.signature(model.forward)`` lists; for PEFT's own classes they unwrap to the
base model first, which they cannot do for peftkit's. A ``PeftModel`` forward passes everything
on (``*args, **kwargs``), so without this they would drop every column ("You should supply an
encoding ... that includes input_ids, but you provided []").

:class:`wrapped_signature` is a method decorator: on an instance, ``model.forward`` is a bound
forward whose ``__signature__`` is the wrapped model's (plus the keyword arguments the method
itself adds, such as ``labels`` or ``task_ids``); on the class it is the plain function, whose own
signature names the task's labels (``transformers.utils.find_labels`` reads the class).
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

_P = inspect.Parameter


class BoundForward:
    """``instance.forward``: calls the class's function, reports the wrapped model's signature."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, func: Callable[..., Any], owner: Any):
        self.__func__ = func
        self.__self__ = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    @property
    def __name__(self) -> str:
        return self.__func__.__name__

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self.__func__.__doc__

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        # What code that unwraps a patched forward follows (accelerate's unwrap_model with
        # keep_fp32_wrapper=False rebinds the innermost function); ``__signature__`` still wins
        # for ``inspect.signature``.
        return self.__func__

    @property
    def __signature__(self) -> inspect.Signature:
        own = list(inspect.signature(self.__func__).parameters.values())[1:]  # without self
        wrapped = inspect.signature(self.__self__.get_base_model().forward)
        params = [p for p in wrapped.parameters.values() if p.kind is not _P.VAR_KEYWORD]
        names = {p.name for p in params}
        # What the wrapper itself takes by keyword (labels, task_ids) and the wrapped model does not.
        params += [
            p.replace(kind=_P.KEYWORD_ONLY)
            for p in own
            if p.kind in (_P.KEYWORD_ONLY, _P.POSITIONAL_OR_KEYWORD) and p.name not in names
        ]
        var_keyword = [p for p in (*wrapped.parameters.values(), *own) if p.kind is _P.VAR_KEYWORD][:1]
        if any(p.kind is _P.VAR_POSITIONAL for p in params):  # keyword-only ones must follow *args
            ordered = params
        else:
            ordered = [p for p in params if p.kind is not _P.KEYWORD_ONLY]
            ordered += [p for p in params if p.kind is _P.KEYWORD_ONLY]
        return inspect.Signature(ordered + var_keyword, return_annotation=wrapped.return_annotation)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BoundForward)
            and other.__func__ is self.__func__
            and other.__self__ is self.__self__
        )

    def __hash__(self) -> int:
        return hash((self.__func__, id(self.__self__)))

    def __repr__(self) -> str:
        return f"<bound forward of {type(self.__self__).__name__} with its wrapped model's signature>"


class wrapped_signature:  # noqa: N801 - used as a decorator, like functools.cached_property
    """Decorate a ``PeftModel`` forward so that instances report the wrapped model's signature."""

    def __init__(self, func: Callable[..., Any]):
        self.func = func
        self.name = func.__name__
        functools.update_wrapper(self, func)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self.func
        patched = instance.__dict__.get(self.name)
        if patched is None:
            return BoundForward(self.func, instance)
        # A forward patched onto the instance as a method (accelerate's autocast wrapper under
        # fp16/bf16, TRL's fused LM head) keeps reporting the wrapped model's signature: its own
        # leads back (``__wrapped__``) to the class's ``*args, **kwargs``, and a second Trainer on the
        # same model would then drop every data column.
        if isinstance(patched, types.MethodType) and patched.__self__ is instance:
            return BoundForward(patched.__func__, instance)
        return patched

    # A data descriptor, so that ``model.forward = ...`` is seen by ``__get__`` (kept in the
    # instance's ``__dict__``; ``del model.forward`` restores the class's).
    def __set__(self, instance: Any, value: Any) -> None:
        instance.__dict__[self.name] = value

    def __delete__(self, instance: Any) -> None:
        if instance.__dict__.pop(self.name, None) is None:
            raise AttributeError(self.name)
