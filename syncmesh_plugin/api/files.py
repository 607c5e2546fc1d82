"""Files of a held volume: this node's index, one path traced from etcd to disk, resyncs, digests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from aiohttp import web

from .. import localfs
from ..manifest import Manifest, ManifestError, decode
from ..meta import EtcdUnavailable
from ..sync.decide import differs
from .common import ApiError, cursor, held, paging, record_json, relpath
from .deps import CLUSTER, EVENTS, INDEX, NODE, VOLUMES

DIGEST_MAX_LIMIT = 5000

routes = web.RouteTableDef()


@routes.get("/api/v1/volumes/{name}/files")
async def files(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    held(request, name)
    limit, after = paging(request)
    prefix = request.query.get("prefix", "")
    page = request.app[INDEX]().files_page(name, prefix, after, limit + 1)
    more = len(page) > limit
    page = page[:limit]
    return web.json_response({"volume": name, "prefix": prefix, "files": [record_json(r) for r in page],
                              "next_cursor": cursor(page[-1].path) if more else None})


# Before the GET of files/{path}: its {path:.+} would take ".../sync" too.
@routes.post("/api/v1/volumes/{name}/files/{path:.+}/sync")
async def file_sync(request: web.Request) -> web.Response:
    """Re-hash and republish the path, or fetch its published version again."""
    name = request.match_info["name"]
    held(request, name)
    rel = relpath(request.match_info["path"])
    try:
        res = await request.app[VOLUMES].resync(name, rel)
    except ManifestError as exc:
        raise ApiError(409, f"the published manifest of {rel} is invalid: {exc}") from None
    request.app[EVENTS].publish("resync", {"volume": name, "path": rel, "action": res.get("action", "")})
    return web.json_response(res)


def _manifest_json(m: Manifest, mod_revision: int, create_revision: int) -> dict[str, Any]:
    return {"kind": m.kind, "size": m.size, "mode": f"{m.mode:o}", "uid": m.uid, "gid": m.gid,
            "mtime_ns": m.mtime_ns, "digest": m.digest, "chunks": len(m.chunks), "inline": m.inline is not None,
            "target": m.target, "origin": m.origin, "published_at": m.ts, "mod_revision": mod_revision,
            "create_revision": create_revision}


@routes.get("/api/v1/volumes/{name}/files/{path:.+}")
async def file(request: web.Request) -> web.Response:
    """One path as etcd, the index and the disk have it, and which nodes have its version."""
    name = request.match_info["name"]
    vs = held(request, name)
    rel = relpath(request.match_info["path"])
    cluster = request.app[CLUSTER]
    rec = request.app[INDEX]().file(name, rel)
    fs = await asyncio.to_thread(localfs.lstat, vs.root, rel)
    manifest: dict[str, Any] | None = None
    mod_rev = 0
    etcd_error = ""
    try:
        kv = await cluster.published(name, rel)
        if kv is not None:
            mod_rev = kv.mod_revision
            try:
                manifest = _manifest_json(decode(kv.value), kv.mod_revision, kv.create_revision)
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
    elif differs(rec, fs):
        state = "modified_locally"
    elif mod_rev and rec.rev < mod_rev:
        state = "behind"
    else:
        state = "in_sync"
    local = {"state": state, "indexed": record_json(rec) if rec else None,
             "on_disk": {"kind": fs.kind, "size": fs.size, "mode": f"{fs.mode:o}", "mtime_ns": fs.mtime_ns,
                         "inode": fs.inode} if fs else None}
    nodes: list[dict[str, Any]] = []
    if mod_rev:
        with contextlib.suppress(EtcdUnavailable):
            conv = await cluster.convergence(name)
            nodes = [{"node": x["node"], "live": x["live"], "applied_revision": x["applied_revision"],
                      "has_version": x["applied_revision"] >= mod_rev} for x in conv["nodes"]]
    body = {"volume": name, "path": rel, "manifest": manifest, "local": local, "nodes": nodes,
            "nodes_with_version": [x["node"] for x in nodes if x["has_version"]]}
    if etcd_error:
        body["etcd_error"] = etcd_error
    return web.json_response(body)


@routes.get("/api/v1/volumes/{name}/digests")
async def digests(request: web.Request) -> web.Response:
    """path -> digest of this node's replica: the index, checked against a fresh stat (re-hashed
    where stat disagrees), for `syncmesh-plugin verify`."""
    name = request.match_info["name"]
    vs = held(request, name)
    node_id = request.app[NODE].node_id
    index = request.app[INDEX]()
    limit, after = paging(request, default=1000, maximum=DIGEST_MAX_LIMIT)
    page = index.files_page(name, "", after, limit + 1)
    more = len(page) > limit
    page = page[:limit]

    def check() -> list[list[Any]]:
        out = []
        stats = localfs.lstat_many(vs.root, [r.path for r in page])
        for r in page:
            fs = stats[r.path]
            if fs is None:
                out.append([r.path, "missing", "", ""])
                continue
            if differs(r, fs):
                m = localfs.describe(vs.root, r.path, fs, node_id, time.time())
                digest = (m.digest if m.kind == "file" else m.target) if m else "?"
                out.append([r.path, fs.kind, digest, f"{fs.mode:o}"])
                continue
            out.append([r.path, r.kind, r.digest if r.kind == "file" else r.target, f"{r.mode:o}"])
        return out

    entries = await asyncio.to_thread(check)
    return web.json_response({"volume": name, "node": node_id, "revision": index.revision(name),
                              "entries": entries, "next_cursor": cursor(page[-1].path) if more else None})
