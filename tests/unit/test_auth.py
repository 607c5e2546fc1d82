"""Bearer-token auth (syncmesh_plugin.auth) in front of the real API app: roles, 401 vs 403, health, body cap."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from syncmesh_plugin import auth, chunker, metrics, transfer
from syncmesh_plugin.config import Config, ConfigError, as_dict, load_config

ADMIN, ADMIN2, READER = "adm1n-t0ken-abcdefgh", "second-admin-token-xyz", "r3ad-only-t0ken-abcdefgh"
CID = "0" * 32


class _Source:
    async def read_chunk(self, volume: str, chunk_id: str) -> bytes | None:
        return None


def _app(cfg: Config) -> web.Application:
    """The API's wiring (api.make_app) in miniature: the auth middleware, a few routes, the chunk routes."""
    sec = cfg.security
    app = web.Application(client_max_size=1024 * 1024)
    app.middlewares.append(auth.make_middleware(
        enabled=sec.auth_enabled, admin_tokens=sec.auth_tokens, readonly_tokens=sec.auth_readonly_tokens,
        health_open=sec.health_open, max_body=1024 * 1024))

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def prom(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    for path in ("/", "/api/v1/health", "/api/v1/info", "/api/v1/volumes"):
        app.router.add_get(path, ok)
    app.router.add_post("/api/v1/info", ok)
    app.router.add_get("/metrics", prom)
    app.router.add_get("/api/v1/metrics", prom)
    transfer.add_routes(app, _Source(), encode_frame=chunker.encode_frame, compress_default=True)
    return app


def _cfg(**security: Any) -> Config:
    base = load_config(None, {"SYNCMESH_NODE_ID": "n1"})
    return dataclasses.replace(base, security=dataclasses.replace(base.security, **security))


async def _client(cfg: Config) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = TestClient(TestServer(_app(cfg)))
    await client.start_server()
    return client


@pytest_asyncio.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    c = await _client(_cfg(auth_enabled=True, auth_tokens=[ADMIN, ADMIN2], auth_readonly_tokens=[READER]))
    yield c
    await c.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_missing_or_wrong_token_is_401(client: TestClient[Any, Any]) -> None:
    for headers in ({}, bearer("nope"), {"Authorization": ADMIN}, {"Authorization": f"Basic {ADMIN}"},
                    bearer(""), bearer(ADMIN + "x"), bearer(ADMIN[:-1])):
        for method, path in (("GET", "/api/v1/info"), ("GET", "/metrics"), ("GET", f"/api/v1/chunks/v/{CID}"),
                             ("POST", "/api/v1/chunks/v/batch"), ("GET", "/api/v1/volumes")):
            resp = await client.request(method, path, headers=headers)
            assert resp.status == 401, (headers, path)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await resp.json())["error"] == "missing or invalid bearer token"


async def test_readonly_token_reads_status_but_not_chunks_or_posts(client: TestClient[Any, Any]) -> None:
    for path in ("/api/v1/info", "/metrics", "/api/v1/metrics"):
        assert (await client.get(path, headers=bearer(READER))).status == 200, path
    resp = await client.post("/api/v1/chunks/v/batch", json={"ids": []}, headers=bearer(READER))
    assert resp.status == 403 and "read-only" in (await resp.json())["error"]
    assert (await client.get(f"/api/v1/chunks/v/{CID}", headers=bearer(READER))).status == 403
    assert (await client.post("/api/v1/info", headers=bearer(READER))).status == 403  # any POST needs admin


async def test_admin_tokens_reach_everything(client: TestClient[Any, Any]) -> None:
    for tok in (ADMIN, ADMIN2):
        assert (await client.get("/api/v1/info", headers=bearer(tok))).status == 200
        assert (await client.get(f"/api/v1/chunks/v/{CID}", headers=bearer(tok))).status == 404  # not held
        resp = await client.post("/api/v1/chunks/v/batch", json={"ids": [CID]}, headers=bearer(tok))
        assert resp.status == 200 and len(await resp.read()) == 21
    # the scheme is case-insensitive (RFC 7235)
    assert (await client.get("/api/v1/info", headers={"Authorization": f"bearer {ADMIN}"})).status == 200


