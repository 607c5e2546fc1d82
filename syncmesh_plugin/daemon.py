"""The daemon: wires config, local state, etcd, the engine, the Docker socket and the HTTP server.

Start-up order matters: dockerd gives a plugin about 10 s to listen, so the plugin socket is bound
first (within a second), local state is opened next (Get/List answer from it at once), and etcd is
connected in the background; calls that need the cluster return a clear Err until it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import random
import signal
import ssl
import stat
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from . import api, chunker, driver, etcd_cluster, memory, metrics
from .auth import AutoAccess
from .autotls import ClusterPki, PkiApi
from .config import Config
from .engine import Engine, EngineContext, VolumeSync
from .etcd_cluster import EmbeddedCluster
from .etcd_embedded import EmbeddedEtcd, MemberRemoved, MemberTls
from .housekeeping import Housekeeper
from .membership import Membership, NodeIdConflict, load_identity
from .meta import EtcdStore, EtcdUnavailable, dumps
from .ops import Ops
from .pki import PkiError
from .state import LocalState
from .sync.snapshot import VolumeSnapshot, snapshot
from .transfer import PeerClient, TransferMetrics
from .volumes import VolumeManager

log = logging.getLogger(__name__)

EXIT_CONFLICT = 2
ETCD_PLAIN_WARNING = ("etcd endpoint(s) {} over plain HTTP on the network: manifests, files of at most 4 KiB and "
                      "the public PKI records travel in clear (use https:// endpoints)")
PLAIN_WARNING = ("security.tls_enabled is false: peers are not authenticated and volume data, manifests and tokens "
                 "travel in clear over plain HTTP")


def plain_etcd(endpoints: list[str]) -> list[str]:
    """The etcd endpoints reached in clear over the network (loopback is not the network)."""
    out = []
    for ep in endpoints:
        u = urlsplit(ep if "://" in ep else f"http://{ep}")
        if u.scheme != "https" and u.hostname not in ("localhost", None):
            try:
                if ipaddress.ip_address(u.hostname).is_loopback:
                    continue
            except ValueError:
                pass
            out.append(ep)
    return out


class _ChunkSource:
    def __init__(self, d: Daemon) -> None:
        self.d = d

    async def read_chunk(self, volume: str, chunk_id: str) -> bytes | None:
        data = await self.d.engine.read_chunk(volume, chunk_id)
        if data is not None:
            metrics.bytes_sent.inc(len(data))
        return data


class _HeldVolumes:
    """The engine's volumes as the rest of the daemon sees them: snapshots, and the operator's controls."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self._engine = engine

    def _volumes(self) -> dict[str, VolumeSync]:
        engine = self._engine()
        return engine.volumes if engine is not None else {}

    def snapshots(self) -> dict[str, VolumeSnapshot]:
        return {name: snapshot(vs) for name, vs in self._volumes().items()}

    def snapshot(self, name: str) -> VolumeSnapshot | None:
        vs = self._volumes().get(name)
        return snapshot(vs) if vs is not None else None

    async def resync(self, name: str, path: str | None) -> dict[str, Any]:
        return await self._volumes()[name].resync(path)

    async def resume(self, name: str, restore: bool) -> None:
        await self._volumes()[name].resume(restore=restore)


MEMBER_RESTART = "etcd-member-restart"  # the queue of embedded members restarting to load a new trust


