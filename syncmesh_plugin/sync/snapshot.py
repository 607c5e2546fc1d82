"""What the rest of the daemon sees of a held volume: a frozen snapshot, never VolumeSync's attributes.

Ops, housekeeping, the health check and the API read only `VolumeSnapshot`s, through `HeldVolumes`;
`snapshot(vs)` is the one place that reads a VolumeSync's internals for them (until VolumeSync
produces its snapshot itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..engine import VolumeSync


@dataclass(frozen=True, slots=True)
class VolumeSnapshot:
    name: str
    root: str  # the replica's directory
    ready: bool  # caught up with etcd since it was attached
    revision: int  # the last watch batch seen; the stored revision stays below deferred changes
    paused: str  # why the mass-damage guard paused publishing ("" while it publishes)
    last_error: str
    dirty: int  # local changes not published yet
    deferred: int  # remote changes waiting for chunks no reachable peer has
    watches: int  # inotify watches held
    watcher_degraded: bool  # inotify gave up: periodic rescans stand in
    watcher_reason: str
    tombstones_seen: int  # deletions published or applied here (housekeeping skips idle volumes)
    published: int
    applied: int
    conflicts: int
    lag_seconds: float  # publish-to-apply delay of the last remote change

    @property
    def pending(self) -> int:
        """Changes in flight either way."""
        return self.dirty + self.deferred


def snapshot(vs: VolumeSync) -> VolumeSnapshot:
    w = vs.watcher
    st = vs.status
    return VolumeSnapshot(
        name=vs.name, root=vs.root, ready=vs.ready.is_set(), revision=st.revision, paused=vs.paused,
        last_error=st.last_error, dirty=len(vs.dirty), deferred=len(vs.deferred),
        watches=w.watch_count if w is not None else 0, watcher_degraded=bool(w is not None and w.degraded),
        watcher_reason=(w.degraded_reason or "") if w is not None else "", tombstones_seen=vs.tombstones_seen,
        published=st.published, applied=st.applied, conflicts=st.conflicts, lag_seconds=st.lag_seconds)


class HeldVolumes(Protocol):
    """The volumes this node holds, as snapshots (empty before the engine starts)."""

    def snapshots(self) -> dict[str, VolumeSnapshot]: ...

    def snapshot(self, name: str) -> VolumeSnapshot | None: ...
