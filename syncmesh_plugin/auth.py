"""Bearer-token authorization for the daemon's HTTP server (API, metrics and the peer chunk routes).

With the cluster's own PKI (security.tls_enabled with no certificate files, the default) the API is
locked whatever `security.auth_enabled` says: a client certificate of the cluster's CA is an admin (the
peers, and the CLI on a node's host, which reads the node's certificate from the data root); without
one a token is needed (the node's own tokens in <data_root>/pki, plus any configured); /metrics also
answers GETs from the node's own host (loopback), and a host joining the embedded etcd cluster may
ask for its place without a certificate, since it has none yet: that request carries the join token's
proof, which the handler has checked by the signer before anything is granted. A request on a
connection whose certificate has been revoked since the handshake is refused (403) and the connection
closed.

Two roles:

- admin (`security.auth_tokens`): every endpoint. Peers are admins: the first admin token is what this
  node sends to the others, and only admins may read chunks, i.e. volume data.
- read-only (`security.auth_readonly_tokens`): GET/HEAD of the API and metrics (status, dashboards,
  Prometheus). Never chunks, never a POST/PUT/DELETE.

401 when no valid token was given (with `WWW-Authenticate: Bearer`), 403 when a valid token lacks the
role. Tokens are compared in constant time against every configured token (no early exit, so the
timing does not tell which token nearly matched). Oversized bodies are refused with 413 from the
Content-Length header before a byte of the body is read, and unauthenticated requests never get as
far as reading theirs.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from . import metrics

log = logging.getLogger(__name__)

ADMIN = "admin"
READONLY = "readonly"
HEALTH_PATH = "/api/v1/health"
METRICS_PATHS = frozenset({"/metrics", "/api/v1/metrics"})
ETCD_JOIN_PATH = "/api/v1/cluster/etcd/members"  # proves itself with the join token (api/cluster.py)
CHUNKS_PREFIX = "/api/v1/chunks/"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_LOG_EVERY = 10.0
_last_logged: dict[tuple[str, str], float] = {}


def _log_refusal(request: web.Request, reason: str) -> None:
    """One line per client and reason every 10 s: a scanner must not be able to flood the log."""
    key = (str(request.remote), reason)
    now = time.monotonic()
    if now - _last_logged.get(key, -_LOG_EVERY) < _LOG_EVERY:
        return
    if len(_last_logged) > 4096:
        _last_logged.clear()
    _last_logged[key] = now
    log.warning("refused %s %r from %s: %s", request.method, request.path[:200], request.remote, reason)


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest's time independent of the tokens' lengths.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class TokenChecker:
    """Maps a presented token to its role in constant time; holds only digests of the tokens."""

    def __init__(self, admin: Sequence[str], readonly: Sequence[str] = ()) -> None:
        self._admin = [_digest(str(t)) for t in admin if t]
        self._readonly = [_digest(str(t)) for t in readonly if t]

    def role(self, token: str) -> str | None:
        if not token:
            return None
        d = _digest(token)
        is_admin = False
        is_ro = False
        for t in self._admin:
            is_admin |= hmac.compare_digest(d, t)
        for t in self._readonly:
            is_ro |= hmac.compare_digest(d, t)
        return ADMIN if is_admin else READONLY if is_ro else None


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def required_role(method: str, path: str) -> str:
    """Chunks (volume data) and anything that is not a read need admin; other reads need read-only."""
    if path.startswith(CHUNKS_PREFIX) or method.upper() not in READ_METHODS:
        return ADMIN
    return READONLY


def _json_error(exc: type[web.HTTPException], message: str, **headers: str) -> web.HTTPException:
    return exc(text=json.dumps({"error": message}), content_type="application/json", headers=headers or None)


def peer_certificate(request: web.Request) -> dict[str, Any] | None:
    """The client's certificate as ssl verified it in the handshake; None without one (or without TLS)."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    return cert if isinstance(cert, dict) and cert else None


def _loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AutoAccess:
    """The API's rules with the cluster's own PKI: locked, a cluster certificate is an admin."""

    admin_tokens: Sequence[str]  # this node's own (pki/admin-token), beside security.auth_tokens
    readonly_tokens: Sequence[str]
    revoked: Callable[[], frozenset[str]]  # serials revoked since connections were opened
    etcd_join: bool = False  # this node runs an embedded etcd: hosts without a certificate may ask to join


def make_middleware(
    *,
    enabled: bool,
    admin_tokens: Sequence[str],
    readonly_tokens: Sequence[str] = (),
    health_open: bool = True,
    max_body: int | None = None,
    auto: AutoAccess | None = None,
) -> Middleware:
    """The aiohttp middleware enforcing the rules above (and the Content-Length cap, auth on or off)."""
    if auto is not None:
        enabled = True
        admin_tokens = [*admin_tokens, *auto.admin_tokens]
        readonly_tokens = [*readonly_tokens, *auto.readonly_tokens]
    checker = TokenChecker(admin_tokens, readonly_tokens)

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = peer_certificate(request) if auto is not None else None
        # ssl spells the serial in upper-case hex padded to whole bytes; pki.serial_hex has no leading zero
        if peer is not None and auto is not None and (
                str(peer.get("serialNumber", "")).upper().lstrip("0") in auto.revoked()):
            metrics.rejected_input.labels("auth").inc()
            _log_refusal(request, "revoked client certificate")
            raise _json_error(web.HTTPForbidden, "this client certificate has been revoked", Connection="close")
        # The status page itself is static HTML with no data in it; everything it shows comes from the
        # API, with the token the operator types into the page.
        public = (health_open and request.path == HEALTH_PATH) or (request.path == "/" and request.method == "GET")
        if (auto is not None and request.path in METRICS_PATHS and request.method in READ_METHODS
                and _loopback(request.remote)):
            public = True  # Prometheus or curl on the node's own host
        if (auto is not None and auto.etcd_join and request.path == ETCD_JOIN_PATH and request.method == "POST"
                and peer is None):
            public = True  # a joining host without a certificate: the join token's proof is checked instead
        if enabled and not public:
            role = ADMIN if peer is not None else checker.role(bearer_token(request))
            if role is None:
                metrics.rejected_input.labels("auth").inc()
                _log_refusal(request, "missing or invalid bearer token")
                raise _json_error(web.HTTPUnauthorized, "missing or invalid bearer token",
                                  **{"WWW-Authenticate": 'Bearer realm="syncmesh"'})
            if required_role(request.method, request.path) == ADMIN and role != ADMIN:
                metrics.rejected_input.labels("auth").inc()
                _log_refusal(request, "read-only token on an admin endpoint")
                raise _json_error(web.HTTPForbidden, "this token is read-only; an admin token is required")
        if max_body is not None and request.content_length is not None and request.content_length > max_body:
            metrics.rejected_input.labels("api").inc()
            _log_refusal(request, f"body of {request.content_length} bytes (limit {max_body})")
            raise web.HTTPRequestEntityTooLarge(
                max_size=max_body, actual_size=request.content_length, content_type="application/json",
                text=json.dumps({"error": f"request body exceeds {max_body} bytes"}),
                headers={"Connection": "close"})
        return await handler(request)

    return auth_middleware
