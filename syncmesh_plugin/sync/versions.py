"""Undo: which replaced or deleted versions a node keeps, and which one a restore takes. Pure.

When a change from another node replaces or deletes a file, the node keeps the old file in the
volume's version store (outside `_data`, hard-linked, never copied). A mistake made on one host is
then undone from any other. Modes follow Syncthing's file versioning:

- `trash`: the last replaced or deleted version of each path;
- `simple`: the last `keep` versions of each path;
- `staggered`: one version per 30 s for the first hour, one per hour for the first day, one per day
  for 30 days, then one per week;

all bounded by `retention` (older versions go) and `max_bytes` per node (the oldest go first).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

MODES = ("off", "trash", "simple", "staggered")
# (age up to, one version per): Syncthing's staggered schedule
STAGGERED = ((3600.0, 30.0), (86400.0, 3600.0), (30 * 86400.0, 86400.0), (float("inf"), 7 * 86400.0))


@dataclass(frozen=True, slots=True)
class Version:
    """One kept version: `at` is when it was replaced or deleted (it was the content until then)."""

    id: str
    path: str
    at: float
    size: int
    digest: str = ""
    reason: str = "replaced"  # replaced | deleted
    origin: str = ""  # the node whose change replaced it


def to_drop(versions: Iterable[Version], mode: str, keep: int, retention: float, max_bytes: int,
            now: float) -> set[str]:
    """The ids a node deletes from its version store now."""
    vs = sorted(versions, key=lambda v: v.at, reverse=True)  # newest first
    if mode == "off":
        return {v.id for v in vs}
    drop = {v.id for v in vs if now - v.at > retention}
    by_path: dict[str, list[Version]] = defaultdict(list)
    for v in vs:
        if v.id not in drop:
            by_path[v.path].append(v)
    for path_versions in by_path.values():
        if mode == "trash":
            drop.update(v.id for v in path_versions[1:])
        elif mode == "simple":
            drop.update(v.id for v in path_versions[max(1, keep):])
        elif mode == "staggered":
            drop.update(_staggered_drop(path_versions, now))
    if max_bytes > 0:
        kept = [v for v in vs if v.id not in drop]
        total = sum(v.size for v in kept)
        for v in reversed(kept):  # oldest first
            if total <= max_bytes:
                break
            drop.add(v.id)
            total -= v.size
    return drop


def _staggered_drop(newest_first: list[Version], now: float) -> set[str]:
    """Keep the newest version of each interval of the schedule; the newest overall always stays."""
    seen: set[tuple[int, int]] = set()
    drop = set()
    for v in newest_first:
        age = max(0.0, now - v.at)
        for tier, (upto, every) in enumerate(STAGGERED):
            if age <= upto:
                bucket = (tier, int(age // every))
                break
        if bucket in seen:
            drop.add(v.id)
        else:
            seen.add(bucket)
    return drop


def as_of(versions: Iterable[Version], at: float) -> dict[str, Version]:
    """For `restore --at`: path -> the version that holds its content as it was at time `at`: the first
    one replaced or deleted after `at`. A path with none is unchanged since then (nothing to restore)."""
    best: dict[str, Version] = {}
    for v in versions:
        if v.at > at and (v.path not in best or v.at < best[v.path].at):
            best[v.path] = v
    return best


def parse_size(text: str) -> int:
    """`10G`, `500M`, `1024` -> bytes (binary units); 0 means no cap. ValueError otherwise."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for unit, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if t.endswith(unit):
            t, mult = t[:-1], m
            break
    n = float(t)
    if n < 0 or n != n:
        raise ValueError(text)
    return int(n * mult)
