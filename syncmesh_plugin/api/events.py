"""Events: the live stream (server-sent events, resumable with Last-Event-ID) and the recent ones."""

from __future__ import annotations

import json

from aiohttp import web

from .common import ApiError, paging
from .deps import EVENTS

routes = web.RouteTableDef()


@routes.get("/api/v1/events")
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
    with request.app[EVENTS].subscribe(since=since, backlog=backlog) as sub:
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


@routes.get("/api/v1/events/recent")
async def recent_events(request: web.Request) -> web.Response:
    limit, _ = paging(request, default=100)
    return web.json_response({"events": request.app[EVENTS].recent(limit)})
