"""The connection to an etcd cluster as users run it: several members, any one of which may be gone.

One gRPC channel per configured endpoint (etcd3aio's client given a single address), one endpoint
current: every request goes to it and moves on to the next one when it fails, within the request's own
timeout (meta.EtcdStore gives each request its timeout):

- a refused connection fails the attempt at once (gRPC UNAVAILABLE), and the next endpoint is tried;
- a silent member (packets dropped, a frozen process) is given a per-attempt deadline shorter than the
  request's (a third of it), and gRPC keepalive (a ping after 6 s of silence, 3 s to answer) ends a
  stream that hears nothing;
- etcd's own "no leader", "request timed out" and "leader changed" (UNAVAILABLE) move on as well.

A request whose answer was lost may have been applied: `call(..., once=True)` then raises AnswerLost
instead of sending it again, and the caller checks what etcd holds (meta.EtcdStore.cas_put_many reads the
keys' revisions). Host names are resolved when a channel is made, and again whenever an endpoint that
failed is tried again (a member that moved to another address is found). A probe asks every member for
its status every second (health, leader, revision, round trip), moves off a current endpoint that failed
two probes in a row, and every move interrupts the watch streams open on the endpoint being left, so
their callers resume them on the next member from the revision they applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar
from urllib.parse import urlsplit

import grpc
from etcd3aio import Etcd3Client, EtcdError
from etcd3aio._protobuf import WatchCreateRequest, WatchRequest, WatchResponse
from etcd3aio.errors import EtcdConnectionError, EtcdTransientError, EtcdUnauthenticatedError

from .cancellation import cancelled_from_outside

log = logging.getLogger(__name__)

T = TypeVar("T")

PROBE_INTERVAL = 1.0  # seconds between two status probes of every member
PROBE_TIMEOUT = 1.0
PROBE_FAILURES_TO_MOVE = 2  # a current endpoint failing this many probes in a row is left
PREFERRED_AFTER = 5  # probes in a row the first endpoint must pass before the node moves back to it
KEEPALIVE_TIME_MS = 6000  # etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time)
KEEPALIVE_TIMEOUT_MS = 3000

# The client the running attempt goes to: meta.EtcdStore's service accessors read it (set by call()).
ATTEMPT: ContextVar[Etcd3Client | None] = ContextVar("etcd_attempt", default=None)


class TLS(TypedDict, total=False):
    """etcd3aio's TLS arguments (PEM bytes)."""

    ca_cert: bytes
    cert_chain: bytes
    cert_key: bytes


class AnswerLost(Exception):
    """A request that changes etcd failed after it may have reached etcd: it may or may not have been
    applied. Raised instead of sending it again (call(..., once=True)); the caller checks."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(describe(cause))
        self.cause = cause


class StreamMoved(Exception):
    """A watch stream ended because its endpoint failed or was left: resume it on the current one."""


def _rpc_error(exc: BaseException | None) -> grpc.aio.AioRpcError | None:
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, grpc.aio.AioRpcError):
            return exc
        exc, seen = exc.__cause__, seen + 1
    return None


def describe(exc: BaseException) -> str:
    rpc = _rpc_error(exc)
    if rpc is not None:
        detail = rpc.details() or ""
        for cause in ("Connection refused", "Network is unreachable", "No route to host", "Connection reset"):
            if cause in detail:  # gRPC's "failed to connect to all addresses; last error: ..." said shortly
                return f"{rpc.code().name}: {cause.lower()}"
        return f"{rpc.code().name}: {detail}"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def failover_kind(exc: BaseException) -> str | None:
    """Why an error means "ask another member": refused, timeout, unavailable, busy; None: it does not
    (a bad request, permission denied, a compacted revision, a full database are the same on every member)."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timeout"
    rpc = _rpc_error(exc)
    if rpc is None:
        if isinstance(exc, EtcdConnectionError):
            return "unavailable"
        if isinstance(exc, EtcdTransientError):
            return "timeout"
        if isinstance(exc, OSError):
            return "unavailable"  # name resolution, a socket error before gRPC
        return None
    code, detail = rpc.code(), (rpc.details() or "").lower()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "timeout"
    if code == grpc.StatusCode.UNAVAILABLE:
        return "refused" if "refused" in detail else "unavailable"
    if code == grpc.StatusCode.CANCELLED:
        return "unavailable"  # the channel was closed under the call (a re-resolved endpoint)
    if code == grpc.StatusCode.UNKNOWN and "no status received" in detail:
        return "unavailable"  # the member went away under the call (stopped, restarted): its answer is lost
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many requests" in detail:
        return "busy"
    if "not supported for learner" in detail:
        return "learner"  # a member still catching up serves almost nothing (UNAVAILABLE or FAILED_PRECONDITION)
    # ("too many learner members in cluster" is the cluster's answer, the same on every member)
    return None


