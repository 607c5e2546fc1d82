"""Security end to end: real daemons, real etcd (also with TLS and with auth), real certificates.

- mutual TLS between daemons with certificates from `syncmesh-plugin certs`, bearer tokens with roles,
  a stranger (certificate from another CA) unable to fetch chunks, curl without a client certificate
  refused, secrets absent from logs, `config show`, the API and metrics;
- etcd with TLS and client certificates, and etcd with users and a role limited to the plugin's prefix;
- a chunk list pointing to chunks no one has, 1 GB request bodies, malformed JSON on every route.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Etcd, Node, check_daemon_logs, converged, need_tool, sync_status, wait_for, write

from syncmesh_plugin import certs, openapi

ADMIN = "admin-" + uuid.uuid4().hex
READER = "reader-" + uuid.uuid4().hex
BIG = os.urandom(150_000)  # above the inline limit: has to travel as chunks between peers


class SecNode(Node):
    """A daemon spoken to over HTTPS (client certificate `client_cert`) and/or with a bearer token."""

    def __init__(self, *args: Any, ctx: ssl.SSLContext | None = None, token: str = "", **env: str) -> None:
        super().__init__(*args, **env)
        self.ctx, self.token = ctx, token

    def connection(self) -> http.client.HTTPConnection:
        if self.ctx is None:
            return super().connection()
        return http.client.HTTPSConnection(self.api_host, self.port, timeout=self.http_timeout, context=self.ctx)

    def http(self, method: str, path: str, body: bytes | None = None,  # type: ignore[override]
             token: str | None = None) -> tuple[int, Any]:
        tok = self.token if token is None else token
        return super().http(method, path, body, {"Authorization": f"Bearer {tok}"} if tok else None)


@pytest.fixture
def nodes(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., SecNode]]:
    made: list[SecNode] = []

    def make(name: str, etcd: Etcd, prefix: str, start: bool = True, **kw: Any) -> SecNode:
        n = SecNode(tmp_path, name, etcd, prefix, **kw)
        made.append(n)
        if start:
            n.start()
        return n

    yield make
    for n in made:
        n.stop(timeout=5)
    check_daemon_logs(made, request)


def _pki(base: Path, *names: str) -> Path:
    certs.init_ca(str(base))
    for n in names:
        certs.issue(str(base), n)
    return base


def _client_ctx(pki: Path, name: str, trust: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(trust or pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / f"{name}.pem"), str(pki / f"{name}-key.pem"))
    return ctx


def _tls_env(pki: Path, name: str, ca: Path | None = None) -> dict[str, str]:
    return {"SYNCMESH_SECURITY_TLS_ENABLED": "true", "SYNCMESH_SECURITY_TLS_CERT_FILE": str(pki / f"{name}.pem"),
            "SYNCMESH_SECURITY_TLS_KEY_FILE": str(pki / f"{name}-key.pem"),
            "SYNCMESH_SECURITY_TLS_CA_FILE": str(ca or pki / "ca.pem")}


AUTH_ENV = {"SYNCMESH_SECURITY_AUTH_ENABLED": "true", "SYNCMESH_SECURITY_AUTH_TOKENS": ADMIN,
            "SYNCMESH_SECURITY_AUTH_READONLY_TOKENS": READER}


def _curl(*args: str) -> tuple[int, str]:
    r = subprocess.run([need_tool("curl"), "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", *args],
                       capture_output=True, text=True)
    return r.returncode, r.stdout


def _no_secrets(text: str | bytes, *secrets: str) -> None:
    s = text.decode(errors="replace") if isinstance(text, bytes) else text
    for secret in secrets:
        assert secret not in s, "a secret leaked"


def test_mutual_tls_and_tokens_between_daemons(nodes, etcd, volume, tmp_path):
    pki = _pki(tmp_path / "pki", "n1", "n2")
    other = _pki(tmp_path / "other", "n3")
    prefix = f"/t{uuid.uuid4().hex[:10]}"
    n1 = nodes("n1", etcd, prefix, ctx=_client_ctx(pki, "n1"), token=ADMIN, SYNCMESH_LOG_LEVEL="debug",
               **_tls_env(pki, "n1"), **AUTH_ENV)
    n2 = nodes("n2", etcd, prefix, ctx=_client_ctx(pki, "n2"), token=ADMIN, SYNCMESH_SECURITY_HEALTH_OPEN="false",
               **_tls_env(pki, "n2"), **AUTH_ENV)
    assert n1.http("GET", "/api/v1/info")[1]["advertise"].startswith("https://127.0.0.1:")
    # mount_partial: n3 (a stranger, below) must be able to mount a copy it can never complete
    n1.ok("VolumeDriver.Create", {"Name": volume, "Opts": {"mount_partial": "true"}})
    n1.mount(volume)
    n2.mount(volume)
    write(n1.vol(volume) / "big.bin", BIG)
    write(n2.vol(volume) / "from-n2.bin", BIG[::-1])
    converged([n1, n2], volume, expect=lambda t: {"big.bin", "from-n2.bin"} <= set(t))  # peers fetched over mTLS
    assert (n2.vol(volume) / "big.bin").read_bytes() == BIG

    # curl: no client certificate -> refused in the handshake; member certificate -> the token decides
    url = f"https://127.0.0.1:{n1.port}"
    ca, c1, k1 = str(pki / "ca.pem"), str(pki / "n1.pem"), str(pki / "n1-key.pem")
    rc, _ = _curl("--cacert", ca, f"{url}/api/v1/health")
    assert rc != 0
    rc, _ = _curl("--cacert", ca, "--cert", str(other / "n3.pem"), "--key", str(other / "n3-key.pem"),
                  f"{url}/api/v1/health")
    assert rc != 0
    assert _curl("--cacert", ca, "--cert", c1, "--key", k1, f"{url}/api/v1/health") == (0, "200")
    assert _curl("--cacert", ca, "--cert", c1, "--key", k1, f"{url}/api/v1/volumes") == (0, "401")
    assert _curl("--cacert", ca, "--cert", c1, "--key", k1, "-H", f"Authorization: Bearer {READER}",
                 f"{url}/api/v1/volumes") == (0, "200")
    batch = f"{url}/api/v1/chunks/{volume}/batch"
    assert _curl("--cacert", ca, "--cert", c1, "--key", k1, "-H", f"Authorization: Bearer {READER}",
                 "-d", '{"ids": []}', batch) == (0, "403")
    assert _curl("--cacert", ca, "--cert", c1, "--key", k1, "-H", f"Authorization: Bearer {ADMIN}",
                 "-d", '{"ids": []}', batch) == (0, "200")
    assert _curl("--cacert", ca, "--cert", c1, "--key", k1, "-H", "Authorization: Bearer wrong",
                 f"{url}/api/v1/chunks/{volume}/{'0' * 32}") == (0, "401")
    # health can be closed too (n2): 401 without a token
    assert n2.http("GET", "/api/v1/health", token="")[0] == 401
    assert n2.http("GET", "/api/v1/health", token=READER)[0] == 200

    # a stranger: right CA to trust, right token, but its certificate was signed by another CA
    n3 = nodes("n3", etcd, prefix, ctx=_client_ctx(pki, "n1", trust=other / "ca.pem"), token=ADMIN,
               SYNCMESH_SYNC_MOUNT_TIMEOUT="1s", **_tls_env(other, "n3", ca=pki / "ca.pem"), **AUTH_ENV)
    n3.mount(volume)
    # n3 tried both files and could fetch neither (its certificate is refused): they are deferred, not written
    wait_for(lambda: sync_status(n3, volume)["pending"] >= 2 and "big.bin deferred" in n3.log()
             and "from-n2.bin deferred" in n3.log(), 20, what="n3 to defer both files")
    assert not (n3.vol(volume) / "big.bin").exists() and not (n3.vol(volume) / "from-n2.bin").exists()
    assert n1.http("GET", "/api/v1/health")[0] == 200

    # secrets: nowhere in logs, config show, API answers or metrics
    for n in (n1, n2, n3):
        _no_secrets(n.log(), ADMIN, READER)
    for path in ("/api/v1/info", "/metrics", "/api/v1/volumes", f"/api/v1/volumes/{volume}",
                 "/api/v1/cluster/nodes", "/api/v1/sync/status", "/api/v1/events/recent"):
        _, body = n1.http("GET", path)
        _no_secrets(body if isinstance(body, bytes) else json.dumps(body), ADMIN, READER)
    shown = subprocess.run([sys.executable, "-m", "syncmesh_plugin", "config", "show", "--json"], env=n1.env,
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    _no_secrets(shown.stdout + shown.stderr, ADMIN, READER)
    assert json.loads(shown.stdout)["security"]["auth_tokens"] == ["********"]


class TLSEtcd(Etcd):
    """etcd serving clients over TLS and requiring client certificates signed by the CA."""

    def __init__(self, tmp: Path, pki: Path) -> None:
        super().__init__(tmp)
        self.pki = pki

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.client_port}"

    def client_urls(self) -> str:
        return self.endpoint

    def extra_args(self) -> list[str]:
        return ["--cert-file", str(self.pki / "etcd.pem"), "--key-file", str(self.pki / "etcd-key.pem"),
                "--trusted-ca-file", str(self.pki / "ca.pem"), "--client-cert-auth"]


def test_etcd_with_tls_and_client_certificates(nodes, tmp_path, volume):
    pki = _pki(tmp_path / "pki", "etcd", "n1", "n2")
    e = TLSEtcd(tmp_path / "etcd", pki)
    (tmp_path / "etcd").mkdir()
    e.start()
    try:
        # etcd itself refuses a client without a certificate
        rc, _ = _curl("--cacert", str(pki / "ca.pem"), "-X", "POST", "-d", "{}", f"{e.endpoint}/v3/maintenance/status")
        assert rc != 0
        prefix = f"/t{uuid.uuid4().hex[:10]}"
        env = lambda n: {"SYNCMESH_ETCD_TLS_CA_FILE": str(pki / "ca.pem"),  # noqa: E731
                         "SYNCMESH_ETCD_TLS_CERT_FILE": str(pki / f"{n}.pem"),
                         "SYNCMESH_ETCD_TLS_KEY_FILE": str(pki / f"{n}-key.pem")}
        a, b = nodes("n1", e, prefix, **env("n1")), nodes("n2", e, prefix, **env("n2"))
        a.ok("VolumeDriver.Create", {"Name": volume})
        a.mount(volume)
        b.mount(volume)
        write(a.vol(volume) / "over-tls.bin", BIG)
        converged([a, b], volume, expect=lambda t: "over-tls.bin" in t)
        assert a.http("GET", "/api/v1/health")[1]["components"]["etcd"]["ok"]
    finally:
        e.stop()


class _Gateway:
    """etcd's JSON gateway with an auth token: the etcdctl equivalents used to set up users and roles."""

    def __init__(self, etcd: Etcd) -> None:
        self.port = etcd.client_port
        self.token = ""

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("POST", path, json.dumps(body), headers={"Authorization": self.token} if self.token else {})
        data = json.loads(conn.getresponse().read() or b"{}")
        conn.close()
        return data

    def login(self, name: str, password: str) -> None:
        self.token = ""
        self.token = self.call("/v3/auth/authenticate", {"name": name, "password": password})["token"]


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_etcd_with_auth_and_a_role_limited_to_the_prefix(nodes, tmp_path, volume):
    e = Etcd(tmp_path)
    e.start()
    prefix = f"/mesh{uuid.uuid4().hex[:6]}"
    root_pw, pw = "root-" + uuid.uuid4().hex, "etcdpw-" + uuid.uuid4().hex
    try:
        g = _Gateway(e)
        # etcdctl user add root; user add syncmesh; role add syncmesh;
        # role grant-permission syncmesh readwrite --prefix PREFIX/; user grant-role syncmesh syncmesh; auth enable
        for path, body in [
            ("/v3/auth/user/add", {"name": "root", "password": root_pw}),
            ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
            ("/v3/auth/user/add", {"name": "syncmesh", "password": pw}),
            ("/v3/auth/role/add", {"name": "syncmesh"}),
            ("/v3/auth/role/grant", {"name": "syncmesh", "perm": {
                "permType": "READWRITE", "key": _b64(prefix + "/"), "range_end": _b64(prefix + "0")}}),
            ("/v3/auth/user/grant", {"user": "syncmesh", "role": "syncmesh"}),
            ("/v3/auth/enable", {}),
        ]:
            r = g.call(path, body)
            assert "error" not in r, (path, r)
        g.login("syncmesh", pw)
        assert "permission denied" in g.call("/v3/kv/range", {"key": _b64("/elsewhere")}).get("error", "")
        env = {"SYNCMESH_ETCD_USERNAME": "syncmesh", "SYNCMESH_ETCD_PASSWORD": pw}
        a, b = nodes("n1", e, prefix, SYNCMESH_LOG_LEVEL="debug", **env), nodes("n2", e, prefix, **env)
        a.ok("VolumeDriver.Create", {"Name": volume})
        a.mount(volume)
        b.mount(volume)
        write(a.vol(volume) / "with-auth.bin", BIG)
        write(b.vol(volume) / "small.txt", "hi")
        converged([a, b], volume, expect=lambda t: {"with-auth.bin", "small.txt"} <= set(t))
        # etcd restarts and forgets every auth token: the daemons authenticate again and keep syncing
        e.stop()
        e.start()
        write(a.vol(volume) / "after-restart.txt", "still syncing")
        converged([a, b], volume, timeout=40, expect=lambda t: "after-restart.txt" in t)
        # a wrong password: the daemon keeps serving the socket, reports etcd down, never logs the password
        bad = nodes("n3", e, prefix, start=False, SYNCMESH_ETCD_USERNAME="syncmesh",
                    SYNCMESH_ETCD_PASSWORD="wrong-" + pw)
        bad.start(wait=False)

        def refused() -> Any:
            code, h = bad.http("GET", "/api/v1/health")
            return code == 503 and "authenticat" in h["components"]["etcd"]["error"] and h

        h = wait_for(refused, 20, what="n3 to report the etcd authentication failure")
        for n in (a, b, bad):
            _no_secrets(n.log(), pw, root_pw)
        _no_secrets(json.dumps(h), pw)
        shown = subprocess.run([sys.executable, "-m", "syncmesh_plugin", "config", "show"], env=a.env,
                               capture_output=True, text=True)
        assert shown.returncode == 0 and "********" in shown.stdout
        _no_secrets(shown.stdout, pw)
        _no_secrets(a.http("GET", "/metrics")[1], pw)
        _no_secrets(json.dumps(a.http("GET", "/api/v1/info")[1]), pw)
    finally:
        e.stop()


