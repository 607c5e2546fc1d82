"""The sync engine across three real daemons: every kind of change converges byte-identical."""

from __future__ import annotations

import os
import shutil

from conftest import Node, converged, keys_under, settled, wait_for, write


def three(cluster, volume: str) -> list[Node]:  # type: ignore[no-untyped-def]
    nodes = [cluster(f"n{i}") for i in (1, 2, 3)]
    nodes[0].ok("VolumeDriver.Create", {"Name": volume, "Opts": None})
    for n in nodes:
        n.mount(volume)
    return nodes


def test_files_dirs_symlinks_attrs_converge(cluster, volume):
    nodes = three(cluster, volume)
    a, b, c = (n.vol(volume) for n in nodes)
    write(a / "hello.txt", "hello")
    write(a / "deep/nested/dir/file.bin", os.urandom(300_000))
    (a / "empty/dir").mkdir(parents=True)
    os.symlink("hello.txt", a / "link")
    os.symlink("/etc/passwd", a / "abs-link")
    t = converged(nodes, volume, expect=lambda t: {"hello.txt", "deep/nested/dir/file.bin", "empty/dir", "link",
                                                   "abs-link"} <= set(t))
    assert t["link"] == ("symlink", "hello.txt")
    assert (b / "link").is_symlink() and os.readlink(b / "abs-link") == "/etc/passwd"

    # modify, append, truncate on other nodes
    write(b / "hello.txt", "hello from b, longer")
    converged(nodes, volume, expect=lambda t: (a / "hello.txt").read_text() == "hello from b, longer")
    with open(c / "deep/nested/dir/file.bin", "ab") as fh:
        fh.write(b"appended")
    converged(nodes, volume, expect=lambda t: (a / "deep/nested/dir/file.bin").stat().st_size == 300_008)
    os.truncate(a / "deep/nested/dir/file.bin", 1000)
    converged(nodes, volume, expect=lambda t: (c / "deep/nested/dir/file.bin").stat().st_size == 1000)

    # chmod is an attribute-only change
    os.chmod(b / "hello.txt", 0o600)
    converged(nodes, volume, expect=lambda t: t["hello.txt"][2] == 0o600 and (c / "hello.txt").stat().st_mode
              & 0o777 == 0o600)

    # chown too (the daemons run as root here, as the managed plugin does)
    os.chown(b / "hello.txt", 1234, 5678)
    wait_for(lambda: all((n.vol(volume) / "hello.txt").stat().st_uid == 1234
                         and (n.vol(volume) / "hello.txt").stat().st_gid == 5678 for n in nodes), 10,
             what="the owner change on every node")

    # delete a file and a directory tree
    (c / "hello.txt").unlink()
    shutil.rmtree(a / "deep")
    converged(nodes, volume, expect=lambda t: "hello.txt" not in t and "deep" not in t)


def test_rename_file_and_tree_moves_no_data(cluster, volume):
    nodes = three(cluster, volume)
    a = nodes[0].vol(volume)
    for i in range(20):
        write(a / f"tree/sub{i % 3}/f{i}.dat", os.urandom(20_000 + i))
    write(a / "big.dat", os.urandom(2_000_000))
    converged(nodes, volume, expect=lambda t: "big.dat" in t and len([k for k in t if k.endswith(".dat")]) == 21)
    received = [_metric(n, "syncmesh_bytes_received_total") for n in nodes[1:]]
    os.rename(a / "big.dat", a / "renamed.dat")
    os.rename(a / "tree", a / "moved-tree")
    converged(nodes, volume, expect=lambda t: "renamed.dat" in t and "moved-tree/sub0/f0.dat" in t
              and "tree" not in t and "big.dat" not in t)
    after = [_metric(n, "syncmesh_bytes_received_total") for n in nodes[1:]]
    # a rename moves no file data between peers
    assert all(x - y < 100_000 for x, y in zip(after, received, strict=True)), (received, after)


