"""The daemon's HTTP server: health, info, Prometheus metrics, volume status, and the peer chunk routes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import __version__, auth, chunker, metrics, transfer

if TYPE_CHECKING:
    from .daemon import Daemon


def make_app(d: Daemon) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)
    sec = d.cfg.security
    app.middlewares.append(auth.make_middleware(
        enabled=sec.auth_enabled, admin_tokens=sec.auth_tokens, readonly_tokens=sec.auth_readonly_tokens,
        health_open=sec.health_open, max_body=1024 * 1024))

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

    async def resume(request: web.Request) -> web.Response:
        """Operator decision for a volume paused by the mass-damage guard."""
        name = request.match_info["name"]
        mode = request.query.get("mode", "accept")
        if mode not in ("accept", "restore"):
            return web.json_response({"error": "mode must be accept or restore"}, status=400)
        vs = d.engine.volumes.get(name) if d.engine else None
        if vs is None:
            return web.json_response({"error": f"volume {name} is not held on this node"}, status=404)
        was = vs.paused
        await vs.resume(restore=mode == "restore")
        return web.json_response({"volume": name, "mode": mode, "was_paused": was})

    if d.cfg.monitoring.enabled:
        app.router.add_get("/metrics", prom)
        app.router.add_get("/api/v1/metrics", prom)
    app.router.add_get("/api/v1/health", health)
    app.router.add_get("/api/v1/info", info)
    from . import opsapi  # the operations API (kept in its own module)

    opsapi.add_routes(app, d)  # status page, OpenAPI, cluster, sync, volumes, files, events
    app.router.add_post("/api/v1/volumes/{name}/resume", resume)
    transfer.add_routes(app, d.chunk_source, encode_frame=chunker.encode_frame,
                        compress_default=d.cfg.sync.compression_enabled)
    return app
