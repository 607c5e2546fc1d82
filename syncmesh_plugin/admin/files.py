"""Files of a volume: `files` (this node's index) and `verify` (every holder's digests compared)."""

from __future__ import annotations

import time
from typing import Any

import click

from .client import EXIT_PROBLEM, EXIT_UNREACHABLE, Client, admin_command, emit_json, q, table


@admin_command()
@click.argument("volume")
@click.argument("prefix", required=False, default="")
@click.option("--limit", type=click.IntRange(1, 1000), default=500, show_default=True, help="page size")
@click.option("--max", "max_items", type=int, default=0, help="stop after this many entries (0: all)")
def files(c: Client, as_json: bool, volume: str, prefix: str, limit: int, max_items: int) -> int:
    """This node's index of VOLUME (paths starting with PREFIX), following every page."""
    out: list[dict[str, Any]] = []
    cursor = ""
    while True:
        path = f"/api/v1/volumes/{q(volume)}/files?limit={limit}&prefix={q(prefix)}"
        data = c.must("GET", path + (f"&cursor={q(cursor)}" if cursor else ""))
        out.extend(data["files"])
        cursor = data.get("next_cursor") or ""
        if not cursor or (max_items and len(out) >= max_items):
            break
    if max_items:
        out = out[:max_items]
    if as_json:
        emit_json({"volume": volume, "files": out})
        return 0
    rows: list[tuple[Any, ...]] = [("PATH", "KIND", "SIZE", "MODE", "REV", "ORIGIN", "DIGEST/TARGET")]
    for f in out:
        rows.append((f["path"], f["kind"], f["size"], f["mode"], f["revision"], f.get("origin", ""),
                     f.get("digest") or f.get("target", "")))
    table(rows)
    return 0


@admin_command()
@click.argument("volume")
@click.option("--settle", type=float, default=2.0, show_default=True,
              help="seconds to wait before re-checking differences (changes still in flight)")
def verify(c: Client, as_json: bool, volume: str, settle: float) -> int:
    """Compare every holder's digests of VOLUME; list differences. Exit 1 when they differ."""
    nodes = c.must("GET", "/api/v1/cluster/nodes")["nodes"]
    holders = [n for n in nodes if volume in n["volumes"]]
    # Every replica counts, live or not: one that cannot be asked is never called identical.
    conv = c.must("GET", f"/api/v1/volumes/{q(volume)}").get("convergence", {})
    live_ids = {n["node_id"] for n in holders}
    offline = sorted({x["node"] for x in conv.get("nodes", []) if not x.get("live")} - live_ids)
    if not holders:
        c.must("GET", f"/api/v1/volumes/{q(volume)}")  # 404 -> exit 1 with the node's message
        click.echo(f"syncmesh-plugin: no live node holds {volume}", err=True)
        return EXIT_PROBLEM

    def collect() -> tuple[dict[str, dict[str, tuple[str, ...]]], dict[str, str]]:
        trees: dict[str, dict[str, tuple[str, ...]]] = {}
        failed: dict[str, str] = {}
        for n in holders:
            nc = c.for_node(n["advertise"])
            tree: dict[str, tuple[str, ...]] = {}
            cursor = ""
            try:
                while True:
                    code, data = nc.request("GET", f"/api/v1/volumes/{q(volume)}/digests?limit=5000"
                                            + (f"&cursor={q(cursor)}" if cursor else ""), exit_on_error=False)
                    if code != 200:
                        raise ConnectionError(data.get("error", f"HTTP {code}") if isinstance(data, dict) else code)
                    for path, kind, digest, mode in data["entries"]:
                        tree[path] = (kind, digest, mode)
                    cursor = data.get("next_cursor") or ""
                    if not cursor:
                        break
            except ConnectionError as exc:
                failed[n["node_id"]] = str(exc)
                continue
            trees[n["node_id"]] = tree
        return trees, failed

    def diff(trees: dict[str, dict[str, tuple[str, ...]]]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for path in sorted(set().union(*trees.values()) if trees else ()):
            vals = {n: t.get(path) for n, t in trees.items()}
            if len({v for v in vals.values()}) > 1:
                out[path] = {n: (list(v) if v else None) for n, v in vals.items()}
        return out

    trees, failed = collect()
    differences = diff(trees)
    if differences and settle > 0:
        time.sleep(settle)
        trees, failed = collect()
        differences = diff(trees)
    for n in offline:
        failed[n] = "offline: its replica cannot be asked (last seen " + next(
            (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(x["last_seen"])) for x in conv.get("nodes", [])
             if x["node"] == n and x.get("last_seen")), "never") + ")"
    total = max((len(t) for t in trees.values()), default=0)
    if as_json:
        emit_json({"volume": volume, "nodes": sorted(trees), "unreachable": failed, "paths": total,
                   "identical": not differences and not failed, "differences": differences})
    else:
        for n, err in failed.items():
            click.echo(f"{n}: unreachable: {err}")
        if differences:
            click.echo(f"{volume}: {len(differences)} path(s) differ across {', '.join(sorted(trees))}")
            for path, vals in list(differences.items())[:200]:
                click.echo(f"  {path}")
                for n, v in vals.items():
                    click.echo(f"    {n:<12} {' '.join(v) if v else '(absent)'}")
            if len(differences) > 200:
                click.echo(f"  ... and {len(differences) - 200} more (--json lists all)")
        elif not failed:
            click.echo(f"{volume}: identical on {len(trees)} node(s) ({', '.join(sorted(trees))}), "
                       f"{total} path(s)")
    if failed and not differences:
        return EXIT_UNREACHABLE
    return EXIT_PROBLEM if differences else 0
