"""Prometheus metrics, `syncmesh_` prefix, units in names, no per-path labels (bounded cardinality)."""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

_LAT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

docker_requests = Counter("syncmesh_docker_requests_total", "VolumeDriver calls from dockerd",
                          ["method", "result"], registry=REGISTRY)
docker_request_seconds = Histogram("syncmesh_docker_request_duration_seconds", "VolumeDriver call duration",
                                   ["method"], buckets=_LAT, registry=REGISTRY)
ops_published = Counter("syncmesh_operations_published_total", "Local changes published to etcd",
                        ["kind"], registry=REGISTRY)
ops_applied = Counter("syncmesh_operations_applied_total", "Remote changes applied locally",
                      ["kind"], registry=REGISTRY)
bytes_sent = Counter("syncmesh_bytes_sent_total", "Chunk bytes served to peers (on the wire)", registry=REGISTRY)
bytes_received = Counter("syncmesh_bytes_received_total", "Chunk bytes fetched from peers (on the wire)",
                         registry=REGISTRY)
bytes_reused = Counter("syncmesh_bytes_reused_locally_total", "Chunk bytes found in local files, not fetched",
                       registry=REGISTRY)
bytes_inline = Counter("syncmesh_bytes_inline_total", "File bytes carried inline in manifests", registry=REGISTRY)
chunk_fetch_seconds = Histogram("syncmesh_chunk_fetch_duration_seconds", "Duration of one batched chunk fetch",
                                buckets=_LAT, registry=REGISTRY)
propagation_lag_seconds = Histogram("syncmesh_propagation_lag_seconds",
                                    "Time from publish on the origin to applied here", buckets=_LAT,
                                    registry=REGISTRY)
pending_items = Gauge("syncmesh_pending_items", "Changes waiting to be published or applied", ["volume"],
                      registry=REGISTRY)
conflicts = Counter("syncmesh_conflicts_total", "Concurrent changes resolved", ["mode"], registry=REGISTRY)
watches = Gauge("syncmesh_inotify_watches", "inotify watches held", registry=REGISTRY)
inotify_overflows = Counter("syncmesh_inotify_overflows_total", "inotify queue overflows (each forces a rescan)",
                            registry=REGISTRY)
rescans = Counter("syncmesh_rescans_total", "Full rescans of a volume", ["reason"], registry=REGISTRY)
rescan_seconds = Histogram("syncmesh_rescan_duration_seconds", "Duration of a full rescan",
                           buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300), registry=REGISTRY)
etcd_request_seconds = Histogram("syncmesh_etcd_request_duration_seconds", "etcd request duration", ["op"],
                                 buckets=_LAT, registry=REGISTRY)
etcd_errors = Counter("syncmesh_etcd_errors_total", "etcd requests that failed", ["op"], registry=REGISTRY)
etcd_up = Gauge("syncmesh_etcd_up", "1 when etcd answers", registry=REGISTRY)
etcd_member_up = Gauge("syncmesh_etcd_member_up", "1 when the member behind an etcd endpoint answered its last "
                       "status probe and knows a leader", ["endpoint"], registry=REGISTRY)
etcd_endpoint_current = Gauge("syncmesh_etcd_endpoint_current", "1 for the etcd endpoint this node talks to",
                              ["endpoint"], registry=REGISTRY)
etcd_member_probe_seconds = Gauge("syncmesh_etcd_member_probe_seconds", "Round trip of the last status probe of "
                                  "the member behind an etcd endpoint", ["endpoint"], registry=REGISTRY)
etcd_failovers = Counter("syncmesh_etcd_failovers_total", "Moves from one etcd endpoint to another (refused, "
                         "timeout, unavailable, busy, probe, preferred)", ["reason"], registry=REGISTRY)
nodes_in_cluster = Gauge("syncmesh_cluster_nodes", "Live nodes registered in etcd", registry=REGISTRY)
leader = Gauge("syncmesh_cluster_leader", "1 when this node is the housekeeping leader", registry=REGISTRY)
volumes_held = Gauge("syncmesh_volumes_held", "Volumes this node holds a replica of", registry=REGISTRY)
peer_breaker_open = Gauge("syncmesh_peer_circuit_open", "1 when the circuit breaker to a peer is open", ["peer"],
                          registry=REGISTRY)
rejected_input = Counter("syncmesh_rejected_input_total", "Hostile or malformed input rejected", ["source"],
                         registry=REGISTRY)
volume_paused = Gauge("syncmesh_volume_paused", "1 while publishing is paused by the mass-damage guard",
                      ["volume"], registry=REGISTRY)
volume_replicas = Gauge("syncmesh_volume_replicas", "Replicas of a volume this node knows of, live or offline "
                        "(durable replica records)", ["volume", "state"], registry=REGISTRY)
local_changes = Gauge("syncmesh_local_changes", "Paths changed on a receive-only replica and kept there, not "
                      "published", ["volume"], registry=REGISTRY)
versions_files = Gauge("syncmesh_versions_files", "Replaced or deleted versions kept on this node for undo",
                       ["volume"], registry=REGISTRY)
versions_bytes = Gauge("syncmesh_versions_bytes", "Bytes of the versions kept on this node for undo", ["volume"],
                       registry=REGISTRY)
held_deletions = Gauge("syncmesh_held_deletions", "Local deletions held by the mass-deletion guard, not yet "
                       "published", ["volume"], registry=REGISTRY)
tombstones_collected = Counter("syncmesh_tombstones_collected_total",
                               "Tombstones removed by the housekeeping leader", registry=REGISTRY)
etcd_compactions = Counter("syncmesh_etcd_compactions_total", "etcd history compactions by the leader",
                           registry=REGISTRY)
etcd_defrags = Counter("syncmesh_etcd_defragmentations_total", "etcd defragmentations by the leader",
                       registry=REGISTRY)
etcd_db_bytes = Gauge("syncmesh_etcd_db_size_bytes", "etcd database file size (as seen by the leader)",
                      registry=REGISTRY)
etcd_alarm = Gauge("syncmesh_etcd_alarm", "1 while etcd has an active alarm (NOSPACE: quota reached)",
                   registry=REGISTRY)
corrupt_chunks = Counter("syncmesh_corrupt_chunks_total", "Chunks whose bytes did not match their id",
                         registry=REGISTRY)


def etcd_failover_hook(_from: str, _to: str, reason: str) -> None:
    etcd_failovers.labels(reason).inc()


def set_etcd_endpoints(report: list[dict[str, Any]]) -> None:
    """The endpoint gauges from the store's probes (labels: the configured endpoints, a bounded set)."""
    now = {str(e["endpoint"]) for e in report}
    for g in (etcd_member_up, etcd_endpoint_current, etcd_member_probe_seconds):
        for labels in list(g._metrics):
            if labels[0] not in now:
                with contextlib.suppress(KeyError):
                    g.remove(*labels)
    for e in report:
        ep = str(e["endpoint"])
        etcd_member_up.labels(ep).set(1 if e.get("healthy") else 0)
        etcd_endpoint_current.labels(ep).set(1 if e.get("current") else 0)
        etcd_member_probe_seconds.labels(ep).set(float(e.get("rtt_ms") or 0) / 1000)


def etcd_hook(op: str, seconds: float, ok: bool) -> None:
    etcd_request_seconds.labels(op).observe(seconds)
    if not ok:
        etcd_errors.labels(op).inc()
