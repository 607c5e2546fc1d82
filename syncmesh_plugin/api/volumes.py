"""Volumes: the cluster's registry, this node's sync state of each, and the operator's requests."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from ..meta import EtcdUnavailable
from ..pathsafe import PathError, validate_relpath
from ..volopts import VolumeError
from ..volumes import ClusterUnavailable
from .common import ApiError, held, known, registry
from .deps import CLUSTER, EVENTS, INDEX, NODE, VOLUMES

routes = web.RouteTableDef()

async def answer(call: Awaitable[dict[str, Any]], refused: int = 400) -> web.Response:
    """An operator's request to the registry, its refusals as JSON errors: a bad request or a refusal
    with its reason (`refused`), an unknown version (404), etcd needed and away (503)."""
    try:
        return web.json_response(await call)
    except (VolumeError, PathError) as exc:
        raise ApiError(refused, str(exc)) from None
    except KeyError as exc:
        raise ApiError(404, str(exc.args[0])) from None
    except ClusterUnavailable as exc:
        raise ApiError(503, str(exc)) from None


@routes.get("/api/v1/sync/status")
async def sync_status(request: web.Request) -> web.Response:
    """This node's replicas: progress, backlog and errors."""
    index = request.app[INDEX]()
    vols = []
    for name, s in sorted(request.app[VOLUMES].snapshots().items()):
        stats = index.volume_stats(name)
        vols.append({"volume": name, "ready": s.ready, "files": stats["files"], "bytes": stats["bytes"],
                     "pending": s.pending, "conflicts": len(index.conflicts(name)),
                     "lag_seconds": round(s.lag_seconds, 4), "revision": index.revision(name),
                     "published": s.published, "applied": s.applied, "last_error": s.last_error})
    return web.json_response({"node": request.app[NODE].node_id, "volumes": vols})


@routes.get("/api/v1/volumes")
async def volumes(request: web.Request) -> web.Response:
    vm = registry(request)
    index = request.app[INDEX]()
    out = []
    for v in vm.list():
        rec = index.volume(v["Name"]) or {}
        out.append({"name": v["Name"], "mountpoint": v["Mountpoint"], "created_at": v["CreatedAt"],
                    **vm.status(v["Name"], rec)})
    return web.json_response({"volumes": out})


@routes.get("/api/v1/volumes/{name}")
async def volume(request: web.Request) -> web.Response:
    vm = registry(request)
    name = request.match_info["name"]
    rec = known(request, name)
    body = {"name": name, "mountpoint": vm.mountpoint(name), **vm.status(name, rec)}
    try:
        body["convergence"] = await request.app[CLUSTER].convergence(name)
    except EtcdUnavailable as exc:
        body["convergence"] = {"error": str(exc)}
    return web.json_response(body)


@routes.post("/api/v1/volumes/{name}/sync")
async def volume_sync(request: web.Request) -> web.Response:
    """A full rescan: whatever changed on disk without inotify seeing it is published."""
    name = request.match_info["name"]
    held(request, name)
    res = await request.app[VOLUMES].resync(name, None)
    request.app[EVENTS].publish("resync", {"volume": name, "action": res.get("action", "")})
    return web.json_response(res)


