"""Undo: `versions` (what every live replica keeps), `restore` (a version, or a tree as it was at a
time, published as a new change), `versioning` (change a volume's versioning later), and for removed
volumes `trash`, `undelete` and `purge`."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import click

from ..sync.versions import Version, as_of
from .client import EXIT_PROBLEM, Client, admin_command, emit_json, human_bytes, q, table


def _gather(c: Client, volume: str, prefix: str) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """node -> its kept versions under `prefix`, from every live holder; and the holders not reached."""
    nodes = c.must("GET", "/api/v1/cluster/nodes")["nodes"]
    holders = [n for n in nodes if volume in n["volumes"]]
    if not holders:
        c.must("GET", f"/api/v1/volumes/{q(volume)}")  # 404 -> exit 1 with the node's message
    out: dict[str, list[dict[str, Any]]] = {}
    failed: dict[str, str] = {}
    for n in holders:
        code, data = c.for_node(n["advertise"]).request(
            "GET", f"/api/v1/volumes/{q(volume)}/versions" + (f"?prefix={q(prefix)}" if prefix else ""),
            exit_on_error=False)
        if code == 200:
            out[n["node_id"]] = data["versions"]
        else:
            failed[n["node_id"]] = str(data.get("error", code) if isinstance(data, dict) else code)
    return out, failed


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _parse_time(text: str) -> float:
    """`2026-11-30 14:05`, an ISO time, or seconds since the epoch."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected a time such as '2026-11-30 14:05' or seconds since the "
                                 "epoch") from None


@admin_command()
@click.argument("volume")
@click.argument("path", required=False, default="")
def versions(c: Client, as_json: bool, volume: str, path: str) -> int:
    """The replaced and deleted versions of VOLUME (under PATH) that every live replica keeps."""
    found, failed = _gather(c, volume, path.strip("/"))
    if as_json:
        emit_json({"volume": volume, "nodes": found, "unreachable": failed})
        return 0
    rows: list[tuple[Any, ...]] = [("NODE", "PATH", "REPLACED AT", "SIZE", "REASON", "BY", "ID")]
    for node, vs in sorted(found.items()):
        for v in sorted(vs, key=lambda x: (x["path"], -x["at"])):
            rows.append((node, v["path"], _when(v["at"]), human_bytes(v["size"]), v["reason"], v["origin"] or "-",
                         v["id"]))
    for node, err in failed.items():
        click.echo(f"{node}: unreachable: {err}", err=True)
    if len(rows) == 1:
        click.echo(f"no kept versions of {volume}{'/' + path if path else ''} (versioning may be off: "
                   f"syncmesh-plugin versioning {volume} trash)")
        return 0
    table(rows)
    return 0


@admin_command()
@click.argument("volume")
@click.argument("path")
@click.option("--version", "version_id", help="the version to restore (an ID from `versions`)")
@click.option("--at", "at_text", help="restore PATH (a file or a whole tree) as it was at this time")
@click.option("--to", "to_path", default="", help="restore one version under another path")
def restore(c: Client, as_json: bool, volume: str, path: str, version_id: str | None, at_text: str | None,
            to_path: str) -> int:
    """Publish kept versions of PATH as new changes, so every node converges on them. Without --version
    or --at: the newest kept version of PATH."""
    if version_id and at_text:
        raise click.UsageError("give --version or --at, not both")
    prefix = path.strip("/")
    found, failed = _gather(c, volume, prefix)
    me = c.must("GET", "/api/v1/info").get("node_id", "")
    by_id: dict[str, tuple[str, Version]] = {}
    for node, vs in found.items():
        for d in vs:
            by_id[d["id"]] = (node, Version(d["id"], d["path"], d["at"], d["size"], d["digest"], d["reason"],
                                            d["origin"]))
    chosen: list[tuple[str, Version]]
    if version_id:
        if version_id not in by_id:
            click.echo(f"syncmesh-plugin: no live replica keeps version {version_id} of {volume}", err=True)
            return EXIT_PROBLEM
        chosen = [by_id[version_id]]
    else:
        when = _parse_time(at_text) if at_text else None
        # The same change was kept by every node that received it: prefer this node's copy, then any.
        pool = sorted(by_id.values(), key=lambda nv: (nv[0] != me, nv[0]))
        best: dict[str, tuple[str, Version]] = {}
        if when is not None:
            for p, v in as_of([v for _, v in pool], when).items():
                best[p] = next(nv for nv in pool if nv[1].path == p and nv[1].at == v.at)
        else:
            for node, v in pool:
                if v.path == prefix and (prefix not in best or v.at > best[prefix][1].at):
                    best[prefix] = (node, v)
        chosen = sorted(best.values(), key=lambda nv: nv[1].path)
    if not chosen:
        click.echo(f"syncmesh-plugin: nothing to restore under {volume}/{prefix}" +
                   (" at that time (unchanged since)" if at_text else " (no kept version)"), err=True)
        return EXIT_PROBLEM
    if to_path and len(chosen) != 1:
        raise click.UsageError("--to restores one version at a time")
    nodes = {n["node_id"]: n["advertise"] for n in c.must("GET", "/api/v1/cluster/nodes")["nodes"]}
    results = []
    for node in sorted({n for n, _ in chosen}):
        ids = [v.id for n, v in chosen if n == node]
        nc = c if node == me else c.for_node(nodes[node])
        results.append(nc.must("POST", f"/api/v1/volumes/{q(volume)}/restore",
                               body={"versions": ids, **({"to": to_path} if to_path else {})}))
    if as_json:
        emit_json({"volume": volume, "results": results, "unreachable": failed})
    else:
        for r in results:
            for x in r["restored"]:
                click.echo(f"{r['node']}: {x['path']} restored (the version replaced at {_when(x['at'])}, "
                           f"{human_bytes(x['size'])})")
    return 0


