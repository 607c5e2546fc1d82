"""The cluster's own PKI: `ca status`, `ca rotate`, `ca revoke NODE`, and `token` (the join token, the
node's API tokens, a new join secret)."""

from __future__ import annotations

import datetime
import json
import sys
from typing import Any

import click

from ..config import ConfigError, load_config
from ..pki import PkiDir
from .client import EXIT_CONFIG, EXIT_PROBLEM, Client, admin_command, api_base, emit_json, local_data_root, q, table


@click.group("ca")
def ca() -> None:
    """The cluster's own CA: state, rotation, revoking a node's certificates."""


def _left(ts: Any) -> str:
    try:
        s = float(ts) - datetime.datetime.now(datetime.UTC).timestamp()
    except (TypeError, ValueError):
        return "?"
    if s <= 0:
        return "EXPIRED"
    return f"{s / 86400:.1f}d" if s >= 86400 else f"{s / 3600:.1f}h" if s >= 3600 else f"{s:.0f}s"


@admin_command("status")
def status(c: Client, as_json: bool) -> int:
    """The CAs (the signing one, CRL numbers), a rotation in progress, every node's certificate."""
    data = c.must("GET", "/api/v1/pki")
    if as_json:
        emit_json(data)
        return 0
    click.echo(f"signer    {data.get('signer')}{'  (this node)' if data.get('is_signer') else ''}")
    click.echo(f"rotation  {data.get('rotation', '?')}   trust bundle #{data.get('trust_seq')}")
    for x in data.get("cas", []):
        click.echo(f"CA        {x['fingerprint'][:16]}  {'signing' if x['signing'] else 'trusted'}  until "
                   f"{x['not_after'][:10]}  CRL #{x['crl_number']}")
    rows: list[tuple[Any, ...]] = [("NODE", "LIVE", "CA", "SERIAL", "EXPIRES IN", "TRUST #")]
    for n, rec in data.get("nodes", {}).items():
        rows.append((n, "yes" if rec.get("live") else "no", str(rec.get("ca", ""))[:16],
                     str(rec.get("serial", ""))[:16], _left(rec.get("not_after")), rec.get("trust_seq", "")))
    if len(rows) > 1:
        click.echo("")
        table(rows)
    if data.get("error"):
        click.echo(f"\nproblem: {data['error']}")
    return 0


@admin_command("rotate")
def rotate(c: Client, as_json: bool) -> int:
    """Start a CA rotation: a new CA is trusted alongside the old one, every node renews with it, then the
    old one is dropped (`ca status` shows the phase). Join tokens change: print the new one with `token`."""
    data = c.must("POST", "/api/v1/pki/ca/rotate")
    if as_json:
        emit_json(data)
    else:
        click.echo(f"CA rotation started: new CA {data['new_ca'][:16]} trusted alongside {data['old_ca'][:16]}")
    return 0


@admin_command("revoke")
@click.argument("node_id")
def revoke(c: Client, as_json: bool, node_id: str) -> int:
    """Revoke every certificate of NODE_ID now, live or not: members refuse it within seconds and its
    renewals are refused (for a host you no longer trust; `forget` does this for a node that is gone).
    A host holding the join token could join again under another name: rotate it (`token --rotate`)."""
    data = c.must("POST", f"/api/v1/pki/nodes/{q(node_id)}/revoke")
    if as_json:
        emit_json(data)
    else:
        click.echo(f"node {node_id}: {len(data.get('revoked_serials', []))} certificate(s) revoked")
    return 0


for _cmd in (status, rotate, revoke):
    ca.add_command(_cmd)


@click.command("token")
@click.option("--config", "config", envvar="SYNCMESH_CONFIG", type=click.Path(), help="YAML config file (as for serve)")
@click.option("--admin", "which", flag_value="admin", help="print this node's admin API token instead")
@click.option("--readonly", "which", flag_value="readonly", help="print this node's read-only API token instead")
@click.option("--rotate", is_flag=True, help="make a new join secret (earlier tokens stop admitting nodes) and print "
                                              "the new token")
@click.option("--api", help="node API base URL for --rotate (default: this host's node)")
def token(config: str | None, which: str | None, rotate: bool, api: str | None) -> None:
    """Print the join token other nodes need (join_token, SYNCMESH_JOIN_TOKEN), read from this node's data
    root (root on the host of the node that created the cluster's CA)."""
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        click.echo(f"syncmesh-plugin: configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    if rotate:
        data = Client(cfg, api_base(cfg, api)).must("POST", "/api/v1/pki/join-token/rotate")
        click.echo(data["join_token"])
        return
    root = local_data_root(cfg)
    if root is None:
        click.echo(f"syncmesh-plugin: no node of this host has joined a cluster yet (nothing under {cfg.data_root}/pki "
                   "or a managed plugin's mount); is the daemon running with security.tls_enabled (the default)?",
                   err=True)
        sys.exit(EXIT_PROBLEM)
    files = PkiDir(root)
    path = {"admin": files.admin_token, "readonly": files.readonly_token}.get(which or "", files.join_token)
    try:
        with open(path, encoding="ascii") as fh:
            click.echo(fh.read().strip())
        return
    except PermissionError:
        click.echo(f"syncmesh-plugin: cannot read {path}: run as root", err=True)
    except FileNotFoundError:
        signer = "?"
        try:
            with open(files.trust_json, encoding="utf-8") as fh:
                signer = json.load(fh)["bundle"]["signer"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        click.echo(f"syncmesh-plugin: this node does not hold the cluster's CA: run `syncmesh-plugin token` on the "
                   f"signer, node {signer}" if which is None else f"syncmesh-plugin: {path} is missing", err=True)
    sys.exit(EXIT_PROBLEM)
