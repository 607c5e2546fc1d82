"""The node's HTTP server: the operations REST API (/api/v1/...), metrics, the status page and the
peers' chunk routes.

One module per resource (node, cluster, volumes, files, events), each a `web.RouteTableDef` of
module-level handlers that reach what they need through the typed application keys of deps.py.
Everything answers JSON; errors are {"error": message, "status"} with the right status (404 unknown
volume or path, 400 bad parameters, 409 volume not held here, 503 etcd needed but unreachable).
Listings are paged with an opaque cursor. The OpenAPI document (openapi.json beside the package) is
the reference; tests/unit/test_api_openapi.py keeps it and the routes in agreement.
"""

from __future__ import annotations

from aiohttp import web

from .. import auth, chunker, transfer
from . import cluster, events, files, node, pki, volumes
from .common import errors
from .deps import CLUSTER, ETCD_CLUSTER, EVENTS, INDEX, NODE, PKI, REGISTRY, VOLUMES, ApiDeps, Node

__all__ = ["ApiDeps", "Node", "make_app"]

MAX_BODY = 1024 * 1024


def make_app(deps: ApiDeps) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    sec = deps.security
    app.middlewares.append(auth.make_middleware(
        enabled=sec.auth_enabled, admin_tokens=sec.auth_tokens, readonly_tokens=sec.auth_readonly_tokens,
        health_open=sec.health_open, max_body=MAX_BODY, auto=deps.access))
    app.middlewares.append(errors)
    app[NODE] = deps.node
    app[CLUSTER] = deps.cluster
    app[EVENTS] = deps.events
    app[VOLUMES] = deps.volumes
    app[REGISTRY] = deps.registry
    app[INDEX] = deps.index
    if deps.pki is not None:
        app[PKI] = deps.pki
    if deps.etcd_cluster is not None:
        app[ETCD_CLUSTER] = deps.etcd_cluster
    if deps.monitoring:
        app.add_routes(node.metrics_routes)
    for module in (node, cluster, volumes, files, events, pki):
        app.add_routes(module.routes)
    transfer.add_routes(app, deps.chunks, encode_frame=chunker.encode_frame, compress_default=deps.compression)
    return app
