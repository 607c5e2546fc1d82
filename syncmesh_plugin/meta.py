"""etcd access: the only module that talks to etcd, and, through keyspace.py, the only one that
builds or parses its keys. Callers get typed records (node records, holders, applied progress,
tombstones), never keys to split or values to search.

It covers the gaps of etcd3aio: endpoints must be IP literals and one member that stops answering
fails requests (etcd_client.py keeps a channel per endpoint, resolves host names and fails over within
each request's timeout), a watch from a compacted revision hangs instead of raising (the cancel is
detected and raised as `CompactedError`), and there is no mod_revision compare helper (`_cmp_mod`).
A compare-and-swap whose answer was lost is checked against the keys before anything is sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import grpc
from etcd3aio import Etcd3Client, EtcdError, prefix_range_end
from etcd3aio._protobuf import Compare, RequestOp

from .config import EtcdConfig
from .etcd_client import ATTEMPT, AnswerLost, EtcdConnection, StreamMoved
from .keyspace import Keyspace
from .manifest import ManifestError, decode

if TYPE_CHECKING:
    from etcd3aio.cluster import ClusterService
    from etcd3aio.kv import KVService
    from etcd3aio.lease import LeaseService
    from etcd3aio.maintenance import MaintenanceService
    from etcd3aio.watch import WatchService

log = logging.getLogger(__name__)

ETCD_MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
MAX_TXN_OPS = ETCD_MAX_TXN_OPS - 1  # manifests per publish: one more op rewrites the volume's head key


class EtcdUnavailable(RuntimeError):
    """etcd could not be reached or refused the request; the message says which endpoint and why."""


class ResyncRequired(RuntimeError):
    """The watch cannot deliver the history: the caller must resync from a (paged) range read."""


class CompactedError(ResyncRequired):
    """A watch asked for history etcd no longer has."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd compacted history up to revision {compact_revision}")
        self.compact_revision = compact_revision


class BacklogTooLarge(ResyncRequired):
    """etcd packed more replayed history into one watch response than we accept in one message."""


class WatchInterrupted(EtcdUnavailable):
    """The watch stream broke, or its endpoint was left for another member: the caller re-watches from
    the revision it has really applied (never from the stream's last header revision + 1, which runs
    ahead of the events delivered while history is being replayed)."""


@dataclass(frozen=True, slots=True)
class KV:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int = 0
    lease: int = 0


@dataclass(frozen=True, slots=True)
class WatchEvent:
    key: bytes
    value: bytes | None  # None: the key was deleted
    mod_revision: int


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One watch response: its events, and the revision the watcher has now seen everything up to."""

    events: list[WatchEvent]
    revision: int


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A published deletion: what housekeeping collects once every holder has applied it."""

    path: str
    mod_revision: int
    ts: float  # when the origin published it


@dataclass(frozen=True, slots=True)
class Registration:
    """One node's entry in an election; the oldest (lowest create_revision) leads."""

    node: str
    create_revision: int


def record(raw: bytes) -> dict[str, Any] | None:
    """A JSON object written by a node (node, applied, gc records); None when it is not one."""
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return rec if isinstance(rec, dict) else None


def tombstone_time(raw: bytes) -> float | None:
    """The publish time of a tombstone manifest; None for any other kind (decoded, never searched)."""
    rec = record(raw)
    if rec is None or rec.get("k") != "deleted":
        return None
    try:
        return decode(raw).ts
    except ManifestError:
        return None


def _cmp_mod(key: bytes, mod_revision: int) -> Compare:
    """mod_revision(key) == rev; rev 0 means "the key does not exist"."""
    return Compare(result=Compare.EQUAL, target=Compare.MOD, key=key, mod_revision=mod_revision)


def _op_put(key: bytes, value: bytes, lease: int = 0) -> RequestOp:
    from etcd3aio.kv import KVService

    return KVService.txn_op_put(key, value, lease=lease)


_S = TypeVar("_S")


def _connected(service: _S | None) -> _S:
    """One of etcd3aio's services: they are None until its client connects (and once it is closed)."""
    if service is None:
        raise EtcdUnavailable("etcd is not connected")
    return service


class _TLS(TypedDict, total=False):
    """etcd3aio's TLS arguments (PEM bytes)."""

    ca_cert: bytes
    cert_chain: bytes
    cert_key: bytes


def _wrap(exc: BaseException, what: str) -> EtcdUnavailable:
    if isinstance(exc, grpc.aio.AioRpcError):
        detail = f"{exc.code().name}: {exc.details()}"
    else:
        detail = str(exc) or type(exc).__name__
    return EtcdUnavailable(f"etcd {what} failed: {detail}")