def _pem_blocks(pem: bytes | None) -> set[bytes]:
    """The PEM blocks of a file (the CAs of trust-cas.pem), to tell a CA added from one dropped."""
    return {b"-----BEGIN" + part for part in (pem or b"").split(b"-----BEGIN")[1:]}


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.started_at = time.time()
        self.advertise = cfg.advertise_url()
        self.state: LocalState = None  # type: ignore[assignment]  # opened by start(), before anything reads it
        self.store: EtcdStore | None = None
        self.membership: Membership | None = None
        self.embedded: EmbeddedEtcd | None = None
        # An embedded etcd cluster grown with `join`: our member listens on the advertise host once other hosts
        # must reach it.
        self.etcd_cluster = EmbeddedCluster(cfg.node_id, store=lambda: self.store, embedded=lambda: self.embedded,
                                            max_members=cfg.etcd.embedded_members,
                                            host=urlsplit(self.advertise).hostname or "127.0.0.1",
                                            auth=cfg.tls_mode == "auto")
        self.etcd_endpoints: list[str] = list(cfg.etcd.endpoints)
        self.etcd_ready = asyncio.Event()
        self.etcd_ok = False
        self.etcd_error = "not connected yet"
        self.engine: Engine = None  # type: ignore[assignment]  # made by start(), before anything reads it
        self.manager: VolumeManager | None = None
        self.chunk_source = _ChunkSource(self)
        self.stop_event = asyncio.Event()
        self.exit_code = 0
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._session: aiohttp.ClientSession | None = None
        self.peer_client: PeerClient | None = None
        self.transfer_metrics = TransferMetrics()
        self._nodes_cache: tuple[float, dict[str, dict[str, Any]]] = (0.0, {})
        self._holders_cache: dict[str, tuple[float, list[str]]] = {}
        self.plugin_listening = False
        self.held = _HeldVolumes(lambda: self.engine)
        # Event bus, cluster view, per-node progress (API, status page, metrics).
        self.ops = Ops(cfg.node_id, store=lambda: self.store, membership=lambda: self.membership, volumes=self.held,
                       index=lambda: self.state, peers=lambda: self.peer_client,
                       leader=lambda: self.housekeeper.leader, peer_back=self.peer_back)
        # Tombstones, compaction, defragmentation (leader only).
        self.housekeeper = Housekeeper(cfg.node_id, cfg.housekeeping, store=lambda: self.store,
                                       membership=lambda: self.membership, volumes=self.held,
                                       index=lambda: self.state)
        # The cluster's own CA and this node's certificate (security.tls_enabled without certificate files).
        self.pki: ClusterPki | None = None
        if cfg.tls_mode == "auto":
            self.pki = ClusterPki(node=cfg.node_id, data_root=cfg.data_root, lifetime=float(cfg.security.cert_lifetime),
                                  join_token=str(cfg.join_token), trust_etcd=cfg.security.trust_etcd,
                                  require_client_cert=cfg.security.client_cert_required,
                                  hosts=[urlsplit(self.advertise).hostname or ""])
        self._http_started = False
        self._pki_logged = ""
        self._member_cas: set[bytes] = set()  # the CAs the embedded member loaded when it started
        self._member_trust_lock = asyncio.Lock()
        if self.pki is not None and cfg.embedded_etcd:
            self.pki.before_trust_report = self.load_member_trust

    # ---- start-up
    async def _bind_plugin_socket(self) -> None:
        path = self.cfg.plugin.socket
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket left by a killed daemon
        runner = web.AppRunner(driver.make_app(lambda: self.manager), handle_signals=False, access_log=None)
        await runner.setup()
        old = os.umask(0o177)  # the socket is root-only (mode 0600) from the first moment
        try:
            await web.UnixSite(runner, path).start()
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._runners.append(runner)
        self.plugin_listening = True
        log.info("plugin socket listening on %s", path)

    def _server_ssl(self) -> ssl.SSLContext | None:
        """HTTPS for the API and the peer protocol; with a CA, only clients holding a certificate it
        signed get past the handshake (mutual TLS), so a stranger cannot even reach the auth check."""
        sec = self.cfg.security
        if not sec.tls_enabled:
            return None
        if self.pki is not None:
            return self.pki.server_ctx
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(sec.tls_cert_file, sec.tls_key_file)
        if sec.tls_ca_file:
            ctx.load_verify_locations(sec.tls_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def _client_ssl(self) -> ssl.SSLContext | bool:
        """How this node talks to peers: their certificate is checked against the CA (or the system
        trust store without one), host name included, and our own certificate is presented."""
        sec = self.cfg.security
        if not sec.tls_enabled:
            return True
        if self.pki is not None:
            return self.pki.client_ctx
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=sec.tls_ca_file or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(sec.tls_cert_file, sec.tls_key_file)
        return ctx

    def http_app(self) -> web.Application:
        """The API, metrics and chunk routes, each handler given only the interface it needs."""
        cfg = self.cfg
        node = api.Node(node_id=cfg.node_id, advertise=self.advertise, started_at=self.started_at,
                        data_root=cfg.data_root, plugin_socket=cfg.plugin.socket, embedded_etcd=cfg.embedded_etcd,
                        etcd_prefix=cfg.etcd.prefix, etcd_endpoints=lambda: self.etcd_endpoints, health=self.health,
                        refresh_gauges=self.ops.refresh_gauges)
        access = control = None
        if self.pki is not None:
            p = self.pki
            admin, readonly = p.files.api_tokens()
            access = AutoAccess(admin_tokens=[admin], readonly_tokens=[readonly], revoked=lambda: p.revoked,
                                etcd_join=cfg.embedded_etcd)
            control = PkiApi(p, session=lambda: self._session, nodes=self._live_nodes)
        return api.make_app(api.ApiDeps(
            node=node, security=cfg.security, monitoring=cfg.monitoring.enabled,
            compression=cfg.sync.compression_enabled, cluster=self.ops, events=self.ops.bus, volumes=self.held,
            registry=lambda: self.manager, index=lambda: self.state, chunks=self.chunk_source,
            access=access, pki=control, etcd_cluster=self.etcd_cluster if cfg.embedded_etcd else None))

    async def _live_nodes(self) -> dict[str, dict[str, Any]]:
        if self.membership is None:
            raise EtcdUnavailable("not connected yet")
        return await self.membership.nodes()

    async def _start_http(self) -> None:
        # lingering_time: a refused oversized body is discarded for at most 2 s, then the connection closes.
        runner = web.AppRunner(self.http_app(), handle_signals=False, access_log=None, lingering_time=2.0)
        await runner.setup()
        site = web.TCPSite(runner, self.cfg.server.host, self.cfg.server.port, ssl_context=self._server_ssl(),
                           reuse_address=True)
        await site.start()
        self._runners.append(runner)
        self._http_started = True
        mode = {"auto": "HTTPS, mutual TLS with the cluster's CA", "files": "HTTPS with the configured certificates",
                "off": "PLAIN HTTP"}[self.cfg.tls_mode]
        log.info("HTTP server on %s:%d (%s; advertised as %s)", self.cfg.server.host, self.cfg.server.port, mode,
                 self.advertise)

    async def start(self) -> None:
        await self._bind_plugin_socket()
        self.state = LocalState(self.cfg.state_dir)
        os.makedirs(self.cfg.volumes_dir, mode=0o755, exist_ok=True)
        if self.cfg.tls_mode == "off":
            for _ in range(3):  # loud on purpose: one line is easy to miss in a daemon log
                log.warning("INSECURE: %s; set security.tls_enabled: true (the default)", PLAIN_WARNING)
        headers = {}
        if self.cfg.security.auth_enabled and self.cfg.security.auth_tokens:
            headers["Authorization"] = f"Bearer {self.cfg.security.auth_tokens[0]}"
        self._session = aiohttp.ClientSession(
            headers=headers, connector=aiohttp.TCPConnector(limit=64, ssl=self._client_ssl()))
        self.peer_client = PeerClient(self._session, decode_frame=chunker.decode_frame, verify=chunker.verify,
                                      metrics=self.transfer_metrics, max_chunk=chunker.CHUNK_MAX,
                                      batch_size=32, per_peer_concurrency=4)
        ctx = EngineContext(
            node_id=self.cfg.node_id, data_root=self.cfg.data_root, state=self.state,
            conflict_default=self.cfg.sync.conflict_resolution,
            keep_copies_default=self.cfg.sync.keep_conflict_copies, interval=float(self.cfg.sync.interval),
            debounce=float(self.cfg.sync.debounce), mass_delete_threshold=self.cfg.sync.mass_delete_threshold,
            mass_delete_min_files=self.cfg.sync.mass_delete_min_files,
            mass_delete_window=float(self.cfg.sync.mass_delete_window),
            max_manifest_bytes=self.cfg.sync.max_manifest_bytes,
            get_store=lambda: self.store, etcd_ready=self.etcd_ready,
            fetch=self._fetch, peers=self._peers, emit=self.ops.emit)
        self.engine = Engine(ctx)
        self.manager = VolumeManager(
            node_id=self.cfg.node_id, data_root=self.cfg.data_root, state=self.state, engine=self.engine,
            get_store=lambda: self.store if self.etcd_ready.is_set() else None,
            get_membership=lambda: self.membership, mount_timeout=float(self.cfg.sync.mount_timeout),
            connect_wait=float(self.cfg.etcd.timeout))
        self.manager.on_release = self.ops.forget_replica
        # With the cluster's own CA, a node that has no certificate yet serves HTTPS once it has joined.
        if self.pki is None or self.pki.load_local():
            await self._start_http()
        # Volumes held before a restart keep syncing locally at once; etcd catches up when it answers.
        await self.manager.resume_held()
        self._tasks.append(asyncio.create_task(self._connect_loop(), name="etcd-connect"))
        self._tasks.append(asyncio.create_task(memory.release_loop(), name="memory-release"))

    async def _connect_loop(self) -> None:
        backoff = 0.5
        while not self.stop_event.is_set():
            try:
                await self._connect()
                break
            except NodeIdConflict as exc:
                log.error("%s", exc)
                self.exit_code = EXIT_CONFLICT
                self.stop_event.set()
                return
            except PkiError as exc:
                self.etcd_error = str(exc)
                if str(exc) != self._pki_logged:  # said once; retried quietly every 3 s
                    log.error("cannot get a certificate of the cluster's CA: %s", exc)
                    self._pki_logged = str(exc)
                await asyncio.sleep(3.0)
                continue
            except (EtcdUnavailable, RuntimeError, OSError) as exc:
                self.etcd_error = str(exc)
                log.warning("etcd not reachable yet: %s (retrying in %.1fs)", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        self._tasks.append(asyncio.create_task(self._monitor_etcd(), name="etcd-monitor"))
        self._tasks.append(asyncio.create_task(self._registry_loop(), name="registry-watch"))
        self._tasks.append(asyncio.create_task(self.ops.run(), name="ops"))
        self._tasks.append(asyncio.create_task(self.housekeeper.run(), name="housekeeping"))
        if self.pki is not None:
            self._tasks.append(asyncio.create_task(self.pki.run(), name="pki"))
            if self.cfg.embedded_etcd:
                self._tasks.append(asyncio.create_task(self._follow_certificates(), name="etcd-certificates"))
        assert self.manager is not None  # made by start() before this loop
        self._tasks.append(asyncio.create_task(self.manager.placement_loop(), name="placement"))
        self._tasks.append(asyncio.create_task(self.manager.trash_loop(), name="trash"))

    def _member_tls(self) -> MemberTls | None:
        """Under the cluster's own PKI the embedded member serves and dials with this node's certificate."""
        if self.pki is None:
            return None
        return MemberTls(self.pki.files.identity, self.pki.files.trust_cas)

    async def _start_embedded(self) -> None:
        """The embedded etcd: alone, a member of the cluster this node joined (`join`), or none at all when the
        cluster had its members already (this node is then a client of theirs)."""
        cfg, root = self.cfg, self.cfg.data_root
        role = etcd_cluster.load_role(root)
        if role.get("role") == "client" and role.get("endpoints"):
            self.etcd_endpoints = [str(e) for e in role["endpoints"]]
            return
        tls = self._member_tls()
        emb = EmbeddedEtcd(root, cfg.node_id, cfg.etcd.embedded_client_port, cfg.etcd.embedded_peer_port,
                           host=self.etcd_cluster.host, tls=tls)
        if emb.has_data() and self.pki is not None and not self.pki.ready:
            # a member started before this node had a certificate (a data root of an earlier version): it runs
            # on loopback without TLS this once; from the next start on it serves with the certificate
            log.warning("embedded etcd: this node has no certificate of the cluster's CA yet; its member runs on "
                        "loopback without TLS until the next start")
            emb.tls = None
        if emb.has_data():
            try:
                await emb.start()
            except MemberRemoved:
                if not cfg.join:
                    raise
                log.warning("this node's etcd member was removed from the cluster (forget); its data is kept in %s "
                            "and the node joins %s again", emb.set_aside(), cfg.join)
        if not emb.has_data() and cfg.join:
            host = self.etcd_cluster.host
            emb.remember_ports()  # a join retried asks with the same peer URL (the member added the first time)
            plan = await self._ask_to_join(emb.peer_url_on(host), emb.client_url_on(host))
            if not plan.member:
                etcd_cluster.save_role(root, "client", plan.endpoints)
                self.etcd_endpoints = plan.endpoints
                log.warning("the etcd cluster of %s has its %d members: this node runs none and uses theirs (%s)",
                            cfg.join, cfg.etcd.embedded_members, ", ".join(plan.endpoints))
                return
            await emb.start(initial_cluster=plan.initial_cluster, existing=True, host=host, timeout=60)
            etcd_cluster.save_role(root, "member", plan.endpoints)
            role = {"role": "member", "endpoints": plan.endpoints}
            log.warning("embedded etcd joined the cluster of %s as a learner (data in %s)", cfg.join, emb.data_dir)
        elif not emb.has_data() or emb.proc is None:
            if emb.tls is not None and self.pki is not None and not self.pki.ready:
                self.pki.found_locally()  # the founder: the member serves with the cluster's certificates
            await emb.start()
        self.embedded = emb
        if self.pki is not None:  # what the member loaded (load_member_trust)
            self._member_cas = _pem_blocks(self.pki.files.read(self.pki.files.trust_cas))
        others = [str(e) for e in role.get("endpoints", []) if str(e) != emb.endpoint]
        self.etcd_endpoints = [emb.endpoint, *others]
        log.info("embedded etcd started on %s (data in %s%s)", emb.endpoint, emb.data_dir,
                 ", mutual TLS with the cluster's CA" if emb.tls is not None else "")

    async def _ask_to_join(self, peer_url: str, client_url: str) -> etcd_cluster.JoinPlan:
        """Ask `join` for a place in its embedded etcd cluster. Under the cluster's own PKI a node without a
        certificate sends a request with its join token's proof and takes the certificate and trust of the
        answer once they check out against the token (and the node asked served a certificate of that CA)."""
        assert self._session is not None
        request: dict[str, Any] = {"node": self.cfg.node_id, "peer_urls": [peer_url], "client_urls": [client_url]}
        if self.pki is None or self.pki.ready:
            return (await etcd_cluster.ask_to_join(self._session, self.cfg.join, request)).plan
        key, proof = self.pki.join_request()
        # No trust yet: the node asked is pinned to the certificate it serves, which must turn out to be of the
        # CA the join token names (checked with the answer's trust bundle in adopt).
        target = urlsplit(self.cfg.join)
        try:
            pem = await asyncio.to_thread(ssl.get_server_certificate, (target.hostname or "", target.port or 443),
                                          timeout=10)
        except OSError as exc:
            raise etcd_cluster.JoinRefused(f"cannot reach {self.cfg.join}: {exc}") from None
        der = ssl.PEM_cert_to_DER_cert(pem)
        answer = await etcd_cluster.ask_to_join(self._session, self.cfg.join, {**request, **proof},
                                                ssl=aiohttp.Fingerprint(hashlib.sha256(der).digest()))
        if "cert" not in answer.body:
            raise etcd_cluster.JoinRefused(f"{self.cfg.join} answered without a certificate for this node (a node "
                                           "with security.tls_enabled false?)")
        self.pki.adopt(answer.body, key, server_cert=der)
        if not self._http_started:
            await self._start_http()
        return answer.plan

    async def _connect(self) -> None:
        if self.cfg.embedded_etcd and self.embedded is None:
            await self._start_embedded()
        store = EtcdStore(self.cfg.etcd, self.etcd_endpoints, tls_files=self._etcd_tls_files())
        store.request_hook = metrics.etcd_hook
        store.failover_hook = metrics.etcd_failover_hook
        await store.connect()
        if self.cfg.embedded_etcd:
            # the endpoints follow the cluster's members (remembered for a restart), our own member first
            role = "member" if self.embedded is not None else "client"
            own = self.embedded.endpoint if self.embedded is not None else ""
            store.follow_members(self.cfg.node_id, own, lambda urls: etcd_cluster.save_role(
                self.cfg.data_root, role, [u for u in urls if u != own]))
        if self.pki is not None:
            try:
                await self.pki.bootstrap(store)
            except BaseException:
                await store.close()
                raise
            if not self._http_started:
                await self._start_http()
        if self.embedded is not None and self.embedded.tls is not None:
            try:
                await store.enable_cert_auth(self.cfg.node_id)  # once, by the founder; harmless after
            except BaseException:
                await store.close()
                raise
        membership = Membership(store, self.cfg.node_id, load_identity(self.cfg.state_dir), self.advertise,
                                self.cfg.etcd.lease_ttl)
        try:
            await membership.register()
        except BaseException:
            await membership.close()
            await store.close()
            raise
        self.store, self.membership = store, membership
        assert self.manager is not None
        manager = self.manager
        membership.on_lease_lost = lambda: asyncio.ensure_future(manager.republish_mounts())
        self.etcd_ready.set()
        await self.manager.sync_registry()
        self.etcd_ok, self.etcd_error = True, ""  # healthy once the registry copy is current
        metrics.etcd_up.set(1)
        await self.manager.resume_held()
        await self.manager.republish_mounts()
        log.info("connected to etcd %s as node %s", ", ".join(self.etcd_endpoints), self.cfg.node_id)
        if self.embedded is not None:
            self._tasks.append(asyncio.create_task(self.etcd_cluster.promote_self(), name="etcd-promote"))
        clear = self._etcd_in_clear()
        if clear:
            log.warning("%s", ETCD_PLAIN_WARNING.format(", ".join(clear)))

    def _etcd_tls_files(self) -> tuple[str, str, str] | None:
        """An embedded cluster under the cluster's own PKI: etcd is dialled with this node's certificate."""
        if not self.cfg.embedded_etcd or self.pki is None or not self.pki.ready:
            return None
        if not any(e.startswith("https://") for e in self.etcd_endpoints):
            return None
        files = self.pki.files
        return files.trust_cas, files.identity, files.identity

    async def _follow_certificates(self) -> None:
        """A renewal or a CA rotation changed this node's certificate or trust: the etcd client dials with the
        new ones, and the member loads a CA it does not trust yet (load_member_trust; during a rotation the
        PKI calls it before it reports the new trust, so this loop only catches what came another way)."""
        assert self.pki is not None
        files = self.pki.files
        seen = (files.read(files.identity), files.read(files.trust_cas))
        while True:
            await asyncio.sleep(5.0)
            now = (files.read(files.identity), files.read(files.trust_cas))
            if now == seen:
                continue
            seen = now
            if self.store is not None and self.store.tls_files is not None:
                self.store.reload_tls()
            await self.load_member_trust()

    async def load_member_trust(self) -> None:
        """Restart the embedded member if the cluster trusts a CA the member did not load when it started (it
        reads its trusted CAs only then); a CA dropped is dropped at its next start."""
        assert self.pki is not None
        async with self._member_trust_lock:
            emb = self.embedded
            cas = _pem_blocks(self.pki.files.read(self.pki.files.trust_cas))
            if emb is None or emb.tls is None or emb.proc is None or not cas - self._member_cas:
                return
            await self._restart_member_in_turn(emb)
            self._member_cas = cas

    async def _restart_member_in_turn(self, emb: EmbeddedEtcd) -> None:
        """Restart our member once the members ahead of it have: members queue under their lease (the oldest
        registration goes first, a dead node's leaves with its lease), so a cluster of three never loses its
        quorum to a change of trust, and each restart waits until the member serves again."""
        m, store, me = self.membership, self.store, self.cfg.node_id
        key = store.keys.election_key(MEMBER_RESTART, me) if store is not None else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        bound = False
        while m is not None and store is not None and key is not None:
            try:
                if not bound:
                    await m.bind(key, dumps({"at": time.time()}))
                    bound = True
                queue = await store.election(MEMBER_RESTART)
                others_up = all(e["healthy"] for e in store.endpoint_health()["endpoints"]
                                if e["endpoint"] != emb.endpoint)
                if (not queue or queue[0].node == me) and others_up:
                    break
            except EtcdUnavailable:
                pass  # etcd busy with another member's restart: ask again, never go ahead unasked
            if loop.time() > deadline:
                log.warning("embedded etcd: still waiting for the other members after 120 s; restarting ours now")
                break
            await asyncio.sleep(0.5)
        try:
            log.info("embedded etcd: the cluster trusts a new CA; restarting the member to load it")
            await emb.stop()
            await emb.start(existing=True)
            for _ in range(150):  # up to 30 s for the member to serve again (it catches up first)
                if await emb.healthy():
                    break
                await asyncio.sleep(0.2)
        finally:
            if m is not None and key is not None and bound:
                for _ in range(20):  # the next member waits for this: keep trying while etcd settles
                    try:
                        await m.unbind(key)
                        break
                    except EtcdUnavailable:
                        await asyncio.sleep(0.5)

    async def _monitor_etcd(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            assert self.store is not None
            try:
                await self.store.ping()
                if not self.etcd_ok:
                    log.info("etcd reachable again")
                self.etcd_ok, self.etcd_error = True, ""
                self.etcd_ready.set()
            except EtcdUnavailable as exc:
                if self.etcd_ok:
                    log.warning("etcd unreachable: %s", exc)
                self.etcd_ok, self.etcd_error = False, str(exc)
            metrics.etcd_up.set(1 if self.etcd_ok else 0)

    async def _registry_loop(self) -> None:
        assert self.manager is not None
        while True:
            try:
                await self.manager.watch_registry()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("volume registry watch interrupted: %s; resuming", exc)
                await asyncio.sleep(1.0)

    # ---- peers
    async def _nodes(self) -> dict[str, dict[str, Any]]:
        at, nodes = self._nodes_cache
        if time.monotonic() - at > 2.0 and self.membership is not None:
            with contextlib.suppress(EtcdUnavailable):
                nodes = await self.membership.nodes()
                self._nodes_cache = (time.monotonic(), nodes)
                metrics.nodes_in_cluster.set(len(nodes))
        return nodes

    async def _peers(self, volume: str, origin: str, spread: bool = False) -> list[str]:
        """Peer base URLs for a volume's chunks: the origin first, then every other holder.

        With `spread` (big files), up to three other holders in random order come before the origin,
        so the origin's upload does not grow with the number of nodes (peers serve what they have)."""
        nodes = await self._nodes()
        at, holders = self._holders_cache.get(volume, (0.0, []))
        if time.monotonic() - at > 2.0 and self.store is not None:
            with contextlib.suppress(EtcdUnavailable):
                holders = await self.store.holders(volume)
                self._holders_cache[volume] = (time.monotonic(), holders)
        others = [h for h in holders if h != origin]
        if spread:
            random.shuffle(others)
            order = [*others[:3], origin, *others[3:]]
        else:
            order = [origin, *others]
        urls = []
        for n in order:
            if n == self.cfg.node_id or n not in nodes:
                continue
            url = nodes[n].get("advertise")
            # With TLS on, never send our token to a plain-http address planted in etcd.
            schemes = ("https://",) if self.cfg.security.tls_enabled else ("http://", "https://")
            if isinstance(url, str) and url.startswith(schemes):
                urls.append(url)
        return urls

    def peer_back(self, advertise: str) -> None:
        """A peer joined or restarted: ask it at once for the chunks deferred changes wait for."""
        if self.peer_client is not None and advertise:
            self.peer_client.forget_failures(advertise)
        self.engine.retry_deferred_now()

    async def _fetch(self, volume: str, ids: list[str], peers: list[str]) -> dict[str, bytes]:
        assert self.peer_client is not None
        tm = self.transfer_metrics
        before, corrupt = tm.bytes_received, tm.corrupt
        got = await self.peer_client.fetch(volume, ids, peers, compress=self.cfg.sync.compression_enabled)
        metrics.bytes_received.inc(tm.bytes_received - before)
        metrics.corrupt_chunks.inc(tm.corrupt - corrupt)
        return got

    # ---- health
    def _etcd_members(self) -> dict[str, Any]:
        """The endpoint this node talks to, and what its probes say of every member (no request made)."""
        if self.store is None:
            return {"endpoint": "", "members": []}
        view = self.store.endpoint_health()
        members = [{k: e[k] for k in ("endpoint", "member", "healthy", "leader", "current", "rtt_ms", "error")}
                   for e in view["endpoints"]]
        # a member down while the others answer: requests go on (ok), the member is named here
        down = {m["endpoint"]: m["error"] or "not probed yet" for m in members if not m["healthy"]}
        return {"endpoint": view["current"], "failovers": view["failovers"], "members": members, "degraded": down}

    def _etcd_in_clear(self) -> list[str]:
        if self.cfg.etcd.tls_ca_file or self.cfg.etcd.tls_cert_file or (self.store and self.store.tls_files):
            return []  # TLS to etcd whatever the endpoints' scheme (meta.EtcdStore._tls_material)
        return plain_etcd(self.etcd_endpoints)

    def health(self) -> dict[str, dict[str, Any]]:
        comps: dict[str, dict[str, Any]] = {
            "plugin_socket": {"ok": self.plugin_listening and os.path.exists(self.cfg.plugin.socket),
                              "path": self.cfg.plugin.socket},
            "etcd": {"ok": self.etcd_ok and not self.housekeeper.alarms, "endpoints": self.etcd_endpoints,
                     "error": self.etcd_error or ("alarm: " + ", ".join(self.housekeeper.alarms)
                                                  if self.housekeeper.alarms else ""),
                     "alarms": self.housekeeper.alarms, **self._etcd_members()},
        }
        vols = self.held.snapshots()
        degraded = {n: s.watcher_reason for n, s in vols.items() if s.watcher_degraded}
        comps["watchers"] = {"ok": True, "degraded": degraded}  # degraded watchers fall back to rescans
        paused = {n: s.paused for n, s in vols.items() if s.paused}
        comps["volumes"] = {"ok": not paused, "paused": paused}
        comps["peers"] = self.ops.peers_health()
        # Fewer live replicas than a volume's placement asks for: degraded, still serving (not a 503).
        short = {n: f"{len(r['live'])} of {r['expected']} live replica(s)" + (
            f"; offline: {', '.join(r['offline'])}" if r["offline"] else "")
            for n, r in self.ops.replicas.items() if r["degraded"]}
        comps["replicas"] = {"ok": True, "degraded": short}
        clear = self._etcd_in_clear()
        if clear:
            comps["etcd"]["warning"] = ETCD_PLAIN_WARNING.format(", ".join(clear))
        if self.pki is not None:
            comps["tls"] = self.pki.health()
        elif self.cfg.tls_mode == "files":
            comps["tls"] = {"ok": True, "mode": "files"}
        else:
            comps["tls"] = {"ok": True, "mode": "off", "warning": PLAIN_WARNING}
        return comps

    # ---- shutdown
    async def stop(self) -> None:
        t0 = time.monotonic()
        self.ops.close()  # ends open event streams, so the HTTP server can stop at once
        if self._runners:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._runners[0].cleanup(), 2.0)  # plugin socket: stop accepting
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.engine is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.engine.close(), 2.0)
        for r in self._runners[1:]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(r.cleanup(), 1.0)
        if self.membership is not None:
            await self.membership.close()
        if self.store is not None:
            await self.store.close()
        if self._session is not None:
            await self._session.close()
        if self.embedded is not None:
            await self.embedded.stop()
        if self.state is not None:
            self.state.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.cfg.plugin.socket)
        log.info("stopped in %.2fs", time.monotonic() - t0)


async def run_daemon(cfg: Config) -> int:
    d = Daemon(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, d.stop_event.set)
    try:
        await d.start()
        await d.stop_event.wait()
    finally:
        await d.stop()
    return d.exit_code

