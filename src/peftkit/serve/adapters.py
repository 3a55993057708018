"""Which models a server answers for, and adapters loaded or unloaded while it runs.

The base model is listed under its name; every adapter under its own, with the base as
``parent`` (as vLLM lists LoRA modules). Runtime loading (``--allow-runtime-adapters``) reads only
directories under ``--adapter-root`` (the path is resolved, symlinks included, before the check,
so ``..`` or a link cannot leave it) and refuses an adapter trained on another base model, of
another method than the loaded ones, or with another vocabulary (it would need a different base).
Loading and unloading run on the engine thread between decode steps; an adapter being unloaded
stops being listed at once and is deleted when no running or queued request uses it.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.serve.engine import BASE, Engine
from peftkit.serve.protocol import ApiError

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*$")


@dataclass
class AdapterRegistry:
    base_id: str  # the name the base model is served under
    base_model: str  # what adapters must record as base_model_name_or_path
    adapters: dict[str, str]  # name -> directory
    adapter_root: Path | None = None  # runtime loading allowed under it; None: not allowed
    trust_remote_code: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    _unloading: set[str] = field(default_factory=set)

    def resolve(self, model: str) -> str:
        """The engine's adapter name for a request's ``model``; 404 naming the choices if unknown."""
        if model == self.base_id:
            return BASE
        if model in self.adapters and model not in self._unloading:
            return model
        available = ", ".join([self.base_id, *self.listed()])
        raise ApiError(
            404,
            f"The model '{model}' does not exist; available: {available}",
            param="model",
            code="model_not_found",
        )

    def listed(self) -> list[str]:
        return [name for name in self.adapters if name not in self._unloading]

    def models(self) -> dict[str, Any]:
        base = {
            "id": self.base_id,
            "object": "model",
            "created": self.created,
            "owned_by": "peftkit",
            "root": self.base_model,
        }
        entries = [base] + [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "peftkit",
                "root": self.adapters[name],
                "parent": self.base_id,
            }
            for name in self.listed()
        ]
        return {"object": "list", "data": entries}

    # ---- runtime loading -----------------------------------------------------------------------
    def check_loadable(self, name: str, path: str) -> Path:
        """The resolved adapter directory, or a 400 saying what is wrong (before anything loads)."""
        from peftkit.adapter_sets import _same_model_key
        from peftkit.errors import PeftkitError
        from peftkit.loading import read_adapter_config

        if self.adapter_root is None:
            raise ApiError(
                400,
                "runtime adapter loading is off; start the server with --allow-runtime-adapters --adapter-root DIR",
            )
        if not _NAME.match(name) or name == BASE or name == self.base_id:
            raise ApiError(
                400,
                f"lora_name {name!r} must be letters, digits, '_', '-', '.' or ':' and differ from the base "
                f"model's id and {BASE}",
                param="lora_name",
            )
        if name in self.adapters:
            raise ApiError(
                400, f"an adapter named {name!r} is already loaded; unload it first", param="lora_name"
            )
        root = self.adapter_root.resolve()
        candidate = Path(path).expanduser()
        directory = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if directory != root and root not in directory.parents:
            raise ApiError(400, f"lora_path {path} is outside --adapter-root {root}", param="lora_path")
        try:
            config = read_adapter_config(directory)
        except PeftkitError as err:
            raise ApiError(400, str(err), param="lora_path") from err
        recorded = str(config.get("base_model_name_or_path") or "")
        if recorded and _same_model_key(recorded) != _same_model_key(self.base_model):
            raise ApiError(
                400,
                f"adapter {name!r} was trained on {recorded}, but this server serves {self.base_model}",
                param="lora_path",
            )
        return directory

    async def load(self, engine: Engine, name: str, path: str) -> None:
        directory = self.check_loadable(name, path)
        future = engine.call(lambda: _load_on_engine(engine, name, directory, self.trust_remote_code))
        await asyncio.wrap_future(future)
        self.adapters[name] = str(directory)

    async def unload(self, engine: Engine, name: str) -> None:
        if self.adapter_root is None:
            raise ApiError(
                400,
                "runtime adapter loading is off; start the server with --allow-runtime-adapters --adapter-root DIR",
            )
        if name not in self.adapters or name in self._unloading:
            raise ApiError(
                404,
                f"no adapter named {name!r} is loaded; loaded: {', '.join(self.listed()) or 'none'}",
                param="lora_name",
                code="model_not_found",
            )
        self._unloading.add(name)  # new requests for it get a 404 from now on
        try:
            while engine.in_use(name):
                await asyncio.sleep(0.05)
            await asyncio.wrap_future(engine.call(lambda: _delete_on_engine(engine, name)))
            del self.adapters[name]
        finally:
            self._unloading.discard(name)


def _load_on_engine(engine: Engine, name: str, directory: Path, trust_remote_code: bool) -> None:
    """Load the adapter into the served model (engine thread). Refuses, with the model unchanged,
    what cannot share it: another method, another vocabulary, its own embedding matrices."""
    from peftkit.adapter_sets import _check_embeddings_unchanged, _embedding_weights, _saved_vocabulary
    from peftkit.errors import PeftkitError
    from peftkit.loading import read_adapter_config

    model = engine.model
    vocabulary = _saved_vocabulary(str(directory), trust_remote_code)
    if vocabulary is not None and vocabulary != engine.tokenizer.get_vocab():
        raise ApiError(
            400,
            f"adapter {name!r} was trained with a different vocabulary (training added tokens); serve it with its own base",
            param="lora_path",
        )
    method = read_adapter_config(directory).get("peft_type")
    if hasattr(model, "peft_config") and model.peft_config:
        loaded = {
            str(c.peft_type.value if hasattr(c.peft_type, "value") else c.peft_type)
            for c in model.peft_config.values()
        }
        if str(method) not in loaded:
            raise ApiError(
                400,
                f"adapter {name!r} uses {method}, but the loaded adapters use {', '.join(sorted(loaded))}; one server holds one method",
                param="lora_path",
            )
    before = _embedding_weights(model)
    try:
        if hasattr(model, "load_adapter"):
            model.load_adapter(str(directory), adapter_name=name)
        else:
            from peftkit.auto import apply_saved_adapter

            model, _ = apply_saved_adapter(
                model,
                engine.tokenizer,
                str(directory),
                adapter_name=name,
                trust_remote_code=trust_remote_code,
            )
        _check_embeddings_unchanged(model, before, name, str(directory))
    except (PeftkitError, ValueError, TypeError) as err:
        if hasattr(model, "peft_config") and name in model.peft_config:
            model.delete_adapter(name)
        raise ApiError(400, f"cannot load adapter {name!r}: {err}", param="lora_path") from err
    model.to(engine.device)
    model.eval()
    engine.set_model(model)


def _delete_on_engine(engine: Engine, name: str) -> None:
    model = engine.model
    if model.active_adapter == name:  # switch first: deleting the active adapter warns
        others = [other for other in model.peft_config if other != name]
        if others:
            model.set_adapter(others[0])
    model.delete_adapter(name)
    engine.set_model(model)
