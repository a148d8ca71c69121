"""Loading YAML configuration with environment overrides, shared by broker and exchange.

An override is `<PREFIX><PATH>=value`, the path's parts joined by `__`, list
items by index: RAMP_BROKER_LISTEN=127.0.0.1:9999,
RAMP_BROKER_EXCHANGES__0__TIMEOUT_MS=500. Validation errors name the setting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ValidationError

from currency.money import MoneyError, parse_amount, parse_currency

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """Configuration that cannot be used; the message says which setting and why."""


def _amount(text: str) -> str:
    try:
        parse_amount(text, "amount")
    except MoneyError as exc:
        raise ValueError(exc.problem) from None  # the setting's path says where
    return text


def _currency(code: str) -> str:
    try:
        return parse_currency(code, "currency")
    except MoneyError as exc:
        raise ValueError(exc.problem) from None


# Setting types for money, parsed as strictly as the wire's amounts.
Amount = Annotated[str, AfterValidator(_amount)]
CurrencyCode = Annotated[str, AfterValidator(_currency)]


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
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
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
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise ConfigError(f"{where}: {problems}") from None
