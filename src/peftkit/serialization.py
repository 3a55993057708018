"""Adapter weights in PEFT's format: in memory (state dicts) and on disk (safetensors only).

Keys look like PEFT's: the model keeps the adapter name (``...q_proj.lora_A.default.weight``),
files and the dicts returned here drop it (``...q_proj.lora_A.weight``). Which keys belong to an
adapter, and how each maps, comes from the method (``TunerModel.adapter_state_keys``); nothing
here depends on the method. Pickle files (``adapter_model.bin``) are refused, never unpickled:
unpickling runs arbitrary code from the file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from peftkit.errors import ModelLoadError
from peftkit.io import TMP_MARKER, atomic_dir, atomic_file, write_json
from peftkit.saved_embeddings import embedding_tensors, saves_embeddings, split_embedding_tensors

if TYPE_CHECKING:
    from peftkit.peft_model import PeftModel

# No import from peftkit.methods here: methods import this module, so importing it first must not
# pull in the method packages (a cycle).
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
PREFIX = "base_model."  # PeftModel's name for its tuner: keys read base_model.model.<original name>
_ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, "README.md"}


class AdapterLoadResult(NamedTuple):
    """Keys the model expected but the state dict lacked, and keys the model has no place for."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _key_map(model: PeftModel, adapter_name: str) -> dict[str, str]:
    """``{saved key: model state_dict key}`` for one adapter of ``model``."""
    if adapter_name not in model.peft_config:
        raise ValueError(f"no adapter named {adapter_name!r}; adapters: {', '.join(model.peft_config)}")
    keys = model.base_model.adapter_state_keys(adapter_name)
    return {PREFIX + saved: PREFIX + own for saved, own in keys.items()}


