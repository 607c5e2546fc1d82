"""Admin commands of the CLI: they talk to a node's HTTP API (never to etcd directly).

The node is the one described by the same config file and SYNCMESH_* environment the daemon uses
(server.host/port, TLS and the first auth token), or the one given with --api URL.

Exit codes (every admin command): 0 ok; 1 the node reports a problem (unhealthy, unknown volume,
differences found by verify, a node behind at the end of watch --until-converged); 2 bad
configuration or usage; 3 a node could not be reached.
"""

from __future__ import annotations

import functools
import json
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import click

from .config import Config, ConfigError, load_config

EXIT_OK, EXIT_PROBLEM, EXIT_CONFIG, EXIT_UNREACHABLE = 0, 1, 2, 3


class Client:
    def __init__(self, cfg: Config, base: str) -> None:
        self.cfg = cfg
        self.base = base.rstrip("/")
        self.ctx: ssl.SSLContext | None = None
        sec = cfg.security
        if self.base.startswith("https://"):
            self.ctx = ssl.create_default_context(cafile=sec.tls_ca_file or None)
            if sec.tls_cert_file and sec.tls_key_file:
                self.ctx.load_cert_chain(sec.tls_cert_file, sec.tls_key_file)

    def for_node(self, url: str) -> Client:
        return Client(self.cfg, url)

    def request(self, method: str, path: str, *, exit_on_error: bool = True) -> tuple[int, Any]:
        req = urllib.request.Request(self.base + path, method=method, data=b"" if method == "POST" else None)
        req.add_header("Accept", "application/json")
        sec = self.cfg.security
        if sec.auth_enabled and sec.auth_tokens:
            req.add_header("Authorization", f"Bearer {sec.auth_tokens[0]}")
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.ctx) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                return exc.code, json.loads(body)
            except ValueError:
                return exc.code, {"error": body.decode(errors="replace") or exc.reason}
        except (urllib.error.URLError, OSError) as exc:
            if not exit_on_error:
                raise ConnectionError(f"{self.base}: {exc}") from None
            click.echo(f"syncmesh-plugin: cannot reach the node API at {self.base}: {exc}", err=True)
            sys.exit(EXIT_UNREACHABLE)

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def must(self, method: str, path: str) -> Any:
        """The body of a successful call; otherwise print the node's error and exit 1."""
        code, body = self.request(method, path)
        if code != 200:
            msg = body.get("error", body) if isinstance(body, dict) else body
            click.echo(f"syncmesh-plugin: {msg} (HTTP {code})", err=True)
            sys.exit(EXIT_PROBLEM)
        return body


def api_base(cfg: Config, api: str | None) -> str:
    if api:
        return api if "://" in api else f"http://{api}"
    host = cfg.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    scheme = "https" if cfg.security.tls_enabled else "http"
    return f"{scheme}://{host}:{cfg.server.port}"


def q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


def qpath(s: str) -> str:
    return urllib.parse.quote(s, safe="/")


def table(rows: list[tuple[Any, ...]]) -> None:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def human_bytes(n: int) -> str:
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{int(x)} B" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return str(n)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def admin_command(group: click.Group, name: str | None = None) -> Callable[[Callable[..., Any]], Any]:
    """A command with --config, --api and --json; the function receives a Client as `c`."""

    def deco(fn: Callable[..., Any]) -> Any:
        @functools.wraps(fn)
        def wrapper(config: str | None, api: str | None, as_json: bool, **kw: Any) -> None:
            try:
                cfg = load_config(config)
            except ConfigError as exc:
                click.echo(f"syncmesh-plugin: configuration error: {exc}", err=True)
                sys.exit(EXIT_CONFIG)
            sys.exit(fn(Client(cfg, api_base(cfg, api)), as_json=as_json, **kw) or 0)

        wrapper = click.option("--json", "as_json", is_flag=True, help="machine-readable JSON output")(wrapper)
        wrapper = click.option("--api", help="node API base URL, e.g. http://10.0.0.5:7946 (default: from config)")(
            wrapper)
        wrapper = click.option("--config", "config", envvar="SYNCMESH_CONFIG", type=click.Path(),
                               help="YAML config file (as for serve)")(wrapper)
        return group.command(name)(wrapper)

    return deco


def register(main: click.Group) -> None:
    @admin_command(main)
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

    @admin_command(main)
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

    @admin_command(main)
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

    @admin_command(main)
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
            f"{'in sync' if s.get('ready') else 'syncing'}, {s.get('files', 0)} files, "
            f"{human_bytes(s.get('bytes', 0))}, {s.get('pending', 0)} pending, {s.get('conflicts', 0)} conflicts, "
            f"{data.get('mounts_here', 0)} mount(s)" if s.get("held") else "not held"))
        conv = data.get("convergence", {})
        if "error" in conv:
            click.echo(f"convergence unavailable: {conv['error']}")
            return 0
        click.echo(f"latest    revision {conv['latest_revision']}\n")
        rows: list[tuple[Any, ...]] = [("NODE", "LIVE", "APPLIED", "BEHIND", "PENDING", "LAG(S)", "STATE")]
        for n in conv["nodes"]:
            rows.append((n["node"], "yes" if n["live"] else "no", n["applied_revision"], n["behind_revisions"],
                         n["pending"], f"{n['lag_seconds']:.3f}", "converged" if n["converged"] else "behind"))
        table(rows)
        return 0

    @admin_command(main)
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

    @admin_command(main)
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

    @admin_command(main)
    @click.argument("volume")
    @click.option("--settle", type=float, default=2.0, show_default=True,
                  help="seconds to wait before re-checking differences (changes still in flight)")
    def verify(c: Client, as_json: bool, volume: str, settle: float) -> int:
        """Compare every holder's digests of VOLUME; list differences. Exit 1 when they differ."""
        nodes = c.must("GET", "/api/v1/cluster/nodes")["nodes"]
        holders = [n for n in nodes if volume in n["volumes"]]
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

    @admin_command(main)
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

    @admin_command(main)
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

    @admin_command(main)
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
