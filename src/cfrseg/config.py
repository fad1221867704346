"""Frozen, validated configuration dataclasses and the named profiles (tiny, lite, paper).

Every stage config subclasses :class:`ConfigBase`: it is frozen, checks its values in ``validate()`` (called
at construction), round-trips through JSON, and rejects unknown keys with a clear message. Profiles are JSON
files in ``cfrseg/profiles/`` with one section per stage.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from cfrseg.errors import ConfigError

PROFILES = ("tiny", "lite", "paper")
C = TypeVar("C", bound="ConfigBase")


def _coerce(value: Any, hint: Any) -> Any:
    """Turn JSON values back into the annotated type (lists -> tuples)."""
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(hint):
            if typing.get_origin(arg) is tuple and isinstance(value, list):
                return tuple(value)
    return value


@dataclasses.dataclass(frozen=True)
class ConfigBase:
    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            c = _coerce(v, hints.get(f.name))
            if c is not v:
                object.__setattr__(self, f.name, c)
        self.validate()

    def validate(self) -> None:
        """Override: raise :class:`ConfigError` on bad values."""

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(names)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"{cls.__name__}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        return cls.from_dict(json.loads(Path(path).read_text()))


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def load_profile(name: str) -> dict[str, dict[str, Any]]:
    """The raw sections of a named profile (or of a JSON file path): {"finetune": {...}, "retrain": {...}, ...}."""
    p = Path(name)
    if p.suffix == ".json" and p.is_file():
        return json.loads(p.read_text())
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; choose one of {list(PROFILES)} or give a .json file")
    return json.loads(resources.files("cfrseg.profiles").joinpath(f"{name}.json").read_text())


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``["retrain.iterations=100", "finetune.lr=1e-4"]`` -> ``{"retrain": {"iterations": 100}, ...}``.

    Values are JSON (numbers, booleans, lists, null); anything that is not valid JSON is kept as a string."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, val = item.partition("=")
        stage, dot, name = key.partition(".")
        if not sep or not dot or not stage or not name:
            raise ConfigError(f"--set wants STAGE.KEY=VALUE, got {item!r}")
        try:
            value = json.loads(val)
        except json.JSONDecodeError:
            value = val
        out.setdefault(stage, {})[name] = value
    return out


def apply_overrides(profile: dict[str, dict[str, Any]], items: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """A copy of ``profile`` with :func:`parse_overrides` of ``items`` merged into its sections."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in profile.items()}
    for stage, kv in parse_overrides(items).items():
        out.setdefault(stage, {}).update(kv)
    return out