async def test_health_open_by_default_and_closable(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/api/v1/health")).status == 200
    closed = await _client(_cfg(auth_enabled=True, auth_tokens=[ADMIN], health_open=False))
    try:
        assert (await closed.get("/api/v1/health")).status == 401
        assert (await closed.get("/api/v1/health", headers=bearer(ADMIN))).status == 200
    finally:
        await closed.close()


async def test_auth_off_lets_everything_through_but_still_caps_bodies() -> None:
    c = await _client(_cfg())
    try:
        assert (await c.get("/api/v1/info")).status == 200
        resp = await c.post("/api/v1/chunks/v/batch", data=b"x" * (2 * 1024 * 1024))
        assert resp.status == 413
    finally:
        await c.close()


async def test_oversized_body_refused_from_the_header_without_reading_it(client: TestClient[Any, Any]) -> None:
    """A 1 GB Content-Length gets 413 at once: the body is never sent, let alone buffered."""
    host, port = client.server.host, client.server.port
    for path in ("/api/v1/chunks/v/batch", "/api/v1/info"):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write((f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {1 << 30}\r\n\r\n").encode() + b"{")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 413"), status
        writer.close()
    # unauthenticated: 401 before the body matters
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST /api/v1/chunks/v/batch HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 30}\r\n\r\n".encode())
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 401")
    writer.close()
    assert (await client.get("/api/v1/info", headers=bearer(ADMIN))).status == 200


async def test_chunked_oversized_batch_body_is_cut_off(client: TestClient[Any, Any]) -> None:
    async def forever() -> AsyncIterator[bytes]:
        for _ in range(10_000):  # would be 640 MB; the server stops reading after its 64 KiB cap
            yield b"[" * 65536

    resp = await client.post("/api/v1/chunks/v/batch", data=forever(), headers=bearer(ADMIN))
    assert resp.status == 413


async def test_malformed_bodies_are_400(client: TestClient[Any, Any]) -> None:
    for body in (b"{", b"[]", b'{"ids": "x"}', b'{"ids": [1]}', b"\xff\xfe", b'{"ids": [], "compress": 3}',
                 b"[" * 50_000):
        resp = await client.post("/api/v1/chunks/v/batch", data=body, headers=bearer(ADMIN))
        assert resp.status == 400, body[:20]


async def test_refusals_are_logged_without_the_token_and_counted(client: TestClient[Any, Any],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    auth._last_logged.clear()
    await client.get("/api/v1/info", headers=bearer("wrong-secret-value"))
    await client.post("/api/v1/chunks/v/batch", headers=bearer(READER))
    text = caplog.text
    assert "missing or invalid bearer token" in text and "read-only" in text
    for secret in ("wrong-secret-value", READER, ADMIN):
        assert secret not in text
    resp = await client.get("/metrics", headers=bearer(ADMIN))
    body = await resp.text()
    assert 'syncmesh_rejected_input_total{source="auth"}' in body
    for secret in (ADMIN, ADMIN2, READER):
        assert secret not in body


def test_token_checker_roles() -> None:
    c = auth.TokenChecker([ADMIN], [READER])
    assert c.role(ADMIN) == auth.ADMIN and c.role(READER) == auth.READONLY
    assert c.role("") is None and c.role(ADMIN.upper()) is None and c.role(ADMIN + "\x00") is None
    assert ADMIN not in repr(vars(c))  # only digests are kept


def test_required_role() -> None:
    assert auth.required_role("GET", "/api/v1/info") == auth.READONLY
    assert auth.required_role("HEAD", "/metrics") == auth.READONLY
    assert auth.required_role("POST", "/api/v1/volumes/x/resume") == auth.ADMIN
    assert auth.required_role("GET", f"/api/v1/chunks/v/{CID}") == auth.ADMIN
    assert auth.required_role("DELETE", "/api/v1/info") == auth.ADMIN


def test_config_readonly_tokens_and_health_open() -> None:
    cfg = load_config(None, {"SYNCMESH_NODE_ID": "n1", "SYNCMESH_SECURITY_AUTH_ENABLED": "true",
                             "SYNCMESH_SECURITY_AUTH_TOKENS": f"{ADMIN}, {ADMIN2}",
                             "SYNCMESH_SECURITY_AUTH_READONLY_TOKENS": READER,
                             "SYNCMESH_SECURITY_HEALTH_OPEN": "false"})
    assert cfg.security.auth_tokens == [ADMIN, ADMIN2] and cfg.security.auth_readonly_tokens == [READER]
    assert cfg.security.health_open is False
    shown = as_dict(cfg)["security"]
    assert shown["auth_readonly_tokens"] == ["********"] and shown["auth_tokens"] == ["********"] * 2
    assert load_config(None, {"SYNCMESH_NODE_ID": "n1"}).security.health_open is True


@pytest.mark.parametrize("env, match", [
    ({"SYNCMESH_SECURITY_AUTH_READONLY_TOKENS": "only-readers-here"}, "needs at least one token"),
    ({"SYNCMESH_SECURITY_AUTH_TOKENS": "same-token-value", "SYNCMESH_SECURITY_AUTH_READONLY_TOKENS":
      "same-token-value"}, "both admin and read-only"),
])
def test_config_token_errors(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as ei:
        load_config(None, {"SYNCMESH_NODE_ID": "n1", "SYNCMESH_SECURITY_AUTH_ENABLED": "true", **env})
    for v in env.values():
        assert v not in str(ei.value)


def test_config_token_with_space_refused_without_echoing_it(tmp_path: Any) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("security:\n  auth_enabled: true\n  auth_tokens: ['has a space secret']\n")
    with pytest.raises(ConfigError, match="printable ASCII") as ei:
        load_config(str(p), {"SYNCMESH_NODE_ID": "n1"})
    assert "secret" not in str(ei.value)


async def test_status_page_html_is_public_but_its_data_is_not(client: TestClient[Any, Any]) -> None:
    """The page (static HTML, no data) loads without a token and asks for one; the API it calls still
    refuses without it."""
    assert (await client.get("/")).status == 200
    assert (await client.post("/")).status == 401
    assert (await client.get("/api/v1/volumes")).status == 401
    assert (await client.get("/api/v1/volumes", headers=bearer(READER))).status == 200

