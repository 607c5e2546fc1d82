"""Volume lifecycle as Docker sees it: create, remove, mount, unmount, get, list.

Volumes are cluster-wide (registered in etcd), while Get and List answer from the local persisted
copy of the registry, so Docker keeps working while etcd is briefly unreachable (a Get error would
make dockerd forget the volume). Mount reference counts are per mount ID and persisted, because
dockerd never replays Mount after a plugin restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .engine import Engine
from .membership import Membership
from .meta import EtcdStore, EtcdUnavailable, ResyncRequired, WatchInterrupted, dumps, loads
from .state import LocalState
from .volopts import VolumeError, VolumeOptions, parse_options, validate_name

log = logging.getLogger(__name__)


class ClusterUnavailable(RuntimeError):
    """The call needs etcd and etcd is not reachable right now."""


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class VolumeManager:
    """The Docker-facing operations, on top of the registry (etcd + local copy) and the engine."""

    def __init__(self, *, node_id: str, data_root: str, state: LocalState, engine: Engine,
                 get_store: Callable[[], EtcdStore | None], get_membership: Callable[[], Membership | None],
                 mount_timeout: float, connect_wait: float = 10.0) -> None:
        self.node_id = node_id
        self.data_root = data_root
        self.state = state
        self.engine = engine
        self.get_store = get_store
        self.get_membership = get_membership
        self.mount_timeout = mount_timeout
        self.connect_wait = connect_wait
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._watch_task: asyncio.Task[None] | None = None

    # ---- helpers
    def mountpoint(self, name: str) -> str:
        return os.path.join(self.data_root, "volumes", name, "_data")

    def _store(self) -> EtcdStore:
        store = self.get_store()
        if store is None:
            raise ClusterUnavailable("etcd is not reachable yet; the cluster registry is needed for this call")
        return store

    async def _store_soon(self) -> EtcdStore:
        """The store, waiting briefly while the daemon is still connecting (e.g. right after
        `docker plugin enable` with embedded etcd): Docker retries nothing, so a short wait beats an Err."""
        deadline = time.monotonic() + self.connect_wait
        while self.get_store() is None and time.monotonic() < deadline:  # noqa: ASYNC110 - a derived condition, not one event
            await asyncio.sleep(0.05)
        return self._store()

    def _known(self, name: str) -> dict[str, Any]:
        rec = self.state.volume(name)
        if rec is None:
            raise VolumeError(f"no such volume: {name}")
        return rec

    # ---- Docker operations
    async def create(self, name: Any, opts: Any) -> None:
        name = validate_name(name)
        options = parse_options(opts)
        async with self._locks[name]:
            store = await self._store_soon()
            record = {"name": name, "options": options.to_json(), "created_by": self.node_id,
                      "created_at": time.time()}
            try:
                created, existing = await store.put_if_absent(store.key("volumes", name), dumps(record))
            except EtcdUnavailable as exc:
                raise ClusterUnavailable(str(exc)) from None
            if created:
                rev = 0
                log.info("volume %s created", name, extra={"volume": name})
            else:
                # Idempotent: the cluster's record (and its options) stays as it was.
                assert existing is not None
                record, rev = loads(existing.value), existing.mod_revision
            self.state.put_volume(name, record, rev)
            await self._hold(name, record)

    async def _hold(self, name: str, record: dict[str, Any]) -> None:
        """This node keeps a replica from now on (it was created or mounted here)."""
        await self.engine.attach(name, VolumeOptions.from_json(record.get("options", {})))
        m = self.get_membership()
        if m is not None:
            with contextlib.suppress(EtcdUnavailable):
                await m.bind(m.store.key("holders", name, self.node_id), dumps({"at": time.time()}))

    async def _fetch_record(self, name: str) -> dict[str, Any]:
        """A volume created elsewhere a moment ago may not have reached our registry watch yet."""
        store = self.get_store()
        kv = None
        if store is not None:
            with contextlib.suppress(EtcdUnavailable):
                kv = await store.get(store.key("volumes", name))
        if kv is None:
            raise VolumeError(f"no such volume: {name}")
        record = loads(kv.value)
        self.state.put_volume(name, record, kv.mod_revision)
        return record

    def get(self, name: Any) -> dict[str, Any]:
        name = validate_name(name)
        rec = self._known(name)
        return {"Name": name, "Mountpoint": self.mountpoint(name),
                "CreatedAt": _rfc3339(float(rec.get("created_at", 0))), "Status": self.status(name, rec)}

    def status(self, name: str, rec: dict[str, Any]) -> dict[str, Any]:
        vs = self.engine.volumes.get(name)
        sync = vs.describe_status() if vs else {"held": False}
        if vs:
            sync["held"] = True
        mounts = self.state.mounts(name)
        return {"options": rec.get("options", {}), "created_by": rec.get("created_by", ""),
                "node": self.node_id, "mounts_here": sum(mounts.values()), "sync": sync}

    def list(self) -> list[dict[str, Any]]:
        return [{"Name": n, "Mountpoint": self.mountpoint(n), "CreatedAt": _rfc3339(float(r.get("created_at", 0)))}
                for n, r in sorted(self.state.volumes().items())]

    def path(self, name: Any) -> str:
        name = validate_name(name)
        self._known(name)
        return self.mountpoint(name)

    async def mount(self, name: Any, mount_id: Any) -> str:
        name = validate_name(name)
        if not isinstance(mount_id, str) or not mount_id or len(mount_id) > 256:
            raise VolumeError("Mount needs the ID field (a string)")
        async with self._locks[name]:
            rec = self.state.volume(name) or await self._fetch_record(name)
            first = name not in self.engine.volumes or not self.engine.volumes[name].ready.is_set()
            await self._hold(name, rec)
            if first:
                timeout = float(rec.get("options", {}).get("mount_timeout") or self.mount_timeout)
                if not await self.engine.wait_ready(name, timeout):
                    log.warning("volume %s: not converged within %.0fs of Mount; mounting, sync continues", name,
                                timeout, extra={"volume": name})
            total = self.state.add_mount(name, mount_id)
            await self._publish_mounts(name, total)
            return self.mountpoint(name)

    async def unmount(self, name: Any, mount_id: Any) -> None:
        name = validate_name(name)
        if not isinstance(mount_id, str):
            raise VolumeError("Unmount needs the ID field (a string)")
        async with self._locks[name]:
            if mount_id not in self.state.mounts(name):
                return  # unknown ID: harmless (Docker may retry, or the count was already released)
            total = self.state.remove_mount(name, mount_id)
            await self._publish_mounts(name, total)

    async def _publish_mounts(self, name: str, total: int) -> None:
        m = self.get_membership()
        if m is None:
            return  # re-published when etcd comes back (see republish_mounts)
        key = m.store.key("mounts", name, self.node_id)
        with contextlib.suppress(EtcdUnavailable):
            if total > 0:
                await m.bind(key, dumps({"count": total, "at": time.time()}))
            else:
                await m.unbind(key)

    async def republish_mounts(self) -> None:
        for name, ids in self.state.all_mounts().items():
            await self._publish_mounts(name, sum(ids.values()))
        for name in self.engine.volumes:
            m = self.get_membership()
            if m is not None:
                with contextlib.suppress(EtcdUnavailable):
                    await m.bind(m.store.key("holders", name, self.node_id), dumps({"at": time.time()}))

    async def remove(self, name: Any) -> None:
        name = validate_name(name)
        async with self._locks[name]:
            self._known(name)
            local = sum(self.state.mounts(name).values())
            if local:
                raise VolumeError(f"volume {name} is in use: mounted {local} time(s) on this node ({self.node_id})")
            store = await self._store_soon()
            try:
                _, kvs = await store.get_all(store.key("mounts", name) + b"/")
                nodes = sorted(kv.key.rsplit(b"/", 1)[-1].decode() for kv in kvs)
                if nodes:
                    raise VolumeError(f"volume {name} is in use: mounted on node(s) {', '.join(nodes)}")
                await store.delete(store.key("volumes", name))
                for part in ("files", "mounts", "holders", "applied"):
                    await store.delete_prefix(store.key(part, name) + b"/")
                await store.delete(store.head_key(name))
            except EtcdUnavailable as exc:
                raise ClusterUnavailable(str(exc)) from None
            await self._drop_local(name)

    async def _drop_local(self, name: str) -> None:
        m = self.get_membership()
        if m is not None:
            m.forget(m.store.key("holders", name) + b"/")
            m.forget(m.store.key("mounts", name) + b"/")
        await self.engine.detach(name, delete_data=True)
        self.state.clear_mounts(name)
        self.state.delete_volume(name)
        log.info("volume %s removed on this node", name, extra={"volume": name})

    # ---- registry copy
    async def sync_registry(self) -> int:
        """Replace the local copy with etcd's registry; returns the revision read."""
        store = self._store()
        rev, kvs = await store.get_all(store.key("volumes") + b"/")
        records: dict[str, tuple[dict[str, Any], int]] = {}
        for kv in kvs:
            name = kv.key.rsplit(b"/", 1)[-1].decode("utf-8", "replace")
            try:
                records[validate_name(name)] = (loads(kv.value), kv.mod_revision)
            except (ValueError, VolumeError):
                log.warning("ignoring malformed volume record %r", kv.key[:200])
        gone = set(self.state.volumes()) - set(records)
        self.state.replace_volumes(records)
        for name in gone:
            await self._drop_local(name)
        return rev

    async def watch_registry(self) -> None:
        """Follow volumes/ so the local copy stays current; removal elsewhere drops our replica."""
        while True:
            store = self._store()
            rev = await self.sync_registry()
            try:
                async for batch in store.watch(store.key("volumes") + b"/", rev + 1):
                    for ev in batch.events:
                        name = ev.key.rsplit(b"/", 1)[-1].decode("utf-8", "replace")
                        try:
                            validate_name(name)
                        except VolumeError:
                            continue
                        if ev.value is None:
                            async with self._locks[name]:
                                if self.state.volume(name) is not None:
                                    await self._drop_local(name)
                        else:
                            with contextlib.suppress(ValueError):
                                self.state.put_volume(name, loads(ev.value), ev.mod_revision)
            except (ResyncRequired, WatchInterrupted):
                continue  # re-read the registry, then watch on from there

    async def resume_held(self) -> None:
        """After a restart: keep syncing every volume this node held, and its mounts."""
        volumes = self.state.volumes()
        for name in self.state.held():
            rec = volumes.get(name)
            if rec is None:
                continue
            await self.engine.attach(name, VolumeOptions.from_json(rec.get("options", {})))
