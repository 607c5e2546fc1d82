"""Concurrent writers on one path: etcd's failed compare-and-swap detects it, every node ends the same,
and by default no content is lost (the loser is kept as a conflict copy).

Concurrency is made deterministic by freezing one daemon (SIGSTOP) while both sides write, so the
frozen node's publish is guaranteed to race against a change it has not seen yet.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import Node, converged, wait_for, write


def pair(cluster, volume: str, opts: dict[str, str] | None = None) -> tuple[Node, Node]:  # type: ignore[no-untyped-def]
    a, b = cluster("na"), cluster("nb")
    a.ok("VolumeDriver.Create", {"Name": volume, "Opts": opts})
    a.mount(volume)
    b.mount(volume)
    return a, b


def concurrent_write(a: Node, b: Node, volume: str, rel: str, data_a: bytes, data_b: bytes,
                     mtime_a: int, mtime_b: int) -> None:
    """a and b both change `rel` before either has seen the other's change."""
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP)
    try:
        write(a.vol(volume) / rel, data_a)
        os.utime(a.vol(volume) / rel, ns=(mtime_a, mtime_a))
        # wait until a's change is in etcd (a's status counts it)
        wait_for(lambda: a.http("GET", f"/api/v1/volumes/{volume}")[1]["sync"]["published"] >= 1, 10,
                 what="a to publish")
        write(b.vol(volume) / rel, data_b)
        os.utime(b.vol(volume) / rel, ns=(mtime_b, mtime_b))
    finally:
        b.proc.send_signal(signal.SIGCONT)


def contents(t: dict, root: Path) -> dict[str, bytes]:
    return {k: (root / k).read_bytes() for k, v in t.items() if v[0] == "file"}


T0 = 1_700_000_000 * 10**9


@pytest.mark.parametrize("mode", ["timestamp", "size", "manual"])
def test_concurrent_writes_keep_both_versions(cluster, volume, mode):
    a, b = pair(cluster, volume, {"conflict_resolution": mode})
    data_a, data_b = b"A" * 5000, b"B" * 3000  # a: larger but older; b: smaller but newer
    concurrent_write(a, b, volume, "doc.txt", data_a, data_b, T0, T0 + 10**9)
    t = converged([a, b], volume, expect=lambda t: len([k for k in t if k.startswith("doc")]) == 2)
    files = contents(t, a.vol(volume))
    copies = [k for k in files if ".sync-conflict-" in k]
    assert len(copies) == 1 and copies[0].startswith("doc.sync-conflict-") and copies[0].endswith(".txt")
    winner = {"timestamp": data_b, "size": data_a, "manual": data_a}[mode]
    loser = data_b if winner == data_a else data_a
    assert files["doc.txt"] == winner
    assert files[copies[0]] == loser
    _, conflicts_a = a.http("GET", f"/api/v1/volumes/{volume}")
    _, conflicts_b = b.http("GET", f"/api/v1/volumes/{volume}")
    assert conflicts_a["sync"]["conflicts"] + conflicts_b["sync"]["conflicts"] >= 1


def test_conflict_copies_can_be_turned_off(cluster, volume):
    a, b = pair(cluster, volume, {"keep_conflict_copies": "false"})
    concurrent_write(a, b, volume, "x.bin", b"old" * 100, b"new" * 100, T0, T0 + 10**9)
    t = converged([a, b], volume, expect=lambda t: "x.bin" in t and (a.vol(volume) / "x.bin").read_bytes()
                  == b"new" * 100)
    assert not [k for k in t if ".sync-conflict-" in k]


def test_modify_beats_delete(cluster, volume):
    a, b = pair(cluster, volume)
    write(a.vol(volume) / "keep.txt", "v1")
    converged([a, b], volume, expect=lambda t: "keep.txt" in t)
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP)
    try:
        (a.vol(volume) / "keep.txt").unlink()
        wait_for(lambda: a.http("GET", f"/api/v1/volumes/{volume}")[1]["sync"]["published"] >= 2, 10)
        write(b.vol(volume) / "keep.txt", "v2 edited while deleted elsewhere")
    finally:
        b.proc.send_signal(signal.SIGCONT)
    converged([a, b], volume, expect=lambda t: "keep.txt" in t
              and (a.vol(volume) / "keep.txt").read_text() == "v2 edited while deleted elsewhere")


def test_simultaneous_creates_on_three_nodes(cluster, volume):
    nodes = [cluster(f"n{i}") for i in range(3)]
    nodes[0].ok("VolumeDriver.Create", {"Name": volume})
    for n in nodes:
        n.mount(volume)
    for i, n in enumerate(nodes):
        write(n.vol(volume) / "same.txt", f"from node {i}" * (i + 1))
    t = converged(nodes, volume, expect=lambda t: len([k for k in t if k.startswith("same")]) == 3)
    datas = sorted(contents(t, nodes[0].vol(volume)).values())
    assert datas == sorted((f"from node {i}" * (i + 1)).encode() for i in range(3))
