"""Integration fixtures: a real etcd process, real daemons as subprocesses, real sockets and HTTP."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from syncmesh_plugin.devcluster import (  # noqa: F401  (re-exported for the test modules)
    Etcd,
    Node,
    converged,
    free_port,
    timer,
    tree,
    wait_for,
    write,
)


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    e = Etcd(tmp_path_factory.mktemp("etcd"))
    e.start()
    yield e
    e.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture
def cluster(etcd: Etcd, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Node]]:
    """Factory for daemons sharing one etcd prefix (a fresh prefix per test keeps tests independent)."""
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
    rep = getattr(request.node, "rep_call", None)
    for n in nodes:
        if n.proc is not None and ((rep is not None and rep.failed) or "Traceback" in n.log()):
            print(f"---- {n.name} log ----\n{n.log()[-6000:]}")


@pytest.fixture
def volume() -> str:
    return f"v{uuid.uuid4().hex[:8]}"
