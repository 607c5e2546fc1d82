"""Where replicas live: pure decisions over the cluster's view (live nodes, holders, replica records).

A volume's `replicas` option places replicas ahead of mounts, so a Swarm task moved to another node
finds its data there: `all` (every node, including nodes that join later) or a number N (at least N
live nodes hold it; every node with a mount holds it too). Without it a node holds a volume from its
first Mount or Create, as before. Each node decides for itself from the same view, so no coordinator
is needed: the N are chosen by rendezvous hashing of (volume, node), stable while nodes come and go.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import xxhash

REPLICAS_MAX = 1000


def parse_replicas(value: str) -> str:
    """`all` or a whole number from 1; the canonical text stored with the volume."""
    text = value.strip().lower()
    if text == "all":
        return "all"
    n = int(text)  # ValueError for anything else
    if not 1 <= n <= REPLICAS_MAX:
        raise ValueError(value)
    return str(n)


def rank(volume: str, nodes: Collection[str]) -> list[str]:
    """Nodes in the volume's rendezvous order: the same on every node, and removing one node moves
    only the volumes that node ranked for."""
    return sorted(nodes, key=lambda n: (-xxhash.xxh64_intdigest(f"{volume}\x00{n}".encode()), n))


def wanted(volume: str, spec: str, node: str, live: Collection[str], live_holders: Collection[str]) -> bool:
    """Should `node` start holding `volume` now? (Never asked for volumes it already holds.)"""
    if not spec:
        return False
    if spec == "all":
        return True
    need = int(spec) - len(set(live_holders) & set(live))
    if need <= 0:
        return False
    candidates = [n for n in rank(volume, live) if n not in live_holders]
    return node in candidates[:need]


def expected(spec: str, live: Collection[str]) -> int:
    """How many live replicas the placement asks for now (0: no placement)."""
    if not spec:
        return 0
    return len(live) if spec == "all" else int(spec)


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """One replica as an operator sees it."""

    node: str
    live: bool
    applied_revision: int
    behind_revisions: int
    last_seen: float  # when the node last reported (the record's time; now for live nodes)
    complete: bool  # has every change up to the volume's latest revision


def replica_views(latest: int, records: Mapping[str, Mapping[str, Any]], live: Collection[str],
                  now: float) -> list[ReplicaView]:
    """Every replica, live or offline, from the durable records (and live progress where known)."""
    out = []
    for node in sorted(records):
        rec = records[node]
        rev = int(rec.get("applied_revision", rec.get("revision", 0)) or 0)
        is_live = node in live
        out.append(ReplicaView(node=node, live=is_live, applied_revision=rev, behind_revisions=max(0, latest - rev),
                               last_seen=now if is_live else float(rec.get("last_seen", rec.get("at", 0.0)) or 0.0),
                               complete=rev >= latest))
    return out


def release_refusal(volume: str, spec: str, node: str, latest: int, views: Collection[ReplicaView],
                    mounted_here: int) -> str:
    """Why `node` may not release its replica ("" when it may)."""
    if mounted_here:
        return f"volume {volume} is mounted {mounted_here} time(s) on this node ({node}): unmount it first"
    others = [v for v in views if v.node != node]
    if not any(v.live and v.complete for v in others):
        return (f"{node} holds the last complete replica of {volume} (no other live node has every change up to "
                f"revision {latest}); hold it on another node first and wait until it has caught up")
    if spec == "all":
        return f"volume {volume} is placed on every node (replicas=all): this node would take it back at once"
    if spec:
        live_others = sum(1 for v in others if v.live)
        if live_others < int(spec):
            return (f"volume {volume} asks for {spec} replicas; without this node only {live_others} live node(s) "
                    f"hold it")
    return ""
