"""The tokenizer keys of the GGUF file a base model was converted from (peftkit's built-in aliases).

peftkit converts a GGUF alias (``smollm2-135m-instruct``) to a transformers directory once and
records the file in ``peftkit_conversion.json``. Its ``tokenizer.ggml.*`` keys are what the
original converter wrote; when they still describe the transformers tokenizer (same tokens,
merges, bos/eos and add-bos: ``copyable_fields``), ``gguf_vocab`` copies them verbatim.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from peftkit.export.gguf_vocab import Vocab


def source_gguf(model_dir: Path) -> Path | None:
    """The GGUF file ``model_dir`` was converted from (a built-in alias), if it is still installed."""
    from peftkit.model_aliases import ALIASES, MARKER, GgufAlias, find_gguf, is_converted

    marker = Path(model_dir) / MARKER
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    alias = ALIASES.get(recorded.get("alias")) if isinstance(recorded, dict) else None
    if not isinstance(alias, GgufAlias):
        return None
    path = find_gguf(alias)
    return path if path is not None and is_converted(Path(model_dir), path) else None


def read_tokenizer_fields(path: Path) -> dict[str, tuple[Any, Any]]:
    """``{key: (GGUFValueType, value)}`` of the ``tokenizer.ggml.*`` keys of a GGUF file.

    Reads only the key-value section (a few MB), not the tensor index: gguf.GGUFReader parses the
    whole file into numpy views, ~3 s for SmolLM2's 49k-token vocabulary. Falls back to it for
    files this little parser does not read (big-endian, GGUF v1)."""
    import mmap

    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            return _parse_kv(data)
        except (ValueError, struct.error, KeyError, UnicodeDecodeError):
            pass
    return _read_with_reader(path)


def _parse_kv(data: Any) -> dict[str, tuple[Any, Any]]:
    import gguf
    import numpy as np

    kinds = gguf.GGUFValueType
    scalars = {
        kinds.UINT8: "<B", kinds.INT8: "<b", kinds.UINT16: "<H", kinds.INT16: "<h",
        kinds.UINT32: "<I", kinds.INT32: "<i", kinds.FLOAT32: "<f", kinds.BOOL: "<?",
        kinds.UINT64: "<Q", kinds.INT64: "<q", kinds.FLOAT64: "<d",
    }  # fmt: skip
    if data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] not in (2, 3):
        raise ValueError("not a little-endian GGUF v2/v3 file")
    _, kv_count = struct.unpack_from("<QQ", data, 8)
    offset = 24

    def string() -> str:
        nonlocal offset
        (length,) = struct.unpack_from("<Q", data, offset)
        offset += 8 + length
        return bytes(data[offset - length : offset]).decode("utf-8")

    def value(kind: Any) -> Any:
        nonlocal offset
        if kind == kinds.STRING:
            return string()
        code = scalars[kind]
        offset += struct.calcsize(code)
        return struct.unpack_from(code, data, offset - struct.calcsize(code))[0]

    fields = {}
    for _ in range(kv_count):
        key = string()
        (raw,) = struct.unpack_from("<I", data, offset)
        offset += 4
        kind = kinds(raw)
        if kind == kinds.ARRAY:
            element, count = struct.unpack_from("<IQ", data, offset)
            offset += 12
            element = kinds(element)
            if element in scalars:  # one numpy read instead of count unpacks
                dtype = np.dtype(scalars[element])
                item = np.frombuffer(data, dtype, count, offset).tolist()
                offset += dtype.itemsize * count
            else:
                item = [value(element) for _ in range(count)]
        else:
            item = value(kind)
        if key.startswith("tokenizer.ggml."):
            fields[key] = (kind, item)
    return fields


def _read_with_reader(path: Path) -> dict[str, tuple[Any, Any]]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {
        key: (item.types[0], _field_value(item))
        for key, item in reader.fields.items()
        if key.startswith("tokenizer.ggml.")
    }


def _field_value(item: Any) -> Any:
    """A GGUFReader field as Python values (works with gguf 0.10, which lacks ``contents()``)."""
    import gguf

    kind = item.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        if item.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(item.parts[i]).decode("utf-8") for i in item.data]
        return [item.parts[i].tolist()[0] for i in item.data]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(item.parts[item.data[0]]).decode("utf-8")
    return item.parts[item.data[0]].tolist()[0]


def copyable_fields(fields: dict[str, tuple[Any, Any]], built: Vocab) -> str | None:
    """Why the source GGUF's tokenizer cannot stand for ``built`` (None: it can)."""
    value = {key: item[1] for key, item in fields.items()}
    if value.get("tokenizer.ggml.model") != built.model:
        return f"its tokenizer model is {value.get('tokenizer.ggml.model')!r}, not {built.model!r}"
    if value.get("tokenizer.ggml.tokens") != built.tokens:
        return "its vocabulary differs from the tokenizer's (added tokens?)"
    if value.get("tokenizer.ggml.merges", []) != built.merges:
        return "its merges differ from the tokenizer's"
    for kind in ("bos", "eos"):
        if value.get(f"tokenizer.ggml.{kind}_token_id") != built.special_ids.get(kind):
            return f"its {kind} token differs from the tokenizer's"
    if bool(value.get("tokenizer.ggml.add_bos_token", False)) != built.add_bos:
        return "it adds a bos token where the tokenizer does not (or the reverse)"
    if built.add_space_prefix is not None:  # llama.cpp's default for SentencePiece: add it
        if bool(value.get("tokenizer.ggml.add_space_prefix", True)) != built.add_space_prefix:
            return "its SentencePiece dummy-prefix setting differs from the tokenizer's"
    return None


def write_copied_fields(writer: Any, fields: dict[str, tuple[Any, Any]]) -> None:
    for key, (kind, value) in fields.items():
        writer.add_key_value(key, value, kind)
