"""Node membership: this node's record and its lease-bound keys, kept alive in etcd.

Everything that must vanish when a node dies (its node record, "volume mounted here", "replica held
here") is written under one lease. When the lease is lost (etcd was unreachable longer than the TTL),
a new lease is granted and every lease-bound key is written again, so liveness heals by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from . import __version__
from .meta import EtcdStore, EtcdUnavailable, dumps, loads

log = logging.getLogger(__name__)


class NodeIdConflict(RuntimeError):
    """Another live daemon (another data root) already uses this node_id."""


def load_identity(state_dir: str) -> str:
    """A random id kept in the data root: it tells "the same node restarting" from "another node"."""
    path = os.path.join(state_dir, "identity")
    try:
        with open(path, encoding="ascii") as fh:
            ident = fh.read().strip()
            if ident:
                return ident
    except FileNotFoundError:
        pass
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    ident = uuid.uuid4().hex
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write(ident + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return ident


class Membership:
    """Registers nodes/<node_id> under a kept-alive lease, and owns all lease-bound keys."""

    def __init__(self, store: EtcdStore, node_id: str, identity: str, advertise: str, ttl: int) -> None:
        self.store = store
        self.node_id = node_id
        self.identity = identity
        self.advertise = advertise
        self.ttl = ttl
        self.lease_id = 0
        self.started_at = time.time()
        self._bound: dict[bytes, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self.on_lease_lost: Callable[[], object] | None = None  # its result is ignored
        self.healthy = False

    def record(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "advertise": self.advertise, "version": __version__,
                "started_at": self.started_at, "identity": self.identity, "pid": os.getpid()}

    async def register(self) -> None:
        """Claim nodes/<node_id>; refuse if a different live daemon holds it."""
        key = self.store.keys.node_key(self.node_id)
        existing = await self.store.get(key)
        if existing is not None:
            try:
                other = loads(existing.value)
            except ValueError:
                other = {}
            if other.get("identity") != self.identity:
                raise NodeIdConflict(
                    f"node_id {self.node_id!r} is already live in the cluster (advertising "
                    f"{other.get('advertise', '?')}, started {time.ctime(other.get('started_at', 0))}) with another "
                    f"data root; give this daemon its own node_id (SYNCMESH_NODE_ID)")
            # The same node restarting (even after kill -9): take the registration back at once.
            if existing.lease:
                await self.store.revoke_lease(existing.lease)
        await self._new_lease()
        self.healthy = True
        if self._task is None:
            self._task = asyncio.create_task(self._keepalive(), name="lease-keepalive")

    async def _new_lease(self) -> None:
        self.lease_id = await self.store.grant_lease(self.ttl)
        await self.store.put(self.store.keys.node_key(self.node_id), dumps(self.record()), lease=self.lease_id)
        for k, v in list(self._bound.items()):
            await self.store.put(k, v, lease=self.lease_id)

    async def bind(self, key: bytes, value: bytes) -> None:
        """Write a key that lives as long as this node does."""
        self._bound[key] = value
        if self.lease_id:
            await self.store.put(key, value, lease=self.lease_id)

    def is_bound(self, key: bytes) -> bool:
        return key in self._bound

    async def unbind(self, key: bytes) -> None:
        self._bound.pop(key, None)
        if self.lease_id:
            await self.store.delete(key)

    def forget(self, key_prefix: bytes) -> None:
        """Drop lease-bound keys locally (the cluster already deleted them)."""
        for k in [k for k in self._bound if k.startswith(key_prefix)]:
            del self._bound[k]

    async def _keepalive(self) -> None:
        interval = max(1.0, self.ttl / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                ttl = await self.store.keep_alive_once(self.lease_id)
                if ttl <= 0:
                    log.warning("lease lost (etcd was unreachable longer than %ss); registering again", self.ttl)
                    await self._new_lease()
                    if self.on_lease_lost:
                        self.on_lease_lost()
                self.healthy = True
            except EtcdUnavailable as exc:
                self.healthy = False
                log.warning("lease keep-alive failed: %s", exc)
                interval = 1.0
                continue
            interval = max(1.0, self.ttl / 3)

    async def nodes(self) -> dict[str, dict[str, Any]]:
        return await self.store.node_records()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.lease_id:
            # A clean stop frees the node's keys at once instead of after the TTL.
            with contextlib.suppress(EtcdUnavailable, asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self.store.revoke_lease(self.lease_id), 2)
            self.lease_id = 0
