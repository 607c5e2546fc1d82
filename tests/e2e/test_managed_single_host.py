"""The managed plugin alone on one dockerd with no settings but its ports: embedded etcd inside the plugin."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import PLUGIN_VERSION, TIMINGS
from e2e_harness import IMAGE, Dockerd, free_port, wait_for


def test_managed_plugin_with_embedded_etcd(workdir: Path, image_tar: Path, plugin_dir: Path) -> None:
    d = Dockerd(workdir / "solo").start()  # its own dockerd (own netns): the plugin never touches the machine's
    ref = f"syncmesh/syncmesh-plugin:{PLUGIN_VERSION}"
    try:
        d.import_busybox(image_tar)
        t = time.monotonic()
        d.cli("plugin", "create", ref, str(plugin_dir), timeout=300)
        TIMINGS["solo plugin create"] = time.monotonic() - t
        port = free_port()
        # The plugin shares dockerd's network namespace (its own, loopback only): the node API on
        # loopback, asked from inside that namespace.
        d.cli("plugin", "set", ref, "SYNCMESH_SERVER_HOST=127.0.0.1", f"SYNCMESH_SERVER_PORT={port}",
              "SYNCMESH_NODE_ID=solo", "SYNCMESH_SECURITY_TLS_ENABLED=false")  # get_json() speaks plain HTTP
        t = time.monotonic()
        d.cli("plugin", "enable", ref)
        TIMINGS["solo plugin enable"] = time.monotonic() - t
        wait_for(lambda: d.get_json(f"http://127.0.0.1:{port}/api/v1/health")["components"]["etcd"]["ok"], 30,
                 "the embedded etcd")
        TIMINGS["solo enable -> embedded etcd connected"] = time.monotonic() - t

        d.cli("volume", "create", "-d", ref, "--opt", "conflict_resolution=manual", "solo1")
        assert d.cli("run", "--rm", "-v", "solo1:/data", IMAGE, "sh", "-c",
                     "echo solo > /data/s && cat /data/s").stdout == "solo\n"
        pid = d.cli("plugin", "inspect", "-f", "{{.Id}}", ref).stdout.strip()
        host_path = d.base / "data" / "plugins" / pid / "propagated-mount" / "volumes" / "solo1" / "_data" / "s"
        assert host_path.read_text() == "solo\n"
        status = d.cli("volume", "inspect", "-f", "{{json .Status}}", "solo1").stdout
        assert '"conflict_resolution":"manual"' in status and '"node":"solo"' in status
        # the plugin's stdout/stderr go to dockerd's log
        assert "embedded etcd started" in (d.base / "dockerd.log").read_text()
        d.cli("volume", "rm", "solo1")
        t = time.monotonic()
        d.cli("plugin", "disable", ref)
        TIMINGS["solo plugin disable"] = time.monotonic() - t
    finally:
        d.stop()
