"""What every resource's handlers share: JSON errors, paging, and looking up the volume a path names."""

from __future__ import annotations

import base64
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from ..meta import EtcdUnavailable
from ..pathsafe import PathError, validate_relpath
from ..state import FileRecord
from ..sync.snapshot import VolumeSnapshot
from ..volopts import VolumeError, validate_name
from .deps import INDEX, NODE, REGISTRY, VOLUMES, VolumeRegistry

MAX_LIMIT = 1000


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure of an /api/ route answers {"error", "status"} JSON, etcd outages as 503."""
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


def paging(request: web.Request, default: int = 100, maximum: int = MAX_LIMIT) -> tuple[int, str]:
    """(limit, the path after which the page starts) from ?limit= and the opaque ?cursor=."""
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


def cursor(path: str) -> str:
    return base64.urlsafe_b64encode(path.encode("utf-8", "surrogateescape")).decode().rstrip("=")


def record_json(r: FileRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"path": r.path, "kind": r.kind, "size": r.size, "mode": f"{r.mode:o}", "uid": r.uid,
                           "gid": r.gid, "mtime_ns": r.mtime_ns, "revision": r.rev, "origin": r.origin,
                           "published": r.published}
    if r.kind == "file":
        out["digest"] = r.digest
        out["chunks"] = len(r.chunks or [])
    elif r.kind == "symlink":
        out["target"] = r.target
    return out


def registry(request: web.Request) -> VolumeRegistry:
    vm = request.app[REGISTRY]()
    if vm is None:
        raise ApiError(503, "the daemon is starting")
    return vm


def known(request: web.Request, name: str) -> dict[str, Any]:
    """The volume's registry record; 400 for a malformed name, 404 for an unknown volume."""
    try:
        validate_name(name)
    except VolumeError as exc:
        raise ApiError(400, str(exc)) from None
    rec = request.app[INDEX]().volume(name)
    if rec is None:
        raise ApiError(404, f"no such volume: {name}")
    return rec


def held(request: web.Request, name: str) -> VolumeSnapshot:
    """The volume's snapshot; 409 when this node holds no replica of it."""
    known(request, name)
    snap = request.app[VOLUMES].snapshot(name)
    if snap is None:
        raise ApiError(409, f"volume {name} is not held on this node ({request.app[NODE].node_id}); "
                            "ask a node that holds it")
    return snap


def relpath(raw: str) -> str:
    try:
        return validate_relpath(raw)
    except PathError as exc:
        raise ApiError(400, f"bad path: {exc}") from None
