"""Operations support for the daemon: event bus, cluster view, per-node progress, summaries.

One background loop (`Ops.run`, once a second once etcd answers):
- reads the live node list: `peer_up` / `peer_down` events, `syncmesh_cluster_nodes`, and shows the
  housekeeping leader elected by `housekeeping.Housekeeper`;
- publishes, for every held volume whose progress changed, `applied/<volume>/<node>` =
  {"revision", "ready", "pending", "lag_seconds", "at"} under the node's lease: the etcd revision
  this node has applied the volume up to. A node has a path's version when its applied revision is
  at least the manifest's mod_revision; a node has converged on a volume when its applied revision
  reaches the latest mod_revision under the volume's files prefix;
- keeps this node's durable replica record of every held volume, `replicas/<volume>/<node>` =
  {"applied_revision", "ready", "since", "last_seen"} with no lease: written when the progress changes
  and at least every `REPLICA_REFRESH` seconds, so a replica whose node is down stays visible (offline,
  how far behind, last seen) until it is released or its node is forgotten;
- refreshes gauges (watches, circuit breakers, pending items) and drops labels of volumes no longer held;
- every `summary_interval` seconds logs one progress line per busy volume (never one per file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from . import metrics, placement
from .events import EventBus
from .membership import Membership
from .meta import KV, EtcdStore, EtcdUnavailable, dumps
from .state import LocalState
from .sync.snapshot import HeldVolumes

log = logging.getLogger(__name__)

REPLICA_REFRESH = 30.0  # seconds between two writes of an unchanged replica record (its last_seen)
REPLICA_VIEW_EVERY = 5.0  # seconds between two reads of every replica record (health, metrics)


class PeerCircuits(Protocol):
    """The peer client's circuit breakers, per peer URL ("closed", "open", "half-open")."""

    def breaker_state(self, peer: str) -> str: ...


