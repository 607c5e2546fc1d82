"""What the HTTP handlers depend on: narrow interfaces, handed in by the wiring (daemon.py) as one
`ApiDeps` and read by each handler through a typed application key."""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from ..auth import AutoAccess
from ..config import SecurityConfig
from ..events import EventBus
from ..meta import KV
from ..state import LocalState
from ..sync.snapshot import HeldVolumes
from ..transfer import ChunkSource


@dataclass(frozen=True)
class Node:
    """This node as /api/v1/info and /api/v1/health show it."""

    node_id: str
    advertise: str
    started_at: float
    data_root: str
    plugin_socket: str
    embedded_etcd: bool
    etcd_prefix: str
    etcd_endpoints: Callable[[], list[str]]  # embedded etcd replaces the configured ones when it starts
    health: Callable[[], dict[str, dict[str, Any]]]  # component -> {"ok": ..., details}
    refresh_gauges: Callable[[], None]


class ClusterView(Protocol):
    """The cluster as seen from this node (ops.Ops); the async calls need etcd (EtcdUnavailable)."""

    leader: str

    def connected(self) -> bool: ...

    def peers_health(self) -> dict[str, Any]: ...

    async def live_nodes(self, max_age: float = 2.0) -> dict[str, dict[str, Any]]: ...

    async def holders_by_node(self) -> dict[str, list[str]]: ...

    async def applied_by_node(self) -> dict[str, dict[str, dict[str, Any]]]: ...

    async def latest_revision(self, volume: str) -> int: ...

    async def etcd_members(self) -> dict[str, Any]: ...

    async def convergence(self, volume: str) -> dict[str, Any]: ...

    async def published(self, volume: str, path: str) -> KV | None: ...


class HeldVolumeControl(HeldVolumes, Protocol):
    """The held volumes' snapshots, and the operator's requests to one of them."""

    async def resync(self, name: str, path: str | None) -> dict[str, Any]: ...

    async def resume(self, name: str, restore: bool) -> None: ...


class VolumeRegistry(Protocol):
    """The cluster's volumes as Docker sees them (volumes.VolumeManager)."""

    def list(self) -> list[dict[str, Any]]: ...

    def status(self, name: str, rec: dict[str, Any]) -> dict[str, Any]: ...

    def mountpoint(self, name: str) -> str: ...

    async def hold(self, name: str, role: str | None = None) -> dict[str, Any]: ...

    async def revert(self, name: str, path: str | None = None) -> dict[str, Any]: ...

    async def override(self, name: str) -> dict[str, Any]: ...

    async def restore(self, name: str, ids: Sequence[str], to: str = "") -> dict[str, Any]: ...

    async def set_options(self, name: str, changes: dict[str, str]) -> dict[str, Any]: ...

    async def trash(self) -> builtins.list[dict[str, Any]]: ...

    async def undelete(self, name: str) -> dict[str, Any]: ...

    async def purge(self, name: str) -> dict[str, Any]: ...

    async def release(self, name: str) -> dict[str, Any]: ...

    async def forget_node(self, node: str) -> dict[str, Any]: ...


class PkiControl(Protocol):
    """The cluster's own PKI (autotls.PkiApi): its state, and the signer's operations, which any node
    forwards to the signer."""

    def status(self) -> dict[str, Any]: ...

    async def cluster_status(self) -> dict[str, Any]: ...

    async def revoke(self, node: str) -> dict[str, Any]: ...

    async def rotate_ca(self) -> dict[str, Any]: ...

    async def rotate_token(self) -> dict[str, Any]: ...

    async def sign_joiner(self, node: str, csr_pem: Any, hmac: Any) -> dict[str, Any]: ...


class EtcdMembership(Protocol):
    """The embedded etcd cluster (etcd_cluster.EmbeddedCluster): newcomers admitted, members forgotten."""

    async def admit(self, node: Any, peer_urls: Any, client_urls: Any) -> dict[str, Any]: ...

    async def forget(self, node: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ApiDeps:
    node: Node
    security: SecurityConfig
    monitoring: bool  # serve /metrics
    compression: bool  # default for the chunk routes
    cluster: ClusterView
    events: EventBus
    volumes: HeldVolumeControl
    registry: Callable[[], VolumeRegistry | None]  # None while the daemon starts
    index: Callable[[], LocalState]  # this node's index (opened at start-up)
    chunks: ChunkSource
    access: AutoAccess | None = None  # the cluster's own PKI: the API is locked, a cluster certificate is admin
    pki: PkiControl | None = None  # its state and operations (/api/v1/pki)
    etcd_cluster: EtcdMembership | None = None  # this node runs an embedded etcd (members join through it)


NODE = web.AppKey("node", Node)
CLUSTER = web.AppKey("cluster", ClusterView)
EVENTS = web.AppKey("events", EventBus)
VOLUMES = web.AppKey("volumes", HeldVolumeControl)
REGISTRY: web.AppKey[Callable[[], VolumeRegistry | None]] = web.AppKey("registry")
PKI = web.AppKey("pki", PkiControl)
ETCD_CLUSTER = web.AppKey("etcd_cluster", EtcdMembership)
INDEX: web.AppKey[Callable[[], LocalState]] = web.AppKey("index")
