"""Housekeeping: one elected leader (failover when it dies), tombstone collection, compaction, and a
node that was away while tombstones were collected deletes instead of resurrecting; compaction bounded by
live nodes, defragmentation, the NOSPACE alarm, fenced leader deletes."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Etcd, Node, check_daemon_logs, converged, serving, settled, wait_for, write

from syncmesh_plugin.config import EtcdConfig
from syncmesh_plugin.housekeeping import ELECTION
from syncmesh_plugin.keyspace import Keyspace
from syncmesh_plugin.manifest import Manifest
from syncmesh_plugin.meta import EtcdStore

FAST = {"SYNCMESH_HOUSEKEEPING_INTERVAL": "1s", "SYNCMESH_HOUSEKEEPING_TOMBSTONE_RETENTION": "0s",
        "SYNCMESH_ETCD_LEASE_TTL": "2"}


def _leader(n) -> str:  # type: ignore[no-untyped-def]
    return n.http("GET", "/api/v1/cluster/status")[1].get("leader", "")


def test_one_leader_and_failover(cluster):
    a, b = cluster("n1", **FAST), cluster("n2", **FAST)
    wait_for(lambda: _leader(a) and _leader(a) == _leader(b), 15, what="an agreed leader")
    first = _leader(a)
    leader, other = (a, b) if first == "n1" else (b, a)
    leader.kill()
    wait_for(lambda: _leader(other) == other.name, 20, what="failover to the surviving node")


def test_tombstones_collected_and_absent_node_does_not_resurrect(cluster, etcd, volume):
    env = {**FAST, "SYNCMESH_HOUSEKEEPING_COMPACT_KEEP_REVISIONS": "1"}
    a, b = cluster("n1", **env), cluster("n2", **env)
    a.ok("VolumeDriver.Create", {"Name": volume})
    a.mount(volume)
    b.mount(volume)
    write(a.vol(volume) / "doomed.txt", "to be deleted while n2 is away")
    write(a.vol(volume) / "kept.txt", "stays")
    converged([a, b], volume, expect=lambda t: {"doomed.txt", "kept.txt"} <= set(t))
    b.stop()
    (a.vol(volume) / "doomed.txt").unlink()
    key = f"{cluster.prefix}/files/{volume}/doomed.txt"
    # the tombstone is published, then collected by the leader (n2 is not live: only n1 must have it)
    wait_for(lambda: etcd.get(key) is None, 30, what="the tombstone to be collected")
    gc = json.loads(etcd.get(f"{cluster.prefix}/gc/{volume}") or b"{}")
    assert gc.get("revision", 0) > 0
    b.start()
    converged([a, b], volume, expect=lambda t: "doomed.txt" not in t and "kept.txt" in t)
    # and it stays deleted everywhere (n2 did not publish it again)
    write(a.vol(volume) / "marker.txt", "after")
    t = converged([a, b], volume, expect=lambda t: "marker.txt" in t)
    assert "doomed.txt" not in t and etcd.get(key) is None


# ---------------------------------------------------------------------------------------------- compaction
def _metric(n: Node, name: str) -> float:
    _code, body = n.http("GET", "/metrics")
    text = body.decode() if isinstance(body, bytes) else str(body)
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{n.name} exports no {name}")


def _applied(etcd: Etcd, prefix: str, volume: str, node: str) -> int:
    raw = etcd.get(Keyspace(prefix).applied_key(volume, node))
    return int(json.loads(raw)["revision"]) if raw else 0


def _readable_at(etcd: Etcd, revision: int) -> bool:
    """False once etcd compacted its history past `revision`."""
    r = etcd.etcd_api("/v3/kv/range", {"key": base64.b64encode(b"/any").decode(), "revision": str(revision)})
    if "compacted" in r.get("error", "") + r.get("message", ""):
        return False
    assert "header" in r, r
    return True


def _collect_one_tombstone(a: Node, etcd: Etcd, prefix: str, volume: str, name: str) -> None:
    """Publish a file and its deletion on a volume only `a` holds; return once the leader collected the
    tombstone: one more housekeeping round has run to the end of its collection step."""
    write(a.vol(volume) / name, name)
    key = Keyspace(prefix).file_key(volume, name)
    wait_for(lambda: etcd.get(key) is not None, 10, what=f"{name} published")
    (a.vol(volume) / name).unlink()
    wait_for(lambda: etcd.get(key) is None, 20, what=f"the tombstone of {name} collected")


def test_compaction_never_passes_a_live_node(cluster, etcd, volume):
    """The leader compacts etcd's history, but never past the revision a live node has applied: a node
    that is alive but behind (frozen here, its lease still valid) can replay the history it missed."""
    env = {**FAST, "SYNCMESH_HOUSEKEEPING_COMPACT_KEEP_REVISIONS": "1"}
    a = cluster("n1", **env)
    wait_for(lambda: _leader(a) == "n1", 15, what="n1 to lead")
    c = cluster("n3", **{**env, "SYNCMESH_ETCD_LEASE_TTL": "60"})  # frozen below, its lease must outlive that
    a.ok("VolumeDriver.Create", {"Name": volume})
    a.mount(volume)
    c.mount(volume)
    other = volume + "-a-only"
    a.ok("VolumeDriver.Create", {"Name": other})
    a.mount(other)
    for i in range(5):
        write(a.vol(volume) / f"before{i}.txt", f"before {i}")
    converged([a, c], volume, expect=lambda t: len(t) == 5)
    head = settled(etcd, cluster.prefix, volume, writers=[a], followers=[c])
    wait_for(lambda: _applied(etcd, cluster.prefix, volume, "n3") >= head, 15, what="n3's applied record")
    wait_for(lambda: _metric(a, "syncmesh_etcd_compactions_total") >= 1, 15, what="the leader to compact")
    behind = _applied(etcd, cluster.prefix, volume, "n3")
    assert c.proc is not None
    os.kill(c.proc.pid, signal.SIGSTOP)
    try:
        for i in range(5):
            write(a.vol(volume) / f"while-frozen{i}.txt", f"n3 misses {i}")
        wait_for(lambda: _applied(etcd, cluster.prefix, volume, "n1") > behind, 15, what="n1 to apply past n3")
        # two leader rounds end after that: the first of them compacted with n1 ahead and n3 behind
        _collect_one_tombstone(a, etcd, cluster.prefix, other, "one.txt")
        _collect_one_tombstone(a, etcd, cluster.prefix, other, "two.txt")
        assert _readable_at(etcd, behind), f"history compacted past revision {behind}, which n3 still needs"
    finally:
        os.kill(c.proc.pid, signal.SIGCONT)
    t = converged([a, c], volume, expect=lambda t: len(t) == 10)
    assert "while-frozen4.txt" in t
    assert "compacted history" not in c.log()  # it followed on from its revision, no full re-read
    # n3 has caught up: now the leader compacts past where it was
    wait_for(lambda: not _readable_at(etcd, behind), 20, what="the compaction to move past n3's old revision")


class _OwnEtcd(Etcd):
    """An etcd of the test's own (compaction, defragmentation and quota are etcd-wide)."""

    def __init__(self, tmp: Path, quota: int = 0) -> None:
        super().__init__(tmp)
        self.quota = quota

    def extra_args(self) -> list[str]:
        return ["--quota-backend-bytes", str(self.quota)] if self.quota else []

    def status(self) -> dict[str, Any]:
        return self.etcd_api("/v3/maintenance/status", {})

    def fill(self, total: int, block: int = 512 << 10) -> str:
        """Put `total` bytes under /ballast/ until done or etcd refuses; returns etcd's error, if any."""
        for i in range(total // block):
            r = self.etcd_api("/v3/kv/put", {"key": base64.b64encode(f"/ballast/{i}".encode()).decode(),
                                             "value": base64.b64encode(os.urandom(block)).decode()})
            if "error" in r:
                return str(r["error"])
        return ""

    def drop_ballast(self) -> None:
        r = self.etcd_api("/v3/kv/deleterange", {"key": base64.b64encode(b"/ballast/").decode(),
                                                 "range_end": base64.b64encode(b"/ballast0").decode()})
        assert "error" not in r, r


@pytest.fixture
def own_etcd(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., tuple[_OwnEtcd, Node]]]:
    """An etcd of the test's own and one daemon on it; the daemon's log must hold no traceback."""
    made: list[tuple[_OwnEtcd, Node]] = []

    def make(quota: int = 0, **env: str) -> tuple[_OwnEtcd, Node]:
        (tmp_path / "etcd").mkdir()
        e = _OwnEtcd(tmp_path / "etcd", quota)
        e.start()
        serving(e)
        n = Node(tmp_path, "n1", e, f"/hk{uuid.uuid4().hex[:8]}", **env)
        made.append((e, n))
        n.start()
        return e, n

    yield make
    for e, n in made:
        n.stop(timeout=5)
        e.stop()
    check_daemon_logs([n for _, n in made], request)


