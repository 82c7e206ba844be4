"""TOML files and `--set section.key=value` overrides for any config made of typed sections.

Every error names the file (or `--set`), the key and the value, in one line.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from fedtrust.errors import ConfigError


class Sections:
    """A config: a dataclass of section dataclasses (this module's Config, the distill run's)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_value(annotation: Any, value: Any, where: str) -> Any:
    """Return `value` converted to `annotation`, or raise ConfigError naming `where`."""
    origin = get_origin(annotation)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, e.g. [1, 2], got {value!r}")
        (inner,) = get_args(annotation)
        return [_check_value(inner, v, where) for v in value]
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation}")


def _section_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def apply(cfg: Any, values: dict[str, Any], source: str) -> Any:
    """Merge a nested mapping {section: {key: value}} into `cfg`, validating every key.

    `cfg` is any dataclass of section dataclasses (this module's Config, or another command's).
    """
    sections = _section_types(type(cfg))
    for section, entries in values.items():
        if section not in sections:
            raise ConfigError(
                f"{source}: unknown section [{section}] (known: {', '.join(sections)})"
            )
        if not isinstance(entries, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of key = value")
        target = getattr(cfg, section)
        types_ = _section_types(type(target))
        for key, value in entries.items():
            if key not in types_:
                raise ConfigError(
                    f"{source}: unknown key {section}.{key} (known: {', '.join(types_)})"
                )
            checked = _check_value(types_[key], value, f"{source}: {section}.{key}")
            setattr(target, key, checked)
            cfg.__dict__.setdefault("_sources", {})[f"{section}.{key}"] = source
    return cfg


def parse_override(text: str) -> dict[str, Any]:
    """Turn `section.key=value` into {section: {key: value}}; the value is read as TOML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: the key must be section.key, e.g. client.lr")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as `activity` is a string
    return {parts[0]: {parts[1]: value}}


def load_sections(cfg: Any, path: str | Path | None, overrides: list[str] | None, bundled: Path):
    """`cfg` (a dataclass of sections) updated by the TOML file (a path, or a config name in
    `bundled`, e.g. `shakespeare`), then by each `--set section.key=value` override."""
    if path is not None:
        path = Path(path)
        if not path.exists() and (bundled / f"{path}.toml").is_file():
            path = bundled / f"{path}.toml"
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from None
        apply(cfg, data, str(path))
    for text in overrides or []:
        apply(cfg, parse_override(text), "--set")
    return cfg


def requirement(
    cfg: Any, show: Callable[[Any], Any] = lambda value: value
) -> Callable[[bool, str, str], None]:
    """`require(ok, "section.key", message)`: a ConfigError naming where the value came from,
    the key and the value (`{value}` in `message`, shown through `show`) unless `ok`."""
    sources = cfg.__dict__.get("_sources", {})

    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            where = sources.get(key, "default")
            raise ConfigError(f"{where}: {key}: {message.format(value=show(value))}")

    return require
