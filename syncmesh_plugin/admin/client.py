"""How admin commands talk to a node's HTTP API (never to etcd directly), and print what it says.

The node is the one described by the same config file and SYNCMESH_* environment the daemon uses
(server.host/port, TLS and the first auth token), or the one given with --api URL.
"""

from __future__ import annotations

import functools
import json
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import click

from ..config import Config, ConfigError, load_config

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


def admin_command(name: str | None = None) -> Callable[[Callable[..., Any]], click.Command]:
    """A command with --config, --api and --json; the function receives a Client as `c` and returns
    the exit code."""

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
        wrapper = click.option("--api", help="node API base URL, e.g. http://10.0.0.5:7734 (default: from config)")(
            wrapper)
        wrapper = click.option("--config", "config", envvar="SYNCMESH_CONFIG", type=click.Path(),
                               help="YAML config file (as for serve)")(wrapper)
        return click.command(name)(wrapper)

    return deco
