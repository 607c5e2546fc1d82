"""How admin commands talk to a node's HTTP API (never to etcd directly), and print what it says.

The node is the one described by the same config file and SYNCMESH_* environment the daemon uses
(server.host/port, TLS and the first auth token), or the one given with --api URL.

With the cluster's own PKI (the default) the CLI authenticates like a peer: root on a node's host reads
that node's certificate, key and trust from its data root (`data_root`, or the managed plugin's
/var/lib/docker/plugins/<id>/propagated-mount), as the docker CLI uses its socket, so no flag is needed.
Elsewhere: --token (an admin or read-only token) and --cacert (the cluster's trust.pem).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import click

from ..autotls import api_credentials
from ..config import Config, ConfigError, load_config
from ..pki import PkiDir

EXIT_OK, EXIT_PROBLEM, EXIT_CONFIG, EXIT_UNREACHABLE = 0, 1, 2, 3


MANAGED_PLUGIN_ROOTS = "/var/lib/docker/plugins/*/propagated-mount"


def local_data_root(cfg: Config) -> str | None:
    """The data root of the node on this host that holds a certificate: the configured one, else a managed
    plugin's propagated mount."""
    for d in [cfg.data_root, *sorted(glob.glob(MANAGED_PLUGIN_ROOTS))]:
        if os.path.exists(PkiDir(d).node_cert):
            return d
    return None


class Client:
    def __init__(self, cfg: Config, base: str, token: str = "", cacert: str = "") -> None:
        self.cfg = cfg
        self.base = base.rstrip("/")
        self.token, self.cacert = token, cacert
        self.ctx: ssl.SSLContext | None = None
        self.hint = ""
        sec = cfg.security
        if self.base.startswith("https://"):
            if sec.tls_cert_file and sec.tls_key_file:
                self.ctx = ssl.create_default_context(cafile=sec.tls_ca_file or cacert or None)
                self.ctx.load_cert_chain(sec.tls_cert_file, sec.tls_key_file)
            else:
                self._cluster_context()

    def _cluster_context(self) -> None:
        """The cluster's own PKI: its CAs from the node's trust.pem (or --cacert); the node's certificate
        (an admin) when this user can read its key."""
        root = local_data_root(self.cfg)
        files = PkiDir(root) if root else None
        trust = self.cacert or (files.trust_pem if files and os.path.exists(files.trust_pem) else "")
        if not trust:
            self.ctx = ssl.create_default_context()
            self.hint = ("no cluster CA found on this host (no node certificate under data_root or a managed plugin's "
                         "mount): pass --cacert with a node's <data_root>/pki/trust.pem")
            return
        self.ctx = ssl.create_default_context(cafile=trust)
        self.ctx.check_hostname = False  # the cluster's own CA only signs its members (addresses change)
        creds = api_credentials(root) if root else None
        if creds is not None and not self.token:
            self.ctx.load_cert_chain(creds[0], creds[1])
        elif not self.token:
            self.hint = (f"cannot read this node's key in {files.dir if files else 'its data root'}: run as root on "
                         "the node's host, or pass --token (`syncmesh-plugin token --admin` prints the node's)")

    def for_node(self, url: str) -> Client:
        return Client(self.cfg, url, self.token, self.cacert)

    def request(self, method: str, path: str, *, exit_on_error: bool = True, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(self.base + path, method=method, data=data)
        req.add_header("Accept", "application/json")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        sec = self.cfg.security
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        elif sec.auth_enabled and sec.auth_tokens:
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
            if self.hint:
                click.echo(f"syncmesh-plugin: {self.hint}", err=True)
            sys.exit(EXIT_UNREACHABLE)

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def must(self, method: str, path: str, body: Any = None) -> Any:
        """The body of a successful call; otherwise print the node's error and exit 1."""
        code, body = self.request(method, path, body=body) if body is not None else self.request(method, path)
        if code != 200:
            msg = body.get("error", body) if isinstance(body, dict) else body
            click.echo(f"syncmesh-plugin: {msg} (HTTP {code})", err=True)
            if code in (401, 403) and self.hint:
                click.echo(f"syncmesh-plugin: {self.hint}", err=True)
            sys.exit(EXIT_PROBLEM)
        return body


def api_base(cfg: Config, api: str | None) -> str:
    scheme = "https" if cfg.security.tls_enabled else "http"
    if api:
        return api if "://" in api else f"{scheme}://{api}"
    host = cfg.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
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
        def wrapper(config: str | None, api: str | None, as_json: bool, token: str | None, cacert: str | None,
                    **kw: Any) -> None:
            try:
                cfg = load_config(config)
            except ConfigError as exc:
                click.echo(f"syncmesh-plugin: configuration error: {exc}", err=True)
                sys.exit(EXIT_CONFIG)
            client = Client(cfg, api_base(cfg, api), token or "", cacert or "")
            sys.exit(fn(client, as_json=as_json, **kw) or 0)

        wrapper = click.option("--json", "as_json", is_flag=True, help="machine-readable JSON output")(wrapper)
        wrapper = click.option("--cacert", type=click.Path(dir_okay=False),
                               help="the cluster's CAs (a node's <data_root>/pki/trust.pem) when not on a node's host")(
            wrapper)
        wrapper = click.option("--token", help="API token (admin or read-only) instead of the node's certificate")(
            wrapper)
        wrapper = click.option("--api", help="node API base URL, e.g. http://10.0.0.5:7734 (default: from config)")(
            wrapper)
        wrapper = click.option("--config", "config", envvar="SYNCMESH_CONFIG", type=click.Path(),
                               help="YAML config file (as for serve)")(wrapper)
        return click.command(name)(wrapper)

    return deco
