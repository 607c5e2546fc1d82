"""Undo on real daemons: versions of replaced and deleted files kept by the other nodes, restored
cluster-wide; a tree restored as it was at a time; retention by count and bytes; versioning changed
after Create."""

from __future__ import annotations

import json
import shutil
import time

from conftest import cli, converged, holding, tree, wait_for, write


def _versions(n, volume: str, prefix: str = "") -> list[dict]:  # type: ignore[no-untyped-def]
    q = f"?prefix={prefix}" if prefix else ""
    return n.http("GET", f"/api/v1/volumes/{volume}/versions{q}")[1]["versions"]


def test_an_overwrite_and_a_delete_are_undone_from_another_node(cluster, volume):
    n1, n2, n3 = holding(cluster, volume, versioning="trash")
    write(n1.vol(volume) / "report.txt", "the good version")
    write(n1.vol(volume) / "notes.txt", "keep me")
    converged([n1, n2, n3], volume, expect=lambda t: "notes.txt" in t)
    # mistakes on n1
    write(n1.vol(volume) / "report.txt", "overwritten by mistake")
    (n1.vol(volume) / "notes.txt").unlink()
    converged([n1, n2, n3], volume, expect=lambda t: "notes.txt" not in t)
    wait_for(lambda: len(_versions(n2, volume)) == 2, 10, what="n2 to keep both versions")
    kept = {v["path"]: v for v in _versions(n2, volume)}
    assert kept["report.txt"]["reason"] == "replaced" and kept["notes.txt"]["reason"] == "deleted"
    assert kept["report.txt"]["origin"] == "n1" and kept["report.txt"]["size"] == len("the good version")
    assert _versions(n1, volume) == []  # n1 made the changes: the others keep what they replaced
    # the versions listing covers every replica; the store is outside _data and never synced
    listing = json.loads(cli(n1, "versions", volume, "--json").stdout)
    assert set(listing["nodes"]) == {"n1", "n2", "n3"} and len(listing["nodes"]["n3"]) == 2
    assert not any("versions" in p for p in tree(n1.vol(volume)))
    # restore both, asking n1 (which has no versions): the other nodes' copies are used
    for path in ("report.txt", "notes.txt"):
        got = cli(n1, "restore", volume, path)
        assert got.returncode == 0, got.stderr + got.stdout
    converged([n1, n2, n3], volume, expect=lambda t: "notes.txt" in t)
    for n in (n1, n2, n3):
        assert (n.vol(volume) / "report.txt").read_text() == "the good version"
        assert (n.vol(volume) / "notes.txt").read_text() == "keep me"
    # --to: a version restored beside the current file
    vid = next(v["id"] for v in _versions(n3, volume) if v["path"] == "report.txt")
    got = cli(n3, "restore", volume, "report.txt", "--version", vid, "--to", "report.old.txt")
    assert got.returncode == 0, got.stderr
    converged([n1, n2, n3], volume, expect=lambda t: "report.old.txt" in t)


def test_a_removed_directory_is_restored_as_it_was(cluster, volume):
    n1, n2, n3 = holding(cluster, volume, versioning="simple", versions_keep="3")
    layout = {f"site/page{i}.html": f"v1 page {i}" for i in range(8)}
    for rel, text in layout.items():
        write(n1.vol(volume) / rel, text)
    converged([n1, n2, n3], volume, expect=lambda t: all(k in t for k in layout))
    before = time.time()
    time.sleep(0.05)  # the versions' times must be after `before` (a precondition, not an assertion)
    write(n1.vol(volume) / "site/page0.html", "v2 page 0")  # a bad deploy, then the tree removed
    converged([n1, n2, n3], volume, expect=lambda t: True)
    shutil.rmtree(n1.vol(volume) / "site")
    converged([n1, n2, n3], volume, expect=lambda t: not any(p.startswith("site/") for p in t))
    wait_for(lambda: len(_versions(n2, volume, "site")) >= 9, 10, what="n2's versions of the tree")
    got = cli(n2, "restore", volume, "site", "--at", str(before))
    assert got.returncode == 0, got.stderr + got.stdout
    converged([n1, n2, n3], volume, expect=lambda t: all(k in t for k in layout))
    for rel, text in layout.items():
        assert (n3.vol(volume) / rel).read_text() == text  # as it was: v1 of page 0 too


