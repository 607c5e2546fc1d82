"""Undo's I/O: the version store of one volume on this node (the decisions are in versions.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .. import localfs, metrics
from ..pathsafe import validate_relpath
from .stage import Stage
from .versions import Version, to_drop

if TYPE_CHECKING:
    from .volume import VolumeSync

log = logging.getLogger(__name__)


class Keeper(Stage):
    """Keeps what remote changes replace or delete (hard links in `versions/`, outside `_data`),
    prunes it by the volume's retention, and writes chosen versions back as new changes."""

    def __init__(self, vol: VolumeSync) -> None:
        super().__init__(vol)
        self.versions_dir = os.path.join(vol.base, "versions")  # outside _data: never seen, never synced
        self.versions_added = False
        self.pruning = False

    def version_slot(self) -> tuple[str, str]:
        """A new version's id and where its file goes; ("", "") with versioning off. Worker threads."""
        if self.vol.options.versioning == "off":
            return "", ""
        os.makedirs(self.versions_dir, mode=0o700, exist_ok=True)
        vid = f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}"
        return vid, os.path.join(self.versions_dir, vid)

    def versions_kept(self, kept: list[Version]) -> None:
        self.state.add_versions(self.name, kept)
        self.versions_added = True
        if self.vol.options.versioning_max_bytes and not self.pruning:
            # Over its cap the store is trimmed now, not at the next round.
            self.pruning = True
            asyncio.get_running_loop().create_task(self.prune_versions())

    async def prune_versions(self) -> int:
        """Enforce the volume's retention and byte cap on this node's version store."""
        try:
            o = self.vol.options
            drop = to_drop(self.state.versions(self.name), o.versioning, o.versions_keep, o.versioning_retention,
                           o.versioning_max_bytes, time.time())
            if drop:

                def unlink_all() -> None:
                    for v in drop:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(self.versions_dir, v))

                await asyncio.to_thread(unlink_all)
                self.state.delete_versions(self.name, drop)
            n, size = self.state.version_stats(self.name)
            metrics.versions_files.labels(self.name).set(n)
            metrics.versions_bytes.labels(self.name).set(size)
            return len(drop)
        finally:
            self.pruning = False

    async def versions_loop(self) -> None:
        """Retention is enforced every minute (and at once when a byte cap is crossed)."""
        while True:
            try:
                await self.prune_versions()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next round tries again
                log.exception("volume %s: pruning kept versions failed", self.name)
            await asyncio.sleep(60.0)

    async def restore(self, ids: Sequence[str], to: str = "") -> dict[str, Any]:
        """Write kept versions back into the volume as new local changes: published like any write, so
        every node converges on them. `to`: another path (one version only)."""
        if to and len(ids) != 1:
            raise ValueError("--to restores one version at a time")
        have = {v.id: v for v in self.state.versions(self.name)}
        missing = [i for i in ids if i not in have]
        if missing:
            raise KeyError(f"no kept version {missing[0]} of volume {self.name} on this node")
        target = validate_relpath(to) if to else ""
        restored: list[dict[str, Any]] = []
        try:
            for vid in ids:
                v = have[vid]
                rel = target or v.path
                await asyncio.to_thread(localfs.restore_copy, self.root, rel, os.path.join(self.versions_dir, vid))
                self.vol.dirty.add(rel)
                restored.append({"id": vid, "path": rel, "from": v.path, "at": v.at, "size": v.size})
        finally:
            self.vol.kick.set()  # what was restored before a failure is published all the same
        log.warning("volume %s: %d kept version(s) restored (%s)", self.name, len(restored),
                    ", ".join(r["path"] for r in restored[:5]), extra={"volume": self.name})
        return {"volume": self.name, "node": self.ctx.node_id, "restored": restored}
