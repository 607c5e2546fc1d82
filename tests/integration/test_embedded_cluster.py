"""An embedded etcd cluster that grows with the hosts (issue 22 item 3), as k3s grows its embedded etcd.

The first node runs its embedded member alone; the next ones start with `join` (SYNCMESH_JOIN=http://host1:
PORT) and become members (learners first, promoted once caught up) up to etcd.embedded_members (3), later
nodes are clients only. Losing one of the three member hosts for good loses nothing; `forget` removes its
member, and a new host then takes the free place. Real daemons, real embedded etcd members on loopback.
"""

from __future__ import annotations

import asyncio
import datetime
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import check_daemon_logs
from etcd3aio import Etcd3Client

from syncmesh_plugin import pki
from syncmesh_plugin.devcluster import Node, converged, embedded_etcd_pid, wait_for, write


def lose_host(n: Node) -> None:
    """The host is gone for good: its daemon and its etcd member die at once (SIGKILL)."""
    pid = embedded_etcd_pid(n)
    n.kill()
    if pid is not None:
        os.kill(pid, signal.SIGKILL)


def members(n: Node) -> list[dict[str, Any]]:
    code, body = n.http("GET", "/api/v1/cluster/status")
    assert code == 200, body
    return body["etcd"]["members"]  # type: ignore[no-any-return]


def voting(n: Node) -> list[str]:
    return sorted(m["name"] for m in members(n) if not m["learner"] and m["name"])


@pytest.fixture
def hosts(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Node]]:
    prefix = f"/t{uuid.uuid4().hex[:10]}"
    made: list[Node] = []

    def make(name: str, join: Node | None = None, start: bool = True, tls: bool = False, token: str = "",
             **env: str) -> Node:
        extra = {"SYNCMESH_JOIN": join.api_url} if join is not None else {}
        n = Node(tmp_path, name, None, prefix, SYNCMESH_ETCD_TIMEOUT="5s", tls=tls, join_token=token, **extra, **env)
        made.append(n)
        if start:
            n.start(wait=False)
            n.wait_healthy(60)
        return n

    yield make
    for n in made:
        pid = embedded_etcd_pid(n)
        n.stop(timeout=10)
        if pid is not None and embedded_etcd_pid(n) == pid:
            os.kill(pid, signal.SIGKILL)  # a member whose daemon was killed earlier in the test
    check_daemon_logs(made, request)


def forget_member(via: Node, node: str) -> None:
    """`syncmesh-plugin forget NODE` on `via`'s host until it is accepted (once the node's lease expired) and
    has removed the node's etcd member."""
    def forgotten() -> bool:
        out = subprocess.run([sys.executable, "-m", "syncmesh_plugin", "forget", node], env=via.env,
                             capture_output=True, text=True, timeout=60)
        return out.returncode == 0 and "etcd member" in out.stdout and "removed" in out.stdout

    wait_for(forgotten, 40, interval=1, what=f"forget {node} to be accepted and remove its member")


def _create_all(nodes: list[Node], name: str) -> float:
    worst = 0.0
    for n in nodes:
        t0 = time.monotonic()
        code, data = n.docker("VolumeDriver.Create", {"Name": name})
        worst = max(worst, time.monotonic() - t0)
        assert code == 200 and not data.get("Err"), f"{n.name} Create {name}: {data}"
    return worst


def _each_node_writes(nodes: list[Node], volume: str) -> None:
    """The volume created and mounted on every node, a file written on each, the same tree everywhere."""
    _create_all(nodes, volume)
    for n in nodes:
        n.mount(volume)
    for n in nodes:
        write(n.vol(volume) / f"from-{n.name}.txt", f"written on {n.name}")
    converged(nodes, volume, timeout=30,
              expect=lambda t: len([p for p in t if p.startswith("from-")]) == len(nodes))


