"""Back-pressure: memory of a node facing a large backlog whose only source of chunks is dead.

n1 publishes N files of 8 KiB (too big to travel inline) while n2 is stopped; n1 is then killed and
n2 started: every change it learns of needs chunks that no live peer has. Its RSS is sampled while it
tries, then n1 comes back and the volume must converge.

Usage: python benchmarks/backlog.py [--files 100000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from systems import proc_stats

from syncmesh_plugin.devcluster import Etcd, Node, converged, wait_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--watch-seconds", type=float, default=30.0)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-backlog-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    (base / "etcd").mkdir()
    etcd = Etcd(base / "etcd")
    etcd.start()
    env = {"SYNCMESH_LOG_LEVEL": "warning", "SYNCMESH_SYNC_INTERVAL": "300s"}
    n1, n2 = Node(base, "n1", etcd, "/backlog", **env), Node(base, "n2", etcd, "/backlog", **env)
    try:
        n1.start()
        n2.start()
        n1.ok("VolumeDriver.Create", {"Name": "v"})
        n1.mount("v")
        n2.mount("v")
        n2.stop()
        t0 = time.monotonic()
        d = n1.vol("v")
        for i in range(a.files):
            p = d / f"d{i % 500}" / f"f{i}"
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(os.urandom(8192))

        def published() -> bool:
            return n1.http("GET", "/api/v1/volumes/v")[1]["sync"]["files"] >= a.files + 500

        wait_for(published, 1800, interval=1.0, what="n1 to publish everything")
        print(f"n1 published {a.files} files in {time.monotonic() - t0:.0f}s", flush=True)
        n1.kill()
        n2.start(wait=False)
        assert n2.proc is not None
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, proc_stats(n2.proc.pid)[0])  # type: ignore[union-attr]
                time.sleep(0.2)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        time.sleep(a.watch_seconds)
        print(f"n2 facing a backlog of {a.files} changes with the only source dead: peak RSS "
              f"{peak / 2**20:.0f} MB over {a.watch_seconds:.0f}s", flush=True)
        n1.start()
        t1 = time.monotonic()
        converged([n1, n2], "v", timeout=1800, expect=lambda t: len(t) >= a.files + 500)
        stop.set()
        th.join()
        print(f"after n1 returned: converged in {time.monotonic() - t1:.0f}s; n2 peak RSS overall "
              f"{peak / 2**20:.0f} MB", flush=True)
    finally:
        for n in (n1, n2):
            n.stop()
        etcd.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
