"""The mass-damage guard: a wiped or replaced volume directory is not published as mass deletion."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import converged, tree, wait_for, write


def _paused(n, volume: str) -> str:  # type: ignore[no-untyped-def]
    return n.http("GET", f"/api/v1/volumes/{volume}")[1]["sync"].get("paused", "")


def _seed(cluster, volume: str, count: int = 40):  # type: ignore[no-untyped-def]
    a, b = cluster("n1"), cluster("n2")
    a.ok("VolumeDriver.Create", {"Name": volume})
    a.mount(volume)
    b.mount(volume)
    for i in range(count):
        write(a.vol(volume) / f"f{i}.txt", f"file {i}")
    converged([a, b], volume, expect=lambda t: len(t) == count)
    return a, b


def test_mass_delete_pauses_and_resume_restore_brings_files_back(cluster, volume):
    a, b = _seed(cluster, volume)
    before = tree(a.vol(volume))
    for i in range(30):  # 75% of the volume at once
        (b.vol(volume) / f"f{i}.txt").unlink()
    wait_for(lambda: _paused(b, volume), 10, what="the guard to pause n2")
    assert "would be deleted" in _paused(b, volume)
    code, health = b.http("GET", "/api/v1/health")
    assert code == 503 and volume in health["components"]["volumes"]["paused"]
    # nothing was published: n1 still has every file
    assert tree(a.vol(volume)) == before
    # the operator restores: n2 takes the files back from the cluster
    r = subprocess.run([sys.executable, "-m", "syncmesh_plugin", "resume", volume, "--restore", "--api",
                        f"http://127.0.0.1:{b.port}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    converged([a, b], volume, expect=lambda t: t == before)
    assert not _paused(b, volume)


def test_resume_accept_publishes_the_deletions(cluster, volume):
    a, b = _seed(cluster, volume)
    for i in range(30):
        (b.vol(volume) / f"f{i}.txt").unlink()
    wait_for(lambda: _paused(b, volume), 10)
    code, body = b.http("POST", f"/api/v1/volumes/{volume}/resume?mode=accept")
    assert code == 200 and body["was_paused"]
    converged([a, b], volume, expect=lambda t: len(t) == 10)


def test_replaced_volume_directory_pauses(cluster, volume):
    a, b = _seed(cluster, volume, count=5)
    # the directory is swapped for an empty one (think: an unmounted disk)
    shutil.rmtree(b.vol(volume))
    b.vol(volume).mkdir()
    write(b.vol(volume) / "new.txt", "x")
    wait_for(lambda: _paused(b, volume), 40, what="the guard to notice the replaced directory")
    assert len(tree(a.vol(volume))) == 5
    b.http("POST", f"/api/v1/volumes/{volume}/resume?mode=restore")
    converged([a, b], volume, expect=lambda t: len(t) == 6)
