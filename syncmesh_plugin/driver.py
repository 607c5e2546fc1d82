"""Docker VolumeDriver protocol on the plugin's Unix socket: a thin layer over VolumeManager.

dockerd POSTs JSON with no Content-Type (Activate has an empty body), reads any 200 JSON body, and
treats a non-200 or a non-empty `Err` as failure. Every failure here is `{"Err": "..."}` with a
reason, never a traceback: a malformed body or a wrong field type included.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import metrics
from .cancellation import cancelled_from_outside
from .meta import EtcdUnavailable
from .volopts import VolumeError
from .volumes import ClusterUnavailable, VolumeManager

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024
Handler = Callable[[VolumeManager, dict[str, Any]], Awaitable[dict[str, Any]]]


async def _create(vm: VolumeManager, body: dict[str, Any]) -> dict[str, Any]:
    await vm.create(body.get("Name"), body.get("Opts"))
    return {}


async def _remove(vm: VolumeManager, body: dict[str, Any]) -> dict[str, Any]:
    await vm.remove(body.get("Name"))
    return {}


async def _mount(vm: VolumeManager, body: dict[str, Any]) -> dict[str, Any]:
    return {"Mountpoint": await vm.mount(body.get("Name"), body.get("ID"))}


async def _unmount(vm: VolumeManager, body: dict[str, Any]) -> dict[str, Any]:
    await vm.unmount(body.get("Name"), body.get("ID"))
    return {}


async def _path(vm: VolumeManager, body: dict[str, Any]) -> dict[str, Any]:
    return {"Mountpoint": vm.path(body.get("Name"))}


async def _get(vm: VolumeManager, body: dict[str, Any]) -> dict[str, Any]:
    return {"Volume": vm.get(body.get("Name"))}


async def _list(vm: VolumeManager, body: dict[str, Any]) -> dict[str, Any]:
    return {"Volumes": vm.list()}


async def _capabilities(vm: VolumeManager, body: dict[str, Any]) -> dict[str, Any]:
    # "global": a volume's existence is shared by the whole mesh (dockerd itself only reports it).
    return {"Capabilities": {"Scope": "global"}}


HANDLERS: dict[str, Handler] = {
    "Create": _create, "Remove": _remove, "Mount": _mount, "Unmount": _unmount, "Path": _path,
    "Get": _get, "List": _list, "Capabilities": _capabilities,
}


def _err(message: str) -> web.Response:
    return web.json_response({"Err": message}, status=500)


def make_app(get_manager: Callable[[], VolumeManager | None]) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)

    async def activate(request: web.Request) -> web.Response:
        return web.json_response({"Implements": ["VolumeDriver"]})

    async def dispatch(request: web.Request) -> web.Response:
        method = request.match_info["method"]
        handler = HANDLERS.get(method)
        if handler is None:
            return web.json_response({"Err": f"unknown method VolumeDriver.{method}"}, status=404)
        t0 = time.monotonic()
        result = "error"
        try:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw.strip() else {}
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
                metrics.rejected_input.labels("docker").inc()
                return _err(f"malformed request body: {type(exc).__name__}: {str(exc)[:200]}")
            if not isinstance(body, dict):
                metrics.rejected_input.labels("docker").inc()
                return _err("malformed request body: expected a JSON object")
            vm = get_manager()
            if vm is None:
                return _err("syncmesh is starting; try again in a moment")
            resp = await handler(vm, body)
            resp.setdefault("Err", "")
            result = "ok"
            return web.json_response(resp)
        except web.HTTPRequestEntityTooLarge:
            return _err(f"request body larger than {MAX_BODY} bytes")
        except VolumeError as exc:
            return _err(str(exc))
        except (ClusterUnavailable, EtcdUnavailable) as exc:
            return _err(f"cluster unavailable: {exc}")
        except asyncio.CancelledError:
            if cancelled_from_outside():
                raise  # the call itself was cancelled (dockerd hung up, the daemon stops)
            # a library's inner cancellation that escaped (gRPC cancels calls on a closing channel): dockerd
            # gets an error to retry on, not a dropped connection
            log.exception("VolumeDriver.%s interrupted", method)
            return _err(f"VolumeDriver.{method} was interrupted; try again")
        except Exception as exc:  # never a traceback to dockerd; the log has it
            log.exception("VolumeDriver.%s failed", method)
            return _err(f"internal error in VolumeDriver.{method}: {type(exc).__name__}: {exc}")
        finally:
            metrics.docker_requests.labels(method, result).inc()
            metrics.docker_request_seconds.labels(method).observe(time.monotonic() - t0)

    app.router.add_post("/Plugin.Activate", activate)
    app.router.add_post("/VolumeDriver.{method}", dispatch)
    return app
