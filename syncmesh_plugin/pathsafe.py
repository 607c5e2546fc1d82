"""Untrusted relative paths (from etcd manifests and peers) and safe access inside a volume root.

Every path the syncer writes comes from another host. A compromised or buggy peer must not be able to
make us write outside the volume, neither with ``..`` nor by first publishing a symlink and then a
file "inside" it. So paths are validated syntactically, and directories are walked one component at a
time with ``O_NOFOLLOW`` relative to directory fds, never by handing a joined string to the kernel.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import stat
from collections.abc import Callable
from datetime import UTC, datetime

__all__ = [
    "CONFLICT_MARKER",
    "NAME_MAX",
    "PATH_MAX",
    "TMP_PREFIX",
    "PathError",
    "conflict_name",
    "is_conflict_name",
    "is_internal_name",
    "open_parent_dir",
    "validate_relpath",
]

NAME_MAX = 255
"""Longest file name component in bytes (Linux NAME_MAX)."""

PATH_MAX = 4096
"""Longest accepted relative path in bytes (Linux PATH_MAX)."""

TMP_PREFIX = ".syncmesh-tmp-"
"""Prefix of the syncer's own temporary files; they are never published."""

CONFLICT_MARKER = ".sync-conflict-"

_CONFLICT_RE = re.compile(r"\.sync-conflict-\d{8}-\d{6}-[^/]+")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_WALK_FLAGS = _DIR_FLAGS | os.O_NOFOLLOW


class PathError(ValueError):
    """A path from a manifest or peer is unacceptable, or would escape the volume root."""


def _encode(s: str) -> bytes:
    """File names are bytes on Linux; surrogateescape keeps undecodable names round-trippable."""
    try:
        return s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise PathError(f"path {s!r} is not encodable as a file name: {exc.reason}") from exc


def validate_relpath(p: str) -> str:
    """Accept a manifest path (POSIX, relative, '/'-separated) or raise PathError saying what is wrong.

    Backslashes are ordinary file name characters on Linux and are accepted. The path is returned
    unchanged: no normalisation, so two peers can never disagree on what a path means.
    """
    if not isinstance(p, str):
        raise PathError(f"path must be a str, got {type(p).__name__}")
    if not p:
        raise PathError("empty path")
    if "\x00" in p:
        raise PathError(f"path {p!r} contains a NUL byte")
    if p.startswith("/"):
        raise PathError(f"path {p!r} is absolute")
    raw = _encode(p)
    if len(raw) > PATH_MAX:
        raise PathError(f"path is {len(raw)} bytes long, limit is {PATH_MAX}")
    for comp in p.split("/"):
        if not comp:
            raise PathError(f"path {p!r} has an empty component")
        if comp in (".", ".."):
            raise PathError(f"path {p!r} has a {comp!r} component")
        n = len(_encode(comp))
        if n > NAME_MAX:
            raise PathError(f"path {p!r} has a component of {n} bytes, limit is {NAME_MAX}")
    return p


def _open_dir_nofollow(name: str, dir_fd: int, shown: str) -> int:
    """Open one directory component without following a symlink; PathError if it is one."""
    try:
        return os.open(name, _WALK_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        # Linux answers ELOOP for a symlink under O_NOFOLLOW; check with lstat in any case so that the
        # error is explicit whatever errno a kernel picks.
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                raise exc from None
            if stat.S_ISLNK(st.st_mode):
                raise PathError(f"parent {shown!r} is a symlink; refusing to follow it") from None
        raise


def open_parent_dir(root: str, rel: str, create: bool) -> int:
    """Return an O_DIRECTORY fd of the directory that holds ``rel`` inside ``root``; caller closes it.

    The walk starts at ``root`` (trusted, configured by the operator) and opens each parent with
    O_NOFOLLOW relative to the previous fd, so a symlink planted as a parent is never traversed. With
    ``create`` missing parents are made with mode 0o755; a concurrent mkdir of the same name is fine.
    Errors: PathError (invalid path, symlinked parent), FileNotFoundError (missing parent without
    ``create``), NotADirectoryError (a parent is a file) and other OSErrors.
    """
    validate_relpath(rel)
    parts = rel.split("/")[:-1]
    fd = os.open(root, _DIR_FLAGS)
    try:
        for i, name in enumerate(parts):
            shown = "/".join(parts[: i + 1])
            try:
                nfd = _open_dir_nofollow(name, fd, shown)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass  # another writer made it (or planted something): the re-open decides
                nfd = _open_dir_nofollow(name, fd, shown)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_internal_name(name: str) -> bool:
    """True for the syncer's own temporary files (any component starting with TMP_PREFIX)."""
    return any(comp.startswith(TMP_PREFIX) for comp in name.split("/"))


def conflict_name(rel: str, when: datetime, node_id: str, taken: Callable[[str], bool] | None = None) -> str:
    """Name under which the losing side of a conflict is kept: ``dir/NAME.sync-conflict-TS-NODE.EXT``.

    ``a/b.tar.gz`` becomes ``a/b.tar.sync-conflict-20261127-110000-node1.gz``. Aware datetimes are
    converted to UTC so that every node derives the same name; naive ones are used as given. The
    stem is shortened if needed so the new name still fits NAME_MAX. A hot file can lose twice within
    one second: when `taken(name)` says a name is in use, ``-2``, ``-3``... follow the node id, so a
    second copy never replaces the first.
    """
    validate_relpath(rel)
    if not node_id or "/" in node_id or "\x00" in node_id:
        raise PathError(f"node id {node_id!r} cannot be part of a file name")
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    head, _, base = rel.rpartition("/")
    stem, ext = posixpath.splitext(base)  # last suffix only; '.bashrc' has none
    for n in range(1, 10_000):
        tag = f"{CONFLICT_MARKER}{when:%Y%m%d-%H%M%S}-{node_id}" + (f"-{n}" if n > 1 else "")
        if len(_encode(tag + ext)) >= NAME_MAX:
            raise PathError(f"node id {node_id!r} is too long for a conflict file name")
        short = stem
        while short and len(_encode(short + tag + ext)) > NAME_MAX:
            short = short[:-1]
        new_base = short + tag + ext
        name = validate_relpath(f"{head}/{new_base}" if head else new_base)
        if taken is None or not taken(name):
            return name
    raise PathError(f"no free conflict copy name for {rel!r}")


def is_conflict_name(name: str) -> bool:
    """True if the last component of ``name`` was produced by conflict_name (so it is not re-conflicted)."""
    return _CONFLICT_RE.search(name.rpartition("/")[2]) is not None
