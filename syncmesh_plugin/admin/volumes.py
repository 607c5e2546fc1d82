"""Volumes: `volumes`, `inspect`, `conflicts`, and the operator's requests `resume`, `resync`, `hold`
and `release`."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from .client import Client, admin_command, emit_json, human_bytes, q, qpath, table


@admin_command()
def volumes(c: Client, as_json: bool) -> int:
    """Every volume of the cluster and its state on this node."""
    data = c.must("GET", "/api/v1/volumes")
    if as_json:
        emit_json(data)
        return 0
    rows: list[tuple[Any, ...]] = [("NAME", "HELD", "STATE", "FILES", "BYTES", "PENDING", "MOUNTS",
                                    "CONFLICT MODE")]
    for v in data["volumes"]:
        s = v.get("sync", {})
        rows.append((v["name"], "yes" if s.get("held") else "no",
                     ("in sync" if s.get("ready") else "syncing") if s.get("held") else "-",
                     s.get("files", "-"), human_bytes(s["bytes"]) if "bytes" in s else "-", s.get("pending", "-"),
                     v.get("mounts_here", 0), v.get("options", {}).get("conflict_resolution", "(node default)")))
    table(rows)
    return 0


@admin_command()
@click.argument("volume")
def inspect(c: Client, as_json: bool, volume: str) -> int:
    """One volume: options, this node's sync state, convergence of every node."""
    data = c.must("GET", f"/api/v1/volumes/{q(volume)}")
    if as_json:
        emit_json(data)
        return 0
    s = data.get("sync", {})
    click.echo(f"volume    {data['name']}  (created by {data.get('created_by', '?')})")
    click.echo(f"options   {json.dumps(data.get('options', {}), sort_keys=True)}")
    click.echo(f"here      {data['node']}: " + (
        f"{s.get('role', 'send-receive')}, " + (f"{s['local_changes']} local change(s) kept here, "
                                                 if s.get("local_changes") else "") +
        f"{'in sync' if s.get('ready') else 'syncing'}, {s.get('files', 0)} files, "
        f"{human_bytes(s.get('bytes', 0))}, {s.get('pending', 0)} pending, {s.get('conflicts', 0)} conflicts, "
        f"{data.get('mounts_here', 0)} mount(s)" if s.get("held") else "not held"))
    conv = data.get("convergence", {})
    if "error" in conv:
        click.echo(f"convergence unavailable: {conv['error']}")
        return 0
    click.echo(f"latest    revision {conv['latest_revision']}\n")
    rows: list[tuple[Any, ...]] = [("NODE", "LIVE", "APPLIED", "BEHIND", "PENDING", "LAG(S)", "STATE", "LAST SEEN")]
    for n in conv["nodes"]:
        seen = n.get("last_seen", 0.0)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seen)) if seen else "-"
        rows.append((n["node"], "yes" if n["live"] else "OFFLINE", n["applied_revision"], n["behind_revisions"],
                     n["pending"], f"{n['lag_seconds']:.3f}", "converged" if n["converged"] else "behind",
                     "now" if n["live"] else when))
    table(rows)
    return 0


@admin_command()
@click.argument("volume")
def conflicts(c: Client, as_json: bool, volume: str) -> int:
    """Conflicts settled on this node for VOLUME, and where each losing version was kept."""
    data = c.must("GET", f"/api/v1/volumes/{q(volume)}/conflicts")
    if as_json:
        emit_json(data)
        return 0
    if not data["conflicts"]:
        click.echo(f"no conflicts in {volume}")
        return 0
    rows: list[tuple[Any, ...]] = [("WHEN", "PATH", "MODE", "KEPT", "LOST", "COPY")]
    for x in data["conflicts"]:
        rows.append((time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(x["at"])), x["path"], x["mode"],
                     x["winner"], x["loser"], x["copy"] or "-"))
    table(rows)
    return 0


@admin_command()
@click.argument("volume")
@click.option("--restore", is_flag=True,
              help="discard this node's local changes and take the volume back from the cluster")
def resume(c: Client, as_json: bool, volume: str, restore: bool) -> int:
    """Resume VOLUME after the mass-delete / replaced-directory guard paused it.

    Without --restore this node's local state is accepted and published, deletions included."""
    data = c.must("POST", f"/api/v1/volumes/{q(volume)}/resume?mode={'restore' if restore else 'accept'}")
    if as_json:
        emit_json(data)
    else:
        click.echo(f"volume {volume}: resumed ({data['mode']}); was paused: {data['was_paused'] or 'no'}")
    return 0


@admin_command()
@click.argument("volume")
@click.argument("path", required=False)
def resync(c: Client, as_json: bool, volume: str, path: str | None) -> int:
    """Re-hash and republish, or re-fetch, PATH of VOLUME (the whole volume: a full rescan)."""
    url = f"/api/v1/volumes/{q(volume)}" + (f"/files/{qpath(path)}/sync" if path else "/sync")
    data = c.must("POST", url)
    if as_json:
        emit_json(data)
    else:
        what = f"{volume}/{path}" if path else volume
        click.echo(f"{what}: {data['action']}" + (f" ({data['reason']})" if data.get("reason") else ""))
    return 0


@admin_command()
@click.argument("volume")
@click.option("--role", type=click.Choice(["receive-only", "send-only", "send-receive", "default"]),
              help="this node's role for VOLUME whatever its writers option says (default: what it says)")
def hold(c: Client, as_json: bool, volume: str, role: str | None) -> int:
    """Keep a replica of VOLUME on this node from now on, mounted or not (a Swarm task moved here
    then finds its data in place)."""
    data = c.must("POST", f"/api/v1/volumes/{q(volume)}/hold" + (f"?role={q(role)}" if role else ""))
    if as_json:
        emit_json(data)
    else:
        click.echo(f"volume {volume}: held on {data['node']} as {data.get('role', 'send-receive')}"
                   + (" (already)" if data.get("already") else "; syncing (see `inspect`)"))
    return 0


@admin_command()
@click.argument("volume")
@click.argument("path", required=False)
def revert(c: Client, as_json: bool, volume: str, path: str | None) -> int:
    """Undo this receive-only replica's local changes to VOLUME (or PATH): local additions are removed,
    the cluster's version of what was changed or deleted here comes back."""
    data = c.must("POST", f"/api/v1/volumes/{q(volume)}/revert" + (f"?path={q(path)}" if path else ""))
    if as_json:
        emit_json(data)
    else:
        click.echo(f"volume {volume}: {data['removed']} local addition(s) removed, {data['restored']} path(s) "
                   "taken back from the cluster")
    return 0


@admin_command()
@click.argument("volume")
def override(c: Client, as_json: bool, volume: str) -> int:
    """Publish this node's whole state of VOLUME over the cluster's (the mass-deletion guard judges
    the deletions as always)."""
    data = c.must("POST", f"/api/v1/volumes/{q(volume)}/override")
    if as_json:
        emit_json(data)
    else:
        click.echo(f"volume {volume}: {data['queued']} path(s) that differ from the cluster published from here")
    return 0


@admin_command()
@click.argument("volume")
def release(c: Client, as_json: bool, volume: str) -> int:
    """Stop holding VOLUME on this node and delete this node's copy. Refused, with the reason, when
    it is the last complete replica, when the volume's placement needs it, or while it is mounted here."""
    data = c.must("POST", f"/api/v1/volumes/{q(volume)}/release")
    if as_json:
        emit_json(data)
    else:
        click.echo(f"volume {volume}: released on {data['node']} (its copy deleted)")
    return 0
