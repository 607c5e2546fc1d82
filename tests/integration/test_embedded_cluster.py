"""An embedded etcd cluster that grows with the hosts (issue 22 item 3), as k3s grows its embedded etcd.

The first node runs its embedded member alone; the next ones start with `join` (SYNCMESH_JOIN=http://host1:
PORT) and become members (learners first, promoted once caught up) up to etcd.embedded_members (3), later
nodes are clients only. Losing one of the three member hosts for good loses nothing; `forget` removes its
member, and a new host then takes the free place. Real daemons, real embedded etcd members on loopback.
"""

from __future__ import annotations

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

from syncmesh_plugin.devcluster import Node, converged, wait_for, write


def etcd_pid(n: Node) -> int | None:
    """The pid of the node's embedded etcd (found by its data directory, never by a name)."""
    data = str(n.data_root / "etcd" / "data")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        if data.encode() in args and any(a.endswith(b"etcd") for a in args[:1]):
            return int(d)
    return None


def lose_host(n: Node) -> None:
    """The host is gone for good: its daemon and its etcd member die at once (SIGKILL)."""
    pid = etcd_pid(n)
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

    def make(name: str, join: Node | None = None, start: bool = True, **env: str) -> Node:
        extra = {"SYNCMESH_JOIN": f"http://127.0.0.1:{join.port}"} if join is not None else {}
        n = Node(tmp_path, name, None, prefix, SYNCMESH_ETCD_TIMEOUT="5s", **extra, **env)
        made.append(n)
        if start:
            n.start(wait=False)
            n.wait_healthy(60)
        return n

    yield make
    for n in made:
        pid = etcd_pid(n)
        n.stop(timeout=10)
        if pid is not None and etcd_pid(n) == pid:
            os.kill(pid, signal.SIGKILL)  # a member whose daemon was killed earlier in the test
    check_daemon_logs(made, request)


def _create_all(nodes: list[Node], name: str) -> float:
    worst = 0.0
    for n in nodes:
        t0 = time.monotonic()
        code, data = n.docker("VolumeDriver.Create", {"Name": name})
        worst = max(worst, time.monotonic() - t0)
        assert code == 200 and not data.get("Err"), f"{n.name} Create {name}: {data}"
    return worst


def test_embedded_cluster_grows_survives_a_lost_host_and_forgets_it(hosts, volume):
    n1 = hosts("n1")
    assert voting(n1) == ["n1"]
    n2 = hosts("n2", join=n1)
    wait_for(lambda: voting(n1) == ["n1", "n2"], 30, what="n2 to be promoted to a voting member")
    n3 = hosts("n3", join=n2)  # any node of the cluster can take a newcomer in
    wait_for(lambda: voting(n1) == ["n1", "n2", "n3"], 30, what="n3 to be promoted to a voting member")
    n4 = hosts("n4", join=n1)  # the cluster has its three members: a client only
    assert etcd_pid(n4) is None and voting(n4) == ["n1", "n2", "n3"]
    role = json.loads((n4.data_root / "etcd" / "cluster.json").read_text())
    assert role["role"] == "client" and len(role["endpoints"]) == 3
    for n in (n2, n3):
        assert json.loads((n.data_root / "etcd" / "cluster.json").read_text())["role"] == "member"
        assert etcd_pid(n) is not None
    # every node talks to its own member first; the client to a member
    for n in (n1, n2, n3):
        _, h = n.http("GET", "/api/v1/health")
        assert h["components"]["etcd"]["endpoint"].startswith("http://127.0.0.1:")
        wait_for(lambda n=n: len(n.http("GET", "/api/v1/health")[1]["components"]["etcd"]["members"]) == 3, 20,
                 what=f"{n.name}'s endpoints to follow the member list")
    nodes = [n1, n2, n3, n4]
    _create_all(nodes, volume)
    for n in nodes:
        n.mount(volume)
    for n in nodes:
        write(n.vol(volume) / f"from-{n.name}.txt", f"written on {n.name}")
    converged(nodes, volume, timeout=30, expect=lambda t: len([p for p in t if p.startswith("from-")]) == 4)

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
    def forgotten() -> bool:
        out = subprocess.run([sys.executable, "-m", "syncmesh_plugin", "forget", "n1"], env=n2.env,
                             capture_output=True, text=True, timeout=60)
        return out.returncode == 0 and "etcd member" in out.stdout and "removed" in out.stdout

    wait_for(forgotten, 40, interval=1, what="forget n1 to be accepted and remove its member")
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