def test_compaction_and_defragmentation_shrink_etcd(own_etcd):
    """80 MiB written and deleted: the leader compacts the history away, then defragments the file."""
    e, a = own_etcd(**{**FAST, "SYNCMESH_HOUSEKEEPING_COMPACT_KEEP_REVISIONS": "1"})
    wait_for(lambda: _leader(a) == "n1", 15, what="n1 to lead")
    assert e.fill(80 << 20) == ""
    old = int(e.status()["header"]["revision"])
    e.drop_ballast()
    big = int(e.status()["dbSize"])
    assert big > 80 << 20, big

    def in_use() -> bool:
        # A cluster in use: writes go on. (Compacting at the deletion's own revision keeps the values it
        # deleted, and etcd counts freed pages as free only once a later write commits.)
        e.put("/in-use", os.urandom(8))
        return _metric(a, "syncmesh_etcd_defragmentations_total") >= 1

    wait_for(lambda: e.put("/in-use", b"x") and not _readable_at(e, old), 30, interval=0.5,
             what="the leader to compact the history")
    assert _metric(a, "syncmesh_etcd_compactions_total") >= 1
    wait_for(in_use, 60, interval=0.5, what="the leader to defragment")
    small = int(e.status()["dbSize"])
    assert small < big // 4, (big, small)
    assert "defragmented (" in a.log()