@admin_command()
@click.argument("volume")
@click.argument("mode", type=click.Choice(["off", "trash", "simple", "staggered"]))
@click.option("--keep", type=int, help="simple: versions kept per path")
@click.option("--retention", help="versions older than this go, e.g. 7d")
@click.option("--max-bytes", help="per node, the oldest go first, e.g. 10G (0: no cap)")
def versioning(c: Client, as_json: bool, volume: str, mode: str, keep: int | None, retention: str | None,
               max_bytes: str | None) -> int:
    """Change VOLUME's versioning (every node applies it)."""
    params = {"versioning": mode, **({"versions_keep": str(keep)} if keep is not None else {}),
              **({"versioning_retention": retention} if retention else {}),
              **({"versioning_max_bytes": max_bytes} if max_bytes else {})}
    data = c.must("POST", f"/api/v1/volumes/{q(volume)}/options?" + "&".join(f"{k}={q(v)}" for k, v in params.items()))
    if as_json:
        emit_json(data)
    else:
        o = data["options"]
        click.echo(f"volume {volume}: versioning {o.get('versioning', 'off')}" + (
            f", keep {o.get('versions_keep')}, retention {o.get('versioning_retention', 0) / 86400:g}d, "
            f"cap {human_bytes(o.get('versioning_max_bytes', 0)) if o.get('versioning_max_bytes') else 'none'}"
            if o.get("versioning", "off") != "off" else ""))
    return 0


def _trash_everywhere(c: Client) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, str]]:
    """Every live node's trashed copies; the nodes not reached; node -> its address."""
    nodes = {n["node_id"]: n["advertise"] for n in c.must("GET", "/api/v1/cluster/nodes")["nodes"]}
    found: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for node, url in sorted(nodes.items()):
        code, data = c.for_node(url).request("GET", "/api/v1/trash", exit_on_error=False)
        if code == 200:
            found.extend(data["trash"])
        else:
            failed[node] = str(data.get("error", code) if isinstance(data, dict) else code)
    return found, failed, nodes


@admin_command()
def trash(c: Client, as_json: bool) -> int:
    """Removed volumes (with versioning on) whose copies live nodes keep, and how complete each is."""
    found, failed, _ = _trash_everywhere(c)
    if as_json:
        emit_json({"trash": found, "unreachable": failed})
        return 0
    for node, err in failed.items():
        click.echo(f"{node}: unreachable: {err}", err=True)
    if not found:
        click.echo("no removed volumes are kept (removal keeps a copy only with versioning on)")
        return 0
    rows: list[tuple[Any, ...]] = [("VOLUME", "NODE", "REMOVED", "FILES", "BYTES")]
    for e in sorted(found, key=lambda e: (e["name"], -e["files"])):
        rows.append((e["name"], e["node"], _when(e["removed_at"]), e["files"], human_bytes(e["bytes"])))
    table(rows)
    return 0


@admin_command()
@click.argument("volume")
def undelete(c: Client, as_json: bool, volume: str) -> int:
    """Create a removed VOLUME again with its options, from the most complete trashed copy (then every
    node holding it gets the data)."""
    found, _, nodes = _trash_everywhere(c)
    copies = sorted((e for e in found if e["name"] == volume), key=lambda e: (-e["files"], -e["bytes"]))
    if not copies:
        click.echo(f"syncmesh-plugin: no live node keeps a trashed copy of {volume}", err=True)
        return EXIT_PROBLEM
    best = copies[0]
    data = c.for_node(nodes[best["node"]]).must("POST", f"/api/v1/trash/{q(volume)}/undelete")
    if as_json:
        emit_json(data)
    else:
        click.echo(f"volume {volume}: undeleted from {data['node']}'s copy ({data['files']} files, "
                   f"{human_bytes(data['bytes'])}); other nodes get it as they hold it")
    return 0


@admin_command()
@click.argument("volume")
def purge(c: Client, as_json: bool, volume: str) -> int:
    """Delete every live node's trashed copies of a removed VOLUME, for good."""
    _, _, nodes = _trash_everywhere(c)
    results = [c.for_node(url).must("POST", f"/api/v1/trash/{q(volume)}/purge") for url in nodes.values()]
    if as_json:
        emit_json({"results": results})
    else:
        click.echo(f"volume {volume}: {sum(r['purged'] for r in results)} trashed copy(ies) deleted")
    return 0
