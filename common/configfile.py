"""Loading YAML configuration with environment overrides, shared by the broker and the reference Exchange.

An override is `<PREFIX><PATH>=value`, the path's parts joined by `__`, list
items by index: RAMP_BROKER_LISTEN=127.0.0.1:9999,
RAMP_BROKER_EXCHANGES__0__TIMEOUT_MS=500. Validation errors name the setting.
Setting types for money are currency.settings'.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)
_ADDR = re.compile(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")


class ConfigError(Exception):
    """Configuration that cannot be used; the message says which setting and why."""


def check_address(value: str) -> str:
    """A `listen` setting: host:port (IPv6 as [::1]:port)."""
    m = _ADDR.fullmatch(value)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"{value!r} is not host:port (IPv6 as [::1]:port)")
    return value


class DuplicateKey(yaml.YAMLError):
    """A mapping names the same key twice; YAML would silently keep only the last value."""

    def __init__(self, key: str, first_line: int, second_line: int) -> None:
        super().__init__(f"key {key} appears twice (lines {first_line} and {second_line})")
        self.key = key
        self.lines = (first_line, second_line)


_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing a key repeated in one mapping, at any depth.

    Checked as each mapping is composed, before merge keys (`<<`) are expanded: a key set
    beside `<<: *defaults` overrides the merged one as YAML intends, and merged mappings are
    each checked where they are written. Two `<<` in one mapping are refused like any repeat.
    """

    def _key(self, node: yaml.Node) -> Any:
        """What `node` is as a dict key: 1, 0x1 and true are one key once constructed."""
        if node.tag == _STR_TAG:
            return node.value
        if node.tag == _MERGE_TAG:
            return (_MERGE_TAG,)
        if isinstance(node, yaml.ScalarNode):
            return self.construct_object(node, deep=True)
        return id(node)  # a complex key: SafeLoader refuses it as unhashable anyway

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:  # the stub mistypes anchor
        node = super().compose_mapping_node(anchor)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self._key(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKey(repr(key_node.value), seen[key], line)
            seen[key] = line
        return node

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Expand `<<`, then keep one entry per key: the mapping's own, else the first merged.

        PyYAML leaves a merged mapping's overridden keys in place and dedupes by string
        identity, so merging a mapping that itself overrides a merged key took the stale value.
        """
        own = sum(1 for key_node, _ in node.value if key_node.tag != _MERGE_TAG)
        super().flatten_mapping(node)
        split = len(node.value) - own
        merged, mine = node.value[:split], node.value[split:]
        taken = {self._key(key_node) for key_node, _ in mine}
        kept = []
        for pair in merged:
            key = self._key(pair[0])
            if key not in taken:
                taken.add(key)
                kept.append(pair)
        node.value = kept + mine


def _apply_override(tree: dict[str, Any], path: list[str], value: str, env_name: str) -> None:
    node: Any = tree
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{env_name}: no list item {part!r} to override")
            idx = int(part)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            elif part not in node and path[i + 1].isdigit():
                raise ConfigError(f"{env_name}: {'.'.join(path[:i + 1])} has no list item "
                                  f"{path[i + 1]!r} to override")
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{env_name}: {'.'.join(path[:i])} is not a section")


def load(
    model: type[M], path: str | Path | None, env_prefix: str,
    environ: Mapping[str, str] | None = None,
) -> M:
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        except DuplicateKey as exc:
            raise ConfigError(f"{path}: {exc}; a repeated key would silently replace the first") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of settings")
        tree = loaded or {}
    env = os.environ if environ is None else environ
    for name in sorted(env):
        if name.startswith(env_prefix):
            parts = name[len(env_prefix):].lower().split("__")
            _apply_override(tree, parts, env[name], name)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        where = str(path) if path else "configuration"
        problems = "; ".join(_problem(err["loc"], err["msg"]) for err in exc.errors())
        raise ConfigError(f"{where}: {problems}") from None


def _problem(loc: tuple[int | str, ...], msg: str) -> str:
    msg = msg.removeprefix("Value error, ")
    # A check across settings has no single location; its message names the settings.
    return f"{'.'.join(str(p) for p in loc)}: {msg}" if loc else msg
