"""Writers and readers on real daemons: `writers=n1` makes n2 and n3 receive-only replicas; a
forged manifest "from" a reader is ignored; `--role send-only` and `override`."""

from __future__ import annotations

from conftest import cli, converged, holding, tree, wait_for, write

from syncmesh_plugin.chunker import chunk_id
from syncmesh_plugin.manifest import Manifest


def _sync(n, volume: str) -> dict:  # type: ignore[no-untyped-def]
    return n.http("GET", f"/api/v1/volumes/{volume}")[1]["sync"]


def _published(n, volume: str, path: str) -> bool:  # type: ignore[no-untyped-def]
    code, body = n.http("GET", f"/api/v1/volumes/{volume}/files/{path}")
    return code == 200 and body.get("manifest") is not None and body["manifest"].get("k") != "deleted"


def _marker(src, dsts, volume: str, name: str) -> None:  # type: ignore[no-untyped-def]
    write(src.vol(volume) / name, name)
    for d in dsts:
        wait_for(lambda d=d: (d.vol(volume) / name).exists(), 20, what=f"{name} on {d.name}")


def test_one_writer_many_readers(cluster, volume):
    n1, n2, n3 = holding(cluster, volume, writers="n1")
    assert _sync(n2, volume)["role"] == "receive-only" and _sync(n1, volume)["role"] == "send-receive"
    write(n1.vol(volume) / "shared.txt", "from the writer")
    converged([n1, n2, n3], volume, expect=lambda t: "shared.txt" in t)

    # a stray write on a reader stays there, shown as a local change
    write(n2.vol(volume) / "stray.log", "reader's log")
    write(n2.vol(volume) / "shared.txt", "edited on a reader")
    wait_for(lambda: _sync(n2, volume)["local_changes"] == 2, 10, what="n2's two local changes")
    _marker(n1, [n2, n3], volume, "m1")
    assert not (n3.vol(volume) / "stray.log").exists() and not _published(n1, volume, "stray.log")
    assert (n3.vol(volume) / "shared.txt").read_text() == "from the writer"
    assert "local change" in n2.log()
    shown = cli(n2, "inspect", volume).stdout
    assert "receive-only" in shown and "2 local change(s)" in shown

    # revert: the addition goes, the cluster's version comes back
    got = cli(n2, "revert", volume)
    assert got.returncode == 0, got.stderr
    wait_for(lambda: not (n2.vol(volume) / "stray.log").exists()
             and (n2.vol(volume) / "shared.txt").read_text() == "from the writer", 20, what="n2 reverted")
    assert _sync(n2, volume)["local_changes"] == 0
    converged([n1, n2, n3], volume)


def test_a_remote_change_wins_over_a_readers_local_edit_which_is_kept_unpublished(cluster, volume):
    n1, n2, n3 = holding(cluster, volume, writers="n1")
    write(n1.vol(volume) / "doc.txt", "v1")
    converged([n1, n2, n3], volume, expect=lambda t: "doc.txt" in t)
    write(n2.vol(volume) / "doc.txt", "local edit on n2")
    wait_for(lambda: _sync(n2, volume)["local_changes"] == 1, 10)
    write(n1.vol(volume) / "doc.txt", "v2 from the writer")
    wait_for(lambda: (n2.vol(volume) / "doc.txt").read_text() == "v2 from the writer", 20, what="n1's version on n2")
    copies = [p for p in tree(n2.vol(volume)) if p.startswith("doc.sync-conflict-")]
    assert len(copies) == 1 and (n2.vol(volume) / copies[0]).read_text() == "local edit on n2"
    _marker(n1, [n2, n3], volume, "m2")
    assert not any(p.startswith("doc.sync-conflict-") for p in tree(n3.vol(volume)))  # never published


def test_a_manifest_forged_from_a_reader_is_ignored(cluster, etcd, volume):
    n1, _n2, n3 = holding(cluster, volume, writers="n1")
    data = b"forged content"
    forged = Manifest(kind="file", size=len(data), mode=0o644, mtime_ns=1, origin="n2", inline=data,
                      digest=chunk_id(data))
    etcd.put(f"{cluster.prefix}/files/{volume}/forged.txt", forged.encode())
    _marker(n1, [n1, n3], volume, "m3")
    assert not (n1.vol(volume) / "forged.txt").exists() and not (n3.vol(volume) / "forged.txt").exists()
    wait_for(lambda: 'syncmesh_rejected_input_total{source="writer"}' in n1.http("GET", "/metrics")[1].decode(), 10)


def test_send_only_and_override(cluster, volume):
    n1, n2, n3 = holding(cluster, volume)
    write(n1.vol(volume) / "cfg.txt", "v1")
    converged([n1, n2, n3], volume, expect=lambda t: "cfg.txt" in t)
    got = cli(n3, "hold", volume, "--role", "send-only")
    assert got.returncode == 0, got.stderr
    assert _sync(n3, volume)["role"] == "send-only"
    # n3 publishes its changes ...
    write(n3.vol(volume) / "from-n3.txt", "n3")
    wait_for(lambda: (n1.vol(volume) / "from-n3.txt").exists(), 20, what="n3's file on n1")
    # ... and ignores the others'
    write(n1.vol(volume) / "cfg.txt", "v2 from n1")
    _marker(n1, [n2], volume, "m4")
    wait_for(lambda: _sync(n3, volume)["remote_ignored"] >= 1, 20, what="n3 to count the ignored change")
    assert (n3.vol(volume) / "cfg.txt").read_text() == "v1" and not (n3.vol(volume) / "m4").exists()
    # override: n3's whole state over the cluster's
    got = cli(n3, "override", volume)
    assert got.returncode == 0, got.stderr
    wait_for(lambda: (n1.vol(volume) / "cfg.txt").read_text() == "v1" and not (n1.vol(volume) / "m4").exists(), 20,
             what="n3's state on n1")
    converged([n1, n2, n3], volume)
