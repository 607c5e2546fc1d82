"""The managed plugin grows its embedded etcd across hosts under the defaults (issue 22): two hosts
(network namespaces, a dockerd each), no etcd of the user's; host 1's plugin runs its member alone and
makes the cluster's CA, host 2's plugin is set with SYNCMESH_JOIN and the token `syncmesh-plugin token`
reads from host 1's plugin. The members then talk mutual TLS on the hosts' addresses, and a container
on host 2 reads what a container on host 1 wrote."""

from __future__ import annotations

import contextlib
import json
import ssl
import time
import urllib.request
from pathlib import Path
from typing import Any

from conftest import PLUGIN_VERSION, TIMINGS
from e2e_harness import IMAGE, Dockerd, Network, wait_for

PORT = 7734


def health(ip: str) -> dict[str, Any]:
    """The node's health over HTTPS (health is open; the certificate is the cluster's own CA's)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(f"https://{ip}:{PORT}/api/v1/health", timeout=3, context=ctx) as r:
        return dict(json.loads(r.read()))


def etcd_ok(ip: str, members: int) -> bool:
    etcd = health(ip)["components"]["etcd"]
    return bool(etcd["ok"]) and len(etcd.get("members", [])) == members


def test_managed_plugins_grow_an_embedded_etcd_over_tls(workdir: Path, image_tar: Path, plugin_dir: Path) -> None:
    net = Network(2, subnet="10.231.80", tag="j")
    ref = f"syncmesh/syncmesh-plugin:{PLUGIN_VERSION}"
    hosts: list[Dockerd] = []
    try:
        net.setup()
        hosts = [Dockerd(workdir / f"join{n}", netns=net.ns[n - 1]) for n in (1, 2)]
        for n, d in enumerate(hosts, start=1):
            d.start()
            d.import_busybox(image_tar)
            d.cli("plugin", "create", ref, str(plugin_dir), timeout=300)
            d.cli("plugin", "set", ref, f"SYNCMESH_NODE_ID=host{n}", f"SYNCMESH_SERVER_ADVERTISE={net.addr(n)}:{PORT}",
                  "SYNCMESH_LOG_FORMAT=text", "SYNCMESH_SYNC_MOUNT_TIMEOUT=15s")
        h1, h2 = hosts
        ip1, ip2 = net.addr(1), net.addr(2)
        t = time.monotonic()
        h1.cli("plugin", "enable", "--timeout", "120", ref)
        wait_for(lambda: etcd_ok(ip1, 1), 60, "host1's embedded etcd")
        TIMINGS["embedded cluster: host1 enable -> etcd connected"] = time.monotonic() - t
        pid1 = h1.cli("plugin", "inspect", "-f", "{{.Id}}", ref).stdout.strip()
        mount1 = h1.base / "data" / "plugins" / pid1 / "propagated-mount"
        token = (mount1 / "pki" / "join-token").read_text().strip()  # what `syncmesh-plugin token` prints there
        assert token.startswith("SM1"), token

        h2.cli("plugin", "set", ref, f"SYNCMESH_JOIN=https://{ip1}:{PORT}", f"SYNCMESH_JOIN_TOKEN={token}")
        t = time.monotonic()
        h2.cli("plugin", "enable", "--timeout", "120", ref)
        wait_for(lambda: etcd_ok(ip2, 2), 90, "host2's member to join the embedded cluster")
        TIMINGS["embedded cluster: host2 enable -> member of the cluster"] = time.monotonic() - t
        wait_for(lambda: etcd_ok(ip1, 2), 30, "host1 to follow the member list")
        # host1's member moved to its address for host2; every URL is https, both members healthy
        def all_https_and_healthy(ip: str) -> bool:
            members = health(ip)["components"]["etcd"]["members"]
            assert all(m["endpoint"].startswith("https://") for m in members), members
            return all(m["healthy"] for m in members)

        for ip in (ip1, ip2):  # probes run every few seconds; a learner answers once it has caught up
            wait_for(lambda ip=ip: all_https_and_healthy(ip), 30, f"every member healthy as seen from {ip}")
        cluster = json.loads((mount1 / "etcd" / "ports.json").read_text())
        assert cluster["host"] == ip1, cluster

        h1.cli("volume", "create", "-d", ref, "joined")
        h1.cli("run", "--rm", "-v", "joined:/data", IMAGE, "sh", "-c", "echo from-host1 > /data/hello")
        t = time.monotonic()
        out = h2.cli("run", "--rm", "-v", "joined:/data", IMAGE, "cat", "/data/hello").stdout
        TIMINGS["embedded cluster: host2 container reads host1's file"] = time.monotonic() - t
        assert out == "from-host1\n", out
        h2.cli("run", "--rm", "-v", "joined:/data", IMAGE, "sh", "-c", "echo from-host2 > /data/back")
        wait_for(lambda: h1.cli("run", "--rm", "-v", "joined:/data", IMAGE, "cat", "/data/back",
                                check=False).stdout == "from-host2\n", 30, "host2's write on host1")
        h1.cli("volume", "rm", "joined")
    finally:
        for d in hosts:
            if d.proc is not None and d.proc.poll() is None:
                with contextlib.suppress(Exception):
                    d.cli("plugin", "disable", "-f", ref, check=False, timeout=60)
            d.stop()
        net.close()
