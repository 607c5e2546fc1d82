"""The sync engine: every volume this node holds, each kept in agreement with etcd by its stages.

One `VolumeSync` (sync/volume.py) per held volume. A change flows through its stages, one module each:
  local:  scan (inotify, rescans) -> publish (describe, guard, compare-and-swap) -> index
  remote: follow (watch, parse) -> apply (plan) -> fetch (local chunks, peers) -> commit (stage, syncfs,
          rename) -> index; a local edit met on the way goes to conflict.
Decisions are pure functions (sync/decide.py, sync/guard.py); the stages do the I/O that acts on them.
Publishing and applying of one volume are serialised by a lock, which keeps the conflict logic
simple: a remote change is applied only after checking that the local path has no unpublished edit.
etcd orders everything; a failed compare-and-swap is the only way a conflict is detected.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil

from . import metrics
from .sync.context import EngineContext
from .sync.volume import VolumeSync
from .volopts import VolumeOptions

__all__ = ["Engine", "EngineContext", "VolumeSync"]

log = logging.getLogger(__name__)


class Engine:
    """All volumes this node holds."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.volumes: dict[str, VolumeSync] = {}

    async def attach(self, name: str, options: VolumeOptions) -> VolumeSync:
        vs = self.volumes.get(name)
        if vs is None:
            vs = VolumeSync(self.ctx, name, options)
            self.volumes[name] = vs
            await vs.start()
            metrics.volumes_held.set(len(self.volumes))
        return vs

    def retry_deferred_now(self) -> None:
        for vs in self.volumes.values():
            if vs.deferred:
                vs.retry_now.set()

    async def wait_ready(self, name: str, timeout: float) -> bool:
        vs = self.volumes.get(name)
        if vs is None:
            return False
        try:
            await asyncio.wait_for(vs.complete.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def detach(self, name: str, delete_data: bool, trash_to: str = "") -> None:
        """Stop syncing the volume here; with `delete_data` forget it and delete its data, or move the
        data to `trash_to` (same file system) so that `undelete` can bring it back."""
        vs = self.volumes.pop(name, None)
        if vs is not None:
            await vs.stop()
        metrics.volumes_held.set(len(self.volumes))
        if delete_data:
            self.ctx.state.unhold(name)
            base = os.path.join(self.ctx.data_root, "volumes", name)
            if trash_to and os.path.isdir(base):
                os.makedirs(os.path.dirname(trash_to), mode=0o700, exist_ok=True)
                await asyncio.to_thread(os.rename, base, trash_to)
            else:
                await asyncio.to_thread(shutil.rmtree, base, True)

    async def read_chunk(self, volume: str, chunk_id: str) -> bytes | None:
        vs = self.volumes.get(volume)
        return await vs.read_chunk(chunk_id) if vs else None

    async def close(self) -> None:
        for name in list(self.volumes):
            vs = self.volumes.pop(name)
            await vs.stop()
