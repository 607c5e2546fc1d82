"""Integration fixtures: a real etcd process, real daemons as subprocesses, real sockets and HTTP."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from syncmesh_plugin.devcluster import (  # noqa: F401  (re-exported for the test modules)
    Etcd,
    Node,
    converged,
    free_port,
    tree,
    wait_for,
    write,
)
from syncmesh_plugin.keyspace import Keyspace


def need_tool(name: str, package: str | None = None) -> str:
    """The path of a tool a test runs. A missing tool fails the test and names it: it is never a skip
    (.ci/run installs every tool the tests use)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (apt-get install {package or name}); this test needs it",
                    pytrace=False)
    return path


def serving(e: Etcd) -> Etcd:
    """Wait until etcd answers requests (it listens before it has elected itself leader)."""
    wait_for(lambda: "header" in e.etcd_api("/v3/kv/range", {"key": "AA=="}), 20, what="etcd to serve")
    return e


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    e = Etcd(tmp_path_factory.mktemp("etcd"))
    e.start()
    yield serving(e)
    e.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


_DEBUG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ DEBUG ")
_CHAINED = ("During handling of the above exception, another exception occurred:",
            "The above exception was the direct cause of the following exception:")


def first_traceback(log: str, lines: int = 30) -> str | None:
    """The first Python traceback in a daemon log with the line before it, or None; a long one keeps its
    first lines and its last (the innermost frames and the exception), `lines` in all.

    A traceback attached to a DEBUG record (and the tracebacks chained to it) does not count: it reports
    nothing wrong (grpc logs one at DEBUG for every watch stream it cancels). Any other one does, and so
    does a traceback written to stderr outside logging (an uncaught exception)."""
    text = log.splitlines()
    for i, line in enumerate(text):
        if line != "Traceback (most recent call last):":
            continue
        before = text[i - 1] if i else ""
        if before == "" and i >= 2 and text[i - 2] in _CHAINED:
            continue  # chained to the traceback before it, which was judged (and let pass) already
        if _DEBUG_RECORD.match(before):
            continue
        end = i + 1
        while end < len(text) and text[end].startswith(" "):
            end += 1  # frames and their source lines; the exception line ends the block
        block = text[max(0, i - 1): end + 1]
        if len(block) > lines:
            block = [*block[:3], f"  ... ({len(block) - lines + 1} lines) ...", *block[-(lines - 4):]]
        return "\n".join(block)
    return None


def check_daemon_logs(nodes: Sequence[Node], request: pytest.FixtureRequest) -> None:
    """Print the log tails when the test failed; fail the test when any daemon logged a traceback."""
    rep = getattr(request.node, "rep_call", None)
    failed = rep is not None and rep.failed
    found = []
    for n in nodes:
        if n.proc is None:
            continue
        log = n.log()
        tb = first_traceback(log)
        if failed or tb is not None:
            print(f"---- {n.name} log (tail) ----\n{log[-6000:]}")
        if tb is not None:
            found.append(f"{n.name} ({n.log_path}):\n{tb}")
    if found:
        pytest.fail("traceback in a daemon log:\n" + "\n\n".join(found), pytrace=False)


@pytest.fixture
def cluster(etcd: Etcd, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Node]]:
    """Factory for daemons sharing one etcd prefix (a fresh prefix per test keeps tests independent).

    After the test every daemon is stopped; a traceback in any daemon log fails the test."""
    prefix = f"/t{uuid.uuid4().hex[:10]}"
    nodes: list[Node] = []

    def make(name: str, start: bool = True, **env: str) -> Node:
        n = Node(tmp_path, name, etcd, prefix, **env)
        nodes.append(n)
        if start:
            n.start()
        return n

    make.prefix = prefix  # type: ignore[attr-defined]
    yield make
    for n in nodes:
        n.stop(timeout=5)
    check_daemon_logs(nodes, request)


@pytest.fixture
def volume() -> str:
    return f"v{uuid.uuid4().hex[:8]}"


# ---- waiting for an event instead of sleeping: what did not arrive once these hold never will


def _b64(key: str | bytes) -> str:
    return base64.b64encode(key.encode() if isinstance(key, str) else key).decode()


def mod_revision(etcd: Etcd, key: str | bytes) -> int:
    """The key's mod_revision in etcd (0: no such key)."""
    kvs = etcd.etcd_api("/v3/kv/range", {"key": _b64(key)}).get("kvs") or []
    return int(kvs[0].get("mod_revision", 0)) if kvs else 0


def keys_under(etcd: Etcd, prefix: str) -> list[str]:
    """Every key under a prefix (keys only)."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    r = etcd.etcd_api("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(end), "keys_only": True})
    return sorted(base64.b64decode(kv["key"]).decode() for kv in r.get("kvs") or [])


def sync_status(n: Node, volume: str) -> dict[str, Any]:
    """The node's sync status of one volume (watch revision, pending changes)."""
    code, body = n.http("GET", "/api/v1/sync/status")
    assert code == 200, body
    [vol] = [v for v in body["volumes"] if v["volume"] == volume]
    return vol  # type: ignore[no-any-return]


def settled(etcd: Etcd, prefix: str, volume: str, writers: Sequence[Node], followers: Sequence[Node],
            timeout: float = 30.0) -> int:
    """Wait until the writers have published everything they saw change (nothing pending) and every
    follower's watch has passed the volume's latest change, with nothing deferred. Returns that revision.
    A change that has not arrived on a follower by then was never published."""

    def idle() -> bool:
        return all(sync_status(w, volume)["pending"] == 0 for w in writers)

    wait_for(idle, timeout, what="the writers to have nothing left to publish")
    head = mod_revision(etcd, Keyspace(prefix).head_key(volume))
    assert head > 0, f"nothing was ever published to {volume}"

    def caught_up() -> bool:
        return all((s := sync_status(f, volume))["revision"] >= head and s["pending"] == 0 for f in followers)

    wait_for(caught_up, timeout, what=f"the followers to follow {volume} up to revision {head}")
    return head


def cli(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    """The admin CLI as an operator runs it, against `node`'s API."""
    return subprocess.run([sys.executable, "-m", "syncmesh_plugin", *args, "--api", f"http://127.0.0.1:{node.port}"],
                          capture_output=True, text=True, timeout=60)


def holding(cluster: Callable[..., Node], volume: str, n: int = 3, **opts: str) -> list[Node]:
    """`n` daemons (n1, n2, ...), the volume created on the first with `opts` and mounted on every one."""
    nodes = [cluster(f"n{i}") for i in range(1, n + 1)]
    nodes[0].ok("VolumeDriver.Create", {"Name": volume, "Opts": opts})
    for nd in nodes:
        nd.mount(volume)
    return nodes