def test_nospace_alarm_is_reported_and_clears(own_etcd, volume):
    """etcd hits its quota and raises NOSPACE: health and metrics say so while it lasts; once an operator
    frees space and disarms the alarm, they clear and a change made meanwhile is published."""
    e, a = own_etcd(quota=16 << 20, **FAST)
    a.ok("VolumeDriver.Create", {"Name": volume})
    a.mount(volume)
    assert "space exceeded" in e.fill(32 << 20)

    def alarmed() -> Any:
        code, h = a.http("GET", "/api/v1/health")
        return code == 503 and h["components"]["etcd"]["alarms"] == ["NOSPACE"] and h

    h = wait_for(alarmed, 20, what="n1 to report the NOSPACE alarm")
    assert "NOSPACE" in h["components"]["etcd"]["error"]
    assert _metric(a, "syncmesh_etcd_alarm") == 1
    write(a.vol(volume) / "during.txt", "written while etcd refuses writes")
    # the operator: free space, compact, defragment, disarm (etcdctl alarm disarm)
    e.drop_ballast()
    e.compact()
    assert "error" not in e.etcd_api("/v3/maintenance/defragment", {})
    for alarm in e.etcd_api("/v3/maintenance/alarm", {"action": "GET"}).get("alarms", []):
        e.etcd_api("/v3/maintenance/alarm", {"action": "DEACTIVATE", "memberID": alarm["memberID"],
                                             "alarm": "NOSPACE"})
    wait_for(lambda: a.http("GET", "/api/v1/health")[0] == 200, 20, what="n1 healthy again")
    assert _metric(a, "syncmesh_etcd_alarm") == 0
    key = Keyspace(a.env["SYNCMESH_ETCD_PREFIX"]).file_key(volume, "during.txt")
    wait_for(lambda: e.get(key) is not None, 60, what="the change made during the alarm to be published")


# ---------------------------------------------------------------------------------------------- fencing
def test_fenced_deletes_need_the_same_leader_registration(etcd, volume):
    """The leader's deletes carry a fence: its election key with the create_revision it had when it
    became leader. A leader whose registration is gone (lease lost) or was made anew deletes nothing."""

    async def scenario() -> None:
        prefix = f"/fence{uuid.uuid4().hex[:8]}"
        store = EtcdStore(EtcdConfig(endpoints=[etcd.endpoint], prefix=prefix), [etcd.endpoint])
        await store.connect()
        try:
            tomb = Manifest("deleted", origin="n2", ts=time.time() - 3600).encode()
            rev = await store.put(store.keys.file_key(volume, "gone.txt"), tomb)
            me = store.keys.election_key(ELECTION, "n1")
            lease = await store.grant_lease(30)
            await store.put(me, b"{}", lease=lease)
            [reg] = await store.election(ELECTION)
            assert reg.node == "n1"
            fence = (me, reg.create_revision)
            assert [t.path for t in [t async for t in store.tombstones(volume)]] == ["gone.txt"]

            await store.revoke_lease(lease)  # the lease is lost mid-round: the registration is gone
            assert await store.election(ELECTION) == []
            assert not await store.delete_files_if_unchanged(volume, [("gone.txt", rev)], fence=fence)
            assert await store.get_file(volume, "gone.txt") is not None

            await store.put(me, b"{}")  # registered again: a new term, another create_revision
            assert not await store.delete_files_if_unchanged(volume, [("gone.txt", rev)], fence=fence)
            assert await store.get_file(volume, "gone.txt") is not None

            [reg] = await store.election(ELECTION)
            fence = (me, reg.create_revision)
            stale = rev
            rev = await store.put(store.keys.file_key(volume, "gone.txt"), tomb)  # rewritten meanwhile
            assert not await store.delete_files_if_unchanged(volume, [("gone.txt", stale)], fence=fence)
            assert await store.delete_files_if_unchanged(volume, [("gone.txt", rev)], fence=fence)
            assert await store.get_file(volume, "gone.txt") is None
        finally:
            await store.close()

    asyncio.run(scenario())
