"""This node: `status`."""

from __future__ import annotations

from typing import Any

import click

from .client import EXIT_PROBLEM, Client, admin_command, emit_json, human_bytes, table


@admin_command()
def status(c: Client, as_json: bool) -> int:
    """Node health, etcd, cluster and this node's volumes. Exit 1 when unhealthy."""
    code, health = c.get("/api/v1/health")
    info = c.must("GET", "/api/v1/info")
    sync = c.must("GET", "/api/v1/sync/status")
    ccode, cluster = c.get("/api/v1/cluster/status")
    if as_json:
        emit_json({"health": health, "info": info, "sync": sync, "cluster": cluster if ccode == 200 else None})
        return 0 if code == 200 else EXIT_PROBLEM
    click.echo(f"node      {info.get('node_id')}  {info.get('advertise')}  version {info.get('version')}")
    click.echo(f"health    {health.get('status', '?')}")
    for name, comp in health.get("components", {}).items():
        detail = comp.get("error") or ""
        if name == "peers" and comp.get("open"):
            detail = "circuit open to " + ", ".join(comp["open"])
        click.echo(f"  {name:<14}{'ok' if comp.get('ok') else 'FAILING'}  {detail}".rstrip())
    etcd = health.get("components", {}).get("etcd", {})
    if etcd.get("members"):
        fo = int(etcd.get("failovers", 0) or 0)
        click.echo(f"etcd      talking to {etcd.get('endpoint') or '-'}" + (f" ({fo} failover(s))" if fo else ""))
        erows: list[tuple[Any, ...]] = [("", "ENDPOINT", "MEMBER", "STATE", "LEADER", "RTT", "ERROR")]
        for m in etcd["members"]:
            erows.append(("*" if m.get("current") else "", m.get("endpoint", ""), m.get("member") or "-",
                          "ok" if m.get("healthy") else "DOWN", "yes" if m.get("leader") else "",
                          f"{m['rtt_ms']:.1f}ms" if m.get("healthy") else "-", (m.get("error") or "")[:80]))
        table(erows)
    if ccode == 200:
        click.echo(f"cluster   {len(cluster['nodes'])} node(s), leader {cluster.get('leader') or '-'}, "
                   f"etcd {len(cluster['etcd'].get('members', []))} member(s)")
    else:
        click.echo(f"cluster   unavailable: {cluster.get('error', cluster) if isinstance(cluster, dict) else ''}")
    rows: list[tuple[Any, ...]] = [("VOLUME", "STATE", "FILES", "BYTES", "PENDING", "CONFLICTS", "LAG")]
    for v in sync["volumes"]:
        state = "error" if v.get("last_error") else ("in sync" if v["ready"] else "syncing")
        rows.append((v["volume"], state, v["files"], human_bytes(v["bytes"]), v["pending"], v["conflicts"],
                     f"{v['lag_seconds']:.3f}s"))
    if len(rows) > 1:
        click.echo("")
        table(rows)
    return 0 if code == 200 else EXIT_PROBLEM
