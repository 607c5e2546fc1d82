"""Housekeeping: one elected leader (failover when it dies), tombstone collection, compaction, and a
node that was away while tombstones were collected deletes instead of resurrecting."""

from __future__ import annotations

import json

from conftest import converged, wait_for, write

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
