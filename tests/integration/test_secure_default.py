"""Secure by default (issue 19): real daemons started with the defaults only, a real etcd, real TLS.

- two and three nodes converge over mutual TLS with the cluster's own CA, the others joining with the
  token the first node prints;
- a client without a certificate gets through the handshake but no further than health, the status page
  and localhost metrics; one with a certificate of another CA, or of a forgotten node, is refused in the
  handshake; with security.client_cert_required no certificate, no handshake;
- no volume byte and no manifest without credentials, on every route of the OpenAPI document;
- the CLI on the node's host with no flags (like `make run`: embedded etcd, defaults);
- certificates renewed under load (20 s lifetime), a node joining after the first certificates expired;
- CA rotation and join-token rotation; trust through etcd; plain HTTP warned about.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Etcd, Node, check_daemon_logs, converged, need_tool, sync_status, wait_for, write

from syncmesh_plugin import certs, pki
from syncmesh_plugin.config import _primary_address

SECRET = b"root:hunter2:" + os.urandom(16).hex().encode()
BIG = SECRET + os.urandom(150_000)  # chunks, fetched from peers


@pytest.fixture
def secure(etcd: Etcd, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Node]]:
    """Daemons with the product's defaults (no TLS or auth settings at all); every node after the first
    gets the first node's join token, as an operator would copy it."""
    prefix = f"/s{uuid.uuid4().hex[:10]}"
    made: list[Node] = []

    def make(name: str, *, token: str | None = None, start: bool = True, etcd_: Etcd | None = etcd,
             **env: str) -> Node:
        tok = token if token is not None else (made[0].join_token() if made else "")
        n = Node(tmp_path, name, etcd_, prefix, tls=True, join_token=tok, **env)
        made.append(n)
        if start:
            n.start()
        return n

    make.prefix = prefix  # type: ignore[attr-defined]
    yield make
    for n in made:
        n.stop(timeout=5)
    check_daemon_logs(made, request)


