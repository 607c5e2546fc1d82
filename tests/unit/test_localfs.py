"""The swap of a fetched version into place never loses a local write made during it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from syncmesh_plugin import localfs
from syncmesh_plugin.manifest import Manifest
from syncmesh_plugin.pathsafe import TMP_PREFIX, PathError


def _stage(root: Path, rel: str, data: bytes) -> tuple[int, str]:
    return localfs.stage(str(root), rel, Manifest(kind="file", mode=0o644, mtime_ns=1_000_000_000, inline=data),
                         lambda cid, ln: b"")


def _temps(root: Path) -> list[str]:
    return [p.name for p in root.rglob(f"{TMP_PREFIX}*")]


def test_commit_replaces_an_unchanged_target(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"old")
    expect = localfs.lstat(str(tmp_path), "f")
    dfd, tmp = _stage(tmp_path, "f", b"remote")
    fs, displaced = localfs.commit(dfd, tmp, "f", expect)
    assert (tmp_path / "f").read_bytes() == b"remote"
    assert displaced == -1 and fs.size == 6 and not _temps(tmp_path)


def test_commit_refuses_a_target_changed_since_it_was_looked_at(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"old")
    expect = localfs.lstat(str(tmp_path), "f")
    (tmp_path / "f").write_bytes(b"local edit, longer")
    dfd, tmp = _stage(tmp_path, "f", b"remote")
    with pytest.raises(localfs.TargetChanged) as caught:
        localfs.commit(dfd, tmp, "f", expect)
    assert caught.value.now is not None and caught.value.now.size == 18
    assert (tmp_path / "f").read_bytes() == b"local edit, longer"
    assert not _temps(tmp_path)


def test_commit_never_replaces_a_file_created_meanwhile(tmp_path: Path) -> None:
    dfd, tmp = _stage(tmp_path, "new", b"remote")
    (tmp_path / "new").write_bytes(b"created here")  # expected absent, but a container just wrote it
    with pytest.raises(localfs.TargetChanged):
        localfs.commit(dfd, tmp, "new", None)
    assert (tmp_path / "new").read_bytes() == b"created here" and not _temps(tmp_path)


def test_a_write_landing_during_the_swap_is_handed_back_and_kept(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "d" / "f"
    target.parent.mkdir()
    target.write_bytes(b"old")
    expect = localfs.lstat(str(tmp_path), "d/f")
    dfd, tmp = _stage(tmp_path, "d/f", b"remote")
    real_rename = os.rename

    def racing_rename(*a, **kw):  # a container writes in place between the check and the rename
        with open(target, "wb") as fh:
            fh.write(b"written by the container during the swap")
        return real_rename(*a, **kw)

    monkeypatch.setattr(localfs.os, "rename", racing_rename)
    _fs, displaced = localfs.commit(dfd, tmp, "d/f", expect)
    monkeypatch.setattr(localfs.os, "rename", real_rename)
    assert displaced >= 0
    assert target.read_bytes() == b"remote"
    (tmp_path / "d/f.sync-conflict-x").write_bytes(b"an earlier copy")  # the name got taken meanwhile
    name, kept = localfs.save_displaced(str(tmp_path), "d/f.sync-conflict-x", displaced, settle=0.01,
                                        next_name=lambda: "d/f.sync-conflict-x-2")
    assert name == "d/f.sync-conflict-x-2"
    assert (tmp_path / "d/f.sync-conflict-x-2").read_bytes() == b"written by the container during the swap"
    assert (tmp_path / "d/f.sync-conflict-x").read_bytes() == b"an earlier copy"
    assert kept.size == 40 and not _temps(tmp_path)
    with pytest.raises(OSError):
        os.fstat(displaced)  # closed


def test_a_conflict_copy_move_never_replaces_an_existing_copy(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"second loser")
    (tmp_path / "f.copy").write_bytes(b"first loser")
    with pytest.raises(FileExistsError):
        localfs.rename_local(str(tmp_path), "f", "f.copy", replace=False)
    assert (tmp_path / "f.copy").read_bytes() == b"first loser" and (tmp_path / "f").exists()
    names = iter(["f.copy-2", "f.copy-3"])
    (tmp_path / "f.copy-2").write_bytes(b"another")
    used, st = localfs.rename_local(str(tmp_path), "f", "f.copy", replace=False, next_name=lambda: next(names))
    assert used == "f.copy-3" and (tmp_path / "f.copy-3").read_bytes() == b"second loser"
    assert st.size == len(b"second loser") and (tmp_path / "f.copy-2").read_bytes() == b"another"
    (tmp_path / "f").write_bytes(b"third loser")
    assert localfs.rename_local(str(tmp_path), "f", "sub/f.copy", replace=False)[0] == "sub/f.copy"
    assert (tmp_path / "sub/f.copy").read_bytes() == b"third loser"
    (tmp_path / "g").write_bytes(b"g")
    with pytest.raises(PathError):  # a next name elsewhere is refused, not followed
        localfs.rename_local(str(tmp_path), "g", "f.copy", replace=False, next_name=lambda: "sub/g.copy")


def test_start_writeback_is_best_effort(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "big", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"x" * 65536, 0)
        localfs.start_writeback(fd, 0, 65536)  # starts the flush, does not wait for it
        assert os.pread(fd, 4, 65532) == b"xxxx"
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        localfs.start_writeback(w, 0, 10)  # ESPIPE is ignored, nothing raised
    finally:
        os.close(r)
        os.close(w)


def _sig(p) -> tuple[int, int, int, int]:
    s = os.stat(p)
    return (s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino)


def test_copy_ranges_copies_unchanged_runs_in_the_kernel(tmp_path) -> None:
    old = os.urandom(3 * 4096 + 1234)
    (tmp_path / "f").write_bytes(old)
    fd = os.open(tmp_path / "new", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # a misaligned run (the head goes first), a shifted run (an insert), an aligned one
        runs = [(100, 100, 5000), (0, 6000, 50), (8192, 8192, 4096 + 1234)]
        assert localfs.copy_ranges(str(tmp_path), "f", _sig(tmp_path / "f"), fd, runs)
        got = os.pread(fd, 20000, 0)
    finally:
        os.close(fd)
    assert got[100:5100] == old[100:5100]
    assert got[6000:6050] == old[:50]
    assert got[8192:] == old[8192:]


def test_copy_ranges_refuses_a_source_that_changed_since_indexed(tmp_path) -> None:
    (tmp_path / "f").write_bytes(b"a" * 10000)
    seen = _sig(tmp_path / "f")
    with open(tmp_path / "f", "r+b") as fh:
        fh.write(b"b")
    fd = os.open(tmp_path / "new", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert not localfs.copy_ranges(str(tmp_path), "f", seen, fd, [(0, 0, 100)])
        assert not localfs.copy_ranges(str(tmp_path), "gone", seen, fd, [(0, 0, 100)])
        # longer than the file: refused, not a short copy
        assert not localfs.copy_ranges(str(tmp_path), "f", _sig(tmp_path / "f"), fd, [(9000, 0, 2000)])
    finally:
        os.close(fd)


def test_lstat_many_agrees_with_lstat(tmp_path: Path) -> None:
    """Every kind of path, grouped by parent or alone: the same answer as one `lstat` per path, and a
    symlinked parent is never followed."""
    root = tmp_path / "vol"
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "a").write_text("a")
    (root / "d" / "b").write_text("bb")
    (root / "d" / "sub" / "c").write_text("c")
    (root / "top").write_text("t")
    os.symlink("top", root / "d" / "link")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    os.symlink(outside, root / "evil")
    rels = ["d/a", "d/b", "d/missing", "d/sub", "d/sub/c", "d/link", "top", "top/under", "evil/secret",
            "gone/x", "../escape", "d//double", "d/" + "n" * 300]
    many = localfs.lstat_many(str(root), rels)
    assert set(many) == set(rels)
    for rel in rels:
        assert many[rel] == localfs.lstat(str(root), rel), rel
    assert many["d/a"] is not None and many["d/a"].size == 1
    assert many["d/sub"] is not None and many["d/sub"].kind == "dir"
    assert many["d/link"] is not None and many["d/link"].kind == "symlink"
    assert many["evil/secret"] is None  # behind a symlinked parent
    assert many["../escape"] is None and many["d/missing"] is None and many["top/under"] is None