def never_sent(exc: BaseException) -> bool:
    """The request cannot have been applied (the connection was refused, a learner turned it away, or etcd
    refused a member change while the cluster is unhealthy: all before proposing it): safe to send again."""
    rpc = _rpc_error(exc)
    if rpc is None:
        return False
    detail = (rpc.details() or "").lower()
    return ((rpc.code() == grpc.StatusCode.UNAVAILABLE and ("refused" in detail or "unhealthy cluster" in detail))
            or "not supported for learner" in detail)


def split_endpoint(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an endpoint as users write it: http://host:2379, https://10.0.0.5:2379, host:2379."""
    u = urlsplit(url if "://" in url else f"http://{url}")
    if not u.hostname:
        raise ValueError(f"bad etcd endpoint {url!r}")
    return u.scheme, u.hostname, u.port or 2379


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass
class MemberHealth:
    """One probe of one endpoint: what the member said about itself, or why it did not answer."""

    ok: bool
    at: float
    rtt_ms: float = 0.0
    member_id: int = 0
    leader_id: int = 0
    raft_term: int = 0
    revision: int = 0
    db_size: int = 0
    version: str = ""
    error: str = ""


@dataclass(eq=False)
class Endpoint:
    """One configured endpoint, its channel and what is known of it."""

    url: str
    scheme: str
    host: str
    port: int
    address: str = ""  # ip:port the channel goes to (resolved)
    client: Etcd3Client | None = None
    token_at: float = 0.0  # when its auth token was obtained (0: none)
    failures: int = 0  # attempts failed since the last success
    last_error: str = ""
    failed_at: float = 0.0
    resolved_at: float = 0.0
    probe_failures: int = 0
    probe_streak: int = 0  # probes passed in a row
    health: MemberHealth | None = None
    streams: set[Any] = field(default_factory=set)  # open watch calls
    interrupted: set[Any] = field(default_factory=set)  # of those, the ones we cancelled to move them
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def probed_ok(self) -> bool | None:
        return None if self.health is None else self.health.ok


async def _attempt(client: Etcd3Client, fn: Callable[[], Awaitable[T]]) -> T:
    """One attempt of a request on this client: meta's service accessors read it from ATTEMPT."""
    token = ATTEMPT.set(client)
    try:
        return await fn()
    finally:
        ATTEMPT.reset(token)


class EtcdConnection:
    """The endpoints of one etcd cluster, failover between them, member health."""

    def __init__(self, endpoints: Sequence[str], *, tls: TLS, server_name: str = "", username: str = "",
                 password: str = "", timeout: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint")
        self.tls = tls
        self.server_name = server_name
        self.username, self.password = username, password
        self.timeout = timeout
        self.endpoints: list[Endpoint] = []
        self.set_endpoints(endpoints)
        self.current: Endpoint = self.endpoints[0]
        self.failovers = 0
        self.last_failover: dict[str, Any] = {}
        self.members: dict[int, dict[str, Any]] = {}  # member id -> name, peer/client URLs, learner (member list)
        self.failover_hook: Callable[[str, str, str], None] | None = None  # (from url, to url, reason)
        # An embedded cluster: the endpoints follow the member list (own_name's member reached on own_endpoint).
        self.follow: tuple[str, str] | None = None
        self.on_endpoints: Callable[[list[str]], None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    # ---- endpoints
    def set_endpoints(self, urls: Sequence[str]) -> None:
        """Use these endpoints from now on (the ones already known keep their channel and state)."""
        known = {ep.url: ep for ep in self.endpoints}
        fresh: list[Endpoint] = []
        for url in dict.fromkeys(urls):
            if url in known:
                fresh.append(known.pop(url))
            else:
                scheme, host, port = split_endpoint(url)
                fresh.append(Endpoint(url, scheme, host, port))
        if not fresh:
            raise ValueError("no etcd endpoint")
        self.endpoints = fresh
        for gone in known.values():
            self._drop_channel(gone)
        if getattr(self, "current", None) is not None and self.current not in fresh:
            self.current = fresh[0]

    async def on_member(self, url: str, fn: Callable[[], Awaitable[T]], timeout: float) -> T:
        """Run `fn` on this endpoint's member only (maintenance that concerns one member: its status, its
        defragmentation); no failover, the member's own error is raised."""
        ep = next((e for e in self.endpoints if e.url == url), None)
        if ep is None:
            raise ValueError(f"no etcd endpoint {url}")
        client: Etcd3Client | None = None
        try:
            async with asyncio.timeout(timeout):
                client = await self.ready(ep)
                return await _attempt(client, fn)
        except asyncio.CancelledError:
            if not self._closed_under(ep, client):
                raise
            # a defragmentation outlasts the grace of a channel closed under it (new TLS material): an error
            # for the caller to try again, not a cancellation that would end the caller's task
            raise ConnectionError(f"the channel to {url} closed under the request") from None

    def set_tls(self, tls: TLS) -> None:
        """New TLS material (a renewed certificate, a rotated CA): every channel is made again with it on its
        next use; streams on the old ones are interrupted and resume (watches from their revision)."""
        self.tls = tls
        for ep in self.endpoints:
            self._drop_channel(ep)

    @property
    def urls(self) -> list[str]:
        return [ep.url for ep in self.endpoints]

    def attempt_timeout(self, total: float) -> float:
        """The deadline of one attempt: a third of the request's, so two more members can be tried within it."""
        if len(self.endpoints) < 2:
            return total
        return max(0.5, total / 3)

    async def _resolve(self, ep: Endpoint) -> str:
        if is_ip(ep.host):
            return f"{ep.host}:{ep.port}"
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(ep.host, ep.port, family=socket.AF_INET, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise OSError(f"cannot resolve etcd endpoint {ep.url!r}: {exc}") from None
        return f"{infos[0][4][0]}:{ep.port}"

    def _make_client(self, ep: Endpoint, address: str) -> Etcd3Client:
        name = self.server_name or (ep.host if self.tls else "")
        client = Etcd3Client([address], tls_server_name=name or None, rpc_max_attempts=1,
                             watch_max_reconnect_backoff_seconds=2.0, **self.tls)
        client._manager.grpc_options[:] = [
            ("grpc.lb_policy_name", "pick_first"),
            # A silent connection under a call (a watch) is found within 9 s; idle channels send no pings
            # (etcd counts pings without a stream as abuse), the probes watch them instead.
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS), ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 0), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.enable_retries", 1),
            # gRPC's default reconnect backoff grows to 120 s: after an etcd restart we would sit idle for
            # minutes. Reconnect within a couple of seconds instead.
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
            # Watch responses replaying a backlog can be large; past this, the caller reads a range instead.
            ("grpc.max_receive_message_length", 16 * 1024 * 1024)]
        return client

    def _drop_channel(self, ep: Endpoint) -> None:
        client, ep.client, ep.token_at = ep.client, None, 0.0
        if client is not None:
            for call in list(ep.streams):
                ep.interrupted.add(call)
                call.cancel()
            with contextlib.suppress(RuntimeError):
                task = asyncio.get_running_loop().create_task(self._close_gracefully(client))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _close_gracefully(self, client: Etcd3Client) -> None:
        """Close a channel left for a new one once the requests already on it have their answers (gRPC
        cancels the ones still running when a channel closes; a request's whole time is the grace)."""
        channel = client._channel
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close(grace=self.timeout)
        await client.close()

    @staticmethod
    def _closed_under(ep: Endpoint, client: Etcd3Client | None) -> bool:
        """A CancelledError raised in a request on `client` is gRPC's, not the request's own cancellation:
        the channel was closed under it (new TLS material, a new address) and the endpoint has another."""
        return client is not None and ep.client is not client and not cancelled_from_outside()

    async def ready(self, ep: Endpoint) -> Etcd3Client:
        """The endpoint's channel, made (or made again on a new address) and authenticated."""
        async with ep.lock:
            now = time.monotonic()
            if ep.client is None or (ep.failures and not is_ip(ep.host) and now - ep.resolved_at > 1.0):
                address = await self._resolve(ep)
                ep.resolved_at = now
                if ep.client is not None and address != ep.address:
                    log.info("etcd endpoint %s now resolves to %s (was %s)", ep.url, address, ep.address)
                    self._drop_channel(ep)
                if ep.client is None:
                    client = self._make_client(ep, address)
                    await client.connect()
                    ep.client, ep.address = client, address
            client = ep.client
            assert client is not None
            if self.username and not ep.token_at:
                await self._authenticate(ep, client)
            return client

    async def _authenticate(self, ep: Endpoint, client: Etcd3Client) -> None:
        auth = client.auth
        assert auth is not None
        client.set_token(None)  # etcd rejects Authenticate itself when it carries a stale token
        resp = await auth.authenticate(self.username, self.password, timeout=self.timeout)
        client.set_token(resp.token)
        ep.token_at = time.monotonic()

    # ---- requests
    def _next(self, tried: set[int]) -> Endpoint | None:
        """The endpoint for the next attempt: the current one, else the best one not tried in this request."""
        if id(self.current) not in tried:
            return self.current
        order = self._ring(self.current)
        for ep in sorted(order, key=lambda e: e.probed_ok is False):
            if id(ep) not in tried:
                return ep
        return None

    def _ring(self, start: Endpoint) -> list[Endpoint]:
        i = self.endpoints.index(start) if start in self.endpoints else -1
        return self.endpoints[i + 1:] + self.endpoints[:max(i, 0)]

    async def call(self, what: str, fn: Callable[[], Awaitable[T]], *, timeout: float | None = None,
                   once: bool = False) -> T:
        """Run one request within `timeout` (the connection's by default), moving to another endpoint when an
        attempt fails in a way another member may not. `fn` builds the request from meta's service
        accessors, which read ATTEMPT. With `once`, an attempt that may have reached etcd is not repeated:
        AnswerLost is raised for the caller to check what etcd holds."""
        loop = asyncio.get_running_loop()
        total = self.timeout if timeout is None else timeout
        deadline = loop.time() + total
        tried: set[int] = set()
        refused: list[Endpoint] = []  # endpoints that refused the connection in this round
        last: BaseException | None = None
        started = time.monotonic()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0.005:
                raise last if last is not None else TimeoutError(f"{what}: no etcd endpoint answered")
            ep = self._next(tried)
            if ep is None:
                # Every endpoint failed once in this request. Nothing listening anywhere (every one refused, names
                # resolved again since): etcd is down, say so at once. Otherwise (an election takes about a
                # second, a silent member) go round again within the request's time.
                if last is not None and len(refused) == len(tried) and not any(
                        not is_ip(e.host) and e.resolved_at < e.failed_at for e in refused):
                    raise last
                await asyncio.sleep(min(0.2, remaining))
                tried.clear()
                refused.clear()
                continue
            tried.add(id(ep))
            per = min(self.attempt_timeout(total), remaining)
            client: Etcd3Client | None = None
            try:
                async with asyncio.timeout(per):
                    client = await self.ready(ep)
                    res = await _attempt(client, fn)
            except asyncio.CancelledError:
                if not self._closed_under(ep, client):
                    raise  # this request was cancelled (asyncio.timeout turns its own expiry into TimeoutError)
                # Try again on the endpoint's new channel.
                if once:
                    raise AnswerLost(ConnectionError(f"the channel to {ep.url} closed under the request")) from None
                tried.discard(id(ep))
                continue
            except EtcdUnauthenticatedError:
                # etcd forgets simple tokens when it restarts, and a member does not know another's tokens:
                # authenticate again once (one request for all the calls that failed together), then retry.
                if not self.username or ep.token_at > started:
                    raise
                ep.token_at = 0.0
                tried.discard(id(ep))
                started = time.monotonic()
                continue
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
                kind = failover_kind(exc)
                if kind is None:
                    raise
                last = exc
                self.failed(ep, kind, exc)
                if kind == "refused":
                    refused.append(ep)
                if once and not never_sent(exc):
                    raise AnswerLost(exc) from exc
                continue
            ep.failures = 0
            return res

    def failed(self, ep: Endpoint, kind: str, exc: BaseException | str) -> None:
        """An attempt or a stream on `ep` failed: remember why, and leave it if it is the current endpoint."""
        now = time.monotonic()
        ep.failures += 1
        ep.failed_at = now
        ep.probe_streak = 0  # moving back to it ("preferred") needs good probes after this failure
        ep.last_error = f"{kind}: {exc if isinstance(exc, str) else describe(exc)}"
        if ep is self.current and len(self.endpoints) > 1:
            if all(now - e.failed_at < 1.0 for e in self.endpoints if e is not ep):
                return  # every endpoint failed within the last second: no better one to move to (no move storm)
            self.move(kind)

    def move(self, reason: str, to: Endpoint | None = None) -> None:
        """Make the next endpoint current (healthy ones first), or `to`, and interrupt the streams on the one
        left."""
        old = self.current
        ring = self._ring(old)
        if not ring:
            return
        new = to or sorted(ring, key=lambda e: (e.probed_ok is False, e.failures > 0))[0]
        self.current = new
        self.failovers += 1
        self.last_failover = {"from": old.url, "to": new.url, "reason": reason, "at": time.time()}
        log.warning("etcd: leaving %s (%s), now talking to %s", old.url, old.last_error or reason, new.url)
        for call in list(old.streams):
            old.interrupted.add(call)
            call.cancel()
        if self.failover_hook is not None:
            self.failover_hook(old.url, new.url, reason)

    # ---- watch
    async def watch(self, key: bytes, range_end: bytes, start_revision: int) -> AsyncIterator[WatchResponse]:
        """A watch stream on the current endpoint. It never reconnects by itself: when its endpoint fails or is
        left it raises StreamMoved, and the caller watches again (on the endpoint current then) from the
        revision it has applied. etcd is asked to end the stream if its member loses the leader (hasleader)."""
        ep = self.current
        try:
            async with asyncio.timeout(self.attempt_timeout(self.timeout)):
                client = await self.ready(ep)
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
            self.failed(ep, failover_kind(exc) or "unavailable", exc)
            await asyncio.sleep(0.1)  # no busy loop when every endpoint refuses
            raise StreamMoved(f"cannot watch on {ep.url}: {describe(exc)}") from None
        svc = client.watch
        assert svc is not None
        create = WatchCreateRequest(key=key, range_end=range_end, start_revision=start_revision, progress_notify=True)

        ended = asyncio.Event()

        async def requests() -> AsyncIterator[WatchRequest]:
            yield WatchRequest(create_request=create)
            # The stream stays open until it ends. Not a bare Future: gRPC does not cancel the task reading
            # this generator when the call ended by itself (a broken stream), which would then wait forever.
            await ended.wait()

        metadata = (*svc._metadata, ("hasleader", "true"))
        call = svc._stub.Watch(requests(), metadata=metadata)
        ep.streams.add(call)
        try:
            async for resp in call:
                ep.failures = 0
                yield resp
            raise StreamMoved(f"etcd {ep.url} ended the watch stream")
        except asyncio.CancelledError:
            if call in ep.interrupted and not cancelled_from_outside():
                raise StreamMoved(f"the watch left {ep.url} ({ep.last_error or 'endpoint changed'})") from None
            raise
        except grpc.aio.AioRpcError as exc:
            kind = failover_kind(exc)
            if kind is None:
                raise
            if call not in ep.interrupted:
                self.failed(ep, kind, exc)
            raise StreamMoved(f"the watch on {ep.url} broke: {describe(exc)}") from None
        finally:
            ep.streams.discard(call)
            ep.interrupted.discard(call)
            call.cancel()
            ended.set()

    # ---- probes
    def start_probes(self) -> None:
        if self._probe_task is None:
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop(), name="etcd-probe")

    async def _probe_loop(self) -> None:
        rounds = 0
        while not self._closed:
            await asyncio.gather(*(self.probe(ep) for ep in list(self.endpoints)), return_exceptions=True)
            if rounds % 5 == 0 or any(ep.health and ep.health.ok and ep.health.member_id not in self.members
                                      for ep in self.endpoints):
                with contextlib.suppress(Exception):
                    await self.refresh_members()
            rounds += 1
            cur = self.current
            if cur.probe_failures == 1:
                # the member this node talks to did not answer: ask again at once rather than a second later
                await asyncio.sleep(0.2)
                await self.probe(cur)
            first = self.endpoints[0]
            if (cur.probe_failures >= PROBE_FAILURES_TO_MOVE and len(self.endpoints) > 1
                    and any(ep.probed_ok for ep in self.endpoints if ep is not cur)):
                cur.last_error = (cur.health.error if cur.health else "") or "failed its probes"
                self.move("probe")
            elif cur is not first and first.probe_streak >= PREFERRED_AFTER:
                # the member this node was given first is back (and stayed up): talk to it again
                self.move("preferred", to=first)
            await asyncio.sleep(PROBE_INTERVAL)

    async def probe(self, ep: Endpoint) -> MemberHealth:
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                if ep.probe_failures and not is_ip(ep.host):
                    ep.failures = max(ep.failures, 1)  # resolve the name again (ready() does when failing)
                client = await self.ready(ep)
                svc = client.maintenance
                assert svc is not None
                st = await svc.status(timeout=PROBE_TIMEOUT)
            rtt = (time.monotonic() - t0) * 1000
            errors = [str(e) for e in st.errors]
            ok = bool(st.leader)
            h = MemberHealth(ok=ok, at=time.time(), rtt_ms=round(rtt, 2), member_id=int(st.header.member_id),
                             leader_id=int(st.leader), raft_term=int(st.raftTerm), revision=int(st.header.revision),
                             db_size=int(st.dbSize), version=st.version,
                             error="" if ok else "no leader" + (f" ({'; '.join(errors)})" if errors else ""))
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError, AssertionError) as exc:
            h = MemberHealth(ok=False, at=time.time(), error=describe(exc) if not isinstance(exc, TimeoutError)
                             else f"no answer within {PROBE_TIMEOUT:.0f}s")
        member = self.members.get(h.member_id)
        if h.ok and member is not None and member["learner"]:
            h.ok, h.error = False, "learner: not a voting member yet (catching up)"
        ep.health = h
        if h.ok:
            ep.probe_failures = 0
            ep.probe_streak += 1
            if ep is not self.current:
                ep.failures = 0
        else:
            ep.probe_failures += 1
            ep.probe_streak = 0
        return h

    async def refresh_members(self) -> dict[int, dict[str, Any]]:
        """The cluster's member list (names, peer and client URLs, learners), asked of any endpoint."""

        async def ask() -> Any:
            client = ATTEMPT.get()
            assert client is not None and client.cluster is not None
            return await client.cluster.member_list(timeout=self.timeout)

        resp = await self.call("member_list", ask, timeout=min(self.timeout, 3.0))
        self.members = {int(m.ID): {"name": m.name, "peer_urls": list(m.peerURLs), "client_urls": list(m.clientURLs),
                                    "learner": bool(m.isLearner)} for m in resp.members}
        if self.follow is not None:
            self._follow_members()
        return self.members

    def follow_members(self, own_name: str, own_endpoint: str = "",
                       on_change: Callable[[list[str]], None] | None = None) -> None:
        self.follow = (own_name, own_endpoint)
        self.on_endpoints = on_change

    def _follow_members(self) -> None:
        assert self.follow is not None
        own_name, own_endpoint = self.follow
        urls = [own_endpoint] if own_endpoint else []
        for m in sorted(self.members.values(), key=lambda m: str(m["name"])):
            if m["name"] and m["name"] != own_name and not m["learner"]:
                urls += [u for u in m["client_urls"] if u not in urls]
        if own_endpoint and not any(m["name"] == own_name for m in self.members.values()):
            urls.remove(own_endpoint)  # our member was removed (forget): it serves nothing any more
        if urls and urls != self.urls:
            log.info("etcd: endpoints now %s (the cluster's members)", ", ".join(urls))
            self.set_endpoints(urls)
            if self.on_endpoints is not None:
                self.on_endpoints(urls)

    def report(self) -> list[dict[str, Any]]:
        """Every endpoint: the member behind it, whether it answers, whether this node talks to it."""
        out = []
        for ep in self.endpoints:
            h = ep.health
            member = self.members.get(h.member_id, {}) if h and h.member_id else {}
            if not member:  # not answering: the member list still says whose endpoint it is
                member = next((m for m in self.members.values() if ep.url in m["client_urls"]), {})
            out.append({
                "endpoint": ep.url, "address": ep.address, "current": ep is self.current,
                "healthy": bool(h and h.ok), "member": member.get("name", ""),
                "member_id": f"{h.member_id:x}" if h and h.member_id else "",
                "leader": bool(h and h.ok and h.member_id == h.leader_id),
                "raft_term": h.raft_term if h else 0, "revision": h.revision if h else 0,
                "db_size": h.db_size if h else 0, "version": h.version if h else "",
                "rtt_ms": h.rtt_ms if h else 0.0, "probed_at": h.at if h else 0.0,
                "error": (h.error if h else "") or (ep.last_error if ep.failures else "") or "",
            })
        return out

    async def close(self) -> None:
        self._closed = True
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._probe_task
            self._probe_task = None
        for ep in self.endpoints:
            client, ep.client = ep.client, None
            for call in list(ep.streams):
                call.cancel()
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
