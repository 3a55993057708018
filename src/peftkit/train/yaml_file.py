"""The raw job mapping: a YAML config file read strictly (UTF-8 only, a mapping at the top, no
key given twice) and the ``--set key=value`` overrides applied to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from peftkit.configuration import ConfigError
from peftkit.errors import not_utf8_message


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: YAML
    would keep the last value silently, and the first one is usually the one the user edited."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges may be overridden by explicit keys, as YAML allows
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {seen[key]} and {line}): keep one", None
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a UTF-8 YAML config file; anything else is a ``ConfigError``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give the YAML file inside it")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {not_utf8_message(path, raw, err)}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - safe loader
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        raise ConfigError(
            f"config file {path} is empty (or only comments): it must hold a mapping of options, "
            "such as the files in examples/"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of options at the top level, got {type(data).__name__}"
        )
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value (for example training.max_steps=100), got {text!r}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return raw
