"""`syncmesh-plugin certs init / issue`: files, modes, SANs, and real TLS handshakes with the daemon's contexts."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import ssl
import stat
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from syncmesh_plugin import certs
from syncmesh_plugin.cli import main
from syncmesh_plugin.config import load_config
from syncmesh_plugin.daemon import Daemon


def _mode(p: str | Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_init_and_issue_files_modes_and_names(tmp_path: Path) -> None:
    ca = certs.init_ca(str(tmp_path / "pki"))
    assert _mode(ca.key) == 0o600 and _mode(tmp_path / "pki") == 0o700
    node = certs.issue(str(tmp_path / "pki"), "node-1", ["10.0.0.5", "node1.example.com", "::1"])
    assert node.cert.endswith("/node-1.pem") and node.key.endswith("/node-1-key.pem")
    assert _mode(node.key) == 0o600 and _mode(node.cert) == 0o644
    cert = x509.load_pem_x509_certificate(Path(node.cert).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"node-1", "node1.example.com", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address(a)
                                                             for a in ("10.0.0.5", "127.0.0.1", "::1")}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    ca_cert = x509.load_pem_x509_certificate(Path(ca.cert).read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_refuses_to_overwrite_and_bad_input(tmp_path: Path) -> None:
    d = str(tmp_path)
    with pytest.raises(certs.CertError, match="run `syncmesh-plugin certs init` first"):
        certs.issue(d, "n1")
    certs.init_ca(d)
    with pytest.raises(certs.CertError, match="already exists"):
        certs.init_ca(d)
    certs.issue(d, "n1")
    with pytest.raises(certs.CertError, match="already exists"):
        certs.issue(d, "n1")
    certs.issue(d, "n1", force=True)
    for bad in ("../evil", "a/b", "", "-x", "x" * 64):
        with pytest.raises(certs.CertError, match="node name"):
            certs.issue(d, bad)
    with pytest.raises(certs.CertError, match="--host"):
        certs.issue(d, "n2", ["not a host!"])
    assert not (tmp_path / "n2.pem").exists()


def test_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["certs", "init", "--dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["certs", "issue", "n1", "--dir", str(tmp_path), "--host", "10.1.2.3"])
    assert r.exit_code == 0 and "security.tls_cert_file" in r.output
    assert (tmp_path / "n1.pem").exists() and (tmp_path / "n1-key.pem").exists()
    r = runner.invoke(main, ["certs", "init", "--dir", str(tmp_path)])
    assert r.exit_code == 2 and "already exists" in r.output
    r = runner.invoke(main, ["certs", "issue", "../x", "--dir", str(tmp_path)])
    assert r.exit_code == 2
    assert "BEGIN" not in r.output  # keys are never printed


def _daemon(pki: Path, node: str, ca: Path | None = None) -> Daemon:
    cfg = load_config(None, {"SYNCMESH_NODE_ID": node, "SYNCMESH_SECURITY_TLS_ENABLED": "true",
                             "SYNCMESH_SECURITY_TLS_CERT_FILE": str(pki / f"{node}.pem"),
                             "SYNCMESH_SECURITY_TLS_KEY_FILE": str(pki / f"{node}-key.pem"),
                             "SYNCMESH_SECURITY_TLS_CA_FILE": str(ca or pki / "ca.pem")})
    return Daemon(dataclasses.replace(cfg))


async def _serve(ctx: ssl.SSLContext) -> tuple[web.AppRunner, int]:
    async def hello(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        return web.json_response({"peer": dict(x[0] for x in peer["subject"])["commonName"] if peer else None})

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def _get(ctx: Any, port: int, host: str = "127.0.0.1") -> Any:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        async with s.get(f"https://{host}:{port}/", timeout=aiohttp.ClientTimeout(total=5)) as r:
            return await r.json()


async def test_mutual_tls_with_the_daemon_contexts(tmp_path: Path) -> None:
    pki, other = tmp_path / "pki", tmp_path / "other"
    certs.init_ca(str(pki))
    certs.init_ca(str(other))
    for n in ("n1", "n2"):
        certs.issue(str(pki), n)
    certs.issue(str(other), "n3")
    os.link(other / "n3.pem", pki / "n3.pem")
    os.link(other / "n3-key.pem", pki / "n3-key.pem")
    server = _daemon(pki, "n1")._server_ssl()
    assert server is not None and server.verify_mode == ssl.CERT_REQUIRED
    runner, port = await _serve(server)
    try:
        # a member (certificate signed by the mesh CA) gets through, and is identified
        assert await _get(_daemon(pki, "n2")._client_ssl(), port) == {"peer": "n2"}
        assert await _get(_daemon(pki, "n2")._client_ssl(), port, "localhost") == {"peer": "n2"}
        # a certificate from another CA is refused, even by a client that trusts the server
        with pytest.raises(aiohttp.ClientError):
            await _get(_daemon(pki, "n3", ca=pki / "ca.pem")._client_ssl(), port)
        # no client certificate at all: refused
        bare = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with pytest.raises(aiohttp.ClientError):
            await _get(bare, port)
        # and a member does not trust a server whose certificate another CA signed
        runner3, port3 = await _serve(_daemon(pki, "n3", ca=other / "ca.pem")._server_ssl())  # type: ignore[arg-type]
        try:
            with pytest.raises(aiohttp.ClientError):
                await _get(_daemon(pki, "n2")._client_ssl(), port3)
        finally:
            await runner3.cleanup()
    finally:
        await runner.cleanup()
    await asyncio.sleep(0)
