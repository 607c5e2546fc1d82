"""Volume lifecycle as Docker sees it: create, remove, mount, unmount, get, list.

Volumes are cluster-wide (registered in etcd), while Get and List answer from the local persisted
copy of the registry, so Docker keeps working while etcd is briefly unreachable (a Get error would
make dockerd forget the volume). Mount reference counts are per mount ID and persisted, because
dockerd never replays Mount after a plugin restart.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from . import placement
from .engine import Engine
from .membership import Membership
from .meta import EtcdStore, EtcdUnavailable, ResyncRequired, WatchInterrupted, dumps, loads
from .state import LocalState
from .sync.roles import parse_role
from .volopts import VolumeError, VolumeOptions, parse_options, validate_name

log = logging.getLogger(__name__)

TRASH_RECORD = "removed.json"  # in a trashed copy: the volume's record and when it was removed


class ClusterUnavailable(RuntimeError):
    """The call needs etcd and etcd is not reachable right now."""


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class VolumeManager:
    """The Docker-facing operations, on top of the registry (etcd + local copy) and the engine.

    (Signatures below say `builtins.list`: in the class body `list` is the Docker List operation.)"""

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
        self.on_release: Callable[[str], None] = lambda name: None  # ops stops writing its replica record
        self._removed: dict[str, int] = {}  # volume -> etcd revision of its removal from this node
        self._dropping: set[str] = set()  # being removed here: no longer listed while its data goes

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
        if rec is None or name in self._dropping:
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
                created, existing = await store.create_volume(name, dumps(record))
            except EtcdUnavailable as exc:
                raise ClusterUnavailable(str(exc)) from None
            if created:
                rev = 0
                # A new volume is empty: its creator has all of it, so its first Mount never waits.
                self.state.set_meta(f"complete:{name}", "1")
                log.info("volume %s created", name, extra={"volume": name})
            else:
                # Idempotent: the cluster's record (and its options) stays as it was.
                assert existing is not None
                record, rev = loads(existing.value), existing.mod_revision
            self.state.put_volume(name, record, rev)
            await self._hold(name, record)

    async def _hold(self, name: str, record: dict[str, Any]) -> None:
        """This node keeps a replica from now on (created, mounted or placed here, or held by an operator)."""
        await self.engine.attach(name, VolumeOptions.from_json(record.get("options", {})))
        m = self.get_membership()
        if m is not None:
            with contextlib.suppress(EtcdUnavailable):
                await m.bind(m.store.keys.holder_key(name, self.node_id), dumps({"at": time.time()}))
                if not self.state.get_meta(f"held_since:{name}"):
                    # The durable record exists from the first moment (ops keeps it current from then on).
                    now = round(time.time(), 3)
                    await m.store.put_replica(name, self.node_id, {"applied_revision": self.state.revision(name),
                                                                   "ready": False, "since": now, "last_seen": now})
                    self.state.set_meta(f"held_since:{name}", str(now))

    async def _fetch_record(self, name: str) -> dict[str, Any]:
        """A volume created elsewhere a moment ago may not have reached our registry watch yet."""
        store = self.get_store()
        kv = None
        if store is not None:
            with contextlib.suppress(EtcdUnavailable):
                kv = await store.get_volume(name)
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
                for n, r in sorted(self.state.volumes().items()) if n not in self._dropping]

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
            opts = VolumeOptions.from_json(rec.get("options", {}))
            first = name not in self.engine.volumes or not self.engine.volumes[name].complete.is_set()
            await self._hold(name, rec)
            if first:
                # Bounded by dockerd's own deadline for Mount (sync.mount_timeout <= 110 s < 120 s).
                timeout = float(opts.mount_timeout or self.mount_timeout)
                if not await self.engine.wait_ready(name, timeout):
                    await self._not_ready(name, timeout, opts.mount_partial)
            total = self.state.add_mount(name, mount_id)
            await self._publish_mounts(name, total)
            return self.mountpoint(name)

    async def _not_ready(self, name: str, timeout: float, partial: bool) -> None:
        """A first Mount that timed out. A replica that was complete once (a restart, etcd away) mounts
        and catches up; one that never was fails with how far it got, unless the volume allows partial
        mounts. Either way the node keeps holding and syncing, so Docker's or Swarm's retry succeeds."""
        if self.state.get_meta(f"complete:{name}") or partial:
            log.warning("volume %s: not caught up within %.0fs of Mount; mounting (%s), sync continues", name,
                        timeout, "the replica was complete before" if not partial else "mount_partial=true",
                        extra={"volume": name})
            return
        here = self.state.volume_stats(name)["files"]
        total = ""
        store = self.get_store()
        if store is not None:
            with contextlib.suppress(EtcdUnavailable):
                total = f" of about {await store.count_files(name):,}"
        log.warning("volume %s: first copy not complete within %.0fs of Mount (%d paths here%s); Mount refused, "
                    "sync continues", name, timeout, here, total, extra={"volume": name})
        raise VolumeError(
            f"volume data: {here:,}{total} paths on this node ({self.node_id}), still syncing after {timeout:.0f}s; "
            f"retry the container or service (the copy goes on), or place replicas ahead with --opt replicas=all; "
            f"--opt mount_partial=true mounts before the copy is complete")

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
        key = m.store.keys.mount_key(name, self.node_id)
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
                    await m.bind(m.store.keys.holder_key(name, self.node_id), dumps({"at": time.time()}))

    async def remove(self, name: Any) -> None:
        name = validate_name(name)
        async with self._locks[name]:
            self._known(name)
            local = sum(self.state.mounts(name).values())
            # Mounted here: refused without waiting for etcd, naming the other nodes when etcd can say.
            store = self.get_store() if local else await self._store_soon()
            others: list[str] | None = None
            if store is not None:
                try:
                    others = [n for n in await store.mounted_on(name) if n != self.node_id]
                except EtcdUnavailable as exc:
                    if not local:
                        raise ClusterUnavailable(str(exc)) from None
            if local or others:
                raise VolumeError(self._in_use(name, local, others))
            store = self._store()
            try:
                # The registry watch may still deliver the volume's older records: they must not bring it back.
                self._removed[name] = await store.delete_volume(name)
            except EtcdUnavailable as exc:
                raise ClusterUnavailable(str(exc)) from None
            await self._drop_local(name)

    def _in_use(self, name: str, local: int, others: builtins.list[str] | None) -> str:
        """Remove's refusal: every node where the volume is mounted (removal is cluster-wide)."""
        nodes = ([f"{self.node_id} (this node, {local} mount{'s' if local != 1 else ''})"] if local else []) \
            + (others or [])
        unknown = " and maybe others (etcd unreachable)" if others is None else ""
        return (f"volume {name} is in use: mounted on node(s) {', '.join(nodes)}{unknown}; stop the containers "
                f"using it there first (docker volume rm removes a syncmesh volume on every node)")

    async def _drop_local(self, name: str) -> None:
        self._dropping.add(name)
        try:
            await self._drop_local_now(name)
        finally:
            self._dropping.discard(name)

    async def _drop_local_now(self, name: str) -> None:
        m = self.get_membership()
        if m is not None:
            m.forget(m.store.keys.holders_prefix(name))
            m.forget(m.store.keys.mounts_prefix(name))
        record = self.state.volume(name) or {}
        options = VolumeOptions.from_json(record.get("options", {}))
        trash_to = ""
        if options.versioning != "off" and name in self.state.held():
            # Removal with a way back: this node's copy waits in the trash for the retention.
            trash_to = os.path.join(self.trash_root, f"{name}.{time.time_ns():x}")
        await self.engine.detach(name, delete_data=True, trash_to=trash_to)
        if trash_to and os.path.isdir(trash_to):
            with open(os.path.join(trash_to, TRASH_RECORD), "w") as fh:
                json.dump({"name": name, "record": record, "removed_at": time.time()}, fh)
        self.state.clear_mounts(name)
        self.state.delete_volume(name)
        log.info("volume %s removed on this node%s", name, " (its copy kept in the trash: syncmesh-plugin undelete "
                 f"{name})" if trash_to else "", extra={"volume": name})

    # ---- removal with a way back (versioning on): the trash, undelete, purge
    @property
    def trash_root(self) -> str:
        return os.path.join(self.data_root, "trash")

    def _trash_entries(self) -> builtins.list[dict[str, Any]]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(os.listdir(self.trash_root)):
                d = os.path.join(self.trash_root, entry)
                try:
                    with open(os.path.join(d, TRASH_RECORD)) as fh:
                        meta = json.load(fh)
                except (OSError, ValueError):
                    continue
                files = size = 0
                for where, _dirs, names in os.walk(os.path.join(d, "_data")):
                    for n in names:
                        files += 1
                        with contextlib.suppress(OSError):
                            size += os.lstat(os.path.join(where, n)).st_size
                out.append({"name": meta.get("name", ""), "entry": entry, "removed_at": meta.get("removed_at", 0.0),
                            "options": meta.get("record", {}).get("options", {}), "files": files, "bytes": size,
                            "node": self.node_id})
        return out

    async def trash(self) -> builtins.list[dict[str, Any]]:
        """The removed volumes whose copy this node keeps, newest first."""
        return sorted(await asyncio.to_thread(self._trash_entries), key=lambda e: -e["removed_at"])

    async def purge(self, name: Any) -> dict[str, Any]:
        """Delete this node's trashed copies of a removed volume, for good."""
        name = validate_name(name)
        gone = [e["entry"] for e in await self.trash() if e["name"] == name]
        for entry in gone:
            await asyncio.to_thread(shutil.rmtree, os.path.join(self.trash_root, entry), True)
        return {"volume": name, "node": self.node_id, "purged": len(gone)}

    async def undelete(self, name: Any) -> dict[str, Any]:
        """Recreate a removed volume with its options from this node's newest trashed copy, and put the
        copy back: every file is published again, so every node holding the volume gets it."""
        name = validate_name(name)
        entries = [e for e in await self.trash() if e["name"] == name]
        if not entries:
            raise VolumeError(f"no trashed copy of volume {name} on this node ({self.node_id})")
        entry = entries[0]
        store = await self._store_soon()
        async with self._locks[name]:
            record = {"name": name, "options": entry["options"], "created_by": self.node_id,
                      "created_at": time.time(), "undeleted_from": entry["removed_at"]}
            try:
                created, _ = await store.create_volume(name, dumps(record))
            except EtcdUnavailable as exc:
                raise ClusterUnavailable(str(exc)) from None
            if not created:
                raise VolumeError(f"volume {name} exists again: remove it or undelete under another name first")
            self.state.put_volume(name, record, 0)
            self.state.set_meta(f"complete:{name}", "1")  # like a Create: the copy comes from here
            await self._hold(name, record)
            src = os.path.join(self.trash_root, entry["entry"])

            def put_back() -> int:
                data = os.path.join(src, "_data")
                moved = 0
                for n in os.listdir(data) if os.path.isdir(data) else []:
                    os.rename(os.path.join(data, n), os.path.join(self.mountpoint(name), n))
                    moved += 1
                shutil.rmtree(src, True)
                return moved

            await asyncio.to_thread(put_back)
            self.engine.volumes[name].scanner.rescan_soon()
        log.warning("volume %s undeleted from this node's trash (%d files, removed %s)", name, entry["files"],
                    _rfc3339(entry["removed_at"]), extra={"volume": name})
        return {"volume": name, "node": self.node_id, "files": entry["files"], "bytes": entry["bytes"]}

    async def trash_loop(self, interval: float = 3600.0) -> None:
        """Trashed copies older than their volume's versioning retention go."""
        while True:
            try:
                now = time.time()
                for e in await self.trash():
                    keep = float(VolumeOptions.from_json(e["options"]).versioning_retention)
                    if now - e["removed_at"] > keep:
                        await asyncio.to_thread(shutil.rmtree, os.path.join(self.trash_root, e["entry"]), True)
                        log.info("volume %s: trashed copy expired and deleted", e["name"], extra={"volume": e["name"]})
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("trash retention failed; trying again later")
            await asyncio.sleep(interval)

    # ---- replicas: held ahead of mounts, released by an operator
    async def hold(self, name: Any, role: str | None = None) -> dict[str, Any]:
        """Keep a replica of the volume on this node from now on, mounted or not (`syncmesh-plugin hold`);
        with a role, this node's replica is receive-only, send-only or send-receive whatever the
        volume's `writers` says ("default": back to what it says)."""
        name = validate_name(name)
        try:
            override = parse_role(role) if role is not None else None
        except ValueError:
            raise VolumeError(f"bad role {role!r}: expected receive-only, send-only, send-receive or default") from None
        async with self._locks[name]:
            rec = self.state.volume(name) or await self._fetch_record(name)
            was = name in self.engine.volumes
            await self._hold(name, rec)
            vs = self.engine.volumes[name]
            if role is not None:
                vs.set_role(override)
        return {"volume": name, "node": self.node_id, "held": True, "already": was, "role": vs.role.value}

    def _held(self, name: Any) -> Any:
        name = validate_name(name)
        vs = self.engine.volumes.get(name)
        if vs is None:
            raise VolumeError(f"volume {name} is not held on this node ({self.node_id})")
        return vs

    async def set_options(self, name: Any, changes: dict[str, str]) -> dict[str, Any]:
        """Options that may change after Create (versioning): validated, written to the volume's record
        by compare-and-swap, applied by every node from its registry watch."""
        name = validate_name(name)
        allowed = {"versioning", "versions_keep", "versioning_retention", "versioning_max_bytes"}
        bad = sorted(set(changes) - allowed)
        if bad or not changes:
            raise VolumeError(f"options that can change after Create: {', '.join(sorted(allowed))}"
                              + (f" (not {', '.join(bad)})" if bad else ""))
        parse_options(changes)  # each value checked alone first: a clear error names it
        store = await self._store_soon()
        async with self._locks[name]:
            for _ in range(5):
                try:
                    kv = await store.get_volume(name)
                    if kv is None:
                        raise VolumeError(f"no such volume: {name}")
                    record = loads(kv.value)
                    current = VolumeOptions.from_json(record.get("options", {}))
                    merged = {k: v for k, v in current.to_json().items() if k in allowed}
                    merged = {**{k: str(v) for k, v in merged.items()}, **changes}
                    fresh = parse_options(merged)
                    options = replace(current, versioning=fresh.versioning, versions_keep=fresh.versions_keep,
                                      versioning_retention=fresh.versioning_retention,
                                      versioning_max_bytes=fresh.versioning_max_bytes)
                    record["options"] = options.to_json()
                    if await store.replace_volume(name, dumps(record), kv.mod_revision):
                        self._apply_record(name, record)
                        log.info("volume %s: options changed: %s", name, changes, extra={"volume": name})
                        return {"volume": name, "options": record["options"]}
                except EtcdUnavailable as exc:
                    raise ClusterUnavailable(str(exc)) from None
        raise ClusterUnavailable(f"volume {name}: its record kept changing; try again")

    def _apply_record(self, name: str, record: dict[str, Any]) -> None:
        """A volume record read from etcd: the options that may change later reach the held replica."""
        vs = self.engine.volumes.get(name)
        if vs is not None:
            vs.options = VolumeOptions.from_json(record.get("options", {}))

    async def revert(self, name: Any, path: str | None = None) -> dict[str, Any]:
        """Undo a receive-only replica's local changes (all, or one path)."""
        return dict(await self._held(name).local.revert(path))

    async def restore(self, name: Any, ids: Sequence[str], to: str = "") -> dict[str, Any]:
        """Kept versions of this node written back into the volume (published like any write)."""
        try:
            return dict(await self._held(name).keeper.restore(ids, to))
        except ValueError as exc:
            raise VolumeError(str(exc)) from None

    async def override(self, name: Any) -> dict[str, Any]:
        """Publish this node's whole state of the volume over the cluster's."""
        try:
            return dict(await self._held(name).local.override())
        except ValueError as exc:
            raise VolumeError(str(exc)) from None

    async def replica_views(self, name: str) -> tuple[int, builtins.list[placement.ReplicaView]]:
        """The volume's latest revision and every replica (durable records, live progress where known)."""
        store = await self._store_soon()
        m = self.get_membership()
        try:
            latest = await store.latest_revision(name)
            records: dict[str, dict[str, Any]] = {n: dict(r) for n, r in await store.replicas(name)}
            for n, rec in await store.applied(name):
                records.setdefault(n, {})["applied_revision"] = int(rec.get("revision", 0) or 0)
            live = set(await m.nodes()) if m is not None else {self.node_id}
        except EtcdUnavailable as exc:
            raise ClusterUnavailable(str(exc)) from None
        vs = self.engine.volumes.get(name)
        if vs is not None:  # this node's own progress, as of now
            own = max(self.state.revision(name), vs.status.revision if not vs.deferred else 0)
            records.setdefault(self.node_id, {})["applied_revision"] = own
        return latest, placement.replica_views(latest, records, live, time.time())

    async def release(self, name: Any) -> dict[str, Any]:
        """Stop holding the volume here and delete this node's copy, unless that would lose the last
        complete replica, leave a placement short, or pull it from under a mount."""
        name = validate_name(name)
        async with self._locks[name]:
            rec = self._known(name)
            if name not in self.engine.volumes:
                raise VolumeError(f"volume {name} is not held on this node ({self.node_id})")
            latest, views = await self.replica_views(name)
            spec = VolumeOptions.from_json(rec.get("options", {})).replicas
            reason = placement.release_refusal(name, spec, self.node_id, latest, views,
                                               sum(self.state.mounts(name).values()))
            if reason:
                raise VolumeError(f"cannot release {name}: {reason}")
            store = self._store()
            m = self.get_membership()
            try:
                if m is not None:
                    await m.unbind(m.store.keys.holder_key(name, self.node_id))
                    await m.unbind(m.store.keys.applied_key(name, self.node_id))
                self.on_release(name)
                await store.delete_replica(name, self.node_id)
            except EtcdUnavailable as exc:
                raise ClusterUnavailable(str(exc)) from None
            await self.engine.detach(name, delete_data=True)
            self.state.set_meta(f"held_since:{name}", "")
            self.state.set_meta(f"complete:{name}", "")
            log.info("volume %s released on this node (its copy deleted; %d other replica(s))", name,
                     sum(1 for v in views if v.node != self.node_id), extra={"volume": name})
        return {"volume": name, "node": self.node_id, "released": True}

    async def place(self) -> builtins.list[str]:
        """Start holding the volumes whose placement (`replicas`) wants a replica on this node."""
        placed = {n: r for n, r in self.state.volumes().items()
                  if VolumeOptions.from_json(r.get("options", {})).replicas and n not in self.engine.volumes}
        store, m = self.get_store(), self.get_membership()
        if not placed or store is None or m is None:
            return []
        live = set(await m.nodes())
        holders: dict[str, set[str]] = defaultdict(set)
        for node, names in (await store.holders_by_node()).items():
            for n in names:
                holders[n].add(node)
        out = []
        for name, rec in sorted(placed.items()):
            spec = VolumeOptions.from_json(rec.get("options", {})).replicas
            if placement.wanted(name, spec, self.node_id, live, holders[name]):
                async with self._locks[name]:
                    if name in self.engine.volumes or self.state.volume(name) is None:
                        continue
                    await self._hold(name, rec)
                log.info("volume %s: holding a replica here (replicas=%s)", name, spec, extra={"volume": name})
                out.append(name)
        return out

    async def placement_loop(self, interval: float = 2.0) -> None:
        """Volumes placed with `replicas` are held ahead of any mount: on every node for `all`, on
        enough live nodes for a number (a node taking over when a holder is down)."""
        while True:
            try:
                await self.place()
            except (EtcdUnavailable, ClusterUnavailable):
                pass
            except asyncio.CancelledError:
                raise
            except Exception:  # placement must outlive any one failure
                log.exception("replica placement failed; trying again")
            await asyncio.sleep(interval)

    async def forget_node(self, node: Any) -> dict[str, Any]:
        """An operator says `node` will not come back: its replica records go, so no view waits for it."""
        if not isinstance(node, str) or not node or "/" in node or len(node) > 253:
            raise VolumeError("forget needs a node id")
        store = await self._store_soon()
        m = self.get_membership()
        try:
            live = set(await m.nodes()) if m is not None else set()
            if node in live:
                raise VolumeError(f"node {node} is live: stop it (or release its volumes) before forgetting it")
            gone = [v for v, n, _ in await store.replicas_all() if n == node]
            for v in gone:
                await store.delete_replica(v, node)
        except EtcdUnavailable as exc:
            raise ClusterUnavailable(str(exc)) from None
        log.warning("node %s forgotten: its replica records of %d volume(s) removed", node, len(gone))
        return {"node": node, "forgotten": True, "replicas_removed": sorted(gone)}

    # ---- registry copy
    async def sync_registry(self) -> int:
        """Replace the local copy with etcd's registry; returns the revision read."""
        store = self._store()
        before = set(self.state.volumes())
        rev, kvs = await store.volume_records()
        records: dict[str, tuple[dict[str, Any], int]] = {}
        for name, kv in kvs:
            try:
                records[validate_name(name)] = (loads(kv.value), kv.mod_revision)
            except (ValueError, VolumeError):
                log.warning("ignoring malformed volume record %r", kv.key[:200])
        # A volume created on this node while the registry was being read is not in what was read: it stays
        # (dropping it would fail the Remove or Mount that follows its Create; the watch from `rev` brings it).
        for name, rec in self.state.volumes().items():
            if name not in before and name not in records:
                records[name] = (rec, 0)
        gone = before - set(records)
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
                async for batch in store.watch_volumes(rev + 1):
                    for ev in batch.events:
                        name = store.volume_name(ev.key)
                        try:
                            validate_name(name)
                        except VolumeError:
                            continue
                        if ev.value is None:
                            async with self._locks[name]:
                                if self.state.volume(name) is not None:
                                    await self._drop_local(name)
                        elif ev.mod_revision > self._removed.get(name, 0):
                            with contextlib.suppress(ValueError):
                                record = loads(ev.value)
                                self.state.put_volume(name, record, ev.mod_revision)
                                self._apply_record(name, record)
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