def _find(obj: Any, key: str) -> list[Any]:
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == key] + [x for v in obj.values() for x in _find(v, key)]
    if isinstance(obj, list):
        return [x for v in obj for x in _find(v, key)]
    return []


def test_chunks_no_one_has_are_deferred_not_written(cluster, etcd, volume):
    a, b = cluster("n1"), cluster("n2")
    a.ok("VolumeDriver.Create", {"Name": volume})
    a.mount(volume)
    b.mount(volume)
    ghost = os.urandom(16).hex()
    etcd.put(f"{cluster.prefix}/files/{volume}/ghost.bin", json.dumps(
        {"k": "file", "o": "ghost", "ts": time.time(), "m": 420, "u": 0, "g": 0, "s": 50_000, "t": time.time_ns(),
         "d": ghost, "c": [[ghost, 50_000]]}).encode())
    write(b.vol(volume) / "after.txt", "later changes still apply")
    converged([a, b], volume, expect=lambda t: "after.txt" in t)
    for n in (a, b):
        assert not (n.vol(volume) / "ghost.bin").exists()
        assert not [p for p in n.vol(volume).iterdir() if p.name.startswith(".syncmesh-tmp-")]
        wait_for(lambda n=n: any(d >= 1 for d in _find(n.http("GET", f"/api/v1/volumes/{volume}")[1], "deferred")),
                 10, what="the change to be reported as deferred")
        assert "ghost.bin deferred" in n.log()
    # a newer version of the path still applies (the unobtainable version is kept as a conflict copy that
    # stays deferred: it is never written either)
    write(a.vol(volume) / "ghost.bin", BIG)
    converged([a, b], volume, expect=lambda t: "ghost.bin" in t)
    for n in (a, b):
        assert (n.vol(volume) / "ghost.bin").read_bytes() == BIG
        assert sorted(os.listdir(n.vol(volume))) == ["after.txt", "ghost.bin"]
        assert n.http("GET", "/api/v1/health")[0] == 200


