"""The cluster's own PKI: its state, CA and join-token rotation, revoking a node's certificates.

Operations that need the CA key are carried out by the signer; any node forwards them there over
mutual TLS (the daemon's PkiControl), so the CLI can ask its own node.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..pki import PkiError
from .common import ApiError
from .deps import PKI, PkiControl

routes = web.RouteTableDef()


def control(request: web.Request) -> PkiControl:
    pki = request.app.get(PKI)
    if pki is None:
        raise ApiError(404, "this node does not use the cluster's own PKI (security.tls_enabled is false, or "
                            "security.tls_cert_file names certificates of your own)")
    return pki


async def _run(coro: Any) -> web.Response:
    try:
        return web.json_response(await coro)
    except PkiError as exc:
        raise ApiError(409, str(exc)) from None


@routes.get("/api/v1/pki")
async def status(request: web.Request) -> web.Response:
    """This node's certificate and trust, and every node's as the cluster reports it."""
    return await _run(control(request).cluster_status())


@routes.post("/api/v1/pki/ca/rotate")
async def rotate_ca(request: web.Request) -> web.Response:
    return await _run(control(request).rotate_ca())


@routes.post("/api/v1/pki/join-token/rotate")
async def rotate_token(request: web.Request) -> web.Response:
    return await _run(control(request).rotate_token())


@routes.post("/api/v1/pki/nodes/{node}/revoke")
async def revoke(request: web.Request) -> web.Response:
    return await _run(control(request).revoke(request.match_info["node"]))
