"""The operations REST API (/api/v1/...), the event stream, the OpenAPI document and the status page.

Everything answers JSON; errors are {"error": message} with the right status (404 unknown volume or
path, 400 bad parameters, 409 volume not held here, 503 etcd needed but unreachable). Listings are
paged with an opaque cursor. The OpenAPI document (openapi.json next to this module) is the
reference; tests/unit/test_api_openapi.py keeps it and the routes in agreement.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import __version__, localfs
from . import openapi as openapi_doc
from .engine import _differs as vs_differs
from .manifest import ManifestError, decode
from .meta import EtcdUnavailable
from .pathsafe import PathError, validate_relpath
from .state import FileRecord
from .volopts import VolumeError, validate_name

if TYPE_CHECKING:
    from .daemon import Daemon

MAX_LIMIT = 1000
DIGEST_MAX_LIMIT = 5000


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


def _paging(request: web.Request, default: int = 100, maximum: int = MAX_LIMIT) -> tuple[int, str]:
    raw = request.query.get("limit", str(default))
    try:
        limit = int(raw)
    except ValueError:
        raise ApiError(400, f"limit must be an integer between 1 and {maximum}, got {raw!r}") from None
    if not 1 <= limit <= maximum:
        raise ApiError(400, f"limit must be between 1 and {maximum}, got {limit}")
    cursor = request.query.get("cursor", "")
    after = ""
    if cursor:
        try:
            after = base64.urlsafe_b64decode(cursor.encode() + b"=" * (-len(cursor) % 4)).decode("utf-8")
            if not after:
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "cursor is not one this API returned") from None
    return limit, after


def _cursor(path: str) -> str:
    return base64.urlsafe_b64encode(path.encode("utf-8", "surrogateescape")).decode().rstrip("=")


def _record_json(r: FileRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"path": r.path, "kind": r.kind, "size": r.size, "mode": f"{r.mode:o}", "uid": r.uid,
                           "gid": r.gid, "mtime_ns": r.mtime_ns, "revision": r.rev, "origin": r.origin,
                           "published": r.published}
    if r.kind == "file":
        out["digest"] = r.digest
        out["chunks"] = len(r.chunks or [])
    elif r.kind == "symlink":
        out["target"] = r.target
    return out


def add_routes(app: web.Application, d: Daemon) -> None:
    ops = d.ops

    @web.middleware
    async def errors_mw(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return error(exc.status, exc.message)
        except EtcdUnavailable as exc:
            return error(503, f"etcd is needed for this request and is unreachable: {exc}")
        except web.HTTPException as exc:
            if exc.status >= 400 and request.path.startswith("/api/") and exc.content_type != "application/json":
                return error(exc.status, exc.reason)
            raise

    app.middlewares.append(errors_mw)

    def manager() -> Any:
        if d.manager is None:
            raise ApiError(503, "the daemon is starting")
        return d.manager

    def known(name: str) -> dict[str, Any]:
        try:
            validate_name(name)
        except VolumeError as exc:
            raise ApiError(400, str(exc)) from None
        rec = d.state.volume(name)
        if rec is None:
            raise ApiError(404, f"no such volume: {name}")
        return rec

    def held(name: str) -> Any:
        known(name)
        vs = d.engine.volumes.get(name) if d.engine else None
        if vs is None:
            raise ApiError(409, f"volume {name} is not held on this node ({d.cfg.node_id}); ask a node that holds it")
        return vs

    def relpath(raw: str) -> str:
        try:
            return validate_relpath(raw)
        except PathError as exc:
            raise ApiError(400, f"bad path: {exc}") from None

    # ---- cluster
    async def cluster_nodes(request: web.Request) -> web.Response:
        if d.membership is None:
            raise EtcdUnavailable("not connected yet")
        nodes = await ops.live_nodes(max_age=0)
        holders = await ops.holders_by_node()
        health = ops.peers_health()["peers"]
        out = []
        for n, rec in sorted(nodes.items()):
            vols = holders.get(n, [])
            out.append({"node_id": n, "advertise": rec.get("advertise", ""), "version": rec.get("version", ""),
                        "started_at": rec.get("started_at", 0), "self": n == d.cfg.node_id,
                        "leader": n == ops.leader, "circuit": health.get(n, {}).get("circuit", "closed"),
                        "volumes": vols})
        return web.json_response({"nodes": out, "leader": ops.leader})

    async def cluster_status(request: web.Request) -> web.Response:
        if d.membership is None or d.store is None:
            raise EtcdUnavailable("not connected yet")
        nodes = await ops.live_nodes(max_age=0)
        applied = await ops.applied_by_node()
        holders = await ops.holders_by_node()
        latest: dict[str, int] = {}
        for name in sorted(d.state.volumes()):
            latest[name] = await d.store.latest_revision(name)
        health = ops.peers_health()["peers"]
        out = []
        for n, rec in sorted(nodes.items()):
            vols = applied.get(n, {})
            behind = {v: max(0, latest.get(v, 0) - int(r.get("revision", 0) or 0)) for v, r in vols.items()}
            out.append({
                "node_id": n, "advertise": rec.get("advertise", ""), "version": rec.get("version", ""),
                "self": n == d.cfg.node_id, "leader": n == ops.leader,
                "health": "ok" if health.get(n, {}).get("circuit", "closed") != "open" else "unreachable",
                "circuit": health.get(n, {}).get("circuit", "closed"), "volumes": len(holders.get(n, [])),
                "volumes_behind": sorted(v for v, b in behind.items() if b > 0),
                "lag_revisions": max(behind.values(), default=0),
                "lag_seconds": max((float(r.get("lag_seconds", 0) or 0) for r in vols.values()), default=0.0),
                "pending": sum(int(r.get("pending", 0) or 0) for r in vols.values())})
        try:
            etcd = await ops.etcd_members()
        except EtcdUnavailable as exc:
            etcd = {"error": str(exc), "members": [], "leader": ""}
        return web.json_response({"node": d.cfg.node_id, "leader": ops.leader, "nodes": out, "etcd": etcd,
                                  "volumes": latest})

    # ---- sync status of this node
    async def sync_status(request: web.Request) -> web.Response:
        vols = []
        for name, vs in sorted((d.engine.volumes if d.engine else {}).items()):
            s = vs.describe_status()
            vols.append({"volume": name, "ready": s["ready"], "files": s["files"], "bytes": s["bytes"],
                         "pending": s["pending"] + len(vs.deferred), "conflicts": len(d.state.conflicts(name)),
                         "lag_seconds": s["lag_seconds"], "revision": s["revision"], "published": s["published"],
                         "applied": s["applied"], "last_error": s["last_error"]})
        return web.json_response({"node": d.cfg.node_id, "volumes": vols})

    # ---- volumes
    async def volumes(request: web.Request) -> web.Response:
        vm = manager()
        out = []
        for v in vm.list():
            rec = d.state.volume(v["Name"]) or {}
            out.append({"name": v["Name"], "mountpoint": v["Mountpoint"], "created_at": v["CreatedAt"],
                        **vm.status(v["Name"], rec)})
        return web.json_response({"volumes": out})

    async def volume(request: web.Request) -> web.Response:
        vm = manager()
        name = request.match_info["name"]
        rec = known(name)
        body = {"name": name, "mountpoint": vm.mountpoint(name), **vm.status(name, rec)}
        try:
            body["convergence"] = await ops.convergence(name)
        except EtcdUnavailable as exc:
            body["convergence"] = {"error": str(exc)}
        return web.json_response(body)

    async def files(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        held(name)
        limit, after = _paging(request)
        prefix = request.query.get("prefix", "")
        page = d.state.files_page(name, prefix, after, limit + 1)
        more = len(page) > limit
        page = page[:limit]
        return web.json_response({"volume": name, "prefix": prefix, "files": [_record_json(r) for r in page],
                                  "next_cursor": _cursor(page[-1].path) if more else None})

    async def file(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        vs = held(name)
        rel = relpath(request.match_info["path"])
        rec = d.state.file(name, rel)
        fs = await asyncio.to_thread(localfs.lstat, vs.root, rel)
        manifest: dict[str, Any] | None = None
        mod_rev = 0
        etcd_error = ""
        try:
            kv = await d.store.get_file(name, rel) if d.store else None
            if d.store is None:
                etcd_error = "etcd is not connected"
            elif kv is not None:
                mod_rev = kv.mod_revision
                try:
                    m = decode(kv.value)
                    manifest = {"kind": m.kind, "size": m.size, "mode": f"{m.mode:o}", "uid": m.uid, "gid": m.gid,
                                "mtime_ns": m.mtime_ns, "digest": m.digest, "chunks": len(m.chunks),
                                "inline": m.inline is not None, "target": m.target, "origin": m.origin,
                                "published_at": m.ts, "mod_revision": kv.mod_revision,
                                "create_revision": kv.create_revision}
                except ManifestError as exc:
                    manifest = {"invalid": str(exc), "mod_revision": kv.mod_revision}
        except EtcdUnavailable as exc:
            etcd_error = str(exc)
        if manifest is None and rec is None and fs is None:
            raise ApiError(404, f"no such path in volume {name}: {rel}")
        if rec is None:
            state = "unpublished" if fs is not None else "absent"
        elif fs is None:
            state = "absent" if rec.kind == "deleted" else "deleted_locally"
        elif vs_differs(rec, fs):
            state = "modified_locally"
        elif mod_rev and rec.rev < mod_rev:
            state = "behind"
        else:
            state = "in_sync"
        local = {"state": state, "indexed": _record_json(rec) if rec else None,
                 "on_disk": {"kind": fs.kind, "size": fs.size, "mode": f"{fs.mode:o}", "mtime_ns": fs.mtime_ns,
                             "inode": fs.inode} if fs else None}
        nodes: list[dict[str, Any]] = []
        if mod_rev:
            with contextlib.suppress(EtcdUnavailable):
                conv = await ops.convergence(name)
                nodes = [{"node": x["node"], "live": x["live"], "applied_revision": x["applied_revision"],
                          "has_version": x["applied_revision"] >= mod_rev} for x in conv["nodes"]]
        body = {"volume": name, "path": rel, "manifest": manifest, "local": local, "nodes": nodes,
                "nodes_with_version": [x["node"] for x in nodes if x["has_version"]]}
        if etcd_error:
            body["etcd_error"] = etcd_error
        return web.json_response(body)

    async def file_sync(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        vs = held(name)
        rel = relpath(request.match_info["path"])
        try:
            res = await vs.resync(rel)
        except ManifestError as exc:
            raise ApiError(409, f"the published manifest of {rel} is invalid: {exc}") from None
        ops.emit("resync", {"volume": name, "path": rel, "action": res.get("action", "")})
        return web.json_response(res)

    async def volume_sync(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        vs = held(name)
        res = await vs.resync(None)
        ops.emit("resync", {"volume": name, "action": res.get("action", "")})
        return web.json_response(res)

    async def conflicts(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        known(name)
        rows = d.state.conflicts(name)
        return web.json_response({"volume": name, "conflicts": [
            {"path": r["path"], "copy": r["copy"], "mode": r["mode"], "winner": r["winner"], "loser": r["loser"],
             "at": r["at"]} for r in rows]})

    async def digests(request: web.Request) -> web.Response:
        """path -> digest of this node's replica: the index, checked against a fresh stat (re-hashed
        where stat disagrees), for `syncmesh-plugin verify`."""
        name = request.match_info["name"]
        vs = held(name)
        limit, after = _paging(request, default=1000, maximum=DIGEST_MAX_LIMIT)
        page = d.state.files_page(name, "", after, limit + 1)
        more = len(page) > limit
        page = page[:limit]

        def check() -> list[list[Any]]:
            out = []
            for r in page:
                fs = localfs.lstat(vs.root, r.path)
                if fs is None:
                    out.append([r.path, "missing", "", ""])
                    continue
                if vs_differs(r, fs):
                    m = localfs.describe(vs.root, r.path, fs, d.cfg.node_id, time.time())
                    digest = (m.digest if m.kind == "file" else m.target) if m else "?"
                    out.append([r.path, fs.kind, digest, f"{fs.mode:o}"])
                    continue
                out.append([r.path, r.kind, r.digest if r.kind == "file" else r.target, f"{r.mode:o}"])
            return out

        entries = await asyncio.to_thread(check)
        return web.json_response({"volume": name, "node": d.cfg.node_id, "revision": d.state.revision(name),
                                  "entries": entries, "next_cursor": _cursor(page[-1].path) if more else None})

    # ---- events
    async def events(request: web.Request) -> web.StreamResponse:
        since_raw = request.headers.get("Last-Event-ID") or request.query.get("since")
        try:
            since = int(since_raw) if since_raw else None
            backlog = int(request.query.get("backlog", "50"))
            if not 0 <= backlog <= 1000 or (since is not None and since < 0):
                raise ValueError
        except ValueError:
            raise ApiError(400, "since must be an event id and backlog an integer in [0, 1000]") from None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        with ops.bus.subscribe(since=since, backlog=backlog) as sub:
            await resp.write(b"retry: 2000\n\n")
            while not sub.closed:
                ev = await sub.get(timeout=15.0)
                try:
                    if ev is None:
                        await resp.write(b": keep-alive\n\n")
                        continue
                    head = f"id: {ev['id']}\n" if ev["id"] else ""
                    await resp.write(f"{head}data: {json.dumps(ev, default=str)}\n\n".encode())
                except (ConnectionResetError, RuntimeError):
                    break
        return resp

    async def recent_events(request: web.Request) -> web.Response:
        limit, _ = _paging(request, default=100)
        return web.json_response({"events": ops.bus.recent(limit)})

    # ---- documents
    async def openapi(request: web.Request) -> web.Response:
        doc = openapi_doc.load()
        doc["info"]["version"] = __version__
        return web.json_response(doc)

    async def status_page(request: web.Request) -> web.Response:
        html = resources.files(__package__).joinpath("statuspage", "index.html").read_text()
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-cache"})

    r = app.router
    r.add_get("/", status_page)
    r.add_get("/api/v1/openapi.json", openapi)
    r.add_get("/api/v1/cluster/status", cluster_status)
    r.add_get("/api/v1/cluster/nodes", cluster_nodes)
    r.add_get("/api/v1/sync/status", sync_status)
    r.add_get("/api/v1/volumes", volumes)
    r.add_get("/api/v1/volumes/{name}", volume)
    r.add_get("/api/v1/volumes/{name}/files", files)
    r.add_post("/api/v1/volumes/{name}/files/{path:.+}/sync", file_sync)
    r.add_get("/api/v1/volumes/{name}/files/{path:.+}", file)
    r.add_post("/api/v1/volumes/{name}/sync", volume_sync)
    r.add_get("/api/v1/volumes/{name}/conflicts", conflicts)
    r.add_get("/api/v1/volumes/{name}/digests", digests)
    r.add_get("/api/v1/events", events)
    r.add_get("/api/v1/events/recent", recent_events)