def _metric(n: Node, name: str) -> float:
    _code, body = n.http("GET", "/metrics")
    text = body.decode() if isinstance(body, bytes) else str(body)
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_burst_of_2000_small_files(cluster, volume):
    nodes = three(cluster, volume)
    a = nodes[0].vol(volume)
    for i in range(2000):
        write(a / f"burst/d{i % 20}/file{i}.txt", f"content {i}\n" * (i % 7 + 1))
    t = converged(nodes, volume, timeout=60,
                  expect=lambda t: len([k for k in t if k.startswith("burst/") and t[k][0] == "file"]) == 2000)
    assert t["burst/d0/file0.txt"][0] == "file"


def test_large_file(cluster, volume):
    nodes = three(cluster, volume)
    a = nodes[0].vol(volume)
    size = 200 * 1024 * 1024
    with open(a / "large.bin", "wb") as fh:
        block = os.urandom(1024 * 1024)
        for i in range(size // len(block)):
            fh.write(block[i % 7:] + block[: i % 7])
    converged(nodes, volume, timeout=120, expect=lambda t: "large.bin" in t)
    assert (nodes[2].vol(volume) / "large.bin").stat().st_size == size


def test_file_rewritten_while_syncing(cluster, volume):
    nodes = three(cluster, volume)
    a = nodes[0].vol(volume)
    for i in range(30):
        write(a / "hot.bin", os.urandom(500_000 + i))
    final = os.urandom(123_457)
    write(a / "hot.bin", final)
    converged(nodes, volume, expect=lambda t: (nodes[1].vol(volume) / "hot.bin").exists()
              and (nodes[1].vol(volume) / "hot.bin").read_bytes() == final)


def test_ignore_patterns(cluster, etcd, volume):
    nodes = [cluster("n1"), cluster("n2")]
    nodes[0].ok("VolumeDriver.Create", {"Name": volume, "Opts": {"ignore": "*.lock,cache/"}})
    for n in nodes:
        n.mount(volume)
    a, b = (n.vol(volume) for n in nodes)
    write(a / "db.lock", "x")
    write(a / "cache/blob", "x")
    write(a / "keep.txt", "x")
    wait_for(lambda: (b / "keep.txt").exists(), 10, what="keep.txt on n2")
    # n1 has published all it saw change and n2 followed up to that revision: what is not there now never will be
    settled(etcd, cluster.prefix, volume, writers=nodes[:1], followers=nodes[1:])
    published = {k.rsplit(f"/files/{volume}/", 1)[1] for k in keys_under(etcd, f"{cluster.prefix}/files/{volume}/")}
    assert "keep.txt" in published and not published & {"db.lock", "cache/blob", "cache"}, published
    assert not (b / "db.lock").exists() and not (b / "cache").exists()


def test_chunk_list_too_big_for_etcd_travels_as_a_blob(cluster, etcd, volume):
    """Files of many GiB have chunk lists larger than an etcd value: a small limit shows the mechanism."""
    small = {"SYNCMESH_SYNC_MAX_MANIFEST_BYTES": "1024"}
    nodes = [cluster("n1", **small), cluster("n2", **small), cluster("n3", **small)]
    nodes[0].ok("VolumeDriver.Create", {"Name": volume})
    for n in nodes:
        n.mount(volume)
    write(nodes[0].vol(volume) / "big.bin", os.urandom(24 * 1024 * 1024))
    converged(nodes, volume, timeout=60, expect=lambda t: "big.bin" in t)
    raw = etcd.get(f"{cluster.prefix}/files/{volume}/big.bin")
    assert raw is not None and b'"bd":' in raw and b'"c":' not in raw
    # a later edit of the same file still converges (the third node may fetch the blob from either peer)
    with open(nodes[1].vol(volume) / "big.bin", "r+b") as fh:
        fh.seek(10 * 1024 * 1024)
        fh.write(b"edited in the middle")
    converged(nodes, volume, timeout=60,
              expect=lambda t: b"edited in the middle" in (nodes[2].vol(volume) / "big.bin").read_bytes())
