"""Python reward functions as judges, with TRL's signature::

    def exact_answer(prompts, completions, answer, **kwargs) -> list[float | None]:
        return [1.0 if answer_of(c) == a else 0.0 for c, a in zip(completions, answer)]

    reward: {functions: [my_rewards:exact_answer]}   # my_rewards.py next to the config, or importable

A function is called once per batch with one row per answer: ``prompts`` repeats each prompt once
per answer of its group (rows in group order), ``completions`` holds the answers (text, or
``[{"role": "assistant", "content": ...}]`` for a chat prompt) and every other data column arrives
as a keyword argument, its value repeated like the prompt. It returns one number per answer, or
None to give that answer no score (NaN counts as None). Unlike TRL, peftkit does not pass
``completion_ids`` or ``trainer_state``: a function that needs them must take ``**kwargs`` and do
without. A column named ``prompts`` or ``completions`` is not passed (it would clash).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.judges.base import Judge, Scores, flatten, regroup

_RESERVED = ("prompts", "completions")


class FunctionJudge(Judge):
    """A reward function ``fn(prompts, completions, **columns) -> list[float | None]``."""

    def __init__(self, fn: Callable[..., Any], name: str | None = None):
        self.fn = fn
        self.name = name or function_name(fn)
        self.unparseable = 0

    def score_groups(self, prompts: list, groups: list[list], columns: dict[str, list]) -> Scores:
        flat_prompts, completions, owner = flatten(prompts, groups)
        if not completions:
            return [[] for _ in groups]
        kwargs = {k: [v[i] for i in owner] for k, v in columns.items() if k not in _RESERVED}
        try:
            returned = self.fn(prompts=flat_prompts, completions=completions, **kwargs)
        except Exception as err:
            raise PeftkitError(
                f"reward function {self.name} raised {type(err).__name__}: {err} (called on {len(prompts)} "
                f"prompt(s) with {len(completions)} answer(s) in all; columns: {', '.join(kwargs) or 'none'})"
            ) from err
        return regroup(self.check(returned, len(completions), len(prompts)), groups)

    def check(self, returned: Any, expected: int, prompts: int) -> list[float | None]:
        """``returned`` as floats and Nones, or an error naming the function and what it returned."""
        wanted = (
            f"expected a list of {expected} numbers or None, one per answer ({prompts} prompt(s) with "
            f"{expected} answer(s) in all, in group order)"
        )
        if isinstance(returned, (str, bytes, dict)) or not hasattr(returned, "__len__"):
            raise PeftkitError(f"reward function {self.name} returned {_show(returned)}: {wanted}")
        if len(returned) != expected:
            raise PeftkitError(
                f"reward function {self.name} returned {len(returned)} value(s) ({_show(returned)}): {wanted}"
            )
        out: list[float | None] = []
        for i, value in enumerate(returned):
            if value is not None and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
                value = value.item()  # a numpy scalar or a 0-d tensor
            if value is None:
                out.append(None)
            elif isinstance(value, numbers.Real):
                number = float(value)
                if math.isinf(number):
                    raise PeftkitError(
                        f"reward function {self.name} returned {number} for answer {i}: rewards must be finite "
                        "(None or NaN skips an answer)"
                    )
                out.append(None if math.isnan(number) else number)
            else:
                raise PeftkitError(
                    f"reward function {self.name} returned {_show(value)} ({type(value).__name__}) for answer "
                    f"{i}: {wanted}"
                )
        return out


def function_name(fn: Any, fallback: str = "function") -> str:
    """A metric name for ``fn``: its ``__name__``; a partial's: its function's; a callable object's:
    its class name; a lambda's: ``fallback``."""
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name and not name.startswith("<"):
        return name
    inner = getattr(fn, "func", None)  # functools.partial
    if callable(inner) and inner is not fn:
        return function_name(inner, fallback)
    if name is None:
        return type(fn).__name__
    return fallback


def load_reward_function(spec: str, base_dir: str | Path | None = None) -> Callable[..., Any]:
    """The function ``spec`` names: ``module:function`` (the module a file ``base_dir/module.py``,
    else ``./module.py``, else an importable module) or ``dir/file.py:function``."""
    module_part, sep, attribute = str(spec).rpartition(":")
    if not sep or not module_part.strip() or not all(p.isidentifier() for p in attribute.split(".")):
        raise PeftkitError(
            f"reward function {spec!r}: write module:function (e.g. my_rewards:exact_answer) or "
            "path/to/file.py:function"
        )
    module = _load_module(module_part.strip(), spec, base_dir)
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise PeftkitError(_missing_message(module, attribute, spec))
        target = getattr(target, part)
    if not callable(target):
        raise PeftkitError(
            f"reward function {spec!r}: {attribute} in {_where(module)} is a {type(target).__name__} "
            f"({_show(target)}), not a function; name a function fn(prompts, completions, **columns)"
        )
    return target


def _load_module(name: str, spec: str, base_dir: str | Path | None) -> Any:
    is_path = name.endswith(".py") or "/" in name or os.sep in name
    relative = Path(name).expanduser() if is_path else Path(*name.split(".")).with_suffix(".py")
    if not is_path and not all(p.isidentifier() for p in name.split(".")):
        raise PeftkitError(
            f"reward function {spec!r}: {name!r} is neither a module name nor a .py file; write "
            "module:function or path/to/file.py:function"
        )
    candidates = [relative] if relative.is_absolute() else []
    if not relative.is_absolute():
        candidates += [Path(base_dir) / relative] if base_dir is not None else []
        candidates.append(Path.cwd() / relative)
    candidates = list(dict.fromkeys(candidates))
    for path in candidates:
        if path.is_file():
            return _load_file(path, spec)
    looked = " and ".join(str(p) for p in candidates)
    if is_path:
        raise PeftkitError(f"reward function {spec!r}: there is no file {looked}")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
            raise PeftkitError(
                f"reward function {spec!r}: importing {name} failed: {type(err).__name__}: {err}"
            ) from err
        raise PeftkitError(
            f"reward function {spec!r}: cannot find module {name!r}: there is no file {looked}, and Python "
            f"cannot import it (not an installed package or a module on sys.path). Put {relative} next to "
            "the config, or install the module"
        ) from None
    except Exception as err:
        raise PeftkitError(
            f"reward function {spec!r}: importing {name} failed: {type(err).__name__}: {err}"
        ) from err


def _load_file(path: Path, spec: str) -> Any:
    """Run a .py file as a module (registered in sys.modules, as dataclasses and pickle need)."""
    path = path.resolve()
    name = path.stem if path.stem.isidentifier() else "reward_module"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) != str(path):
        name = f"_peftkit_reward_{name}_{abs(hash(str(path))):x}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))  # while it runs: its own imports of files beside it
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise PeftkitError(
            f"reward function {spec!r}: running {path} failed: {type(err).__name__}: {err}"
        ) from err
    finally:
        sys.path.remove(str(path.parent))
    return module


def _missing_message(module: Any, attribute: str, spec: str) -> str:
    from peftkit.configuration import closest

    own = sorted(
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == module.__name__
    )
    near = closest(attribute, own)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    listed = f"its functions: {', '.join(own)}" if own else "it defines no functions"
    return f"reward function {spec!r}: {_where(module)} has no {attribute!r}; {hint}{listed}"


def _where(module: Any) -> str:
    file = getattr(module, "__file__", None)
    return f"module {module.__name__} ({file})" if file else f"module {module.__name__}"


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
