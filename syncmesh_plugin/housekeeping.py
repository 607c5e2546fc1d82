"""Housekeeping, done by one node at a time: tombstone collection, etcd compaction and defragmentation.

Leader election: every node registers `election/housekeeper/<node>` under its lease; the key with
the lowest create_revision is the leader. When the leader dies its lease expires, its key goes, and
the next oldest registration leads. Every destructive step the leader takes is a transaction that
also checks its own registration still exists with the same create_revision (fencing): a leader that
lost its lease while it was working cannot delete anything.

Tombstones (manifests of deleted paths) are removed once every live holder of the volume has
applied them and they are older than `housekeeping.tombstone_retention`. The revision up to which
tombstones were collected is recorded in `gc/<volume>`; a node that comes back after that (its
stored revision below it) reconciles, and deletes locally what was deleted while it was away
instead of publishing it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from . import metrics
from .config import HousekeepingConfig
from .membership import Membership
from .meta import EtcdStore, EtcdUnavailable, dumps
from .state import LocalState
from .sync.snapshot import HeldVolumes

log = logging.getLogger(__name__)

ELECTION = "housekeeper"


def needs_defrag(size: int, in_use: int) -> bool:
    """A member's file is worth defragmenting: over 64 MiB and more than half of it free."""
    return size > 64 * 2**20 and in_use > 0 and size > 2 * in_use


class Housekeeper:
    """Dependencies are getters: etcd and the index come up after the daemon is built."""

    def __init__(self, node: str, cfg: HousekeepingConfig, *, store: Callable[[], EtcdStore | None],
                 membership: Callable[[], Membership | None], volumes: HeldVolumes,
                 index: Callable[[], LocalState]) -> None:
        self.cfg = cfg
        self.node = node
        self._store, self._membership, self._index = store, membership, index
        self.volumes = volumes
        self.leader = ""
        self.is_leader = False
        self._my_create = 0
        self.last_run: dict[str, Any] = {}
        self.alarms: list[str] = []
        self._rounds = 0
        self._seen: dict[str, int] = {}

    def _key(self, node: str) -> bytes:
        store = self._store()
        assert store is not None
        return store.keys.election_key(ELECTION, node)

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except EtcdUnavailable as exc:
                log.debug("housekeeping skipped: %s", exc)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("housekeeping round failed")
            await asyncio.sleep(min(float(self.cfg.interval), 5.0) if not self.is_leader else float(self.cfg.interval))

    async def tick(self) -> None:
        store, m = self._store(), self._membership()
        if store is None or m is None or not m.lease_id:
            return
        mine = self._key(self.node)
        if not m.is_bound(mine):
            await m.bind(mine, dumps({"node": self.node, "at": time.time()}))
        registered = await store.election(ELECTION)
        if not registered:
            return
        first = min(registered, key=lambda r: r.create_revision)
        self.leader = first.node
        self.is_leader = first.node == self.node
        self._my_create = first.create_revision if self.is_leader else 0
        metrics.leader.set(1 if self.is_leader else 0)
        await self._check_alarms()
        if self.is_leader:
            await self._collect_tombstones()
            await self._compact_and_defrag()
        self._prune_conflict_records()

    # ---- fencing
    def _fence(self) -> tuple[bytes, int]:
        return self._key(self.node), self._my_create

    # ---- tombstones
    async def _collect_tombstones(self) -> None:
        store = self._store()
        assert store is not None
        retention = float(self.cfg.tombstone_retention)
        now = time.time()
        self._rounds += 1
        for name in list(self._index().volumes()):
            # Reading every manifest is costly on big volumes: only when deletions happened since the
            # last collection (seen by this node's replica), or every tenth round for volumes not held here.
            vs = self.volumes.snapshot(name)
            seen = vs.tombstones_seen if vs is not None else -1
            if (vs is not None and seen == self._seen.get(name)) or (vs is None and self._rounds % 10):
                continue
            revs = []
            for _, rec in await store.applied(name):
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    revs.append(int(rec["revision"]))
            if not revs:
                continue  # nobody holds it live: nothing can be proven applied
            horizon = min(revs)
            doomed: list[tuple[str, int]] = []
            waiting = 0  # tombstones not yet old enough, or not yet applied by every live holder
            async for t in store.tombstones(name):
                if t.mod_revision <= horizon and now - t.ts >= retention:
                    doomed.append((t.path, t.mod_revision))
                else:
                    waiting += 1
            if not waiting:
                self._seen[name] = seen  # nothing left to wait for: skip until new deletions
            if not doomed:
                continue
            top = max(r for _, r in doomed)
            removed = 0
            fence = self._fence()
            # Record the horizon first: a node coming back below it must not resurrect these paths.
            if top > await store.gc_horizon(name):
                await store.set_gc_horizon(name, top, at=now, by=self.node)
            for i in range(0, len(doomed), 100):
                ok = await store.delete_files_if_unchanged(name, doomed[i:i + 100], fence=fence)
                if not ok:
                    log.warning("housekeeping: lost leadership or a tombstone changed; stopping this round")
                    return
                removed += len(doomed[i:i + 100])
            metrics.tombstones_collected.inc(removed)
            self.last_run[name] = {"tombstones_removed": removed, "horizon": top, "at": now}
            log.info("housekeeping: volume %s: %d tombstones collected (applied everywhere up to %d)", name,
                     removed, horizon, extra={"volume": name, "count": removed})

    # ---- etcd footprint
    async def _compact_and_defrag(self) -> None:
        store = self._store()
        assert store is not None
        keep = int(self.cfg.compact_keep_revisions)
        if keep <= 0:
            return
        current = await store.current_revision()
        target = current - keep
        # Never compact past what a live node still needs to replay.
        for _, _, rec in await store.applied_all():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                target = min(target, int(rec["revision"]))
        last = int(self.last_run.get("_compacted", 0))
        if target <= last or target <= 0:
            return
        await store.compact(target)
        self.last_run["_compacted"] = target
        metrics.etcd_compactions.inc()
        log.info("housekeeping: etcd history compacted up to revision %d (current %d)", target, current)
        st = await store.status()
        metrics.etcd_db_bytes.set(st.get("db_size", 0))
        # Every member keeps its own file: each is defragmented on its own, one at a time (a member does not
        # answer while it defragments; the others do, and requests fail over to them).
        for url in store.endpoint_urls():
            try:
                st = await store.member_status(url)
            except EtcdUnavailable as exc:
                log.info("housekeeping: no status from etcd member %s (%s); not defragmented now", url, exc)
                continue
            size, in_use = st["db_size"], st["db_size_in_use"]
            if needs_defrag(size, in_use):
                await store.defragment_member(url)
                metrics.etcd_defrags.inc()
                log.info("housekeeping: etcd member %s defragmented (%d MiB in a %d MiB file)", url, in_use >> 20,
                         size >> 20)

    async def _check_alarms(self) -> None:
        store = self._store()
        assert store is not None
        self.alarms = await store.alarms()
        metrics.etcd_alarm.set(1 if self.alarms else 0)
        if self.alarms:
            log.error("etcd raised alarm(s): %s; writes are refused until an operator frees space "
                      "(compact, defragment, `etcdctl alarm disarm`)", ", ".join(self.alarms))

    def _prune_conflict_records(self) -> None:
        cutoff = time.time() - float(self.cfg.conflict_retention)
        self._index().prune_conflicts(cutoff)
