"""The systems under test, behind one small interface, so every workload runs identically on each.

A system is N nodes sharing one logical folder/volume; `dirs[i]` is node i's copy. Workloads write
into the copies and time convergence by comparing content digests, never by trusting logs.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from syncmesh_plugin.devcluster import Etcd, Node, wait_for


class System:
    """N nodes, one shared folder. Subclasses start real processes."""

    name = "system"

    def __init__(self, base: Path, nodes: int) -> None:
        self.base = base
        self.n = nodes
        self.dirs: list[Path] = []

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        """The daemon process of each node (for RSS and CPU)."""
        raise NotImplementedError

    def aux_pids(self) -> list[int]:
        """Processes the system needs besides its daemons (etcd): counted in the total CPU."""
        return []

    def peer_bytes(self) -> int:
        """Bytes sent between peers so far (file data on the wire, all nodes added up)."""
        raise NotImplementedError

    def restart_node(self, i: int) -> float:
        """Restart node i; return seconds until it says it is ready (its own readiness signal)."""
        raise NotImplementedError

    def reset(self) -> None:
        """An empty shared folder for the next workload (a new volume / folder)."""
        raise NotImplementedError

    def extra(self) -> dict[str, Any]:
        return {}


def proc_stats(pid: int) -> tuple[int, float]:
    """(current RSS bytes, CPU seconds user+sys) of a process."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return rss, (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, IndexError, ValueError):
        return 0, 0.0


class Syncmesh(System):
    name = "syncmesh"

    def __init__(self, base: Path, nodes: int, tls: bool = True, versioning: str = "off") -> None:
        super().__init__(base, nodes)
        self.tls = tls  # the product's default (mutual TLS, the cluster's own CA); False: plain HTTP
        self.versioning = versioning  # the volume's option: "trash" measures the version store's cost
        if not tls:
            self.name = "syncmesh-plain"
        if versioning != "off":
            self.name = f"syncmesh-{versioning}"
        self.etcd: Etcd | None = None
        self.nodes: list[Node] = []
        self.volume = ""
        self.prefix = f"/bench{uuid.uuid4().hex[:6]}"
        self._restarted_bytes = 0
        self.rss_after_restart = 0

    def start(self) -> None:
        (self.base / "etcd").mkdir(parents=True, exist_ok=True)
        self.etcd = Etcd(self.base / "etcd")
        self.etcd.start()
        self.nodes = []
        for i in range(self.n):  # the first node creates the cluster CA, the others join with its token
            token = self.nodes[0].join_token() if self.tls and self.nodes else ""
            nd = Node(self.base, f"node{i}", self.etcd, self.prefix, tls=self.tls, join_token=token,
                      SYNCMESH_LOG_LEVEL="warning", SYNCMESH_SYNC_INTERVAL="300s")
            nd.start()
            self.nodes.append(nd)
        self.reset()

    def reset(self) -> None:
        if self.volume:
            for nd in self.nodes:
                for mid in ("bench",):
                    nd.docker("VolumeDriver.Unmount", {"Name": self.volume, "ID": mid})
            self.nodes[0].ok("VolumeDriver.Remove", {"Name": self.volume})
            for nd in self.nodes:
                wait_for(lambda nd=nd: not nd.vol(self.volume).exists(), 30, what="volume removal")
        self.volume = f"bench{uuid.uuid4().hex[:8]}"
        opts = {"versioning": self.versioning} if self.versioning != "off" else None
        self.nodes[0].ok("VolumeDriver.Create", {"Name": self.volume, "Opts": opts})
        for nd in self.nodes:
            nd.mount(self.volume, "bench")
        self.dirs = [nd.vol(self.volume) for nd in self.nodes]

    def stop(self) -> None:
        for nd in self.nodes:
            nd.stop(timeout=10)
        if self.etcd is not None:
            self.etcd.stop()

    def pids(self) -> list[int]:
        return [nd.proc.pid for nd in self.nodes if nd.proc is not None]

    def aux_pids(self) -> list[int]:
        return [self.etcd.proc.pid] if self.etcd is not None and self.etcd.proc is not None else []

    def peer_bytes(self) -> int:
        total = self._restarted_bytes  # counters of a restarted daemon start again at 0
        for nd in self.nodes:
            _, body = nd.http("GET", "/metrics")
            for line in body.decode().splitlines():
                if line.startswith("syncmesh_bytes_received_total "):
                    total += int(float(line.split()[1]))
        return total

    def _received(self, nd: Node) -> int:
        _, body = nd.http("GET", "/metrics")
        return sum(int(float(line.split()[1])) for line in body.decode().splitlines()
                   if line.startswith("syncmesh_bytes_received_total "))

    def restart_node(self, i: int) -> float:
        nd = self.nodes[i]
        self._restarted_bytes += self._received(nd)
        nd.stop()
        t0 = time.monotonic()
        nd.start(wait=False)

        def ready() -> bool:
            code, body = nd.http("GET", f"/api/v1/volumes/{self.volume}")
            return code == 200 and body["sync"].get("ready") and body["sync"].get("pending", 1) == 0

        wait_for(ready, 300, interval=0.05, what="restarted node ready")
        took = time.monotonic() - t0
        assert nd.proc is not None
        self.rss_after_restart = proc_stats(nd.proc.pid)[0]
        return took

    def extra(self) -> dict[str, Any]:
        size = 0
        if self.etcd is not None:
            p = self.etcd.dir / "data" / "member" / "snap" / "db"
            size = p.stat().st_size if p.exists() else 0
        kept = 0  # the version store of every node (hard links: bytes no longer in any volume)
        for nd in self.nodes:
            d = nd.data_root / "volumes" / self.volume / "versions"
            if d.is_dir():
                kept += sum(p.stat().st_size for p in d.iterdir() if p.is_file())
        return {"etcd_db_bytes": size, "versions_bytes": kept}

    def remove_base(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)