def cli(n: Node, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`syncmesh-plugin ARGS` on the node's host: the node's configuration (its environment), no flags."""
    return subprocess.run([sys.executable, "-m", "syncmesh_plugin", *args], env=env or n.env, capture_output=True,
                          text=True, timeout=60)


def files_of(n: Node) -> tuple[str, str, str]:
    d = n.pki_dir
    return str(d / "node.pem"), str(d / "node-key.pem"), str(d / "trust.pem")


def copy_identity(n: Node, dest: Path) -> tuple[str, str]:
    """Keep a node's current certificate and key (to try them after a revocation, a rotation, an expiry)."""
    dest.mkdir(parents=True, exist_ok=True)
    cert, key, _ = files_of(n)
    (dest / "cert.pem").write_bytes(Path(cert).read_bytes())
    (dest / "key.pem").write_bytes(Path(key).read_bytes())
    return str(dest / "cert.pem"), str(dest / "key.pem")


def handshake(port: int, trust: str, cert: str | None = None, key: str | None = None, *,
              tls12: bool = False) -> str:
    """'ok' when the server answers an HTTP request over the handshake, else why not. With TLS 1.2 the
    server's refusal of the client certificate surfaces in the handshake itself."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=trust)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            s = ctx.wrap_socket(raw, server_hostname="localhost")  # the handshake
        except (ssl.SSLError, OSError) as exc:
            return f"refused in the handshake: {type(exc).__name__}: {exc}"
        try:
            s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = s.recv(100)
            return "ok" if data.startswith(b"HTTP/1.1 ") else f"no answer ({data!r})"
        except (ssl.SSLError, OSError) as exc:
            return f"refused after the handshake: {type(exc).__name__}: {exc}"
        finally:
            s.close()


def refused(port: int, trust: str, cert: str | None = None, key: str | None = None) -> bool:
    """Refused in the handshake: with TLS 1.2 the handshake itself fails; with TLS 1.3 (where the server
    checks the client's certificate after the client has finished) no HTTP answer ever comes."""
    r13, r12 = handshake(port, trust, cert, key), handshake(port, trust, cert, key, tls12=True)
    return r13 != "ok" and r12.startswith("refused in the handshake")


def request(n: Node, method: str, path: str, *, cert: tuple[str, str] | None = None, token: str = "",
            host: str = "127.0.0.1", body: bytes | None = None) -> tuple[int, bytes]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=files_of(n)[2])
    if cert:
        ctx.load_cert_chain(*cert)
    conn = http.client.HTTPSConnection(host, n.port, timeout=10, context=ctx)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(2_000_000)
    finally:
        conn.close()


def pki_status(n: Node) -> dict[str, Any]:
    code, body = n.http("GET", "/api/v1/pki")
    assert code == 200, body
    return body  # type: ignore[no-any-return]


def other_ca(tmp: Path) -> tuple[str, str]:
    """A certificate of another CA, made with `syncmesh-plugin certs` (a stranger)."""
    certs.init_ca(str(tmp))
    out = certs.issue(str(tmp), "stranger", ["127.0.0.1"])
    return out.cert, out.key


def volume_on(nodes: list[Node], volume: str) -> None:
    nodes[0].ok("VolumeDriver.Create", {"Name": volume})
    for n in nodes:
        n.mount(volume)


# ---------------------------------------------------------------------------------------------------------------


def test_two_nodes_with_defaults_mutual_tls_and_who_gets_through_the_handshake(secure, volume, tmp_path):
    n1 = secure("n1")
    token = n1.join_token()
    assert pki.parse_token(token).ca_fingerprint == pki_status(n1)["cas"][0]["fingerprint"]
    n2 = secure("n2")
    for n in (n1, n2):
        code, h = n.http("GET", "/api/v1/health")
        assert code == 200 and h["components"]["tls"]["mode"] == "auto" and "warnings" not in h, h
        assert n.http("GET", "/api/v1/info")[1]["advertise"].startswith("https://127.0.0.1:")
    volume_on([n1, n2], volume)
    write(n1.vol(volume) / "big.bin", BIG)
    write(n2.vol(volume) / "small.txt", "from n2")
    converged([n1, n2], volume, expect=lambda t: {"big.bin", "small.txt"} <= set(t))
    assert (n2.vol(volume) / "big.bin").read_bytes() == BIG  # its chunks came from n1 over mutual TLS
    st = pki_status(n2)
    assert st["signer"] == "n1" and not st["is_signer"] and set(st["nodes"]) == {"n1", "n2"}
    assert {r["ca"] for r in st["nodes"].values()} == {st["cas"][0]["fingerprint"]}

    trust = files_of(n1)[2]
    # no certificate: the handshake completes (browsers, health checks, tokens) and the request is anonymous
    assert handshake(n1.port, trust) == "ok"
    assert request(n1, "GET", "/api/v1/volumes")[0] == 401
    # a certificate of another CA: refused in the handshake, by both nodes
    stranger = other_ca(tmp_path / "other")
    for n in (n1, n2):
        assert refused(n.port, trust, *stranger), handshake(n.port, trust, *stranger, tls12=True)
    rc = subprocess.run([need_tool("curl"), "-s", "-o", "/dev/null", "--cacert", trust, "--cert", stranger[0],
                         "--key", stranger[1], f"https://127.0.0.1:{n1.port}/api/v1/health"]).returncode
    assert rc != 0
    # a member's certificate: an admin, on every node
    member = files_of(n2)[:2]
    assert handshake(n1.port, trust, *member, tls12=True) == "ok"
    assert request(n1, "GET", "/api/v1/volumes", cert=member)[0] == 200
    # the node's client refuses a server of another CA (n2 never talks to a stranger posing as a peer)
    assert n1.http("GET", "/api/v1/health")[0] == 200


def test_three_nodes_forget_and_client_cert_required(secure, volume, tmp_path):
    n1, n2, n3 = secure("n1"), secure("n2"), secure("n3")
    volume_on([n1, n2, n3], volume)
    write(n1.vol(volume) / "a.bin", BIG)
    write(n2.vol(volume) / "b.txt", "b")
    write(n3.vol(volume) / "c.bin", BIG[::-1])
    converged([n1, n2, n3], volume, expect=lambda t: {"a.bin", "b.txt", "c.bin"} <= set(t))
    assert set(pki_status(n1)["nodes"]) == {"n1", "n2", "n3"}
    trust = files_of(n1)[2]

    # n3 leaves for good: its certificate is kept (a disk that is not wiped), the node forgotten
    n3_cert = copy_identity(n3, tmp_path / "n3-copy")
    assert not refused(n1.port, trust, *n3_cert)
    # a connection n3's certificate opened before the revocation, kept alive
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=trust)
    ctx.load_cert_chain(*n3_cert)
    kept = http.client.HTTPSConnection("127.0.0.1", n1.port, timeout=10, context=ctx)
    kept.request("GET", "/api/v1/volumes")
    assert kept.getresponse().read() and kept.sock is not None
    n3.stop()
    wait_for(lambda: "n3" not in {x["node_id"] for x in n1.http("GET", "/api/v1/cluster/nodes")[1]["nodes"]}, 20,
             what="n3 to leave")
    out = cli(n2, "forget", "n3")  # on n2's host, no flags; n1 (the signer) revokes
    assert out.returncode == 0, out.stderr
    assert "certificate(s) revoked" in out.stdout, out.stdout
    for n in (n1, n2):
        wait_for(lambda n=n: refused(n.port, trust, *n3_cert), 10, what=f"{n.name} to refuse n3's certificate")
    sock = kept.sock
    kept.request("GET", "/api/v1/volumes")  # the same connection: refused now, and closed
    assert kept.sock is sock
    resp = kept.getresponse()
    assert resp.status == 403 and b"revoked" in resp.read() and resp.getheader("Connection") == "close"
    kept.close()
    assert request(n1, "GET", "/api/v1/volumes", cert=files_of(n2)[:2])[0] == 200  # members unaffected
    st = pki_status(n2)
    assert st["cas"][0]["crl_number"] >= 2 and "n3" not in st["nodes"]
    # n3 comes back with its revoked certificate: it says so, its renewal is refused, it gets no data
    n3.start(wait=False)
    wait_for(lambda: "certificate was revoked" in n3.log(), 20, what="n3 to notice its revocation")
    write(n1.vol(volume) / "after.bin", BIG + b"after")
    converged([n1, n2], volume, expect=lambda t: "after.bin" in t)
    assert not (n3.vol(volume) / "after.bin").exists()

    # a node refusing clients without a certificate in the handshake still syncs with its peers
    n4 = secure("n4", start=False, SYNCMESH_SECURITY_CLIENT_CERT_REQUIRED="true")
    n4.start()
    n4.mount(volume)
    converged([n1, n2, n4], volume, expect=lambda t: "after.bin" in t)
    assert refused(n4.port, trust)  # no certificate: refused in the handshake
    assert not refused(n4.port, trust, *files_of(n1)[:2])
    assert refused(n4.port, trust, *n3_cert)