def get_peft_model_state_dict(
    model: PeftModel,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their saved names (adapter name removed), as PEFT returns them.

    The arguments are PEFT's, in PEFT's order. ``state_dict`` may be passed when the model's own
    is not usable directly (e.g. gathered from FSDP shards); it must have the model's key names.
    ``unwrap_compiled`` accepts a ``torch.compile``-d model. ``save_embedding_layers`` adds the full
    embedding matrices as PEFT does (see ``saved_embeddings.py``; "auto": when an embedding is
    a target or the vocabulary was resized).
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    if state_dict is None:
        state_dict = model.state_dict()
    tensors = {saved: state_dict[own] for saved, own in _key_map(model, adapter_name).items()}
    tensors = model.base_model.to_saved_tensors(adapter_name, tensors)
    if saves_embeddings(model, adapter_name, save_embedding_layers):
        tensors = {**embedding_tensors(model, adapter_name, state_dict), **tensors}
    return tensors


def _sample(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def set_peft_model_state_dict(
    model: PeftModel,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
    *,
    strict: bool = True,
) -> AdapterLoadResult:
    """Copy saved adapter tensors into ``model``'s adapter ``adapter_name`` (PEFT's arguments).

    With ``strict`` (default; PEFT only warns) any missing or unexpected key raises
    ``ModelLoadError`` naming them; otherwise the keys that fit are loaded and the rest reported
    in the result. A shape mismatch raises, unless ``ignore_mismatched_sizes``: then those tensors
    are left as they are, with a warning naming them. ``low_cpu_mem_usage`` is accepted for
    PEFT's callers and changes nothing: the adapter's tensors exist already and are copied into.
    """
    del low_cpu_mem_usage
    state_dict = peft_model_state_dict
    key_map = _key_map(model, adapter_name)
    embeddings, state_dict = split_embedding_tensors(model, adapter_name, state_dict, set(key_map))
    state_dict = model.base_model.from_saved_tensors(adapter_name, state_dict)
    missing = [k for k in key_map if k not in state_dict]
    unexpected = [k for k in state_dict if k not in key_map]
    if strict and (missing or unexpected):
        problems = []
        if missing:
            problems.append(
                f"{len(missing)} adapter tensor(s) the model expects are missing: {_sample(missing)}"
            )
        if unexpected:
            problems.append(f"{len(unexpected)} tensor(s) have no place in the model: {_sample(unexpected)}")
        raise ModelLoadError(
            f"adapter weights do not fit adapter {adapter_name!r}: {'; '.join(problems)}. "
            "Check that the adapter was trained for this base model with this adapter_config.json."
        )
    own_tensors = dict(model.named_parameters(remove_duplicate=False))
    own_tensors.update(model.named_buffers(remove_duplicate=False))
    if any(own not in own_tensors for own in key_map.values()):
        # tensors a method keeps outside its module tree but shows in state_dict() (e.g. the
        # inactive adaption-prompt adapters); keep_vars gives the tensors themselves to copy_ into
        own_tensors = {**model.state_dict(keep_vars=True), **own_tensors}
    wrong_shape = []
    with torch.no_grad():
        for saved, own in key_map.items():
            if saved not in state_dict:
                continue
            target, value = own_tensors[own], state_dict[saved]
            if target.shape != value.shape:
                wrong_shape.append(f"{saved} (file {tuple(value.shape)}, model {tuple(target.shape)})")
                continue
            target.copy_(value)
    if wrong_shape and not ignore_mismatched_sizes:
        raise ModelLoadError(
            f"adapter tensors have the wrong shape: {_sample(wrong_shape)} "
            "(ignore_mismatched_sizes=True leaves those tensors as they are)"
        )
    if wrong_shape:
        warnings.warn(
            f"adapter tensors of the wrong shape were not loaded: {_sample(wrong_shape)}", stacklevel=2
        )
    with torch.no_grad():  # full embedding matrices saved with the adapter (save_embedding_layers)
        for own, value in embeddings.items():
            own_tensors[own].copy_(value)
    return AdapterLoadResult(missing, unexpected)


# -- files ----------------------------------------------------------------------------------------


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to ``path`` atomically (CPU, contiguous, no shared storage)."""
    out, seen = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:
            tensor = tensor.clone()  # safetensors refuses tensors sharing memory (tied weights)
        seen.add(storage)
        out[key] = tensor
    with atomic_file(path, "wb") as handle:
        handle.write(safetensors_bytes(out, metadata={"format": "pt"}))


def unreadable_safetensors(path: str | os.PathLike, err: Exception) -> ModelLoadError:
    """The error for a safetensors file that cannot be parsed (typically cut short by a copy)."""
    detail = str(err).removeprefix("Error while deserializing header: ")
    return ModelLoadError(
        f"{path} is not a readable safetensors file ({detail}): the file may be truncated or still "
        "being copied"
    )


def load_adapter_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` from ``directory``; refuse pickle-only adapters."""
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:
            return load_file(path)
        except SafetensorError as err:
            raise unreadable_safetensors(path, err) from err
    pickles = [name for name in PICKLE_WEIGHTS_NAMES if (directory / name).exists()]
    if pickles:
        raise ModelLoadError(
            f"{directory} holds the adapter weights only as {pickles[0]}, a pickle file. peftkit never "
            "unpickles files (that can run arbitrary code). If you trust the file, convert it once: "
            'python -c "import torch; from safetensors.torch import save_file; '
            f"save_file(torch.load('{pickles[0]}', weights_only=True), '{WEIGHTS_NAME}')\""
        )
    raise ModelLoadError(
        f"no {WEIGHTS_NAME} in {directory} (peftkit reads adapter weights only from safetensors)"
    )


def check_finite_adapter(directory: str | os.PathLike, action: str) -> None:
    """Refuse (before any base model loads) an adapter whose saved weights hold NaN or inf."""
    bad = [key for key, t in load_adapter_weights(directory).items() if not torch.isfinite(t).all()]
    if bad:
        raise ModelLoadError(
            f"adapter {directory} has NaN or inf values in {len(bad)} tensor(s) ({_sample(bad, 3)}); "
            f"refusing to {action} it: the run that saved it diverged. Use an earlier checkpoint or "
            "retrain (e.g. with a lower learning rate)"
        )


def load_peft_weights(
    model_id: str | os.PathLike,
    device: str | torch.device | None = None,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
) -> dict[str, torch.Tensor]:
    """The saved adapter tensors of ``model_id`` (PEFT's ``load_peft_weights``), on ``device``.

    ``model_id`` is an adapter directory or a Hub repo (``revision`` / ``subfolder`` as in
    ``PeftModel.from_pretrained``). Keys are the file's (adapter name removed), ready for
    ``set_peft_model_state_dict``. Differences from PEFT: ``device=None`` keeps the tensors on
    the CPU (PEFT picks the accelerator), and only ``adapter_model.safetensors`` is read: a
    pickle-only adapter (``adapter_model.bin``) is refused with how to convert it, never unpickled.
    """
    tensors = load_adapter_weights(resolve_adapter_dir(model_id, revision, subfolder))
    if device is None:
        return tensors
    return {key: tensor.to(device) for key, tensor in tensors.items()}


def resolve_adapter_dir(
    model_id: str | os.PathLike, revision: str | None = None, subfolder: str | None = None
) -> Path:
    """A local adapter directory, or the Hub repo ``model_id`` downloaded (config + safetensors only);
    with ``subfolder``, that folder of either."""
    path = Path(model_id)
    if path.is_dir():
        if subfolder and not (path / subfolder).is_dir():
            raise ModelLoadError(
                f"no adapter directory at {path / subfolder} (subfolder {subfolder!r} of {path})"
            )
        return path / subfolder if subfolder else path
    text = str(model_id)
    if text.count("/") > 1 or text.startswith((".", "/", "~")) or os.sep != "/" and os.sep in text:
        # Hub ids are "name" or "owner/name": anything longer is a local path that is not there.
        raise ModelLoadError(f"no adapter directory at {text!r} (resolved: {path.expanduser().resolve()})")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        config_path = hf_hub_download(str(model_id), CONFIG_NAME, revision=revision, subfolder=subfolder)
        try:
            hf_hub_download(str(model_id), WEIGHTS_NAME, revision=revision, subfolder=subfolder)
        except EntryNotFoundError:
            pass  # load_adapter_weights reports the missing file
    except Exception as err:  # offline, no such repo, no access: all mean "cannot find it"
        raise ModelLoadError(
            f"{model_id!r} is not a local adapter directory and could not be fetched from the Hugging Face Hub: {err}"
        ) from err
    return Path(config_path).parent


def _replaceable(root: Path, subdirs: set[str]) -> bool:
    """Whether ``root`` holds nothing but adapter files, so the whole directory may be swapped."""
    if not root.exists():
        return True
    if not root.is_dir():
        raise NotADirectoryError(f"{root} exists and is not a directory")
    for child in root.iterdir():
        if TMP_MARKER in child.name or ".old-" in child.name:
            continue  # leftovers of an interrupted atomic write
        if child.is_file() and child.name in _ADAPTER_FILES:
            continue
        if (
            child.is_dir()
            and child.name in subdirs
            and all(c.name in _ADAPTER_FILES for c in child.iterdir())
        ):
            continue
        return False
    return True


def _write_adapter(directory: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(directory / WEIGHTS_NAME, tensors)
    write_json(directory / CONFIG_NAME, config)  # last: a config never points at weights not yet written


def save_adapters(
    save_directory: str | os.PathLike, adapters: dict[str, tuple[dict[str, torch.Tensor], dict]]
) -> None:
    """Write ``{subdir: (tensors, config json)}`` under ``save_directory`` (``""`` is the directory itself).

    A directory holding only adapter files (or not existing yet) is replaced as a whole, so a
    kill leaves either the old or the new adapter, never a mix. A directory shared with other
    files (a tokenizer, checkpoints) is left in place and updated file by file, each file atomic.
    """
    root = Path(save_directory)
    if _replaceable(root, {sub for sub in adapters if sub}):
        with atomic_dir(root) as tmp:
            for sub, (tensors, config) in adapters.items():
                _write_adapter(tmp / sub, tensors, config)
    else:
        for sub, (tensors, config) in adapters.items():
            _write_adapter(root / sub, tensors, config)
