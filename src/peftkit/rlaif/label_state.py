"""The output file of label-pairs (:mod:`peftkit.rlaif.label_pairs`) and its state sidecar.

``OUT.state.json`` records how far OUT got (prompts done, OUT's length then), the counts so far
and the fingerprint of the settings that made it. From it this module decides whether a run may
start, resume or must be refused, cuts OUT back to its last recorded batch, and holds the lock
that keeps a second run off the same file. The fingerprints are digests of files, not paths: an
adapter or reward module copied elsewhere is the same one, an edited one is not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.rlaif.label_report import LabelReport

STATE_FORMAT = "peftkit-label-pairs/1"


def state_path(out: str | os.PathLike) -> Path:
    """The state file beside output ``out``: ``OUT.state.json``."""
    out = Path(out)
    return out.with_name(out.name + ".state.json")


# -- claiming, locking and recording the output ----------------------------------------------------


def claim_output(out: Path, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The state to resume from (None: start afresh), or a refusal saying what to do."""
    state_file = state_path(out)
    has_rows = out.is_file() and out.stat().st_size > 0
    if not resume:
        if (has_rows or state_file.exists()) and not overwrite:
            raise PeftkitError(
                f"{out} already exists (from an earlier label-pairs run or elsewhere): pass --resume to continue "
                "it, --overwrite to replace it, or choose another --out"
            )
        return None
    if not state_file.exists():
        if has_rows:
            raise PeftkitError(
                f"cannot resume {out}: it has no state file {state_file.name} (not written by label-pairs, or "
                "the state was deleted), so how far it got is unknown; pass --overwrite to start again"
            )
        return None  # nothing to resume: start
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        int(state["prompts_done"]), int(state["bytes"]), dict(state["settings"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise PeftkitError(
            f"cannot resume {out}: its state file {state_file} is unreadable ({err}); pass --overwrite to start again"
        ) from None
    if not out.is_file():
        raise PeftkitError(
            f"cannot resume {out}: the file is gone but its state {state_file.name} is there; pass --overwrite "
            "to start again"
        )
    size = out.stat().st_size
    if size < int(state["bytes"]):
        raise PeftkitError(
            f"cannot resume {out}: it is shorter ({size:,} bytes) than when {state['prompts_done']:,} prompts "
            f"were recorded done ({int(state['bytes']):,} bytes), so it was cut or edited since; pass "
            "--overwrite to start again"
        )
    return state


def check_settings(state: dict[str, Any], settings: dict[str, Any], out: Path) -> None:
    """Refuse to resume when a setting known so far differs from the recorded ones."""
    recorded = _flat(state["settings"])
    now = _flat(json.loads(json.dumps(settings, default=str)))
    differ = [
        f"{key}: {_short(recorded.get(key))} then, {_short(now.get(key))} now"
        for key in sorted(set(recorded) | set(now))
        if _known(key, settings) and recorded.get(key) != now.get(key)
    ]
    if differ:
        raise PeftkitError(
            f"cannot resume {out}: it was made with other settings ({'; '.join(differ[:6])}"
            f"{'; ...' if len(differ) > 6 else ''}); resume with the same settings, pass --overwrite to start "
            "again, or choose another --out"
        )


def _known(key: str, settings: dict[str, Any]) -> bool:
    return key.split(".", 1)[0] in settings


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


@contextlib.contextmanager
def locked_output(out: Path) -> Iterator[Any]:
    """OUT opened for appending, locked against a second run on it (where the OS locks files)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "ab") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory lock
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise PeftkitError(
                    f"{out} is being written by another label-pairs run; wait for it, or choose another --out"
                ) from None
        yield handle


def cut_back(handle: Any, size: int, out: Path, say: Callable[[str], None]) -> None:
    """Drop what was written after the last recorded batch (a kill mid-write leaves a half line)."""
    extra = os.fstat(handle.fileno()).st_size - size
    if extra > 0:
        say(
            f"note: dropped {extra:,} bytes of {out} written after the last recorded prompt (an interrupted batch)"
        )
        handle.truncate(size)  # appends go to the end of the file: after this, right after the last row
        os.fsync(handle.fileno())


def write_state(out: Path, settings: dict[str, Any], report: LabelReport, size: int) -> None:
    from peftkit.io import write_json

    write_json(
        state_path(out),
        {
            "format": STATE_FORMAT,
            "prompts_done": report.prompts_done,
            "prompts_total": report.prompts_total,
            "bytes": size,
            "counts": report.counts(),
            "settings": json.loads(json.dumps(settings, default=str)),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


# -- fingerprints ----------------------------------------------------------------------------------


def file_digest(path: str | os.PathLike | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dir_digest(directory: str | os.PathLike) -> str:
    """One digest of the files directly in ``directory`` (an adapter: its config, weights, tokenizer)."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            digest.update(f"{path.name}\0{file_digest(path)}\0".encode())
    return digest.hexdigest()


def module_file(fn: Any) -> str | None:
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    return getattr(module, "__file__", None)


def prompts_digest(prompts: list[Any]) -> str:
    """The split's prompts as the model sees them, in order: another data file, order or rendering
    gives another digest."""
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps([p.origin, p.prompt_ids, p.columns], default=str).encode())
    return digest.hexdigest()
