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


@pytest.fixture
def cluster(etcd: Etcd, tmp_path: Path) -> Iterator[Callable[..., Node]]:
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
    failed = [n for n in nodes if n.proc is not None and "Traceback" in n.log()]
    for n in failed:
        print(f"---- {n.name} log (has a traceback) ----\n{n.log()[-4000:]}")


@pytest.fixture
def volume() -> str:
    return f"v{uuid.uuid4().hex[:8]}"
