"""Local changes of a replica that does not publish them (receive-only), and the two ways out:
revert (take the cluster's version back) and override (push this node's state over the cluster's)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

from .. import localfs, metrics
from ..manifest import ManifestError, decode
from ..pathsafe import validate_relpath
from .decide import depth, differs
from .pending import Pending, record_of
from .roles import Role
from .stage import Stage

log = logging.getLogger(__name__)


class LocalChanges(Stage):
    """What a receive-only replica keeps to itself, shown and warned about; revert and override."""

    def note(self, changed: set[str], unchanged: set[str]) -> None:
        """A receive-only replica's edits: kept, shown, warned about once a minute (never per file)."""
        self.vol.local_changes |= changed
        self.vol.local_changes -= unchanged
        metrics.local_changes.labels(self.name).set(len(self.vol.local_changes))
        if changed and time.monotonic() - self.vol.local_warned_at >= 60:
            self.vol.local_warned_at = time.monotonic()
            log.warning("volume %s: %d local change(s) on a receive-only replica are kept here and not published "
                        "(e.g. %s); `syncmesh-plugin revert %s` takes the cluster's version back", self.name,
                        len(self.vol.local_changes), min(self.vol.local_changes), self.name,
                        extra={"volume": self.name})

    async def revert(self, path: str | None = None) -> dict[str, Any]:
        """Syncthing's "Revert Local Changes": local additions go, the cluster's version of what was
        changed or deleted here comes back."""
        if path is None:
            await self.vol.scanner.rescan("revert")  # the local changes as the disk has them now
        async with self.vol.lock:
            todo = set(self.vol.local_changes) if path is None else {validate_relpath(path)}
            recs = self.state.files_for(self.name, todo)
            added = sorted((p for p in todo if (r := recs.get(p)) is None or r.kind == "deleted"), key=depth,
                           reverse=True)
            removed = await asyncio.to_thread(lambda: [p for p in added if localfs.remove(self.root, p)])
            back: list[Pending] = []
            for p in sorted(todo - set(added)):
                kv = await self.store.get_file(self.name, p)
                if kv is not None:
                    back.append(Pending(p, decode(kv.value), kv.mod_revision))
            if back:
                await self.vol.applier.apply(back, resolving=True)
            self.note(set(), todo)
        log.warning("volume %s: local changes reverted: %d addition(s) removed, %d path(s) taken back from the "
                    "cluster", self.name, len(removed), len(back), extra={"volume": self.name})
        return {"volume": self.name, "removed": len(removed), "restored": len(back)}

    async def override(self) -> dict[str, Any]:
        """Syncthing's "Override Changes": this node's whole state is published over the cluster's. Each
        path etcd has that differs here gets its published revision as the base of a new publish (the
        path itself, or a tombstone when it is gone here); the mass-deletion guard judges as always."""
        if self.vol.role is Role.RECEIVE_ONLY:
            raise ValueError(f"volume {self.name}: this node's replica is receive-only; it publishes nothing")
        store = self.store
        queued = 0
        async with self.vol.lock:
            _, pages = await store.read_files(self.name, page=2048)
            async for page in pages:
                items = [(store.path_of(self.name, kv.key), kv) for kv in page]
                stats = await asyncio.to_thread(localfs.lstat_many, self.root, [rel for rel, _ in items])
                recs = self.state.files_for(self.name, [rel for rel, _ in items])
                adopt = []
                for rel, kv in items:
                    try:
                        remote = decode(kv.value)
                    except ManifestError:
                        continue
                    fs, rec = stats[rel], recs.get(rel)
                    same = (fs is not None and rec is not None and not differs(rec, fs) and rec.kind == remote.kind
                            and rec.digest == remote.digest and rec.target == remote.target)
                    if same or (fs is None and remote.kind == "deleted"):
                        if rec is not None:
                            adopt.append(replace(rec, rev=kv.mod_revision))
                        continue
                    # The base of our publish is what etcd holds now; inode 0 makes the path differ.
                    adopt.append(record_of(self.name, rel, remote, None, kv.mod_revision))
                    self.vol.dirty.add(rel)
                    queued += 1
                self.state.put_files(adopt)
            self.vol.remote_ignored.clear()
        self.vol.scanner.rescan_soon()  # and whatever exists only here
        log.warning("volume %s: overriding the cluster with this node's state (%d path(s) differ)", self.name, queued,
                    extra={"volume": self.name})
        return {"volume": self.name, "queued": queued}