def test_no_volume_byte_and_no_manifest_without_credentials(secure, etcd, volume):
    n1 = secure("n1", SYNCMESH_SERVER_HOST="0.0.0.0")
    n2 = secure("n2")
    volume_on([n1, n2], volume)
    write(n1.vol(volume) / "passwords.txt", SECRET)
    write(n1.vol(volume) / "big.bin", BIG)
    converged([n1, n2], volume, expect=lambda t: {"passwords.txt", "big.bin"} <= set(t))
    raw = etcd.get(f"{secure.prefix}/files/{volume}/big.bin")
    assert raw is not None
    chunk_id = json.loads(raw)["c"][0][0]
    member = files_of(n1)[:2]
    code, doc = request(n1, "GET", "/api/v1/openapi.json", cert=member)
    assert code == 200
    routes = sorted({(m.upper(), p) for p, ops in json.loads(doc)["paths"].items() for m in ops})
    assert len(routes) >= 29
    subst = {"{name}": volume, "{volume}": volume, "{path}": "passwords.txt", "{chunk_id}": chunk_id,
             "{node}": "n2"}
    public = {("GET", "/api/v1/health"), ("GET", "/"), ("GET", "/metrics"), ("GET", "/api/v1/metrics")}
    admin, readonly = ((n1.pki_dir / f).read_text().strip() for f in ("admin-token", "readonly-token"))
    primary = _primary_address()
    tried = 0
    for method, template in routes:
        path = template
        for k, v in subst.items():
            path = path.replace(k, v)
        body = json.dumps({"ids": [chunk_id]}).encode() if path.endswith("/batch") else (
            b"" if method == "POST" else None)
        # no certificate, no token / a wrong token: only the public routes answer, and none with data
        for token in ("", "wrong-" + uuid.uuid4().hex):
            code, data = request(n1, method, path, token=token, body=body)
            assert SECRET not in data and BIG[-200:] not in data, (method, path)
            expected = 200 if (method, template) in public else 401
            assert code == expected, (method, path, token[:5], code, data[:200])
            tried += 1
        # read-only token: never a chunk, never a POST
        if template.startswith("/api/v1/chunks/") or method == "POST":
            code, data = request(n1, method, path, token=readonly, body=body)
            assert code == 403 and SECRET not in data, (method, path, code)
    assert tried == 2 * len(routes)
    # metrics are open from the node's own host only; another address needs a token
    if not primary.startswith("127."):
        assert request(n1, "GET", "/metrics", host=primary)[0] == 401
        assert request(n1, "GET", "/metrics", host=primary, token=readonly)[0] == 200
    # with credentials the same routes give the data: an admin token, or a member's certificate
    batch = f"/api/v1/chunks/{volume}/batch"
    for kw in ({"token": admin}, {"cert": files_of(n2)[:2]}):
        code, data = request(n1, "POST", batch, body=json.dumps({"ids": [chunk_id]}).encode(), **kw)
        assert code == 200 and len(data) > 1000, (kw.keys(), code)
        code, data = request(n1, "GET", f"/api/v1/volumes/{volume}/files/passwords.txt", **kw)
        assert code == 200 and json.loads(data)["manifest"]["size"] == len(SECRET)