def _routes(n: Node) -> list[tuple[str, str]]:
    """Every route the daemon serves, from the OpenAPI document it serves (tests/unit/test_api_openapi.py
    holds that document equal to the app's route table). No document, no test."""
    code, doc = n.http("GET", "/api/v1/openapi.json")
    assert code == 200 and isinstance(doc, dict), f"the daemon serves no OpenAPI document: {code} {doc!r:.200}"
    return sorted({(m.upper(), p) for p, ops in doc["paths"].items() for m in ops})


def _raw(port: int, head: str, body: bytes = b"", wait: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(head.encode() + body)
        return s.recv(65536)


def test_huge_bodies_and_malformed_json_on_every_route(cluster, volume):
    n = cluster("n1")
    n.ok("VolumeDriver.Create", {"Name": volume})
    n.mount(volume)
    write(n.vol(volume) / "f.txt", "x")
    subst = {"{name}": volume, "{volume}": volume, "{path}": "f.txt", "{chunk_id}": "0" * 32, "{node}": "gone"}
    routes = _routes(n)
    streams = [(m, p) for m, p in routes if p.endswith("/events")]  # never end by design: not sent bodies
    assert ("POST", "/api/v1/chunks/{volume}/batch") in routes and ("GET", "/api/v1/health") in routes
    tried = 0
    for method, template in routes:
        path = template
        for k, v in subst.items():
            path = path.replace(k, v)
        assert "{" not in path, f"no value to substitute in {template}"
        if (method, template) in streams:
            continue
        # 1 GB announced, never sent: refused from the header (the body is never sent, so an answer at
        # all means the daemon did not wait for it)
        answer = _raw(n.port, f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              f"Content-Length: {1 << 30}\r\n\r\n", b"{")
        assert answer.startswith(b"HTTP/1.1 413"), (method, path, answer[:100])
        tried += 1
        for body in (b"{", b"[" * 100_000, b"\xff\xfe\x00", b'{"ids": [1, 2', b"null", b'"x"', b"[]"):
            code, data = n.http(method, path, body)
            assert code < 500, (method, path, body[:10], code, data)
    # chunked transfer without a length: the batch route stops reading at its cap
    chunk = b"[" * 60_000
    head = (f"POST /api/v1/chunks/{volume}/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    answer = _raw(n.port, head, (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") * 3)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    # every route of the package's OpenAPI document (tests/unit/test_api_openapi.py holds it equal to the app's
    # routes): 31 today, the API grows (issues 15 and 19 added routes)
    packaged = {(m.upper(), p) for p, ops in openapi.load()["paths"].items() for m in ops}
    assert set(routes) == packaged and len(routes) >= 29 and streams == [("GET", "/api/v1/events")], routes
    assert tried == len(routes) - len(streams), (tried, len(routes))
    assert n.http("GET", "/api/v1/health")[0] == 200
    assert "Traceback" not in n.log()
    assert n.proc is not None and n.proc.poll() is None
    n.stop(signal.SIGTERM)
