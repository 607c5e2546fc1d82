"""Command line: `syncmesh-plugin serve`, `config show`, `certs`, and the admin commands (admin/), `token`
and `ca` among them.

Admin commands talk to a node's HTTP API: by default the one described by the same config file and
`SYNCMESH_*` environment the daemon uses, or the one given with --api.
"""

from __future__ import annotations

import asyncio
import json
import sys

import click
import yaml

from . import admin
from .config import Config, ConfigError, as_dict, load_config


def _load(config: str | None) -> Config:
    try:
        return load_config(config)
    except ConfigError as exc:
        click.echo(f"syncmesh-plugin: configuration error: {exc}", err=True)
        sys.exit(2)


@click.group()
@click.version_option(package_name="syncmesh-plugin")
def main() -> None:
    """syncmesh: Docker volumes kept identical across hosts in real time."""


@main.command()
@click.option("--config", "config", envvar="SYNCMESH_CONFIG", type=click.Path(), help="YAML config file")
def serve(config: str | None) -> None:
    """Run the plugin daemon (Docker socket + peer/API server)."""
    cfg = _load(config)
    from .daemon import run_daemon
    from .logs import setup_logging
    from .memory import limit_malloc_arenas

    limit_malloc_arenas()

    setup_logging(cfg.log_level, cfg.log_format, node=cfg.node_id)
    sys.exit(asyncio.run(run_daemon(cfg)))


@main.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@click.option("--config", "config", envvar="SYNCMESH_CONFIG", type=click.Path(), help="YAML config file")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of YAML")
def config_show(config: str | None, as_json: bool) -> None:
    """Print the effective configuration (file + environment), secrets masked."""
    data = as_dict(_load(config))
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


# status, nodes, watch, volumes, inspect, conflicts, resume, resync, files, verify, token, ca: see admin/
for command in admin.COMMANDS:
    main.add_command(command)


@main.group("certs")
def certs_group() -> None:
    """Certificate files of your own for mutual TLS (security.tls_cert_file...); not needed with the
    cluster's own CA, the default."""


@certs_group.command("init")
@click.option("--dir", "directory", default=".", show_default=True, type=click.Path(file_okay=False),
              help="where ca.pem and ca-key.pem are written")
@click.option("--days", default=3650, show_default=True, type=click.IntRange(1, 36500))
@click.option("--force", is_flag=True, help="overwrite an existing CA (every node certificate must be reissued)")
def certs_init(directory: str, days: int, force: bool) -> None:
    """Create a CA: ca.pem (give it to every node) and ca-key.pem (mode 0600; keep it off the nodes)."""
    from .certs import CertError, init_ca

    try:
        out = init_ca(directory, days=days, force=force)
    except (CertError, OSError) as exc:
        click.echo(f"syncmesh-plugin: {exc}", err=True)
        sys.exit(2)
    click.echo(f"wrote {out.cert} and {out.key}")


@certs_group.command("issue")
@click.argument("node")
@click.option("--dir", "directory", default=".", show_default=True, type=click.Path(file_okay=False),
              help="directory holding the CA; NODE.pem and NODE-key.pem are written there")
@click.option("--host", "hosts", multiple=True, metavar="NAME_OR_IP",
              help="an address peers use to reach this node (repeatable); localhost and 127.0.0.1 are always in")
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 36500))
@click.option("--force", is_flag=True, help="overwrite existing files")
def certs_issue(node: str, directory: str, hosts: tuple[str, ...], days: int, force: bool) -> None:
    """Issue NODE.pem / NODE-key.pem signed by the CA, valid as server and client certificate."""
    from os.path import join

    from .certs import CertError, issue

    try:
        out = issue(directory, node, hosts, days=days, force=force)
    except (CertError, OSError) as exc:
        click.echo(f"syncmesh-plugin: {exc}", err=True)
        sys.exit(2)
    click.echo(f"wrote {out.cert} and {out.key}")
    click.echo(f"  security.tls_cert_file: {out.cert}\n  security.tls_key_file: {out.key}\n"
               f"  security.tls_ca_file: {join(directory, 'ca.pem')}")