@routes.get("/api/v1/volumes/{name}/conflicts")
async def conflicts(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    known(request, name)
    rows = request.app[INDEX]().conflicts(name)
    return web.json_response({"volume": name, "conflicts": [
        {"path": r["path"], "copy": r["copy"], "mode": r["mode"], "winner": r["winner"], "loser": r["loser"],
         "at": r["at"]} for r in rows]})


@routes.post("/api/v1/volumes/{name}/resume")
async def resume(request: web.Request) -> web.Response:
    """Operator decision for a volume paused by the mass-damage guard."""
    name = request.match_info["name"]
    mode = request.query.get("mode", "accept")
    if mode not in ("accept", "restore"):
        return web.json_response({"error": "mode must be accept or restore"}, status=400)
    snap = request.app[VOLUMES].snapshot(name)
    if snap is None:
        return web.json_response({"error": f"volume {name} is not held on this node"}, status=404)
    await request.app[VOLUMES].resume(name, restore=mode == "restore")
    return web.json_response({"volume": name, "mode": mode, "was_paused": snap.paused})


@routes.post("/api/v1/volumes/{name}/hold")
async def hold(request: web.Request) -> web.Response:
    """Keep a replica on this node from now on, mounted or not."""
    name = request.match_info["name"]
    known(request, name)
    return await answer(registry(request).hold(name, request.query.get("role")))


@routes.post("/api/v1/volumes/{name}/release")
async def release(request: web.Request) -> web.Response:
    """Stop holding the volume here and delete this node's copy; refused (409) with the reason when
    that would lose the last complete replica, leave the placement short, or pull it from a mount."""
    name = request.match_info["name"]
    known(request, name)
    return await answer(registry(request).release(name), refused=409)


@routes.post("/api/v1/volumes/{name}/revert")
async def revert(request: web.Request) -> web.Response:
    """A receive-only replica's local changes undone (all, or ?path=): additions removed, the cluster's
    version of what was changed taken back."""
    name = request.match_info["name"]
    held(request, name)
    return await answer(registry(request).revert(name, request.query.get("path")))


@routes.post("/api/v1/volumes/{name}/override")
async def override(request: web.Request) -> web.Response:
    """This node's whole state published over the cluster's (after the mass-deletion guard)."""
    name = request.match_info["name"]
    held(request, name)
    return await answer(registry(request).override(name), refused=409)


@routes.get("/api/v1/volumes/{name}/versions")
async def versions(request: web.Request) -> web.Response:
    """The replaced and deleted versions this node keeps of the volume (`?prefix=`: a path or a tree)."""
    name = request.match_info["name"]
    known(request, name)
    prefix = request.query.get("prefix", "").strip("/")
    try:
        if prefix:
            validate_relpath(prefix)
    except PathError as exc:
        raise ApiError(400, str(exc)) from None
    rows = request.app[INDEX]().versions(name, prefix)
    return web.json_response({"volume": name, "node": request.app[NODE].node_id, "versions": [
        {"id": v.id, "path": v.path, "at": v.at, "size": v.size, "digest": v.digest, "reason": v.reason,
         "origin": v.origin} for v in rows]})


@routes.post("/api/v1/volumes/{name}/restore")
async def restore(request: web.Request) -> web.Response:
    """Kept versions written back as new changes (body {"versions": [ids], "to": "new/path"}): every
    node converges on them."""
    name = request.match_info["name"]
    held(request, name)
    try:
        body = await request.json() if request.can_read_body else {}
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        raise ApiError(400, "the body must be JSON: {\"versions\": [ids], \"to\": \"path\"}") from None
    ids = body.get("versions") if isinstance(body, dict) else None
    to = body.get("to", "") if isinstance(body, dict) else ""
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids) or not isinstance(to, str):
        raise ApiError(400, "the body must be JSON: {\"versions\": [ids], \"to\": \"path\"}")
    return await answer(registry(request).restore(name, ids, to))


@routes.post("/api/v1/volumes/{name}/options")
async def set_options(request: web.Request) -> web.Response:
    """Options that may change after Create (versioning), as query parameters; every node applies them."""
    name = request.match_info["name"]
    known(request, name)
    return await answer(registry(request).set_options(name, dict(request.query)))


@routes.get("/api/v1/trash")
async def trash(request: web.Request) -> web.Response:
    """Removed volumes (versioning on) whose copy this node keeps for the retention."""
    return web.json_response({"node": request.app[NODE].node_id, "trash": await registry(request).trash()})


@routes.post("/api/v1/trash/{name}/undelete")
async def undelete(request: web.Request) -> web.Response:
    """The volume created again with its options, and this node's trashed copy put back (published)."""
    return await answer(registry(request).undelete(request.match_info["name"]), refused=409)


@routes.post("/api/v1/trash/{name}/purge")
async def purge(request: web.Request) -> web.Response:
    """This node's trashed copies of the volume deleted for good."""
    return await answer(registry(request).purge(request.match_info["name"]))
