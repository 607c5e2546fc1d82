"""The cluster: its live nodes, who leads housekeeping, and how far each node has applied each volume."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..auth import ETCD_JOIN_PATH, peer_certificate
from ..meta import EtcdUnavailable
from ..pki import PkiError
from ..volopts import VolumeError
from ..volumes import ClusterUnavailable
from .common import ApiError, registry
from .deps import CLUSTER, ETCD_CLUSTER, INDEX, NODE, PKI, ClusterView

routes = web.RouteTableDef()


def _connected(request: web.Request) -> tuple[ClusterView, str]:
    """The cluster view and this node's id; 503 until this node has registered in etcd."""
    ops = request.app[CLUSTER]
    if not ops.connected():
        raise EtcdUnavailable("not connected yet")
    return ops, request.app[NODE].node_id


@routes.get("/api/v1/cluster/status")
async def cluster_status(request: web.Request) -> web.Response:
    ops, me = _connected(request)
    nodes = await ops.live_nodes(max_age=0)
    applied = await ops.applied_by_node()
    holders = await ops.holders_by_node()
    latest: dict[str, int] = {}
    for name in sorted(request.app[INDEX]().volumes()):
        latest[name] = await ops.latest_revision(name)
    health = ops.peers_health()["peers"]
    out = []
    for n, rec in sorted(nodes.items()):
        vols = applied.get(n, {})
        behind = {v: max(0, latest.get(v, 0) - int(r.get("revision", 0) or 0)) for v, r in vols.items()}
        out.append({
            "node_id": n, "advertise": rec.get("advertise", ""), "version": rec.get("version", ""),
            "self": n == me, "leader": n == ops.leader,
            "health": "ok" if health.get(n, {}).get("circuit", "closed") != "open" else "unreachable",
            "circuit": health.get(n, {}).get("circuit", "closed"), "volumes": len(holders.get(n, [])),
            "volumes_behind": sorted(v for v, b in behind.items() if b > 0),
            "lag_revisions": max(behind.values(), default=0),
            "lag_seconds": max((float(r.get("lag_seconds", 0) or 0) for r in vols.values()), default=0.0),
            "pending": sum(int(r.get("pending", 0) or 0) for r in vols.values())})
    try:
        etcd: dict[str, Any] = await ops.etcd_members()
    except EtcdUnavailable as exc:
        etcd = {"error": str(exc), "members": [], "leader": ""}
    return web.json_response({"node": me, "leader": ops.leader, "nodes": out, "etcd": etcd, "volumes": latest})


@routes.get("/api/v1/cluster/nodes")
async def cluster_nodes(request: web.Request) -> web.Response:
    ops, me = _connected(request)
    nodes = await ops.live_nodes(max_age=0)
    holders = await ops.holders_by_node()
    health = ops.peers_health()["peers"]
    out = []
    for n, rec in sorted(nodes.items()):
        out.append({"node_id": n, "advertise": rec.get("advertise", ""), "version": rec.get("version", ""),
                    "started_at": rec.get("started_at", 0), "self": n == me,
                    "leader": n == ops.leader, "circuit": health.get(n, {}).get("circuit", "closed"),
                    "volumes": holders.get(n, [])})
    return web.json_response({"nodes": out, "leader": ops.leader})


@routes.post(ETCD_JOIN_PATH)
async def etcd_join(request: web.Request) -> web.Response:
    """A node started with `join` asks for a place in this node's embedded etcd cluster: a learner member
    while the cluster has fewer than etcd.embedded_members members, else the members' client URLs."""
    etcd = request.app.get(ETCD_CLUSTER)
    if etcd is None:
        raise ApiError(409, "this node does not run an embedded etcd: give the joining node etcd.endpoints instead")
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "expected a JSON body {node, peer_urls, client_urls}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "expected a JSON body {node, peer_urls, client_urls}")
    issued: dict[str, Any] = {}
    pki = request.app.get(PKI)
    if pki is not None and peer_certificate(request) is None:
        # a host without a certificate yet: the signer checks its join token's proof before anything is granted
        node = body.get("node")
        if not isinstance(node, str):
            raise ApiError(400, "expected a JSON body {node, peer_urls, client_urls, csr, hmac}")
        try:
            issued = await pki.sign_joiner(node, body.get("csr"), body.get("hmac"))
        except PkiError as exc:
            raise ApiError(403, str(exc)) from None
    try:
        plan = await etcd.admit(body.get("node"), body.get("peer_urls"), body.get("client_urls"))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    return web.json_response({**plan, **issued})


@routes.post("/api/v1/cluster/nodes/{node}/forget")
async def forget(request: web.Request) -> web.Response:
    """A node that will not come back: its replica records are removed, so no view waits for it."""
    node = request.match_info["node"]
    try:
        out = await registry(request).forget_node(node)
    except VolumeError as exc:
        raise ApiError(409, str(exc)) from None
    except ClusterUnavailable as exc:
        raise ApiError(503, str(exc)) from None
    etcd = request.app.get(ETCD_CLUSTER)
    if etcd is not None:  # an embedded etcd cluster: the node's member goes too (its name is the node id)
        try:
            out["etcd_member"] = await etcd.forget(node)
        except (EtcdUnavailable, ValueError) as exc:
            out["etcd_member"] = {"error": str(exc)}
    pki = request.app.get(PKI)
    if pki is not None:  # with the cluster's own CA, a forgotten node can no longer connect
        try:
            out["certificates"] = await pki.revoke(node)
        except PkiError as exc:
            out["certificates"] = {"error": str(exc)}
    return web.json_response(out)