class Ops:
    """Dependencies are getters: etcd, the index and the peer client come up after the daemon is built."""

    def __init__(self, node: str, *, store: Callable[[], EtcdStore | None],
                 membership: Callable[[], Membership | None], volumes: HeldVolumes,
                 index: Callable[[], LocalState], peers: Callable[[], PeerCircuits | None],
                 leader: Callable[[], str], peer_back: Callable[[str], None],
                 interval: float = 1.0, summary_interval: float = 10.0) -> None:
        self.node = node
        self._store, self._membership, self._index, self._peers = store, membership, index, peers
        self.volumes = volumes
        self._leader, self._peer_back = leader, peer_back
        self.bus = EventBus(self.node)
        self.interval = interval
        self.summary_interval = summary_interval
        self.nodes: dict[str, dict[str, Any]] = {}
        self.nodes_at = 0.0
        self.leader = ""
        self._started: dict[str, Any] | None = None  # live node -> started_at (a change: it restarted)
        self._applied: dict[str, dict[str, Any]] = {}
        self._replica_at: dict[str, tuple[int, float]] = {}  # volume -> (revision, when) last written
        self.replicas: dict[str, dict[str, Any]] = {}  # volume -> live/offline replicas against its placement
        self._replicas_read = 0.0
        self._counters: dict[str, tuple[int, int]] = {}
        self._summary_at = time.monotonic()
        self._pending_labels: set[str] = set()

    # ---- events
    def emit(self, kind: str, data: dict[str, Any]) -> None:
        self.bus.publish(kind, data)

    def close(self) -> None:
        self.bus.close()

    # ---- the loop
    async def run(self) -> None:
        while True:
            with contextlib.suppress(EtcdUnavailable):
                await self.tick()
            await asyncio.sleep(self.interval)

    async def tick(self) -> None:
        self.refresh_gauges()
        self._summaries()
        await self._refresh_nodes()
        await self._publish_applied()
        if time.monotonic() - self._replicas_read >= REPLICA_VIEW_EVERY:
            await self._refresh_replicas()

    async def _refresh_nodes(self) -> None:
        m = self._membership()
        if m is None:
            return
        nodes = await m.nodes()
        self.nodes, self.nodes_at = nodes, time.time()
        metrics.nodes_in_cluster.set(len(nodes))
        self.leader = self._leader()  # elected in etcd (see housekeeping.py)
        live = set(nodes)
        if self._started is not None:
            for n in sorted(live):
                started = nodes[n].get("started_at")
                if n == self.node or (n in self._started and self._started[n] in (None, started)):
                    continue
                if n not in self._started:
                    log.info("peer %s up (%s)", n, nodes[n].get("advertise", ""), extra={"peer": n})
                    self.emit("peer_up", {"node": n, "advertise": nodes[n].get("advertise", "")})
                else:  # restarted within its lease's lifetime: never seen down
                    log.info("peer %s restarted (%s)", n, nodes[n].get("advertise", ""), extra={"peer": n})
                self._peer_back(str(nodes[n].get("advertise", "")))
            for n in sorted(set(self._started) - live):
                if n != self.node:
                    log.info("peer %s down", n, extra={"peer": n})
                    self.emit("peer_down", {"node": n})
        self._started = {n: rec.get("started_at") for n, rec in nodes.items()}

    def progress(self, name: str) -> dict[str, Any] | None:
        s = self.volumes.snapshot(name)
        if s is None:
            return None
        # The stored revision stays below any deferred change (so a restart replays it) and only moves
        # with the next watch batch; with nothing deferred the last batch seen is how far we really are.
        rev = self._index().revision(name)
        if not s.deferred:
            rev = max(rev, s.revision)
        return {"revision": rev, "ready": s.ready, "pending": s.pending, "lag_seconds": round(s.lag_seconds, 4)}

    async def _publish_applied(self) -> None:
        m = self._membership()
        if m is None:
            return
        held = set(self.volumes.snapshots())
        for name in list(self._applied):
            if name not in held:
                # Removed (the cluster deleted applied/<volume>/) or detached: stop re-binding it.
                m.forget(m.store.keys.applied_key(name, self.node))
                del self._applied[name]
        for name in sorted(held):
            rec = self.progress(name)
            if rec is None or rec == self._applied.get(name) or self._index().volume(name) is None:
                continue
            await m.bind(m.store.keys.applied_key(name, self.node), dumps({**rec, "at": round(time.time(), 3)}))
            self._applied[name] = rec
        await self._publish_replicas(held)

    async def _publish_replicas(self, held: set[str]) -> None:
        store = self._store()
        if store is None:
            return
        now = time.time()
        for name in list(self._replica_at):
            if name not in held:
                del self._replica_at[name]  # released or removed: the record went with it
        for name in sorted(held):
            rec = self.progress(name)
            if rec is None or self._index().volume(name) is None:
                continue
            last = self._replica_at.get(name)
            if last is not None and last[0] == rec["revision"] and now - last[1] < REPLICA_REFRESH:
                continue
            since = self._index().get_meta(f"held_since:{name}") or ""
            if not since:
                since = str(round(now, 3))
                self._index().set_meta(f"held_since:{name}", since)
            await store.put_replica(name, self.node, {"applied_revision": rec["revision"], "ready": rec["ready"],
                                                      "since": float(since), "last_seen": round(now, 3)})
            self._replica_at[name] = (rec["revision"], now)

    async def _refresh_replicas(self) -> None:
        """Every volume's replicas, live or offline, against what its placement asks for: the health
        check's `replicas` component and `syncmesh_volume_replicas`."""
        store = self._store()
        if store is None or self._membership() is None:
            return
        self._replicas_read = time.monotonic()
        records = await store.replicas_all()
        live = set(self.nodes)
        index = self._index()
        out: dict[str, dict[str, Any]] = {}
        for name, rec in index.volumes().items():
            spec = str(rec.get("options", {}).get("replicas", "") or "")
            nodes = sorted(n for v, n, _ in records if v == name)
            up = [n for n in nodes if n in live]
            want = placement.expected(spec, live)
            out[name] = {"replicas": spec, "expected": want, "live": up,
                         "offline": [n for n in nodes if n not in live], "degraded": len(up) < want}
        for name in set(self.replicas) - set(out):
            for st in ("live", "offline"):
                with contextlib.suppress(KeyError):
                    metrics.volume_replicas.remove(name, st)
        for name, r in out.items():
            metrics.volume_replicas.labels(name, "live").set(len(r["live"]))
            metrics.volume_replicas.labels(name, "offline").set(len(r["offline"]))
        self.replicas = out

    def forget_replica(self, name: str) -> None:
        """This node released the volume: write no more records for it."""
        self._replica_at.pop(name, None)

    def refresh_gauges(self) -> None:
        store = self._store()
        if store is not None:
            metrics.set_etcd_endpoints(store.endpoint_health()["endpoints"])
        vols = self.volumes.snapshots()
        metrics.watches.set(sum(s.watches for s in vols.values()))
        for name, s in vols.items():
            metrics.pending_items.labels(name).set(s.pending)
        for name in self._pending_labels - set(vols):
            with contextlib.suppress(KeyError):
                metrics.pending_items.remove(name)
        self._pending_labels = set(vols)
        pc = self._peers()
        if pc is not None:
            for n, rec in self.nodes.items():
                url = rec.get("advertise", "")
                if url and n != self.node:
                    metrics.peer_breaker_open.labels(n).set(1 if pc.breaker_state(url) == "open" else 0)
            for labels in list(metrics.peer_breaker_open._metrics):  # bounded: only live nodes keep a series
                if labels[0] not in self.nodes:
                    with contextlib.suppress(KeyError):
                        metrics.peer_breaker_open.remove(*labels)

    def _summaries(self) -> None:
        now = time.monotonic()
        if now - self._summary_at < self.summary_interval:
            return
        took = now - self._summary_at
        self._summary_at = now
        vols = self.volumes.snapshots()
        for name, s in vols.items():
            cur = (s.published, s.applied)
            pub0, app0 = self._counters.get(name, (0, 0))
            self._counters[name] = cur
            if cur == (pub0, app0):
                continue
            log.info("volume %s: published %d, applied %d in the last %.0fs; %d pending, revision %d", name,
                     cur[0] - pub0, cur[1] - app0, took, s.pending, self._index().revision(name),
                     extra={"volume": name, "count": cur[0] - pub0 + cur[1] - app0, "duration": round(took, 3)})
        for name in list(self._counters):
            if name not in vols:
                del self._counters[name]

    # ---- views used by the API
    def peers_health(self) -> dict[str, Any]:
        pc = self._peers()
        peers = {}
        for n, rec in sorted(self.nodes.items()):
            if n == self.node:
                continue
            url = rec.get("advertise", "")
            peers[n] = {"advertise": url, "circuit": pc.breaker_state(url) if pc and url else "closed"}
        open_ = [n for n, p in peers.items() if p["circuit"] == "open"]
        # A peer being down does not make this node unhealthy, unless it can reach none of them.
        return {"ok": not peers or len(open_) < len(peers), "peers": peers, "open": open_}

    async def live_nodes(self, max_age: float = 2.0) -> dict[str, dict[str, Any]]:
        m = self._membership()
        if m is not None and time.time() - self.nodes_at >= max_age:
            with contextlib.suppress(EtcdUnavailable):
                self.nodes, self.nodes_at = await m.nodes(), time.time()
        return self.nodes

    async def convergence(self, volume: str) -> dict[str, Any]:
        """Every holder's applied revision against the latest change of the volume (needs etcd)."""
        store = self.store()
        latest = await store.latest_revision(volume)
        holders = await store.holders(volume)
        recs = dict(await store.applied(volume))
        replicas = dict(await store.replicas(volume))
        nodes = await self.live_nodes(max_age=1.0)
        mine = self.progress(volume)
        if mine is not None:
            recs[self.node] = {**mine, "at": time.time()}
        names = set(holders) | set(recs) | set(replicas)
        out = []
        now = time.time()
        for n in sorted(names):
            rec = recs.get(n, {})
            durable = replicas.get(n, {})
            live = n in nodes
            # A live node's progress is its lease-bound record; an offline one's, its durable record.
            rev = int(rec.get("revision", 0) or 0) if rec else int(durable.get("applied_revision", 0) or 0)
            out.append({"node": n, "live": live, "applied_revision": rev,
                        "behind_revisions": max(0, latest - rev), "converged": rev >= latest,
                        "ready": bool(rec.get("ready", durable.get("ready", False))),
                        "pending": int(rec.get("pending", 0) or 0),
                        "lag_seconds": float(rec.get("lag_seconds", 0.0) or 0.0),
                        "updated_at": float(rec.get("at", 0.0) or 0.0),
                        "last_seen": round(now, 3) if live else float(durable.get("last_seen", 0.0) or 0.0),
                        "replica_since": float(durable.get("since", 0.0) or 0.0)})
        offline = [x["node"] for x in out if not x["live"]]
        return {"volume": volume, "latest_revision": latest, "nodes": out, "offline": offline,
                "converged": bool(out) and all(x["converged"] for x in out if x["live"])}

    async def applied_by_node(self) -> dict[str, dict[str, dict[str, Any]]]:
        """node -> volume -> applied record, from etcd (this node's own from memory)."""
        store = self.store()
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for volume, node, rec in await store.applied_all():
            out.setdefault(node, {})[volume] = rec
        for name in self.volumes.snapshots():
            p = self.progress(name)
            if p is not None:
                out.setdefault(self.node, {})[name] = p
        return out

    async def holders_by_node(self) -> dict[str, list[str]]:
        """node -> volumes it holds a replica of (holders/<volume>/<node>, bound to the node's lease)."""
        store = self.store()
        return await store.holders_by_node()

    async def etcd_members(self) -> dict[str, Any]:
        store = self.store()
        return await store.members()

    def connected(self) -> bool:
        """Registered in the cluster (etcd answered once): cluster views can be asked for."""
        return self._membership() is not None

    def store(self) -> EtcdStore:
        store = self._store()
        if store is None:
            raise EtcdUnavailable("etcd is not connected")
        return store

    async def latest_revision(self, volume: str) -> int:
        return await self.store().latest_revision(volume)

    async def published(self, volume: str, path: str) -> KV | None:
        """The manifest of a path as published in etcd (raw; manifest.decode validates it)."""
        return await self.store().get_file(volume, path)