def test_retention_by_count_and_bytes_and_a_change_after_create(cluster, volume):
    n1, n2 = cluster("n1"), cluster("n2")
    n1.ok("VolumeDriver.Create", {"Name": volume, "Opts": {"versioning": "simple", "versions_keep": "2"}})
    n1.mount(volume)
    n2.mount(volume)
    for i in range(5):
        write(n1.vol(volume) / "f.txt", f"version {i}")
        wait_for(lambda i=i: (n2.vol(volume) / "f.txt").exists() and
                 (n2.vol(volume) / "f.txt").read_text() == f"version {i}", 10)
    wait_for(lambda: len(_versions(n2, volume)) == 4, 10, what="four replaced versions kept")
    # versioning changed later: a byte cap of 30 bytes (each version is 9 bytes) keeps the 3 newest
    got = cli(n1, "versioning", volume, "simple", "--keep", "10", "--max-bytes", "30")
    assert got.returncode == 0, got.stderr
    for i in range(5, 8):
        write(n1.vol(volume) / "f.txt", f"version {i}")
        wait_for(lambda i=i: (n2.vol(volume) / "f.txt").read_text() == f"version {i}", 10)
    wait_for(lambda: sum(v["size"] for v in _versions(n2, volume)) <= 30 and len(_versions(n2, volume)) == 3, 15,
             what="the cap enforced on n2")
    kept = sorted(v["at"] for v in _versions(n2, volume))
    assert len(kept) == 3
    assert 'syncmesh_versions_bytes{volume="' + volume + '"}' in n2.http("GET", "/metrics")[1].decode()
    # off: the store empties on the next round; no new versions are kept
    assert cli(n1, "versioning", volume, "off").returncode == 0
    write(n1.vol(volume) / "f.txt", "version 9")
    wait_for(lambda: (n2.vol(volume) / "f.txt").read_text() == "version 9", 10)
    assert len(_versions(n2, volume)) == 3  # nothing new kept (the old ones go with the next minute's round)


def test_a_removed_volume_is_undeleted_from_the_most_complete_copy(cluster, volume):
    n1, n2 = cluster("n1"), cluster("n2")
    n1.ok("VolumeDriver.Create", {"Name": volume, "Opts": {"versioning": "trash", "conflict_resolution": "size"}})
    n1.mount(volume, "m1")
    n2.mount(volume, "m2")
    for i in range(12):
        write(n1.vol(volume) / f"d/f{i}.txt", f"file {i}")
    before = converged([n1, n2], volume, expect=lambda t: "d/f11.txt" in t)
    for n, mid in ((n1, "m1"), (n2, "m2")):
        n.ok("VolumeDriver.Unmount", {"Name": volume, "ID": mid})
    n1.ok("VolumeDriver.Remove", {"Name": volume})  # docker volume rm: gone on every node ...
    wait_for(lambda: not n2.vol(volume).exists(), 20, what="the removal on n2")
    listing = json.loads(cli(n1, "trash", "--json").stdout)["trash"]
    assert {(e["name"], e["node"], e["files"]) for e in listing} == {(volume, "n1", 12), (volume, "n2", 12)}
    got = cli(n2, "undelete", volume)  # ... and back, with its options
    assert got.returncode == 0, got.stderr + got.stdout
    vol = n1.ok("VolumeDriver.Get", {"Name": volume})["Volume"]
    assert vol["Status"]["options"]["conflict_resolution"] == "size"
    n1.mount(volume, "m3")
    n2.mount(volume, "m4")  # whichever node's copy was used, the other gets the data
    converged([n1, n2], volume, expect=lambda t: t == before)
    # purge: the trashed copy that was not used goes for good
    got = cli(n1, "purge", volume)
    assert got.returncode == 0 and "1 trashed copy(ies) deleted" in got.stdout, got.stdout + got.stderr
    assert json.loads(cli(n1, "trash", "--json").stdout)["trash"] == []
