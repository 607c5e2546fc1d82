"""The cluster: `nodes` (every live node, its lag and health) and `watch` (every node's progress on
every volume, live)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from .client import EXIT_PROBLEM, Client, admin_command, emit_json, q, table


@admin_command()
def nodes(c: Client, as_json: bool) -> int:
    """Live nodes: address, health, leader, lag behind the latest change, pending items."""
    data = c.must("GET", "/api/v1/cluster/status")
    if as_json:
        emit_json(data)
        return 0
    rows: list[tuple[Any, ...]] = [("NODE", "ADDRESS", "HEALTH", "LEADER", "VOLUMES", "BEHIND", "LAG(REV)",
                                    "LAG(S)", "PENDING")]
    for n in data["nodes"]:
        rows.append((n["node_id"] + (" *" if n["self"] else ""), n["advertise"], n["health"],
                     "yes" if n["leader"] else "", n["volumes"], ",".join(n["volumes_behind"]) or "-",
                     n["lag_revisions"], f"{n['lag_seconds']:.3f}", n["pending"]))
    table(rows)
    members = data["etcd"].get("members", [])
    click.echo(f"\netcd: {len(members)} member(s): " +
               ", ".join(m["name"] + (" (leader)" if m.get("leader") else "") for m in members))
    return 0


@admin_command()
@click.argument("volume", required=False)
@click.option("--interval", type=float, default=1.0, show_default=True)
@click.option("--count", type=int, default=0, help="stop after this many refreshes (0: until Ctrl-C)")
@click.option("--until-converged", is_flag=True, help="exit 0 once every live holder has converged")
def watch(c: Client, as_json: bool, volume: str | None, interval: float, count: int,
          until_converged: bool) -> int:
    """Live progress bars and lag of every node, per volume, while volumes sync."""
    base: dict[tuple[str, str], int] = {}
    tty = sys.stdout.isatty() and not as_json
    n = 0
    try:
        while True:
            names = [volume] if volume else [v["name"] for v in c.must("GET", "/api/v1/volumes")["volumes"]]
            snap = []
            for name in names:
                conv = c.must("GET", f"/api/v1/volumes/{q(name)}").get("convergence", {})
                snap.append({"volume": name, **conv})
            all_done = all(x.get("converged") for x in snap if "error" not in x)
            n += 1
            if as_json:
                click.echo(json.dumps({"ts": time.time(), "volumes": snap, "converged": all_done}))
            else:
                lines = [time.strftime("%H:%M:%S") + ("  all converged" if all_done else "  syncing")]
                for x in snap:
                    latest = x.get("latest_revision", 0)
                    for nd in x.get("nodes", []):
                        key = (x["volume"], nd["node"])
                        start = base.setdefault(key, min(nd["applied_revision"], latest))
                        span = latest - start
                        frac = 1.0 if span <= 0 else max(0.0, min(1.0, (nd["applied_revision"] - start) / span))
                        bar = "#" * int(frac * 30) + "." * (30 - int(frac * 30))
                        lines.append(f"{x['volume']:<16} {nd['node']:<12} [{bar}] {frac * 100:5.1f}%  "
                                     f"rev {nd['applied_revision']}/{latest}  pending {nd['pending']}  "
                                     f"lag {nd['lag_seconds']:.3f}s" + ("" if nd["live"] else "  (offline)"))
                    if "error" in x:
                        lines.append(f"{x['volume']:<16} {x['error']}")
                if tty:
                    click.echo("\x1b[H\x1b[2J", nl=False)
                click.echo("\n".join(lines) + ("" if tty else "\n"))
            if (until_converged and all_done) or (count and n >= count):
                return 0 if all_done or not until_converged else EXIT_PROBLEM
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


@admin_command()
@click.argument("node_id")
def forget(c: Client, as_json: bool, node_id: str) -> int:
    """Forget NODE_ID, a node that will not come back: its replica records are removed, so `verify`,
    `inspect` and the placement stop counting it, its embedded etcd member (if any) is removed from the
    cluster, and its certificates are revoked (it can no longer connect to any node). Refused while the
    node is live (`ca revoke` cuts off a live node)."""
    data = c.must("POST", f"/api/v1/cluster/nodes/{q(node_id)}/forget")
    if as_json:
        emit_json(data)
    else:
        gone = data.get("replicas_removed", [])
        click.echo(f"node {node_id} forgotten: {len(gone)} replica record(s) removed"
                   + (f" ({', '.join(gone)})" if gone else ""))
        member = data.get("etcd_member")
        if isinstance(member, dict) and "error" in member:
            click.echo(f"its embedded etcd member was NOT removed: {member['error']}")
        elif isinstance(member, dict) and member.get("removed"):
            click.echo(f"its embedded etcd member {member.get('id')} removed; "
                       f"{member.get('members_left')} member(s) left")
        certs = data.get("certificates")
        if isinstance(certs, dict) and "error" in certs:
            click.echo(f"its certificates were NOT revoked: {certs['error']}")
        elif isinstance(certs, dict):
            click.echo(f"{len(certs.get('revoked_serials', []))} certificate(s) revoked; members refuse it from now on")
    return 0
