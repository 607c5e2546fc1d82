"""Volume names and per-volume options (`docker volume create --opt`, compose `driver_opts`).

Docker does not validate names for non-local drivers, and a name becomes a directory, so the rule is
enforced here before anything touches the disk or etcd.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .config import CONFLICT_MODES, MOUNT_TIMEOUT_MAX, Duration, _coerce
from .placement import parse_replicas
from .sync.roles import parse_writers
from .sync.versions import MODES as VERSIONING_MODES
from .sync.versions import parse_size

NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
NAME_RULE = "volume names must match [a-zA-Z0-9][a-zA-Z0-9_.-]* and be at most 255 bytes"


class VolumeError(ValueError):
    """A bad volume name or option; the message goes back to Docker as `Err`."""


def validate_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise VolumeError(f"missing volume name: {NAME_RULE}")
    if len(name.encode("utf-8", "surrogateescape")) > 255 or not NAME_RE.fullmatch(name):
        raise VolumeError(f"invalid volume name {name!r}: {NAME_RULE}")
    return name


@dataclass(frozen=True)
class VolumeOptions:
    """Options fixed at Create and stored with the volume in etcd (every node uses the same)."""

    conflict_resolution: str | None = None  # None: the node's sync.conflict_resolution
    keep_conflict_copies: bool = True
    compression: bool = True
    ignore: tuple[str, ...] = ()
    mount_timeout: float | None = None  # None: the node's sync.mount_timeout
    mount_partial: bool = False  # a first Mount may return before this node has the whole volume
    replicas: str = ""  # placement ahead of mounts: "all", a number, or "" (from the first Mount or Create)
    writers: tuple[str, ...] = ()  # the nodes whose changes the cluster takes (empty: every node)
    versioning: str = "off"  # off | trash | simple | staggered: what each node keeps of replaced/deleted files
    versions_keep: int = 5  # simple: versions kept per path
    versioning_retention: float = 7 * 86400.0  # versions older than this go
    versioning_max_bytes: int = 0  # per node; the oldest go first (0: no cap)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ignore"] = list(self.ignore)
        d["writers"] = list(self.writers)
        for later in ("mount_partial", "replicas", "writers"):  # options added later are stored only when set
            if not d[later]:
                del d[later]
        if self.versioning == "off":
            for k in ("versioning", "versions_keep", "versioning_retention", "versioning_max_bytes"):
                del d[k]
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VolumeOptions:
        return cls(
            conflict_resolution=data.get("conflict_resolution"),
            keep_conflict_copies=bool(data.get("keep_conflict_copies", True)),
            compression=bool(data.get("compression", True)),
            ignore=tuple(data.get("ignore", ())),
            mount_timeout=data.get("mount_timeout"),
            mount_partial=bool(data.get("mount_partial", False)),
            replicas=str(data.get("replicas", "") or ""),
            writers=tuple(str(w) for w in data.get("writers", ()) or ()),
            versioning=str(data.get("versioning", "off") or "off"),
            versions_keep=int(data.get("versions_keep", 5)),
            versioning_retention=float(data.get("versioning_retention", 7 * 86400.0)),
            versioning_max_bytes=int(data.get("versioning_max_bytes", 0)),
        )


OPTION_HELP = {
    "conflict_resolution": "timestamp|size|manual",
    "keep_conflict_copies": "true|false",
    "compression": "true|false",
    "ignore": "comma-separated gitignore-style patterns, e.g. '*.lock,cache/'",
    "mount_timeout": f"duration such as 25s, at most {MOUNT_TIMEOUT_MAX:.0f}s",
    "mount_partial": "true|false",
    "replicas": "all, or a number of nodes that hold the volume ahead of any mount",
    "writers": "comma-separated node ids whose changes the cluster takes, e.g. host1,host2",
    "versioning": "off|trash|simple|staggered",
    "versions_keep": "a whole number from 1 (simple versioning: versions kept per path)",
    "versioning_retention": "duration such as 7d",
    "versioning_max_bytes": "bytes per node such as 10G (0: no cap)",
}


def _valid_list() -> str:
    return "; ".join(f"{k}={v}" for k, v in OPTION_HELP.items())


def parse_options(opts: Any) -> VolumeOptions:
    """Validate Docker's `Opts` (a string map, possibly null) into VolumeOptions."""
    if opts is None:
        return VolumeOptions()
    if not isinstance(opts, Mapping):
        raise VolumeError(f"Opts must be an object of string values; valid options: {_valid_list()}")
    kwargs: dict[str, Any] = {}
    for key, value in opts.items():
        if key not in OPTION_HELP:
            raise VolumeError(f"unknown volume option {key!r}; valid options: {_valid_list()}")
        if not isinstance(value, str):
            value = str(value)
        try:
            if key == "conflict_resolution":
                if value not in CONFLICT_MODES:
                    raise ValueError
                kwargs[key] = value
            elif key in ("keep_conflict_copies", "compression", "mount_partial"):
                kwargs[key] = _coerce(key, bool, value, from_env=True)
            elif key == "mount_timeout":
                kwargs[key] = float(_coerce(key, Duration, value, from_env=True))
                if not 1 <= kwargs[key] <= MOUNT_TIMEOUT_MAX:
                    raise ValueError
            elif key == "replicas":
                kwargs[key] = parse_replicas(value)
            elif key == "writers":
                kwargs[key] = parse_writers(value)
            elif key == "versioning":
                if value not in VERSIONING_MODES:
                    raise ValueError
                kwargs[key] = value
            elif key == "versions_keep":
                kwargs[key] = int(value)
                if not 1 <= kwargs[key] <= 10_000:
                    raise ValueError
            elif key == "versioning_retention":
                kwargs[key] = float(_coerce(key, Duration, value, from_env=True))
                if kwargs[key] <= 0:
                    raise ValueError
            elif key == "versioning_max_bytes":
                kwargs[key] = parse_size(value)
            elif key == "ignore":
                pats = tuple(p.strip() for p in value.split(",") if p.strip())
                for p in pats:
                    if "\x00" in p or len(p) > 1024:
                        raise ValueError
                kwargs[key] = pats
        except ValueError:
            raise VolumeError(f"bad value {value!r} for volume option {key}: expected {OPTION_HELP[key]}; "
                              f"valid options: {_valid_list()}") from None
    return VolumeOptions(**kwargs)