def test_embedded_cluster_grows_survives_a_lost_host_and_forgets_it(hosts, volume):
    n1 = hosts("n1")
    assert voting(n1) == ["n1"]
    n2 = hosts("n2", join=n1)
    wait_for(lambda: voting(n1) == ["n1", "n2"], 30, what="n2 to be promoted to a voting member")
    n3 = hosts("n3", join=n2)  # any node of the cluster can take a newcomer in
    wait_for(lambda: voting(n1) == ["n1", "n2", "n3"], 30, what="n3 to be promoted to a voting member")
    n4 = hosts("n4", join=n1)  # the cluster has its three members: a client only
    assert embedded_etcd_pid(n4) is None and voting(n4) == ["n1", "n2", "n3"]
    role = json.loads((n4.data_root / "etcd" / "cluster.json").read_text())
    assert role["role"] == "client" and len(role["endpoints"]) == 3
    for n in (n2, n3):
        assert json.loads((n.data_root / "etcd" / "cluster.json").read_text())["role"] == "member"
        assert embedded_etcd_pid(n) is not None
    # every node talks to its own member first; the client to a member
    for n in (n1, n2, n3):
        _, h = n.http("GET", "/api/v1/health")
        assert h["components"]["etcd"]["endpoint"].startswith("http://127.0.0.1:")
        wait_for(lambda n=n: len(n.http("GET", "/api/v1/health")[1]["components"]["etcd"]["members"]) == 3, 20,
                 what=f"{n.name}'s endpoints to follow the member list")
    nodes = [n1, n2, n3, n4]
    _each_node_writes(nodes, volume)

    # n1's host is lost for good (daemon and member killed at once): the other two members keep a quorum
    lose_host(n1)
    t0 = time.monotonic()
    worst = _create_all([n2, n3, n4], f"{volume}after")
    print(f"\nfirst Create after the loss of n1: at most {worst:.2f}s ({time.monotonic() - t0:.2f}s for three)")
    assert worst < 5.0
    for n in (n2, n3, n4):
        write(n.vol(volume) / f"after-{n.name}.txt", "written after n1 was lost")
    converged([n2, n3, n4], volume, timeout=30, expect=lambda t: len([p for p in t if p.startswith("after-")]) == 3)

    # forget n1 (once its lease expired): its member goes, two are left; a new host takes the free place
    forget_member(n2, "n1")
    assert voting(n2) == ["n2", "n3"]
    wait_for(lambda: len(n3.http("GET", "/api/v1/health")[1]["components"]["etcd"]["members"]) == 2, 20,
             what="n3's endpoints to drop the forgotten member")
    n5 = hosts("n5", join=n3)
    wait_for(lambda: voting(n2) == ["n2", "n3", "n5"], 30, what="n5 to take the free place")
    n5.mount(volume)
    converged([n2, n3, n4, n5], volume, timeout=30, expect=lambda t: "after-n4.txt" in t)

    # a member restarts: it comes back as the member it was (its data), nothing asked of anyone
    n2.stop()
    _create_all([n3, n4, n5], f"{volume}restart")
    n2.start(wait=False)
    n2.wait_healthy(60)
    assert voting(n2) == ["n2", "n3", "n5"]
    _create_all([n2, n3, n4, n5], f"{volume}back")


def etcd_args(n: Node) -> list[str]:
    pid = embedded_etcd_pid(n)
    assert pid is not None, f"{n.name} runs no etcd member"
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return [a.decode() for a in fh.read().split(b"\0") if a]


def etcd_read(port: int, trust: Path, identity: Path | None) -> str:
    """A read over gRPC from the member's client port with this certificate: "" when it answered, else the
    error etcd gave."""
    async def read() -> str:
        tls: dict[str, bytes] = {"ca_cert": trust.read_bytes()}
        if identity is not None:
            tls |= {"cert_chain": identity.read_bytes(), "cert_key": identity.read_bytes()}
        client = Etcd3Client([f"127.0.0.1:{port}"], tls_server_name="127.0.0.1", rpc_max_attempts=1, **tls)
        try:
            await client.connect()
            assert client.kv is not None
            await client.kv.get(b"/", timeout=5)
            return ""
        except Exception as exc:  # the test asserts which error
            return f"{type(exc).__name__}: {exc}"
        finally:
            await client.close()

    return asyncio.run(read())


