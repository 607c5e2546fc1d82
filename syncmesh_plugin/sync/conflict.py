"""Conflict stage: a compare-and-swap failed or a remote change met a local edit; settle it through etcd, keep both."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .. import localfs, metrics
from ..localfs import FileStat
from ..manifest import Manifest, ManifestError, decode
from ..pathsafe import conflict_name
from .decide import Winner, plan_conflict
from .pending import Pending, record_of
from .roles import Role
from .stage import Stage

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class Conflicts(Stage):
    """Settles a local edit against a concurrent remote version through etcd, keeping both contents."""

    async def settle(self, rel: str, local: Manifest, fs: FileStat | None) -> None:
        """Our compare-and-swap failed: another node changed `rel` concurrently. Decide, keep both."""
        for _ in range(10):
            kv = await self.store.get_file(self.name, rel)
            if kv is None:
                ok, rev = await self.vol.publisher.cas([(rel, local.encode(), 0)])
                if ok:
                    self.vol.publisher.published([(rel, local, fs)], rev)
                    return
                continue
            try:
                remote = decode(kv.value)
            except ManifestError:
                remote = Manifest(kind="deleted", origin="?")
            plan = plan_conflict(self.vol.mode, self.ctx.node_id, self.vol.keep_copies, local, remote,
                                 send_only=self.vol.role is Role.SEND_ONLY)
            if plan.winner is Winner.SAME:
                # Same content reached from both sides: adopt the published one.
                self.state.put_files([record_of(self.name, rel, remote, fs, kv.mod_revision)])
                if not local.attrs_equal(remote) and remote.kind != "deleted":
                    await asyncio.to_thread(localfs.set_attrs, self.root, rel, remote)
                return
            metrics.conflicts.labels(self.vol.mode).inc()
            self.vol.status.conflicts += 1
            stamp = datetime.now(UTC)
            if plan.winner is Winner.LOCAL:
                ops = []
                copy = ""
                # Even when we could not fetch the remote version yet (its origin may be away), its copy is
                # published: it becomes whole as soon as a holder of its chunks is back, and no write is lost.
                if plan.copy_remote:
                    # The loser's content is kept under a conflict name, published in the same
                    # transaction and before the overwrite: a node that holds only the losing version
                    # sees both in one batch and builds the copy from its local file before replacing it.
                    copy = conflict_name(rel, stamp, remote.origin or "unknown", self.name_taken)
                    remote.ts = time.time()
                    ops.append((copy, remote.encode(), 0))
                ops.append((rel, local.encode(), kv.mod_revision))
                ok, rev = await self.vol.publisher.cas(ops)
                if not ok:
                    continue
                self.vol.publisher.published([(rel, local, fs)], rev)
                if copy:
                    self.record(rel, copy, self.ctx.node_id, remote.origin)
                return
            # The remote version wins: move our content aside (no copy), then take theirs.
            moved = False
            if plan.move_local:
                copy, _ = await asyncio.to_thread(localfs.rename_local, self.root, rel,
                                                  conflict_name(rel, stamp, self.ctx.node_id, self.name_taken),
                                                  False, self.free_copy_name(rel, stamp))
                moved = True
                self.vol.dirty.add(copy)
                self.vol.kick.set()
                self.record(rel, copy, remote.origin, self.ctx.node_id)
            self.state.delete_files(self.name, [rel])
            # Once our content is moved aside the path must be taken as found: a container may have
            # written it again in the meantime, and that write is settled like any other (never
            # overwritten). Without a copy (keep_conflict_copies=false) the local version is replaced.
            await self.vol.applier.apply([Pending(rel, remote, kv.mod_revision)], resolving=not moved)
            return
        # A path rewritten faster than a compare-and-swap round trip: nothing is lost by waiting, the
        # local content stays on disk and differs from the index, so it is published again shortly.
        log.warning("volume %s: conflict on %s not settled after 10 rounds (hot file); retrying", self.name, rel)
        self.vol.dirty.add(rel)
        asyncio.get_running_loop().call_later(0.2, self.vol.kick.set)

    def free_copy_name(self, rel: str, stamp: datetime) -> Callable[[], str]:
        """The next conflict-copy name for `rel` when the one chosen was taken meanwhile. Called in a
        worker thread, so the disk (not the index) says which names are free."""
        return lambda: conflict_name(rel, stamp, self.ctx.node_id,
                                     lambda n: os.path.lexists(os.path.join(self.root, n)))

    def name_taken(self, rel: str) -> bool:
        """A conflict copy name already used here (on disk or in the index): never reused."""
        rec = self.state.file(self.name, rel)
        return (rec is not None and rec.kind != "deleted") or os.path.lexists(os.path.join(self.root, rel))

    def record(self, rel: str, copy: str, winner: str, loser: str) -> None:
        self.state.add_conflict(self.name, rel, copy, self.vol.mode, winner, loser, time.time())
        log.info("volume %s: conflict on %s (%s): %s kept, %s's version saved as %s", self.name, rel, self.vol.mode,
                 winner, loser, copy)
        self.ctx.emit("conflict", {"volume": self.name, "path": rel, "copy": copy, "mode": self.vol.mode,
                                   "winner": winner, "loser": loser})

    async def local_vs_remote(self, it: Pending) -> None:
        """A remote change arrived for a path with an unpublished local edit: settle it through etcd."""
        if self.vol.role is Role.RECEIVE_ONLY:
            await self.take_remote(it)
            return
        if it.fs is None:
            local = Manifest(kind="deleted", origin=self.ctx.node_id, ts=time.time())
        else:
            desc = await asyncio.to_thread(localfs.describe, self.root, it.rel, it.fs, self.ctx.node_id, time.time())
            if desc is None:  # still being written: its close will publish it, then the CAS decides
                self.vol.dirty.add(it.rel)
                self.vol.kick.set()
                return
            local = desc
        if local.content_equal(it.m):
            self.state.put_files([record_of(self.name, it.rel, it.m, it.fs, it.rev)])
            if it.m.kind != "deleted" and not local.attrs_equal(it.m):
                await asyncio.to_thread(localfs.set_attrs, self.root, it.rel, it.m)
            return
        await self.settle(it.rel, local, it.fs)

    async def take_remote(self, it: Pending) -> None:
        """On a receive-only replica the cluster's version wins; a locally changed file is kept under a
        conflict name (a local addition: never published either)."""
        if it.fs is not None and it.fs.kind == "file":
            stamp = datetime.now(UTC)
            copy, _ = await asyncio.to_thread(localfs.rename_local, self.root, it.rel,
                                              conflict_name(it.rel, stamp, self.ctx.node_id, self.name_taken),
                                              False, self.free_copy_name(it.rel, stamp))
            self.vol.local.note({copy}, {it.rel})
            self.record(it.rel, copy, it.m.origin, self.ctx.node_id)
        else:
            self.vol.local.note(set(), {it.rel})
        self.state.delete_files(self.name, [it.rel])
        await self.vol.applier.apply([Pending(it.rel, it.m, it.rev)], resolving=True)