def test_cli_on_the_nodes_host_with_no_flags_and_embedded_etcd(secure):
    # like `make run`: embedded etcd, every setting at its default but where this node's files live
    n = secure("solo", etcd_=None)
    env = {k: v for k, v in n.env.items() if k not in ("SYNCMESH_LOG_FORMAT", "SYNCMESH_LOG_LEVEL")}
    for args, expect in ((["status"], "health    ok"), (["nodes"], "solo *"), (["ca", "status"], "signer    solo"),
                         (["volumes"], "NAME"), (["token", "--readonly"], "")):
        out = cli(n, *args, env=env)
        assert out.returncode == 0 and expect in out.stdout, (args, out.stdout, out.stderr)
    tok = cli(n, "token", env=env).stdout.strip()
    assert tok == n.join_token() and pki.parse_token(tok).ca_fingerprint == pki_status(n)["cas"][0]["fingerprint"]
    # a read-only token works over the network without a certificate (the status page's way)
    ro = cli(n, "token", "--readonly", env=env).stdout.strip()
    out = cli(n, "status", "--token", ro, env=env)
    assert out.returncode == 0 and "health    ok" in out.stdout, out.stderr
    out = cli(n, "resync", "nope", "--token", ro, env=env)  # a POST with a read-only token
    assert out.returncode == 1 and "read-only" in out.stderr, out.stderr
    out = cli(n, "status", "--token", "wrong", env=env)
    assert out.returncode == 1 and "HTTP 401" in out.stderr, out.stderr


def test_certificates_renewed_under_load(secure, volume, tmp_path):
    life = {"SYNCMESH_SECURITY_CERT_LIFETIME": "20s"}
    n1, n2 = secure("n1", **life), secure("n2", **life)
    first = {n.name: copy_identity(n, tmp_path / f"{n.name}-first") for n in (n1, n2)}
    volume_on([n1, n2], volume)
    stop = threading.Event()
    written: list[str] = []
    errors: list[str] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            name = f"load/f{i:04d}.bin"
            write(n1.vol(volume) / name, os.urandom(70_000) + str(i).encode())
            written.append(name)
            i += 1
            time.sleep(0.05)

    def reader() -> None:  # the API under TLS at the same time, fresh connections each time
        while not stop.is_set():
            try:
                sync_status(n2, volume)
            except Exception as exc:
                errors.append(repr(exc))
            time.sleep(0.1)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(pki_status(n)["renewals"] >= 2 for n in (n1, n2)), 60, interval=0.5,
                 what="two renewals on each node")
        expiry = max(pki.load_cert(Path(c).read_bytes()).not_valid_after_utc.timestamp() for c, _ in first.values())
        time.sleep(max(0.0, expiry - time.time()) + 1.0)  # the load goes on past the first certificates' expiry
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    converged([n1, n2], volume, timeout=60, expect=lambda t: set(written) <= set(t))
    for n in (n1, n2):
        st = pki_status(n)
        assert st["certificate"]["serial"] != pki.serial_hex(pki.load_cert(Path(first[n.name][0]).read_bytes())
                                                              .serial_number)
        assert n.http("GET", "/api/v1/health")[1]["components"]["tls"]["ok"]
        # the first certificate has expired: refused; the renewed one in the data root works
        assert refused(n.port, files_of(n)[2], *first[n.name])
        assert not refused(n.port, files_of(n)[2], *files_of(n)[:2])
    # a node joining now opens new connections to both: they present their renewed certificates
    n3 = secure("n3", **life)
    n3.mount(volume)
    converged([n1, n2, n3], volume, timeout=60, expect=lambda t: set(written) <= set(t))
    assert sync_status(n3, volume)["pending"] == 0


