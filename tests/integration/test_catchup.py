"""A node that was down catches up; its offline edits propagate; a late joiner's Mount waits for data."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import converged, sync_status, wait_for, write


@pytest.mark.parametrize("compact", [False, True], ids=["resume-watch", "after-compaction"])
def test_restarted_node_catches_up_and_publishes_offline_edits(cluster, etcd, volume, compact):
    a, b, c = cluster("n1"), cluster("n2"), cluster("n3")
    a.ok("VolumeDriver.Create", {"Name": volume})
    for n in (a, b, c):
        n.mount(volume)
    write(a.vol(volume) / "base.txt", "base")
    write(a.vol(volume) / "gone-later.txt", "will be deleted while n2 is down")
    converged([a, b, c], volume, expect=lambda t: "gone-later.txt" in t)

    assert b.stop(signal.SIGKILL if compact else signal.SIGTERM) is not None
    # while n2 is down: changes elsewhere ...
    write(a.vol(volume) / "while-down/new.bin", os.urandom(200_000))
    write(c.vol(volume) / "base.txt", "changed on n3")
    (a.vol(volume) / "gone-later.txt").unlink()
    # ... and on n2's own disk (a container could keep writing into a bind mount)
    write(b.vol(volume) / "offline-edit.txt", "written on n2 while its daemon was down")
    converged([a, c], volume, expect=lambda t: "while-down/new.bin" in t and "gone-later.txt" not in t)
    if compact:
        for i in range(5):
            write(a.vol(volume) / f"churn{i}", str(i))
        converged([a, c], volume, expect=lambda t: "churn4" in t)
        etcd.compact()

    b.start()
    t = converged([a, b, c], volume, timeout=30,
                  expect=lambda t: "offline-edit.txt" in t and "while-down/new.bin" in t and "gone-later.txt" not in t)
    assert (b.vol(volume) / "base.txt").read_text() == "changed on n3"
    assert t["offline-edit.txt"][0] == "file"


def test_late_joiner_mount_returns_with_the_data(cluster, volume):
    a = cluster("n1")
    a.ok("VolumeDriver.Create", {"Name": volume})
    a.mount(volume)
    for i in range(300):
        write(a.vol(volume) / f"d{i % 10}/f{i}.txt", f"file {i}\n" * 50)
    write(a.vol(volume) / "big.bin", os.urandom(8 * 1024 * 1024))
    converged([a], volume, expect=lambda t: "big.bin" in t)
    # every change is published (300 files, big.bin, 10 directories) and nothing is pending
    wait_for(lambda: a.http("GET", f"/api/v1/volumes/{volume}")[1]["sync"]["files"] >= 311
             and sync_status(a, volume)["pending"] == 0, 20, what="n1 to publish everything")
    late = cluster("late")
    mp = late.mount(volume)
    # no waiting here: Mount returned only once the data was there
    from conftest import tree

    assert tree(mp) == tree(a.vol(volume))


def test_daemon_restart_keeps_mounts_and_refcounts(cluster, volume):
    a = cluster("n1")
    a.ok("VolumeDriver.Create", {"Name": volume})
    a.mount(volume, "id-1")
    a.mount(volume, "id-1")  # the same ID mounted twice (container + docker cp)
    a.mount(volume, "id-2")
    a.kill()
    a.start()
    st = a.ok("VolumeDriver.Get", {"Name": volume})["Volume"]["Status"]
    assert st["mounts_here"] == 3
    a.ok("VolumeDriver.Unmount", {"Name": volume, "ID": "id-1"})
    a.ok("VolumeDriver.Unmount", {"Name": volume, "ID": "unknown-id"})  # harmless
    assert a.ok("VolumeDriver.Get", {"Name": volume})["Volume"]["Status"]["mounts_here"] == 2
    # and it keeps syncing after the restart
    b = cluster("n2")
    b.mount(volume)
    write(a.vol(volume) / "after-restart.txt", "still syncing")
    converged([a, b], volume, expect=lambda t: "after-restart.txt" in t)
