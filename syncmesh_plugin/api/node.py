"""This node: health, identity, Prometheus metrics, the OpenAPI document and the status page."""

from __future__ import annotations

from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__, metrics
from .. import openapi as openapi_doc
from .deps import NODE

routes = web.RouteTableDef()
metrics_routes = web.RouteTableDef()  # only with monitoring enabled


@metrics_routes.get("/api/v1/metrics")
@metrics_routes.get("/metrics")
async def prom(request: web.Request) -> web.Response:
    request.app[NODE].refresh_gauges()
    body = generate_latest(metrics.REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/api/v1/health")
async def health(request: web.Request) -> web.Response:
    node = request.app[NODE]
    comps = node.health()
    ok = all(c["ok"] for c in comps.values())
    # A volume short of the replicas its placement asks for still serves: "degraded", but not a 503.
    short = bool(comps.get("replicas", {}).get("degraded"))
    body: dict[str, Any] = {"status": "ok" if ok and not short else "degraded", "node": node.node_id,
                            "components": comps}
    warnings = [str(c["warning"]) for c in comps.values() if c.get("warning")]
    if warnings:
        body["warnings"] = warnings  # plain HTTP: healthy, and said loudly
    return web.json_response(body, status=200 if ok else 503)


@routes.get("/api/v1/info")
async def info(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return web.json_response({
        "name": "syncmesh-plugin", "version": __version__, "node_id": node.node_id,
        "advertise": node.advertise, "started_at": node.started_at, "data_root": node.data_root,
        "plugin_socket": node.plugin_socket, "etcd_endpoints": node.etcd_endpoints(),
        "embedded_etcd": node.embedded_etcd, "etcd_prefix": node.etcd_prefix,
    })


@routes.get("/")
async def status_page(request: web.Request) -> web.Response:
    html = resources.files("syncmesh_plugin").joinpath("statuspage", "index.html").read_text()
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-cache"})


@routes.get("/api/v1/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    doc = openapi_doc.load()
    doc["info"]["version"] = __version__
    return web.json_response(doc)
