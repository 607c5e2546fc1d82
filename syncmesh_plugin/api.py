"""The daemon's HTTP server: health, info, Prometheus metrics, volume status, and the peer chunk routes."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import __version__, chunker, metrics, transfer

if TYPE_CHECKING:
    from .daemon import Daemon


def make_app(d: Daemon) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)
    sec = d.cfg.security

    async def authorize(request: web.Request) -> None:
        if not sec.auth_enabled:
            return
        header = request.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else ""
        if not token or not any(hmac.compare_digest(token.encode(), str(t).encode()) for t in sec.auth_tokens):
            raise web.HTTPUnauthorized(text='{"error": "missing or invalid bearer token"}',
                                       content_type="application/json",
                                       headers={"WWW-Authenticate": "Bearer"})

    @web.middleware
    async def auth_mw(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/api/v1/health":
            await authorize(request)
        return await handler(request)

    app.middlewares.append(auth_mw)

    async def health(request: web.Request) -> web.Response:
        comps = d.health()
        ok = all(c["ok"] for c in comps.values())
        return web.json_response({"status": "ok" if ok else "degraded", "node": d.cfg.node_id,
                                  "components": comps}, status=200 if ok else 503)

    async def info(request: web.Request) -> web.Response:
        return web.json_response({
            "name": "syncmesh-plugin", "version": __version__, "node_id": d.cfg.node_id,
            "advertise": d.advertise, "started_at": d.started_at, "data_root": d.cfg.data_root,
            "plugin_socket": d.cfg.plugin.socket, "etcd_endpoints": d.etcd_endpoints,
            "embedded_etcd": d.cfg.embedded_etcd, "etcd_prefix": d.cfg.etcd.prefix,
        })

    async def prom(request: web.Request) -> web.Response:
        d.refresh_gauges()
        body = generate_latest(metrics.REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def volumes(request: web.Request) -> web.Response:
        vm = d.manager
        if vm is None:
            return web.json_response({"error": "starting"}, status=503)
        out = []
        for v in vm.list():
            rec = d.state.volume(v["Name"]) or {}
            out.append({"name": v["Name"], "mountpoint": v["Mountpoint"], "created_at": v["CreatedAt"],
                        **vm.status(v["Name"], rec)})
        return web.json_response({"volumes": out})

    async def volume(request: web.Request) -> web.Response:
        vm = d.manager
        name = request.match_info["name"]
        if vm is None:
            return web.json_response({"error": "starting"}, status=503)
        rec = d.state.volume(name)
        if rec is None:
            return web.json_response({"error": f"no such volume: {name}"}, status=404)
        return web.json_response({"name": name, **vm.status(name, rec)})

    if d.cfg.monitoring.enabled:
        app.router.add_get("/metrics", prom)
        app.router.add_get("/api/v1/metrics", prom)
    app.router.add_get("/api/v1/health", health)
    app.router.add_get("/api/v1/info", info)
    app.router.add_get("/api/v1/volumes", volumes)
    app.router.add_get("/api/v1/volumes/{name}", volume)
    transfer.add_routes(app, d.chunk_source, encode_frame=chunker.encode_frame,
                        compress_default=d.cfg.sync.compression_enabled)
    return app
