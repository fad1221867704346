"""The PACS configuration (``CFRSEG_PACS_CONFIG``, a JSON file; docs/pacs.md "Routes"): our AE title and port,
the calling AEs allowed to send (AE title + host), the remote nodes (DIMSE AEs or DICOMweb servers), limits, and
the routes that turn a received series into a segmentation.

Everything is a frozen dataclass validated at construction (ConfigError with the offending key). Route
matching: ``match`` maps a DICOM keyword to a rule: a string is a full-match regular expression on the value
(multi-valued attributes: on the values joined by ``\\``), a list means every listed value is among the
attribute's values, ``[lo, hi]`` of numbers is an inclusive numeric range. The first matching route wins.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfrseg.errors import ConfigError

AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash, 1..16 chars
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SEG_TYPES = ("BINARY", "LABELMAP")


def _ae(value: Any, where: str) -> str:
    if not isinstance(value, str) or not AE_RE.match(value) or not value.strip():
        raise ConfigError(f"{where}: AE title must be 1..16 printable characters without '\\', got {value!r}")
    return value.strip()


def _keys(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected an object, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


@dataclass(frozen=True)
class Caller:
    """A calling AE allowed to send to us (C-STORE) from ``host`` (an IP address or a CIDR network)."""

    ae_title: str
    host: str

    def __post_init__(self) -> None:
        _ae(self.ae_title, "callers")
        try:
            ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            raise ConfigError(f"callers: host {self.host!r} of {self.ae_title!r} must be an IP address or a CIDR "
                              f"network (names are not resolved: a PACS admin registers addresses)") from None

    def allows(self, ae_title: str, address: str) -> bool:
        try:
            return ae_title.strip() == self.ae_title and \
                ipaddress.ip_address(address) in ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            return False


@dataclass(frozen=True)
class Node:
    """A remote node: a DIMSE AE (``ae_title``, ``host``, ``port``) and/or a DICOMweb server (``dicomweb_url``,
    optional bearer token in ``token_file``). Used as a destination for SEGs and as a source for pull mode."""

    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    dicomweb_url: str = ""
    token_file: str = ""
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ConfigError(f"destinations: invalid name {self.name!r}")
        if self.ae_title or self.host or self.port:
            _ae(self.ae_title, f"destinations.{self.name}.ae_title")
            if not self.host or not isinstance(self.port, int) or not 0 < self.port < 65536:
                raise ConfigError(f"destinations.{self.name}: a DIMSE node needs ae_title, host and port (1..65535)")
        if self.dicomweb_url and not re.match(r"^https?://", self.dicomweb_url):
            raise ConfigError(f"destinations.{self.name}.dicomweb_url must start with http:// or https://")
        if not (self.ae_title or self.dicomweb_url):
            raise ConfigError(f"destinations.{self.name}: give ae_title/host/port (DIMSE) or dicomweb_url")
        if self.timeout_s <= 0:
            raise ConfigError(f"destinations.{self.name}.timeout_s must be > 0")

    @property
    def dimse(self) -> bool:
        return bool(self.ae_title)

    def token(self) -> str:
        """The bearer token (read at each use, so a rotated secret file is picked up)."""
        if not self.token_file:
            return ""
        try:
            return Path(self.token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"destinations.{self.name}.token_file: cannot read it ({e.strerror})") from None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("name", "ae_title", "host", "port", "dicomweb_url", "token_file",
                                              "timeout_s")}


@dataclass(frozen=True)
class Limits:
    max_instances: int = 2000          # per series; beyond: 0xA700 for each further instance, REJECTED oversized
    max_series_mb: float = 2048.0      # per series, bytes as received
    max_instance_mb: float = 256.0     # one instance
    min_slices: int = 8                # fewer: REJECTED too_few_slices
    spool_min_free_mb: float = 1024.0  # free disk under the spool below this: 0xA700
    max_voxels: int = 512 * 512 * 2000

    def __post_init__(self) -> None:
        for k in ("max_instances", "max_series_mb", "max_instance_mb", "min_slices", "max_voxels"):
            if not isinstance(getattr(self, k), (int, float)) or getattr(self, k) <= 0:
                raise ConfigError(f"limits.{k} must be > 0, got {getattr(self, k)!r}")
        if self.spool_min_free_mb < 0:
            raise ConfigError("limits.spool_min_free_mb must be >= 0")


def _check_rule(key: str, rule: Any, where: str) -> None:
    if not re.match(r"^[A-Za-z][A-Za-z0-9]{0,63}$", key):
        raise ConfigError(f"{where}.match: {key!r} is not a DICOM keyword")
    if isinstance(rule, str):
        try:
            re.compile(rule)
        except re.error as e:
            raise ConfigError(f"{where}.match.{key}: bad regular expression {rule!r}: {e}") from None
    elif isinstance(rule, list) and len(rule) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            for v in rule):
        if rule[0] > rule[1]:
            raise ConfigError(f"{where}.match.{key}: range [{rule[0]}, {rule[1]}] is empty")
    elif isinstance(rule, list) and rule and all(isinstance(v, str) for v in rule):
        pass
    else:
        raise ConfigError(f"{where}.match.{key}: expected a regex string, a list of values or a [lo, hi] range")


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v).strip() for v in value]
    return [str(value).strip()]


def rule_matches(rule: Any, value: Any) -> bool:
    """One match rule against an attribute value (see the module doc)."""
    vals = _values(value)
    if isinstance(rule, str):
        return re.fullmatch(rule, "\\".join(vals)) is not None
    if len(rule) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rule):
        try:
            return len(vals) == 1 and rule[0] <= float(vals[0]) <= rule[1]
        except ValueError:
            return False
    upper = {v.upper() for v in vals}
    return all(str(v).upper() in upper for v in rule)


@dataclass(frozen=True)
class Route:
    name: str
    model_id: str
    called_ae: str = ""                              # "" = our main AE title
    match: dict[str, Any] = field(default_factory=dict)
    segments: Any = "auto"                            # "auto" (from the model's classes) or a list of segments
    seg_type: str = "BINARY"
    fallback_seg_type: str = ""                       # e.g. BINARY when a destination refuses LABELMAP
    send_to: tuple[str, ...] = ()
    series_number: int = 9001
    series_description: str = "cfrseg segmentation (AI, research use only)"
    omit_empty_frames: bool = True

    def __post_init__(self) -> None:
        where = f"routes.{self.name}"
        if not NAME_RE.match(self.name):
            raise ConfigError(f"routes: invalid route name {self.name!r}")
        if not re.match(r"^[A-Za-z0-9_-]{1,64}$", self.model_id or ""):
            raise ConfigError(f"{where}.model_id: invalid model id {self.model_id!r}")
        if self.called_ae:
            _ae(self.called_ae, f"{where}.called_ae")
        if not isinstance(self.match, dict):
            raise ConfigError(f"{where}.match must be an object")
        for k, r in self.match.items():
            _check_rule(k, r, where)
        if self.seg_type not in SEG_TYPES or (self.fallback_seg_type and self.fallback_seg_type not in SEG_TYPES):
            raise ConfigError(f"{where}: seg_type/fallback_seg_type must be one of {SEG_TYPES}")
        if not self.send_to:
            raise ConfigError(f"{where}.send_to: name at least one destination")
        if not isinstance(self.series_number, int) or not 1 <= self.series_number <= 2**31 - 1:
            raise ConfigError(f"{where}.series_number must be a positive integer")
        if not 1 <= len(self.series_description) <= 64:
            raise ConfigError(f"{where}.series_description must be 1..64 characters")
        if self.segments != "auto":
            from cfrseg.dicom.codes import SegmentSpec

            if not isinstance(self.segments, (list, tuple)) or not self.segments:
                raise ConfigError(f'{where}.segments: "auto" or a non-empty list of segments')
            specs = tuple(s if isinstance(s, SegmentSpec) else SegmentSpec.from_dict(s) for s in self.segments)
            object.__setattr__(self, "segments", specs)

    def matches(self, called_ae: str, attrs: Mapping[str, Any], main_ae: str) -> bool:
        if (self.called_ae or main_ae) != called_ae.strip():
            return False
        return all(rule_matches(rule, attrs.get(k)) for k, rule in self.match.items())

    def to_dict(self) -> dict[str, Any]:
        segs = self.segments if self.segments == "auto" else [s.to_dict() for s in self.segments]
        return {"name": self.name, "model_id": self.model_id, "called_ae": self.called_ae, "match": self.match,
                "segments": segs, "seg_type": self.seg_type, "fallback_seg_type": self.fallback_seg_type,
                "send_to": list(self.send_to), "series_number": self.series_number,
                "series_description": self.series_description, "omit_empty_frames": self.omit_empty_frames}


@dataclass(frozen=True)
class PacsConfig:
    ae_title: str = "CFRSEG"
    bind: str = "127.0.0.1"
    port: int = 11112
    stable_after_s: float = 10.0        # quiet time after the last instance of a series
    release_grace_s: float = 1.0        # ... or this long after the sending association was released (0: off)
    callers: tuple[Caller, ...] = ()
    destinations: dict[str, Node] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    routes: tuple[Route, ...] = ()
    listeners: dict[str, int] = field(default_factory=dict)   # extra called AE title -> its port
    keep_failed_days: float = 7.0
    max_associations: int = 10
    dimse_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _ae(self.ae_title, "ae_title")
        try:
            ipaddress.ip_address(self.bind)
        except ValueError:
            raise ConfigError(f"bind: {self.bind!r} is not an IP address") from None
        for p in (self.port, *self.listeners.values()):
            if not isinstance(p, int) or not 0 <= p < 65536:
                raise ConfigError(f"port {p!r} out of range")
        for ae in self.listeners:
            _ae(ae, "listeners")
        if self.stable_after_s <= 0 or self.release_grace_s < 0:
            raise ConfigError("stable_after_s must be > 0 and release_grace_s >= 0")
        names = [r.name for r in self.routes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"routes: duplicate name(s) {dup}")
        for r in self.routes:
            unknown = [d for d in r.send_to if d not in self.destinations]
            if unknown:
                raise ConfigError(f"routes.{r.name}.send_to: unknown destination(s) {unknown}; "
                                  f"defined: {sorted(self.destinations)}")
            if r.called_ae and r.called_ae != self.ae_title and r.called_ae not in self.listeners:
                raise ConfigError(f"routes.{r.name}.called_ae {r.called_ae!r} is neither ae_title nor a listener "
                                  f"(add it to 'listeners' with its own port)")

    # ---- loading ----
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PacsConfig:
        _keys(d, {"ae_title", "bind", "port", "stable_after_s", "release_grace_s", "callers", "destinations",
                  "limits", "routes", "listeners", "keep_failed_days", "max_associations", "dimse_timeout_s"},
              "pacs config")
        try:
            callers = tuple(Caller(**c) for c in d.get("callers", []))
            dests = {}
            for name, v in (d.get("destinations") or {}).items():
                _keys(v, {"ae_title", "host", "port", "dicomweb_url", "token_file", "timeout_s"},
                      f"destinations.{name}")
                dests[name] = Node(name=name, **v)
            limits = Limits(**(d.get("limits") or {}))
            routes = []
            for r in d.get("routes", []):
                _keys(r, set(Route.__dataclass_fields__), f"routes.{r.get('name', '?')}")
                r = dict(r)
                r["send_to"] = tuple(r.get("send_to", ()))
                routes.append(Route(**r))
            rest = {k: d[k] for k in ("ae_title", "bind", "port", "stable_after_s", "release_grace_s",
                                      "keep_failed_days", "max_associations", "dimse_timeout_s") if k in d}
            return cls(callers=callers, destinations=dests, limits=limits, routes=tuple(routes),
                       listeners=dict(d.get("listeners") or {}), **rest)
        except TypeError as e:
            raise ConfigError(f"pacs config: {e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> PacsConfig:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except OSError as e:
            raise ConfigError(f"CFRSEG_PACS_CONFIG={p}: cannot read it ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"CFRSEG_PACS_CONFIG={p}: not valid JSON ({e})") from None
        return cls.from_dict(data)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PacsConfig | None:
        path = (os.environ if env is None else env).get("CFRSEG_PACS_CONFIG", "")
        return cls.load(path) if path else None

    # ---- use ----
    def allowed(self, ae_title: str, address: str) -> bool:
        return any(c.allows(ae_title, address) for c in self.callers)

    def route(self, name: str) -> Route:
        for r in self.routes:
            if r.name == name:
                return r
        raise ConfigError(f"no route {name!r}; routes: {[r.name for r in self.routes]}")

    def match(self, called_ae: str, attrs: Mapping[str, Any]) -> Route | None:
        return next((r for r in self.routes if r.matches(called_ae, attrs, self.ae_title)), None)

    def called_aes(self) -> dict[str, int]:
        """Every called AE title we answer to, with its port."""
        return {self.ae_title: self.port, **self.listeners}