class EtcdStore:
    """Typed access to the syncmesh keyspace; all etcd errors surface as EtcdUnavailable."""

    def __init__(self, cfg: EtcdConfig, endpoints: Sequence[str],
                 tls_files: tuple[str, str, str] | None = None) -> None:
        self.cfg = cfg
        # (trusted CAs, certificate, key) instead of etcd.tls_*: an embedded cluster under the cluster's own PKI
        self.tls_files = tls_files
        self.endpoints = list(endpoints)
        self.keys = Keyspace(cfg.prefix)
        self.timeout = float(cfg.timeout)
        self._conn: EtcdConnection | None = None
        self.request_hook: Callable[[str, float, bool], None] | None = None  # metrics: (op, seconds, ok)
        self.failover_hook: Callable[[str, str, str], None] | None = None  # metrics: (from, to, reason)

    # ---- keys: callers read paths and names back through these (lease-bound keys: self.keys)
    def path_of(self, volume: str, key: bytes) -> str:
        """The path of a key of the volume's files (a watch event's, a range read's)."""
        return self.keys.path_of(volume, key)

    # ---- lifecycle
    async def connect(self) -> None:
        """Open a channel per endpoint and check that etcd answers (on any of them); raise EtcdUnavailable
        otherwise. Every member's health is probed from then on."""
        conn = EtcdConnection(self.endpoints, tls=self._tls_material(), server_name=self.cfg.tls_server_name,
                              username=self.cfg.username, password=str(self.cfg.password), timeout=self.timeout)
        conn.failover_hook = self.failover_hook
        self._conn = conn
        try:
            await self.ping()
        except EtcdUnavailable as exc:
            await self.close()
            detail = str(exc).split(" failed: ", 1)[-1]
            raise EtcdUnavailable(f"etcd connect to {', '.join(self.endpoints)} failed: {detail}") from None
        conn.start_probes()

    @property
    def connection(self) -> EtcdConnection:
        if self._conn is None:
            raise EtcdUnavailable("etcd is not connected")
        return self._conn

    def set_endpoints(self, endpoints: Sequence[str]) -> None:
        """Talk to these endpoints from now on (an embedded cluster's members, as it grows and shrinks)."""
        self.endpoints = list(endpoints)
        if self._conn is not None:
            self._conn.set_endpoints(self.endpoints)

    def endpoint_health(self) -> dict[str, Any]:
        """Which endpoint this node talks to, and every endpoint's last probe (no request is made)."""
        conn = self._conn
        if conn is None:
            return {"current": "", "endpoints": [], "failovers": 0, "last_failover": {}}
        return {"current": conn.current.url, "endpoints": conn.report(), "failovers": conn.failovers,
                "last_failover": conn.last_failover}

    def _tls_material(self) -> _TLS:
        """TLS when a CA is given, an https:// endpoint is used or a client certificate is configured
        (without a CA file the system's trust store checks etcd's certificate)."""
        ca_file, cert_file, key_file = self.tls_files or (self.cfg.tls_ca_file, self.cfg.tls_cert_file,
                                                          self.cfg.tls_key_file)
        wants_tls = bool(ca_file or cert_file) or any(ep.startswith("https://") for ep in self.endpoints)
        if not wants_tls:
            return {}
        tls: _TLS = {}
        try:
            if ca_file:
                with open(ca_file, "rb") as fh:
                    tls["ca_cert"] = fh.read()
            else:
                paths = ssl.get_default_verify_paths()
                cafile = paths.cafile or paths.openssl_cafile
                with open(cafile, "rb") as fh:
                    tls["ca_cert"] = fh.read()
            if cert_file and key_file:
                with open(cert_file, "rb") as fh:
                    tls["cert_chain"] = fh.read()
                with open(key_file, "rb") as fh:
                    tls["cert_key"] = fh.read()
        except OSError as exc:
            raise EtcdUnavailable(f"cannot read etcd TLS file {exc.filename}: {exc.strerror}") from None
        return tls

    def reload_tls(self) -> None:
        """The certificate or the trusted CAs changed (a renewal, a CA rotation): new channels use them; calls
        and watches under way are moved to the new channels (watches resume from their revision)."""
        if self._conn is not None:
            self._conn.set_tls(self._tls_material())

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    @property
    def client(self) -> Etcd3Client:
        """The client of the endpoint the running request's attempt goes to (else the current one)."""
        client = ATTEMPT.get()
        if client is not None:
            return client
        if self._conn is None or self._conn.current.client is None:
            raise EtcdUnavailable("etcd is not connected")
        return self._conn.current.client

    @property
    def _kv(self) -> KVService:
        return _connected(self.client.kv)

    @property
    def _lease(self) -> LeaseService:
        return _connected(self.client.lease)

    @property
    def _watch(self) -> WatchService:
        return _connected(self.client.watch)

    @property
    def _maintenance(self) -> MaintenanceService:
        return _connected(self.client.maintenance)

    @property
    def _cluster(self) -> ClusterService:
        return _connected(self.client.cluster)

    async def _call(self, what: str, fn: Callable[[], Awaitable[Any]], *, timeout: float | None = None,
                    once: bool = False) -> Any:
        """One request, failing over between endpoints within `timeout` (etcd.timeout by default). With
        `once`, a change whose answer was lost raises AnswerLost instead of being sent again."""
        t0 = time.monotonic()
        ok = False
        try:
            res = await self.connection.call(what, fn, timeout=timeout, once=once)
            ok = True
            return res
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
            raise _wrap(exc, what) from None
        finally:
            if self.request_hook is not None:
                self.request_hook(what, time.monotonic() - t0, ok)

    async def _call_unless(self, already: str, what: str, fn: Callable[[], Awaitable[Any]]) -> bool:
        """A change that may be done already (a user that exists, a member that is gone): True when this call
        made it, False when etcd's error says `already`; other errors raise."""
        try:
            await self._call(what, fn)
        except EtcdUnavailable as exc:
            if already in str(exc):
                return False
            raise
        return True

    async def _on_member(self, url: str, what: str, fn: Callable[[], Awaitable[_S]], timeout: float) -> _S:
        """A request to the member at this endpoint only (no failover): its status, its defragmentation."""
        try:
            return await self.connection.on_member(url, fn, timeout)
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
            raise _wrap(exc, f"{what} of {url}") from None

    async def _current_values(self, keys: Sequence[bytes], deadline: float) -> list[KV | None]:
        """The keys as etcd holds them now, in one read-only transaction (one revision)."""
        from etcd3aio.kv import KVService

        ops = [KVService.txn_op_get(k) for k in keys]
        resp = await self._call("txn", lambda: self._kv.txn([], ops, timeout=self.timeout),
                                timeout=max(0.5, deadline - time.monotonic()))
        out: list[KV | None] = []
        for r in resp.responses:
            kvs = r.response_range.kvs
            out.append(KV(kvs[0].key, kvs[0].value, kvs[0].mod_revision, kvs[0].create_revision) if kvs else None)
        return out

    async def _changed_by_us(self, items: Sequence[tuple[bytes, bytes, int]], deadline: float) -> int:
        """After a lost answer: the revision at which our transaction was applied (every key holds our value,
        all written at one revision after its base), else 0."""
        current = await self._current_values([k for k, _, _ in items], deadline)
        revs = {kv.mod_revision for kv in current if kv is not None}
        if len(revs) == 1 and all(kv is not None and kv.value == v and kv.mod_revision > base
                                  for kv, (_, v, base) in zip(current, items, strict=True)):
            return revs.pop()
        return 0

    # ---- basic operations
    async def ping(self) -> None:
        # A read inside our prefix (etcd3aio's ping reads a key outside it, which a user whose role only
        # covers the prefix may not do).
        await self._call("status", lambda: self._kv.get(self.keys.ping_key(), timeout=self.timeout))

    async def get(self, key: bytes) -> KV | None:
        resp = await self._call("get", lambda: self._kv.get(key, timeout=self.timeout))
        if not resp.kvs:
            return None
        kv = resp.kvs[0]
        return KV(kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.lease)

    async def get_range(self, prefix: bytes, *, page: int = 2000,
                        revision: int = 0) -> tuple[int, AsyncIterator[list[KV]]]:
        """Read a whole prefix in pages at one revision, so memory stays bounded for huge volumes.

        Returns (revision, async iterator of pages)."""
        end = prefix_range_end(prefix)
        first = await self._call("range", lambda: self._kv.get(
            prefix, end, revision=revision, limit=page, timeout=self.timeout * 4), timeout=self.timeout * 4)
        rev = first.header.revision if revision == 0 else revision

        async def pages() -> AsyncIterator[list[KV]]:
            resp = first
            while True:
                kvs = [KV(k.key, k.value, k.mod_revision, k.create_revision, k.lease) for k in resp.kvs]
                if kvs:
                    yield kvs
                if not resp.more or not kvs:
                    return
                start = kvs[-1].key + b"\x00"

                def next_page(s: bytes = start) -> Awaitable[Any]:
                    return self._kv.get(s, end, revision=rev, limit=page, timeout=self.timeout * 4)

                resp = await self._call("range", next_page, timeout=self.timeout * 4)

        return rev, pages()

    async def get_all(self, prefix: bytes) -> tuple[int, list[KV]]:
        rev, pages = await self.get_range(prefix)
        out: list[KV] = []
        async for p in pages:
            out.extend(p)
        return rev, out

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        resp = await self._call("put", lambda: self._kv.put(key, value, lease=lease, timeout=self.timeout))
        return int(resp.header.revision)

    async def put_if_absent(self, key: bytes, value: bytes) -> tuple[bool, KV | None]:
        """Create the key unless it exists; returns (created, existing kv). A creation whose answer was
        lost is told from another node's by the value (ours carries its own creation time)."""
        deadline = time.monotonic() + self.timeout
        lost = False
        while True:
            try:
                resp = await self._call("txn", lambda: self._kv.txn(
                    [self._kv.txn_compare_create_revision(key, 0)], [self._kv.txn_op_put(key, value)],
                    [self._kv.txn_op_get(key)], timeout=self.timeout),
                    timeout=max(0.5, deadline - time.monotonic()), once=True)
            except AnswerLost:
                lost = True
                continue  # its compare (create_revision 0) keeps a second send from applying twice
            if resp.succeeded:
                return True, None
            rng = resp.responses[0].response_range
            if rng.kvs:
                k = rng.kvs[0]
                if lost and k.value == value:
                    return True, None  # the first send was applied; its answer was lost
                return False, KV(k.key, k.value, k.mod_revision, k.create_revision)
            return False, None

    async def cas_put_many(self, items: Sequence[tuple[bytes, bytes, int]],
                           mark: bytes | None = None) -> tuple[bool, int]:
        """Put every (key, value) iff each key's mod_revision still equals its base; one revision.
        `mark` is a key rewritten (unconditionally) by the same transaction when it succeeds.

        Returns (succeeded, revision). At most MAX_TXN_OPS items."""
        if len(items) + (mark is not None) > ETCD_MAX_TXN_OPS:
            raise ValueError("too many operations for one etcd transaction")
        compares = [_cmp_mod(k, base) for k, _, base in items]
        ops = [_op_put(k, v) for k, v, _ in items]
        if mark is not None:
            ops.append(_op_put(mark, b""))
        deadline = time.monotonic() + self.timeout
        lost = False
        while True:
            try:
                resp = await self._call("txn", lambda: self._kv.txn(compares, ops, timeout=self.timeout),
                                        timeout=max(0.5, deadline - time.monotonic()), once=True)
            except AnswerLost as exc:
                # It may have been applied: never send it blindly again. Our values at one revision => it was.
                log.info("etcd: the answer to a transaction of %d key(s) was lost (%s); checking the keys",
                         len(items), exc)
                lost = True
                rev = await self._changed_by_us(items, deadline)
                if rev:
                    return True, rev
                continue  # not applied (yet): send again, its compares keep it from applying twice
            if not resp.succeeded and lost:
                # The first send may have been applied after our check, making this one's compares fail.
                rev = await self._changed_by_us(items, deadline)
                if rev:
                    return True, rev
            return bool(resp.succeeded), int(resp.header.revision)

    async def delete(self, key: bytes) -> None:
        await self._call("delete", lambda: self._kv.delete(key, timeout=self.timeout))

    async def delete_prefix(self, prefix: bytes) -> int:
        resp = await self._call("delete", lambda: self._kv.delete(
            prefix, prefix_range_end(prefix), timeout=self.timeout * 4), timeout=self.timeout * 4)
        return int(resp.deleted)

    async def count_prefix(self, prefix: bytes) -> int:
        resp = await self._call("range", lambda: self._kv.get(
            prefix, prefix_range_end(prefix), count_only=True, timeout=self.timeout))
        return int(resp.count)

    async def latest_revision(self, volume: str) -> int:
        """The revision of the volume's latest published change (0 if none): how far a replica must get."""
        head = await self.get(self.keys.head_key(volume))
        if head is not None:
            return head.mod_revision
        # Nothing published yet, or only by a version without the head key: the highest mod_revision
        # under the prefix. etcd sorts the whole prefix for this, which is slow at a million keys.
        from etcd3aio import SortOrder, SortTarget

        prefix = self.keys.files_prefix(volume)
        resp = await self._call("range", lambda: self._kv.get(
            prefix, prefix_range_end(prefix), limit=1, sort_order=SortOrder.DESCEND, sort_target=SortTarget.MOD,
            keys_only=True, timeout=self.timeout * 12), timeout=self.timeout * 12)
        return int(resp.kvs[0].mod_revision) if resp.kvs else 0

    async def delete_if_unchanged(self, items: Sequence[tuple[bytes, int]], *,
                                  fence: tuple[bytes, int] | None = None) -> bool:
        """Delete keys only if each still has the given mod_revision (and, with a fence, only while
        the fence key still has that create_revision: a leader that lost its lease deletes nothing)."""
        from etcd3aio.kv import KVService

        compares = [_cmp_mod(k, rev) for k, rev in items]
        if fence is not None:
            compares.append(KVService.txn_compare_create_revision(fence[0], fence[1]))
        ops = [KVService.txn_op_delete(k) for k, _ in items]
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                resp = await self._call("txn", lambda: self._kv.txn(compares, ops, timeout=self.timeout),
                                        timeout=max(0.5, deadline - time.monotonic()), once=True)
                return bool(resp.succeeded)
            except AnswerLost:
                # Applied if every key is gone; otherwise sending again is safe (its compares guard it).
                if all(kv is None for kv in await self._current_values([k for k, _ in items], deadline)):
                    return True

    async def status(self) -> dict[str, int]:
        """Database size of the member we talk to (for defragmentation decisions and the quota)."""
        st = await self._call("status", lambda: self._maintenance.status(timeout=self.timeout))
        return {"db_size": int(st.dbSize), "db_size_in_use": int(getattr(st, "dbSizeInUse", 0) or 0),
                "revision": int(st.header.revision)}

    async def members(self) -> dict[str, Any]:
        """The etcd cluster's members and which one leads (for the cluster status API)."""
        resp = await self._call("member_list", lambda: self._cluster.member_list(timeout=self.timeout))
        leader = 0
        with contextlib.suppress(EtcdUnavailable):
            st = await self._call("status", lambda: self._maintenance.status(timeout=self.timeout))
            leader = int(st.leader)
        probes = self.endpoint_health()
        by_id = {e["member_id"]: e for e in probes["endpoints"] if e["member_id"]}
        members = []
        for m in resp.members:
            ep = by_id.get(f"{m.ID:x}")
            members.append({
                "id": f"{m.ID:x}", "name": m.name, "peer_urls": list(m.peerURLs), "client_urls": list(m.clientURLs),
                "learner": bool(m.isLearner), "leader": m.ID == leader,
                # what this node's probes of the member say (None: not one of the endpoints it was given)
                "healthy": ep["healthy"] if ep else None, "endpoint": ep["endpoint"] if ep else "",
                "current": bool(ep and ep["current"]), "rtt_ms": ep["rtt_ms"] if ep else None,
                "error": ep["error"] if ep else ""})
        return {"leader": f"{leader:x}" if leader else "", "members": members, "endpoint": probes["current"],
                "endpoints": probes["endpoints"], "failovers": probes["failovers"],
                "last_failover": probes["last_failover"]}

    async def member_add(self, peer_urls: list[str], *, learner: bool = False) -> tuple[int, list[dict[str, Any]]]:
        """Add a voting member (its peer URLs) through the member API; returns (its id, every member as
        {id, name, peer_urls, client_urls}). A member with these peer URLs already there is returned as is
        (an add whose answer was lost, or a joiner asking again)."""
        existing = await self.member_list()
        for m in existing:
            if set(m["peer_urls"]) & set(peer_urls):
                return int(m["id"], 16), existing
        try:
            resp = await self._call("member_add", lambda: self._cluster.member_add(
                peer_urls, is_learner=learner, timeout=self.timeout), once=True)
        except AnswerLost:
            for m in await self.member_list():
                if set(m["peer_urls"]) & set(peer_urls):
                    return int(m["id"], 16), await self.member_list()
            raise EtcdUnavailable("etcd member_add failed: its answer was lost and the member is not there") from None
        return int(resp.member.ID), [_member(m) for m in resp.members]

    # ---- etcd authentication by certificate (an embedded cluster under the cluster's own PKI)
    @property
    def _auth(self) -> Any:
        return _connected(self.client.auth)

    async def add_cert_user(self, name: str) -> None:
        """An etcd user for the node `name` (no password: etcd takes the name from the client certificate's
        common name) with the root role (nodes run the member API and maintenance). Already there: kept."""
        await self._call_unless("already exists", "user_add",
                                lambda: self._auth.user_add(name, no_password=True, timeout=self.timeout))
        await self._call("user_grant_role", lambda: self._auth.user_grant_role(name, "root", timeout=self.timeout))

    async def delete_cert_user(self, name: str) -> bool:
        """A forgotten node's etcd user goes: its certificate no longer opens etcd. False if there was none."""
        return await self._call_unless("not found", "user_delete",
                                       lambda: self._auth.user_delete(name, timeout=self.timeout))

    async def enable_cert_auth(self, node: str) -> None:
        """Turn etcd authentication on with the users it needs first: root (etcd requires it) and this node.
        Every step is harmless when done already (etcd ignores an enable when authentication is on)."""
        for name in ("root", node):
            await self.add_cert_user(name)
        await self._call("auth_enable", lambda: self._auth.auth_enable(timeout=self.timeout))

    async def member_list(self) -> list[dict[str, Any]]:
        resp = await self._call("member_list", lambda: self._cluster.member_list(timeout=self.timeout))
        return [_member(m) for m in resp.members]

    async def member_update(self, member_id: int, peer_urls: list[str]) -> None:
        """A member's peer URLs changed (it moves from loopback to the host's address)."""
        await self._call("member_update", lambda: self._cluster.member_update(member_id, peer_urls,
                                                                               timeout=self.timeout))

    async def member_promote(self, member_id: int) -> None:
        """A learner that has caught up becomes a voting member (etcd refuses until it has caught up)."""
        await self._call("member_promote", lambda: self._cluster.member_promote(member_id, timeout=self.timeout))

    def follow_members(self, own_name: str, own_endpoint: str = "",
                       on_change: Callable[[list[str]], None] | None = None) -> None:
        """An embedded cluster: the endpoints follow the member list (own member first, learners left out)."""
        self.connection.follow_members(own_name, own_endpoint, on_change)

    async def member_remove(self, member_id: int) -> bool:
        """Remove a member through the member API; False if it was not a member (any more)."""
        return await self._call_unless("member not found", "member_remove",
                                       lambda: self._cluster.member_remove(member_id, timeout=self.timeout))

    def endpoint_urls(self) -> list[str]:
        return self.connection.urls

    async def member_status(self, url: str) -> dict[str, int]:
        """Database size of the member at this endpoint (each member keeps its own file)."""
        st = await self._on_member(url, "status", lambda: self._maintenance.status(timeout=self.timeout),
                                   self.timeout)
        return {"db_size": int(st.dbSize), "db_size_in_use": int(getattr(st, "dbSizeInUse", 0) or 0)}

    async def defragment_member(self, url: str) -> None:
        """Defragment the member at this endpoint only (it stops answering meanwhile; the others do not)."""
        await self._on_member(url, "defragment", lambda: self._maintenance.defragment(timeout=120), 120)

    async def alarms(self) -> list[str]:
        """Active etcd alarms (NOSPACE: the database hit its quota and refuses writes)."""
        resp = await self._call("alarm", lambda: self._maintenance.alarms(timeout=self.timeout))
        names = {1: "NOSPACE", 2: "CORRUPT"}
        return [names.get(int(a.alarm), str(a.alarm)) for a in resp.alarms]

    async def compact(self, revision: int) -> None:
        await self._call("compact", lambda: self._kv.compact(revision, physical=True, timeout=30), timeout=30)

    async def current_revision(self) -> int:
        resp = await self._call("get", lambda: self._kv.get(self.keys.rev_key(), timeout=self.timeout))
        return int(resp.header.revision)

    # ---- the keyspace's records, typed
    async def node_records(self) -> dict[str, dict[str, Any]]:
        """node id -> record of every live node (nodes/, bound to each node's lease)."""
        prefix = self.keys.nodes_prefix()
        _, kvs = await self.get_all(prefix)
        out: dict[str, dict[str, Any]] = {}
        for kv in kvs:
            rec = record(kv.value)
            if rec is not None:
                out[str(rec.get("node_id", self.keys.name_under(prefix, kv.key)))] = rec
        return out

    async def create_volume(self, name: str, value: bytes) -> tuple[bool, KV | None]:
        """Register a volume unless it exists; returns (created, the existing record)."""
        return await self.put_if_absent(self.keys.volume_key(name), value)

    async def get_volume(self, name: str) -> KV | None:
        return await self.get(self.keys.volume_key(name))

    async def replace_volume(self, name: str, value: bytes, base_revision: int) -> bool:
        """A volume record changed (options changed later), iff nobody changed it since `base_revision`."""
        ok, _ = await self.cas_put_many([(self.keys.volume_key(name), value, base_revision)])
        return ok

    async def volume_records(self) -> tuple[int, list[tuple[str, KV]]]:
        """(revision, [(name, kv)]) of the whole volume registry (volumes/)."""
        rev, kvs = await self.get_all(self.keys.volumes_prefix())
        return rev, [(self.volume_name(kv.key), kv) for kv in kvs]

    def watch_volumes(self, start_revision: int) -> AsyncIterator[WatchBatch]:
        """The volume registry as it changes (the keys: volume_name)."""
        return self.watch(self.keys.volumes_prefix(), start_revision)

    def volume_name(self, key: bytes) -> str:
        return self.keys.name_under(self.keys.volumes_prefix(), key)

    async def holders(self, volume: str) -> list[str]:
        """The nodes holding a replica of the volume (holders/<volume>/<node>)."""
        prefix = self.keys.holders_prefix(volume)
        _, kvs = await self.get_all(prefix)
        return [self.keys.name_under(prefix, kv.key) for kv in kvs]

    async def mounted_on(self, volume: str) -> list[str]:
        """The nodes where the volume is mounted (mounts/<volume>/<node>), sorted."""
        prefix = self.keys.mounts_prefix(volume)
        _, kvs = await self.get_all(prefix)
        return sorted(self.keys.name_under(prefix, kv.key) for kv in kvs)

    async def holders_by_node(self) -> dict[str, list[str]]:
        """node -> the volumes it holds a replica of, sorted."""
        prefix = self.keys.holders_prefix()
        _, kvs = await self.get_all(prefix)
        out: dict[str, list[str]] = {}
        for kv in kvs:
            pair = self.keys.pair_under(prefix, kv.key)
            if pair is not None:
                out.setdefault(pair[1], []).append(pair[0])
        return {n: sorted(v) for n, v in out.items()}

    async def applied(self, volume: str) -> list[tuple[str, dict[str, Any]]]:
        """(node, record) of every holder's progress on the volume (applied/<volume>/<node>)."""
        prefix = self.keys.applied_prefix(volume)
        _, kvs = await self.get_all(prefix)
        return [(self.keys.name_under(prefix, kv.key), rec) for kv in kvs if (rec := record(kv.value)) is not None]

    async def put_replica(self, volume: str, node: str, rec: dict[str, Any]) -> None:
        """This node's durable replica record (replicas/<volume>/<node>, no lease)."""
        await self.put(self.keys.replica_key(volume, node), dumps(rec))

    async def delete_replica(self, volume: str, node: str) -> None:
        await self.delete(self.keys.replica_key(volume, node))

    async def replicas(self, volume: str) -> list[tuple[str, dict[str, Any]]]:
        """(node, record) of every replica of the volume, live or not (replicas/<volume>/<node>)."""
        prefix = self.keys.replicas_prefix(volume)
        _, kvs = await self.get_all(prefix)
        return [(self.keys.name_under(prefix, kv.key), rec) for kv in kvs if (rec := record(kv.value)) is not None]

    async def replicas_all(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(volume, node, record) of every replica record."""
        prefix = self.keys.replicas_prefix()
        _, kvs = await self.get_all(prefix)
        out = []
        for kv in kvs:
            pair = self.keys.pair_under(prefix, kv.key)
            rec = record(kv.value) if pair is not None else None
            if pair is not None and rec is not None:
                out.append((pair[0], pair[1], rec))
        return out

    async def applied_all(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(volume, node, record) of every node's progress on every volume."""
        prefix = self.keys.applied_prefix()
        _, kvs = await self.get_all(prefix)
        out = []
        for kv in kvs:
            pair = self.keys.pair_under(prefix, kv.key)
            rec = record(kv.value) if pair is not None else None
            if pair is not None and rec is not None:
                out.append((pair[0], pair[1], rec))
        return out

    async def election(self, election: str) -> list[Registration]:
        """Every live registration in an election (election/<name>/<node>, under each node's lease)."""
        prefix = self.keys.election_prefix(election)
        _, kvs = await self.get_all(prefix)
        return [Registration(self.keys.name_under(prefix, kv.key), kv.create_revision) for kv in kvs]

    async def gc_horizon(self, volume: str) -> int:
        """The revision up to which the volume's tombstones were collected (0: never)."""
        kv = await self.get(self.keys.gc_key(volume))
        return int(loads(kv.value).get("revision", 0)) if kv is not None else 0

    async def set_gc_horizon(self, volume: str, revision: int, *, at: float, by: str) -> None:
        await self.put(self.keys.gc_key(volume), dumps({"revision": revision, "at": at, "by": by}))

    async def tombstones(self, volume: str, *, page: int = 1000) -> AsyncIterator[Tombstone]:
        """The volume's tombstone manifests, read page by page at one revision."""
        _, pages = await self.get_range(self.keys.files_prefix(volume), page=page)
        async for kvs in pages:
            for kv in kvs:
                ts = tombstone_time(kv.value)
                if ts is not None:
                    yield Tombstone(self.keys.path_of(volume, kv.key), kv.mod_revision, ts)

    async def delete_files_if_unchanged(self, volume: str, items: Sequence[tuple[str, int]], *,
                                        fence: tuple[bytes, int] | None = None) -> bool:
        """Delete the volume's manifests of (path, mod_revision), all or none (see delete_if_unchanged)."""
        return await self.delete_if_unchanged([(self.keys.file_key(volume, p), r) for p, r in items], fence=fence)

    async def get_file(self, volume: str, path: str) -> KV | None:
        """The published manifest of one path, raw (manifest.decode validates it)."""
        return await self.get(self.keys.file_key(volume, path))

    async def count_files(self, volume: str) -> int:
        """How many manifests the volume has in etcd (one count-only range read)."""
        return await self.count_prefix(self.keys.files_prefix(volume))

    async def read_files(self, volume: str, *, page: int = 2000) -> tuple[int, AsyncIterator[list[KV]]]:
        """Every manifest of the volume in pages at one revision (the keys: path_of)."""
        return await self.get_range(self.keys.files_prefix(volume), page=page)

    def watch_files(self, volume: str, start_revision: int) -> AsyncIterator[WatchBatch]:
        """The volume's manifests as they change, from a revision (the keys: path_of)."""
        return self.watch(self.keys.files_prefix(volume), start_revision)

    async def publish(self, volume: str, items: Sequence[tuple[str, bytes, int]]) -> tuple[bool, int]:
        """Put manifests (path, value, base mod_revision) iff none changed since its base, rewriting the
        volume's head key in the same transaction; returns (succeeded, revision)."""
        return await self.cas_put_many([(self.keys.file_key(volume, p), v, base) for p, v, base in items],
                                       self.keys.head_key(volume))

    async def delete_volume(self, name: str) -> int:
        """Remove a volume from the cluster: its record, manifests, mounts, holders, progress, head key, in one
        transaction (all or nothing, and one request however many members the failover has to try).
        Returns the revision of the removal."""
        from etcd3aio.kv import KVService

        ops = [KVService.txn_op_delete(self.keys.volume_key(name))]
        ops += [KVService.txn_op_delete(p, range_end=prefix_range_end(p)) for p in self.keys.volume_prefixes(name)]
        ops.append(KVService.txn_op_delete(self.keys.head_key(name)))
        resp = await self._call("delete", lambda: self._kv.txn([], ops, timeout=self.timeout * 4),
                                timeout=self.timeout * 4)
        return int(resp.header.revision)

    # ---- the cluster's PKI (values are JSON; autotls.py verifies every signature, etcd is not trusted)
    async def trust_bundle(self) -> KV | None:
        return await self.get(self.keys.pki_key("ca"))

    async def create_trust_bundle(self, value: bytes) -> tuple[bool, KV | None]:
        """The first node's CA, unless another node's is already there (put-if-absent)."""
        return await self.put_if_absent(self.keys.pki_key("ca"), value)

    async def put_trust_bundle(self, value: bytes) -> None:
        await self.put(self.keys.pki_key("ca"), value)

    async def revocation_lists(self) -> KV | None:
        return await self.get(self.keys.pki_key("crl"))

    async def put_revocation_lists(self, value: bytes) -> None:
        await self.put(self.keys.pki_key("crl"), value)

    async def put_cert_request(self, node: str, value: bytes) -> None:
        await self.put(self.keys.csr_key(node), value)

    async def cert_requests(self) -> list[tuple[str, KV]]:
        """(node, kv) of every pending certificate request."""
        prefix = self.keys.csr_prefix()
        _, kvs = await self.get_all(prefix)
        return [(self.keys.name_under(prefix, kv.key), kv) for kv in kvs]

    async def delete_cert_request(self, node: str, mod_revision: int) -> None:
        """Delete a request unless the node has made a newer one meanwhile."""
        await self.delete_if_unchanged([(self.keys.csr_key(node), mod_revision)])

    async def cert_answer(self, node: str) -> KV | None:
        return await self.get(self.keys.cert_key(node))

    async def put_cert_answer(self, node: str, value: bytes) -> None:
        await self.put(self.keys.cert_key(node), value)

    async def delete_cert_answer(self, node: str) -> None:
        await self.delete(self.keys.cert_key(node))

    async def put_pki_state(self, node: str, rec: dict[str, Any]) -> None:
        await self.put(self.keys.pki_node_key(node), dumps(rec))

    async def pki_states(self) -> dict[str, dict[str, Any]]:
        """node -> its PKI state (pki/nodes/<node>)."""
        prefix = self.keys.pki_nodes_prefix()
        _, kvs = await self.get_all(prefix)
        return {self.keys.name_under(prefix, kv.key): rec for kv in kvs if (rec := record(kv.value)) is not None}

    async def delete_pki_state(self, node: str) -> None:
        await self.delete(self.keys.pki_node_key(node))

    # ---- leases
    async def grant_lease(self, ttl: int) -> int:
        resp = await self._call("lease", lambda: self._lease.grant(ttl=ttl, timeout=self.timeout))
        return int(resp.ID)

    async def keep_alive_once(self, lease_id: int) -> int:
        """One keep-alive round trip; returns the remaining TTL (<= 0: the lease is gone)."""

        async def once() -> int:
            from etcd3aio._protobuf import LeaseKeepAliveRequest

            async def req() -> AsyncIterator[Any]:
                yield LeaseKeepAliveRequest(ID=lease_id)

            stream = self._lease._stub.LeaseKeepAlive(req(), metadata=self._lease._metadata or None)
            try:
                async with asyncio.timeout(self.timeout):
                    async for resp in stream:
                        return int(resp.TTL)
            finally:
                stream.cancel()
            return 0

        return int(await self._call("keepalive", once))

    async def revoke_lease(self, lease_id: int) -> None:
        with contextlib.suppress(EtcdUnavailable):
            await self._call("lease", lambda: self._lease.revoke(lease_id, timeout=1.5), timeout=1.5)

    # ---- watch
    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[WatchBatch]:
        """Watch a prefix from a revision; raises CompactedError when that history is gone.

        The stream is on the endpoint current when it starts; when that endpoint fails (or the node moves
        to another one) WatchInterrupted is raised and the caller watches again from the revision it has
        applied, on the member it talks to then. etcd3aio's own reconnecting loop is not used: it resumes
        from the last header revision + 1, which runs ahead of the history still being replayed."""
        conn = self.connection
        it = conn.watch(prefix, prefix_range_end(prefix), start_revision)
        try:
            async for resp in it:
                if resp.compact_revision > 0:
                    raise CompactedError(int(resp.compact_revision))
                if resp.canceled:
                    raise EtcdUnavailable(f"etcd cancelled the watch on {prefix!r}: {resp.cancel_reason}")
                if resp.created and not resp.events:
                    continue  # its header revision runs ahead of the history still to be replayed
                events = [
                    WatchEvent(ev.kv.key, ev.kv.value if ev.type == 0 else None, int(ev.kv.mod_revision))
                    for ev in resp.events
                ]
                # While replaying, the header revision is the store's current one, ahead of what this
                # response carries: only the events' own revisions say how far we really are.
                rev = max(e.mod_revision for e in events) if events else int(resp.header.revision)
                yield WatchBatch(events, rev)
        except StreamMoved as exc:
            raise WatchInterrupted(f"{exc}; the watch on {prefix!r} resumes on {conn.current.url}") from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # Catching up on a long backlog: etcd sends up to 1000 revisions per response, and ours
                # are transactions of up to 128 manifests. A paged range read gets there instead.
                raise BacklogTooLarge(f"watch backlog too large for one message ({exc.details()})") from None
            raise _wrap(exc, "watch") from None
        finally:
            with contextlib.suppress(Exception):
                await it.aclose()  # type: ignore[attr-defined]


def _member(m: Any) -> dict[str, Any]:
    return {"id": f"{m.ID:x}", "name": m.name, "peer_urls": list(m.peerURLs), "client_urls": list(m.clientURLs),
            "learner": bool(m.isLearner)}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def loads(raw: bytes) -> Any:
    return json.loads(raw)
