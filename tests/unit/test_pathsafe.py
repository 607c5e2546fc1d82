"""Tests of untrusted relative path validation and symlink-safe directory walking."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from syncmesh_plugin.pathsafe import (
    PathError,
    conflict_name,
    is_conflict_name,
    is_internal_name,
    open_parent_dir,
    validate_relpath,
)

WHEN = datetime(2026, 11, 27, 11, 0, 0)


@pytest.mark.parametrize(
    "path, message",
    [
        ("", "empty path"),
        ("../x", "'..'"),
        ("/etc/passwd", "absolute"),
        ("a/../../b", "'..'"),
        ("a/..", "'..'"),
        ("..", "'..'"),
        ("a\x00b", "NUL"),
        ("x" * 300, "300 bytes"),
        ("a/" + "é" * 128, "256 bytes"),
        ("a//b", "empty component"),
        ("a/", "empty component"),
        ("./a", "'.'"),
        ("a/./b", "'.'"),
        ("/".join(["d" * 200] * 21), "limit is 4096"),
        ("a/\ud800", "not encodable"),
    ],
)
def test_hostile_paths_rejected(path: str, message: str) -> None:
    with pytest.raises(PathError, match=message):
        validate_relpath(path)


@pytest.mark.parametrize(
    "path",
    [
        "a",
        "a/b/c.txt",
        "dir\\with\\backslashes",
        "..hidden",
        "a/...",
        ".bashrc",
        "x" * 255,
        "é" * 127,
        "caf\udce9",  # undecodable byte kept by surrogateescape
        "/".join(["d" * 200] * 20),
        "sp ace/tab\there",
    ],
)
def test_valid_paths_returned_unchanged(path: str) -> None:
    assert validate_relpath(path) == path


def test_non_str_rejected() -> None:
    with pytest.raises(PathError):
        validate_relpath(b"a")  # type: ignore[arg-type]


def test_path_error_is_value_error() -> None:
    assert issubclass(PathError, ValueError)


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_open_parent_dir_existing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    fd = open_parent_dir(str(root), "a/b/file", create=False)
    try:
        assert _fd_path(fd) == str(root / "a" / "b")
    finally:
        os.close(fd)


def test_open_parent_dir_top_level_is_root(tmp_path: Path) -> None:
    fd = open_parent_dir(str(tmp_path), "file", create=False)
    try:
        assert _fd_path(fd) == str(tmp_path)
    finally:
        os.close(fd)


def test_open_parent_dir_missing_without_create(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_parent_dir(str(tmp_path), "no/such/file", create=False)
    assert not (tmp_path / "no").exists()


def test_open_parent_dir_creates_nested_parents(tmp_path: Path) -> None:
    fd = open_parent_dir(str(tmp_path), "x/y/z/file", create=True)
    try:
        assert _fd_path(fd) == str(tmp_path / "x" / "y" / "z")
        assert (tmp_path / "x" / "y" / "z").is_dir()
        assert ((tmp_path / "x" / "y").stat().st_mode & 0o777) == 0o755 & ~_umask()
        assert not (tmp_path / "x" / "y" / "z" / "file").exists()
    finally:
        os.close(fd)
    # Again: everything exists now.
    os.close(open_parent_dir(str(tmp_path), "x/y/z/file", create=True))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_symlinked_parent_outside_root_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "evil").symlink_to(outside)
    for create in (False, True):
        with pytest.raises(PathError, match="'evil' is a symlink"):
            open_parent_dir(str(root), "evil/passwd", create=create)
        with pytest.raises(PathError, match="symlink"):
            open_parent_dir(str(root), "evil/sub/passwd", create=create)
    assert list(outside.iterdir()) == []


def test_deep_symlinked_parent_named(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c").symlink_to("/")
    with pytest.raises(PathError, match="'a/b/c'"):
        open_parent_dir(str(tmp_path), "a/b/c/etc/passwd", create=True)


def test_dangling_symlink_parent_not_replaced_by_create(tmp_path: Path) -> None:
    (tmp_path / "d").symlink_to(tmp_path / "nowhere")
    with pytest.raises(PathError, match="symlink"):
        open_parent_dir(str(tmp_path), "d/f", create=True)
    assert not (tmp_path / "nowhere").exists()


def test_symlink_to_directory_inside_root_also_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    with pytest.raises(PathError):
        open_parent_dir(str(tmp_path), "link/f", create=False)


def test_file_as_parent_is_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        open_parent_dir(str(tmp_path), "f/g", create=True)


def test_open_parent_dir_validates(tmp_path: Path) -> None:
    with pytest.raises(PathError):
        open_parent_dir(str(tmp_path), "../x", create=True)
    assert not (tmp_path.parent / "x").exists()


def test_open_parent_dir_does_not_leak_fds(tmp_path: Path) -> None:
    (tmp_path / "evil").symlink_to("/")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(PathError):
            open_parent_dir(str(tmp_path), "evil/x", create=True)
        with pytest.raises(FileNotFoundError):
            open_parent_dir(str(tmp_path), "missing/x", create=False)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize(
    "name, internal",
    [
        (".syncmesh-tmp-123", True),
        ("a/b/.syncmesh-tmp-x.part", True),
        (".syncmesh-tmp-dir/f", True),
        ("syncmesh-tmp-1", False),
        ("a/x.syncmesh-tmp-1", False),
        ("file.txt", False),
    ],
)
def test_is_internal_name(name: str, internal: bool) -> None:
    assert is_internal_name(name) is internal


@pytest.mark.parametrize(
    "rel, expected",
    [
        ("a/b.tar.gz", "a/b.tar.sync-conflict-20261127-110000-node1.gz"),
        ("b.txt", "b.sync-conflict-20261127-110000-node1.txt"),
        ("Makefile", "Makefile.sync-conflict-20261127-110000-node1"),
        (".bashrc", ".bashrc.sync-conflict-20261127-110000-node1"),
        ("x/.config.bak", "x/.config.sync-conflict-20261127-110000-node1.bak"),
        ("d.d/noext", "d.d/noext.sync-conflict-20261127-110000-node1"),
    ],
)
def test_conflict_name(rel: str, expected: str) -> None:
    name = conflict_name(rel, WHEN, "node1")
    assert name == expected
    assert is_conflict_name(name)
    assert not is_conflict_name(rel)


def test_conflict_name_aware_time_is_utc() -> None:
    when = datetime(2026, 11, 27, 12, 0, 0, tzinfo=timezone(timedelta(hours=1)))
    assert conflict_name("f", when, "n") == "f.sync-conflict-20261127-110000-n"
    assert conflict_name("f", WHEN.replace(tzinfo=UTC), "n") == "f.sync-conflict-20261127-110000-n"


def test_conflict_name_fits_name_max() -> None:
    rel = "dir/" + "x" * 250 + ".log"
    name = conflict_name(rel, WHEN, "node1")
    base = name.rpartition("/")[2]
    assert len(base.encode()) <= 255
    assert base.endswith(".sync-conflict-20261127-110000-node1.log")
    assert validate_relpath(name) == name


@pytest.mark.parametrize("node_id", ["", "a/b", "a\x00b", "n" * 260])
def test_conflict_name_rejects_bad_node_id(node_id: str) -> None:
    with pytest.raises(PathError):
        conflict_name("f", WHEN, node_id)


def test_conflict_name_rejects_bad_path() -> None:
    with pytest.raises(PathError):
        conflict_name("../f", WHEN, "n")


@pytest.mark.parametrize(
    "name, result",
    [
        ("a.sync-conflict-20261127-110000-node1.txt", True),
        ("dir/a.sync-conflict-20261127-110000-n", True),
        ("a.sync-conflict-2026-n.txt", False),
        ("a.sync-conflict-20261127-110000-node1/child.txt", False),
        ("plain.txt", False),
    ],
)
def test_is_conflict_name(name: str, result: bool) -> None:
    assert is_conflict_name(name) is result


def test_conflict_name_skips_names_in_use() -> None:
    used = {"d/f.sync-conflict-20261127-110000-n.txt", "d/f.sync-conflict-20261127-110000-n-2.txt"}
    name = conflict_name("d/f.txt", WHEN, "n", used.__contains__)
    assert name == "d/f.sync-conflict-20261127-110000-n-3.txt" and is_conflict_name(name)