def plain_http(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        conn.getresponse().read()
    finally:
        conn.close()


def test_embedded_cluster_under_tls_uses_the_clusters_certificates_and_etcd_auth(hosts, volume, tmp_path):
    """The defaults (security.tls_enabled): members talk mutual TLS with the cluster's certificates, etcd
    authentication is on (a node is the etcd user its certificate names), a host joins with the join
    token only, and a wrong token gets nothing."""
    n1 = hosts("n1", tls=True)
    token = n1.join_token()
    assert token, "the founder printed no join token"
    n2 = hosts("n2", join=n1, tls=True, token=token)
    wait_for(lambda: voting(n1) == ["n1", "n2"], 30, what="n2 to be promoted to a voting member")
    n3 = hosts("n3", join=n2, tls=True, token=token)
    wait_for(lambda: voting(n1) == ["n1", "n2", "n3"], 30, what="n3 to be promoted to a voting member")
    n4 = hosts("n4", join=n3, tls=True, token=token)  # the cluster has its three members: a client only
    assert embedded_etcd_pid(n4) is None and voting(n4) == ["n1", "n2", "n3"]
    for m in members(n1):
        assert all(u.startswith("https://") for u in m["peer_urls"] + m["client_urls"]), m
    for n in (n1, n2, n3):
        args = etcd_args(n)
        for flag in ("--client-cert-auth", "--peer-client-cert-auth"):
            assert flag in args, (n.name, args)
        _, h = n.http("GET", "/api/v1/health")
        assert h["components"]["etcd"]["endpoint"].startswith("https://127.0.0.1:"), h["components"]["etcd"]
    assert all(e.startswith("https://") for e in json.loads((n4.data_root / "etcd" / "cluster.json").read_text())[
        "endpoints"])
    for n in (n2, n3, n4):  # the joiners took the cluster's CA from the answer, checked against the token
        assert n.http("GET", "/api/v1/pki")[1]["cas"][0]["fingerprint"] == n1.http("GET", "/api/v1/pki")[1]["cas"][0][
            "fingerprint"]

    port = int(json.loads((n3.data_root / "etcd" / "ports.json").read_text())["client"])  # n3's own member
    trust = n3.pki_dir / "trust-cas.pem"
    # plain HTTP, TLS without a client certificate: refused before etcd reads a key
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        plain_http(port)  # etcd closes a connection that does not start a TLS handshake
    assert etcd_read(port, trust, None) != ""  # TLS without a client certificate: refused in the handshake
    # a node's certificate: etcd knows the node as its user
    assert etcd_read(port, trust, n3.pki_dir / "node-identity.pem") == ""
    # a certificate of the cluster's own CA for a name etcd has no user for: authentication is on, refused
    ca_dir = n1.pki_dir / "ca"
    ca_key_file = next(ca_dir.glob("*-key.pem"))
    ca_cert = pki.load_cert((ca_dir / ca_key_file.name.replace("-key.pem", ".pem")).read_bytes())
    ca_key = pki.load_key(ca_key_file.read_bytes())
    key = pki.new_key()
    stranger = pki.sign_request(ca_cert, ca_key, pki.make_csr(key, "stranger"), "stranger", [],
                                datetime.timedelta(days=1))
    (tmp_path / "stranger.pem").write_bytes(pki.key_pem(key) + pki.cert_pem(stranger).encode())
    err = etcd_read(port, trust, tmp_path / "stranger.pem")
    assert "user name not found" in err or "permission denied" in err, err

    # a host with a wrong token: refused by the signer, no member added, no certificate
    wrong = token[:-6] + ("aaaaaa" if not token.endswith("aaaaaa") else "bbbbbb")
    bad = hosts("bad", join=n1, tls=True, token=wrong, start=False)
    bad.start(wait=False)
    wait_for(lambda: "the join token's secret is wrong" in bad.log(), 30, what="the wrong token to be refused")
    assert not (bad.pki_dir / "node-identity.pem").exists() and embedded_etcd_pid(bad) is None
    assert sorted(m["name"] for m in members(n1)) == ["n1", "n2", "n3"]
    bad.stop()

    nodes = [n1, n2, n3, n4]
    _each_node_writes(nodes, volume)

    # a member restarts from its data (with its certificate, TLS from the start), then the founder's host is
    # lost: the two other members keep a quorum over TLS
    n2.stop()
    _create_all([n1, n3, n4], f"{volume}restart")
    n2.start(wait=False)
    n2.wait_healthy(60)
    write(n2.vol(volume) / "after-restart.txt", "n2 is back")
    converged(nodes, volume, timeout=30, expect=lambda t: "after-restart.txt" in t)
    lose_host(n1)
    worst = _create_all([n2, n3, n4], f"{volume}after")
    print(f"\nfirst Create after the loss of n1 (TLS): at most {worst:.2f}s")
    assert worst < 5.0
    write(n3.vol(volume) / "after-loss.txt", "n1 is gone")
    converged([n2, n3, n4], volume, timeout=30, expect=lambda t: "after-loss.txt" in t)

    # n1 forgotten: its member goes, and so does its etcd user: its certificate no longer opens etcd
    forget_member(n2, "n1")
    assert voting(n2) == ["n2", "n3"]
    err = etcd_read(port, trust, n1.pki_dir / "node-identity.pem")
    assert "user name not found" in err or "permission denied" in err, err


def test_ca_rotation_in_an_embedded_cluster_under_tls(hosts, volume):
    """A CA rotation changes what the members must trust: each member restarts with the new trust (it reads
    its CAs when it starts), one at a time so that three members keep their quorum, daemons dial again with
    their new certificates, and Docker calls and syncing go on throughout (no Create fails)."""
    n1 = hosts("n1", tls=True)
    n2 = hosts("n2", join=n1, tls=True, token=n1.join_token())
    wait_for(lambda: voting(n1) == ["n1", "n2"], 30, what="n2 to be promoted to a voting member")
    n3 = hosts("n3", join=n1, tls=True, token=n1.join_token())
    wait_for(lambda: voting(n1) == ["n1", "n2", "n3"], 30, what="n3 to be promoted to a voting member")
    nodes = [n1, n2, n3]
    for n in nodes:
        n.ok("VolumeDriver.Create", {"Name": volume})
        n.mount(volume)
    old_ca = n1.http("GET", "/api/v1/pki")[1]["cas"][0]["fingerprint"]
    code, body = n2.http("POST", "/api/v1/pki/ca/rotate")
    assert code == 200, body

    def done() -> bool:
        st = [n.http("GET", "/api/v1/pki")[1] for n in nodes]
        return all(s["rotation"] == "none" and s["cas"][0]["fingerprint"] != old_ca and len(s["cas"]) == 1
                   and s["certificate"]["ca"] == s["cas"][0]["fingerprint"] for s in st)

    i = 0
    deadline = time.monotonic() + 90
    while not done():  # Docker calls and writes go on during the rotation
        assert time.monotonic() < deadline, [n.http("GET", "/api/v1/pki")[1] for n in nodes]
        _create_all(nodes, f"{volume}r{i}")
        write(n1.vol(volume) / f"during-{i}.txt", f"write {i}")
        i += 1
        time.sleep(0.3)
    new_ca = n1.http("GET", "/api/v1/pki")[1]["cas"][0]["fingerprint"]
    for n in nodes:  # the member took the new trust; the file it reads holds the new CA alone by now
        cas = (n.pki_dir / "trust-cas.pem").read_bytes()
        assert cas.count(b"BEGIN CERTIFICATE") == 1 and pki.fingerprint(pki.load_cert(cas)) == new_ca
        wait_for(lambda n=n: "restarting the member to load it" in n.log(), 20, what=f"{n.name}'s member restart")
    wait_for(lambda: all(n.http("GET", "/api/v1/health")[1]["components"]["etcd"]["ok"] for n in nodes), 30,
             what="etcd healthy on every node")
    _create_all(nodes, f"{volume}after")
    write(n2.vol(volume) / "after.txt", "after the rotation")
    converged(nodes, volume, timeout=30,
              expect=lambda t: {"after.txt", *(f"during-{j}.txt" for j in range(i))} <= set(t))
    port = int(n1.http("GET", "/api/v1/health")[1]["components"]["etcd"]["endpoint"].rsplit(":", 1)[1])
    assert etcd_read(port, n1.pki_dir / "trust-cas.pem", n1.pki_dir / "node-identity.pem") == ""