def test_ca_rotation_and_join_token_rotation(secure, volume, tmp_path):
    n1, n2 = secure("n1"), secure("n2")
    old_token = n1.join_token()
    old_ca = pki_status(n1)["cas"][0]["fingerprint"]
    n2_old = copy_identity(n2, tmp_path / "n2-old")
    volume_on([n1, n2], volume)
    write(n1.vol(volume) / "before.bin", BIG)
    converged([n1, n2], volume, expect=lambda t: "before.bin" in t)
    out = cli(n2, "ca", "rotate")  # asked on n2, carried out by the signer n1
    assert out.returncode == 0 and "CA rotation started" in out.stdout, out.stderr

    def done() -> bool:
        st = [pki_status(n) for n in (n1, n2)]
        return all(s["rotation"] == "none" and s["cas"][0]["fingerprint"] != old_ca
                   and s["certificate"]["ca"] == s["cas"][0]["fingerprint"] for s in st)

    i = 0
    deadline = time.monotonic() + 60
    while not done():  # changes keep flowing during the rotation
        assert time.monotonic() < deadline, [pki_status(n) for n in (n1, n2)]
        write(n2.vol(volume) / f"during/{i}.bin", BIG + str(i).encode())
        i += 1
        time.sleep(0.3)
    converged([n1, n2], volume, expect=lambda t: {"before.bin", *(f"during/{j}.bin" for j in range(i))} <= set(t))
    new_ca = pki_status(n1)["cas"][0]["fingerprint"]
    assert not (n1.pki_dir / "ca" / f"{old_ca}-key.pem").exists()  # the old CA key is gone
    assert refused(n1.port, files_of(n1)[2], *n2_old)  # a certificate of the old CA no longer gets in
    new_token = cli(n1, "token").stdout.strip()
    assert pki.parse_token(new_token).ca_fingerprint == new_ca != pki.parse_token(old_token).ca_fingerprint
    # a token from before the rotation no longer admits a node; the new one does
    stale = secure("n3", token=old_token, start=False)
    stale.start(wait=False)
    wait_for(lambda: "does not match the join token" in stale.log(), 20, what="n3 to be refused")
    stale.stop()
    n4 = secure("n4", token=new_token)
    n4.mount(volume)
    converged([n1, n2, n4], volume, expect=lambda t: "before.bin" in t)
    # join-token rotation: the previous token's secret no longer admits anyone
    out = cli(n2, "token", "--rotate")
    assert out.returncode == 0 and out.stdout.strip().startswith("SM1" + new_ca + "::"), out.stderr
    assert out.stdout.strip() != new_token and out.stdout.strip() == n1.join_token()
    late = secure("n5", token=new_token, start=False)
    late.start(wait=False)
    wait_for(lambda: "secret is wrong" in late.log(), 20, what="n5 to be refused")


def test_trust_through_etcd_without_a_token(secure, volume):
    via = {"SYNCMESH_SECURITY_TRUST_ETCD": "true"}
    n1 = secure("n1", **via)
    n2 = secure("n2", token="", **via)
    volume_on([n1, n2], volume)
    write(n1.vol(volume) / "big.bin", BIG)
    converged([n1, n2], volume, expect=lambda t: "big.bin" in t)
    # without trust_etcd and without a token a node is told what to do, and gets no certificate
    n3 = secure("n3", token="", start=False)
    n3.start(wait=False)
    wait_for(lambda: "this cluster already has a CA (created by node n1)" in n3.log(), 20, what="n3's error")
    assert not (n3.pki_dir / "node.pem").exists()


def test_plain_http_is_an_explicit_choice_and_said_loudly(cluster):
    n = cluster("n1")  # the integration fixture sets security.tls_enabled false explicitly
    code, h = n.http("GET", "/api/v1/health")
    assert code == 200 and h["components"]["tls"]["mode"] == "off"
    assert any("tls_enabled is false" in w for w in h["warnings"]), h
    assert n.log().count("INSECURE: security.tls_enabled is false") >= 1
    assert n.http("GET", "/api/v1/info")[1]["advertise"].startswith("http://")
