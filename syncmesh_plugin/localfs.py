"""Filesystem side of the engine: stat, walk, hash, and crash-safe writes inside a volume root.

All functions are synchronous and run in worker threads. Writes never happen in place: a temp file
(`.syncmesh-tmp-*`, never published) in the target directory, one syncfs per batch, then rename over
the target, so a crash leaves the old file or the new one. Every path goes through `pathsafe`, so no
manifest can make us write outside the volume or through a planted symlink.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import stat as st_mod
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from . import chunker
from .manifest import Manifest
from .pathsafe import TMP_PREFIX, PathError, open_parent_dir, validate_relpath

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
IS_ROOT = os.geteuid() == 0


def syncfs(path: str) -> None:
    """Flush the whole file system holding `path` once, instead of one fsync per file of a batch."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range to disk now (sync_file_range, no waiting), so the
    fsync that ends a big file finds little left to flush: disk writes overlap the transfer instead
    of following it. Best effort: file systems without it just flush at the fsync."""
    fn = getattr(_libc, "sync_file_range", None)
    if fn is not None:
        fn(fd, ctypes.c_longlong(offset), ctypes.c_longlong(length), SYNC_FILE_RANGE_WRITE)


@dataclass(frozen=True, slots=True)
class FileStat:
    """What the index compares to tell "changed" from "unchanged" without reading content."""

    kind: str  # file | dir | symlink | other
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    mode: int
    uid: int
    gid: int

    @classmethod
    def of(cls, s: os.stat_result) -> FileStat:
        m = s.st_mode
        kind = ("file" if st_mod.S_ISREG(m) else "dir" if st_mod.S_ISDIR(m)
                else "symlink" if st_mod.S_ISLNK(m) else "other")
        return cls(kind, s.st_size if kind == "file" else 0, s.st_mtime_ns, s.st_ctime_ns, s.st_ino,
                   st_mod.S_IMODE(m), s.st_uid, s.st_gid)


def lstat(root: str, rel: str) -> FileStat | None:
    """lstat of root/rel without following a symlinked parent; None when absent or unreachable safely.
    Kept apart from `lstat_many` (whose per-path validation would come on top of the walk's): one file's
    describe calls it on the publish path."""
    try:
        dfd = open_parent_dir(root, rel, create=False)
    except (FileNotFoundError, NotADirectoryError, PathError):
        return None
    try:
        return FileStat.of(os.stat(rel.rsplit("/", 1)[-1], dir_fd=dfd, follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return None
    finally:
        os.close(dfd)


def lstat_many(root: str, rels: Iterable[str]) -> dict[str, FileStat | None]:
    """`lstat` of many paths: each parent directory is opened once (the same walk, never following a
    symlinked parent) for all of its entries, instead of once per path. A batch of files applied or
    published in one directory cost a walk from the root and three syscalls per level for each."""
    out: dict[str, FileStat | None] = {}
    groups: dict[str, list[str]] = {}
    for rel in rels:
        try:
            validate_relpath(rel)
        except PathError:
            out[rel] = None
            continue
        groups.setdefault(rel.rpartition("/")[0], []).append(rel)
    for group in groups.values():
        try:
            dfd = open_parent_dir(root, group[0], create=False)
        except (FileNotFoundError, NotADirectoryError, PathError):
            out.update(dict.fromkeys(group))
            continue
        try:
            for rel in group:
                try:
                    out[rel] = FileStat.of(os.stat(rel.rpartition("/")[2], dir_fd=dfd, follow_symlinks=False))
                except (FileNotFoundError, NotADirectoryError):
                    out[rel] = None
        finally:
            os.close(dfd)
    return out


def iter_dir(root: str, base: str, ignored: Callable[[str, bool], bool],
             sweep_before_ns: int = 0) -> Iterator[tuple[str, FileStat]]:
    """The entries of one directory below root (never following symlinks), minus ignored and internal
    names, as they are read (a directory of 50,000 entries is never held whole); a directory that
    vanished or cannot be read has none.

    With `sweep_before_ns`, temp files of an apply interrupted before that time (a daemon killed
    mid-transfer) are removed: their ctime tells them from the running daemon's own."""
    try:
        it = os.scandir(os.path.join(root, base) if base else root)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    with it:
        for entry in it:
            name = entry.name
            if name.startswith(TMP_PREFIX):
                if sweep_before_ns:
                    try:
                        if entry.stat(follow_symlinks=False).st_ctime_ns < sweep_before_ns:
                            os.unlink(entry.path)
                    except OSError:
                        pass
                continue
            rel = f"{base}/{name}" if base else name
            try:
                fs = FileStat.of(entry.stat(follow_symlinks=False))
            except FileNotFoundError:
                continue
            if fs.kind == "other" or ignored(rel, fs.kind == "dir"):
                continue
            yield rel, fs


def walk(root: str, ignored: Callable[[str, bool], bool]) -> Iterator[tuple[str, FileStat]]:
    """Every entry below root (never following symlinks), skipping ignored and internal names."""
    stack = [""]
    while stack:
        for rel, fs in iter_dir(root, stack.pop(), ignored):
            yield rel, fs
            if fs.kind == "dir":
                stack.append(rel)


def describe(root: str, rel: str, fs: FileStat, origin: str, ts: float) -> Manifest | None:
    """Build the manifest of a local path (hashing a file); None if it changed while being read."""
    m = Manifest(kind=fs.kind, mode=fs.mode, uid=fs.uid, gid=fs.gid, origin=origin, ts=ts)
    path = os.path.join(root, rel)
    if fs.kind == "symlink":
        try:
            m.target = os.readlink(path)
        except OSError:
            return None
    elif fs.kind == "file":
        try:
            content = chunker.scan_file(path)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            return None
        after = lstat(root, rel)
        # A file still being written is not published half-written: the stat must not have moved.
        if after is None or (after.size, after.mtime_ns, after.ctime_ns, after.inode) != (
                fs.size, fs.mtime_ns, fs.ctime_ns, fs.inode) or content.size != fs.size:
            return None
        m.size, m.mtime_ns, m.digest = content.size, fs.mtime_ns, content.digest
        m.chunks = [[c.id, c.length] for c in content.chunks]
        m.inline = content.inline
    return m


ChunkGetter = Callable[[str, int], bytes]


def _set_attrs(fd: int, m: Manifest) -> None:
    os.fchmod(fd, m.mode)
    if IS_ROOT:
        os.fchown(fd, m.uid, m.gid)


def stage(root: str, rel: str, m: Manifest, get_chunk: ChunkGetter) -> tuple[int, str]:
    """Write the new content of `rel` to a temp file in its directory; returns (dir fd, temp name).

    The caller renames it into place after one syncfs for the whole batch (see `commit`)."""
    dfd = open_parent_dir(root, rel, create=True)
    tmp = f"{TMP_PREFIX}{secrets.token_hex(6)}"
    try:
        if m.kind == "symlink":
            os.symlink(m.target, tmp, dir_fd=dfd)
            if IS_ROOT:
                os.chown(tmp, m.uid, m.gid, dir_fd=dfd, follow_symlinks=False)
            return dfd, tmp
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dfd)
        try:
            if m.inline is not None:
                os.write(fd, m.inline)
            else:
                for cid, length in m.chunks:
                    data = get_chunk(cid, length)
                    view = memoryview(data)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
            _set_attrs(fd, m)
            os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
        finally:
            os.close(fd)
        return dfd, tmp
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        os.close(dfd)
        raise


class TargetChanged(Exception):
    """The target was changed locally since the caller looked at it: the staged version must not
    replace it (the caller settles the two versions as a conflict instead)."""

    def __init__(self, now: FileStat | None) -> None:
        super().__init__("target changed locally")
        self.now = now


RENAME_NOREPLACE = 1


def _rename_noreplace(dfd: int, src: str, dst: str, dst_dfd: int | None = None) -> None:
    """rename(2) that fails with EEXIST instead of replacing (renameat2; link+unlink where missing)."""
    to = dfd if dst_dfd is None else dst_dfd
    fn = getattr(_libc, "renameat2", None)
    if fn is not None:
        if fn(dfd, src.encode(), to, dst.encode(), RENAME_NOREPLACE) == 0:
            return
        e = ctypes.get_errno()
        if e not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(e, os.strerror(e), dst)
    os.link(src, dst, src_dir_fd=dfd, dst_dir_fd=to, follow_symlinks=False)
    os.unlink(src, dir_fd=dfd)


def _stat_at(dfd: int, name: str) -> FileStat | None:
    try:
        return FileStat.of(os.stat(name, dir_fd=dfd, follow_symlinks=False))
    except FileNotFoundError:
        return None


def _keep_version(dfd: int, name: str, keep_as: str) -> None:
    """Hard-link the file about to be replaced or deleted into the version store (same file system:
    no copy). Best effort: a failure only means this version is not kept."""
    if keep_as:
        with contextlib.suppress(OSError):
            os.link(name, keep_as, src_dir_fd=dfd, follow_symlinks=False)


def commit(dfd: int, tmp: str, rel: str, expect: FileStat | None, keep_as: str = "") -> tuple[FileStat, int]:
    """Move the staged temp file onto the target, unless the target is no longer what the caller saw
    (`expect`, None for absent): then raise TargetChanged.

    The check and the move are microseconds apart, and neither side of that gap loses a local write:
    a new target is created with a no-replace rename, and the file being replaced is held open, so a
    write that lands in it during the swap is noticed (its size or mtime moved). Returns the new
    file's stat and, in that case, an fd of the replaced file for `save_displaced` (else -1).
    `keep_as`: where the replaced file is kept (the volume's version store), when versioning is on.
    Closes `dfd`; on TargetChanged the temp file is removed."""
    name = rel.rsplit("/", 1)[-1]
    old_fd = -1
    try:
        if expect is None:
            try:
                _rename_noreplace(dfd, tmp, name)
            except FileExistsError:
                raise TargetChanged(_stat_at(dfd, name)) from None
            return FileStat.of(os.stat(name, dir_fd=dfd, follow_symlinks=False)), -1
        if expect.kind == "file":
            try:
                old_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
                before: FileStat | None = FileStat.of(os.fstat(old_fd))
            except OSError:
                before = _stat_at(dfd, name)
        else:
            before = _stat_at(dfd, name)
        if before != expect:
            raise TargetChanged(before)
        if expect.kind == "file":
            _keep_version(dfd, name, keep_as)
        try:
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except IsADirectoryError:
            # A directory stands where a file now goes (remote kind change): move it aside first.
            _remove_tree_at(dfd, name)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        new = FileStat.of(os.stat(name, dir_fd=dfd, follow_symlinks=False))
        if old_fd >= 0 and before is not None:
            after = os.fstat(old_fd)
            if after.st_size != before.size or after.st_mtime_ns != before.mtime_ns:
                fd, old_fd = old_fd, -1
                return new, fd  # written to while being replaced: the caller keeps that content
        return new, -1
    except TargetChanged:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    finally:
        if old_fd >= 0:
            os.close(old_fd)
        os.close(dfd)


def save_displaced(root: str, rel: str, fd: int, settle: float = 0.2, limit: float = 5.0,
                   next_name: Callable[[], str] | None = None) -> tuple[str, FileStat]:
    """Keep the content of a file that was written to while a remote version replaced it, as `rel`
    (a conflict copy name). Waits until the writer seems done (size and mtime still for `settle`
    seconds, at most `limit`), copies it beside (under `rel`, or the next free name if `rel` appeared
    meanwhile), closes `fd`, returns the name used and its stat."""
    try:
        deadline = time.monotonic() + limit
        last = os.fstat(fd)
        while time.monotonic() < deadline:
            time.sleep(settle)
            now = os.fstat(fd)
            if (now.st_size, now.st_mtime_ns) == (last.st_size, last.st_mtime_ns):
                break
            last = now
        dfd = open_parent_dir(root, rel, create=True)
        tmp = f"{TMP_PREFIX}{secrets.token_hex(6)}"
        try:
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          st_mod.S_IMODE(last.st_mode), dir_fd=dfd)
            try:
                off = 0
                while data := os.pread(fd, 1 << 20, off):
                    off += len(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(out, view):]
                os.utime(out, ns=(last.st_atime_ns, last.st_mtime_ns))
                os.fsync(out)
            finally:
                os.close(out)
            name = _rename_to_free_name(dfd, tmp, dfd, rel, next_name)
            head = rel.rpartition("/")[0]
            return (f"{head}/{name}" if head else name), FileStat.of(os.stat(name, dir_fd=dfd, follow_symlinks=False))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        finally:
            os.close(dfd)
    finally:
        os.close(fd)


def discard(dfd: int, tmp: str) -> None:
    try:
        os.unlink(tmp, dir_fd=dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _remove_tree_at(dfd: int, name: str) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        for entry in os.listdir(fd):
            s = os.stat(entry, dir_fd=fd, follow_symlinks=False)
            if st_mod.S_ISDIR(s.st_mode):
                _remove_tree_at(fd, entry)
            else:
                os.unlink(entry, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dfd)


def make_dir(root: str, rel: str, m: Manifest) -> FileStat:
    dfd = open_parent_dir(root, rel, create=True)
    name = rel.rsplit("/", 1)[-1]
    try:
        try:
            os.mkdir(name, 0o755, dir_fd=dfd)
        except FileExistsError:
            s = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not st_mod.S_ISDIR(s.st_mode):
                os.unlink(name, dir_fd=dfd)  # a file or symlink stands where the directory now goes
                os.mkdir(name, 0o755, dir_fd=dfd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            _set_attrs(fd, m)
            return FileStat.of(os.fstat(fd))
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


def set_attrs(root: str, rel: str, m: Manifest) -> FileStat | None:
    """Attribute-only change: mode, owner, mtime; no data moves."""
    dfd = open_parent_dir(root, rel, create=False)
    name = rel.rsplit("/", 1)[-1]
    try:
        if m.kind == "symlink":
            if IS_ROOT:
                os.chown(name, m.uid, m.gid, dir_fd=dfd, follow_symlinks=False)
        else:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                _set_attrs(fd, m)
                if m.kind == "file":
                    os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
            finally:
                os.close(fd)
        return FileStat.of(os.stat(name, dir_fd=dfd, follow_symlinks=False))
    finally:
        os.close(dfd)


def remove(root: str, rel: str, keep_as: str = "") -> bool:
    """Delete a file, symlink or empty directory; False if a directory still has content. A regular
    file is first kept as `keep_as` (the volume's version store) when that is given."""
    try:
        dfd = open_parent_dir(root, rel, create=False)
    except (FileNotFoundError, NotADirectoryError):
        return True
    name = rel.rsplit("/", 1)[-1]
    try:
        s = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if st_mod.S_ISDIR(s.st_mode):
            # Leftover temp files of an interrupted apply do not keep a deleted directory alive.
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                for entry in os.listdir(fd):
                    if entry.startswith(TMP_PREFIX):
                        os.unlink(entry, dir_fd=fd)
            finally:
                os.close(fd)
            try:
                os.rmdir(name, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    return False
                raise
        else:
            if st_mod.S_ISREG(s.st_mode):
                _keep_version(dfd, name, keep_as)
            os.unlink(name, dir_fd=dfd)
        return True
    except FileNotFoundError:
        return True
    finally:
        os.close(dfd)


def _rename_to_free_name(sfd: int, src: str, dfd: int, rel: str, next_name: Callable[[], str] | None) -> str:
    """Rename `src` to the last component of `rel` without replacing anything; when that name is
    taken, to the names `next_name` gives (in the same directory). Returns the name used."""
    name = rel.rsplit("/", 1)[-1]
    for _ in range(100):
        try:
            _rename_noreplace(sfd, src, name, dfd)
            return name
        except FileExistsError:
            if next_name is None:
                raise
            nxt = next_name()
            if nxt.rpartition("/")[0] != rel.rpartition("/")[0]:
                raise PathError(f"{nxt!r} is not beside {rel!r}") from None
            name = nxt.rsplit("/", 1)[-1]
    raise FileExistsError(errno.EEXIST, "no free name after 100 tries", rel)


def rename_local(root: str, src: str, dst: str, replace: bool = True,
                 next_name: Callable[[], str] | None = None) -> tuple[str, FileStat]:
    """Move a local file (a rename made on another node, or a conflict copy): no data is copied.
    With replace=False an existing file is never replaced: the next free name from `next_name` is
    used, or FileExistsError without one. Returns the path used and its stat."""
    sfd = open_parent_dir(root, src, create=False)
    try:
        dfd = open_parent_dir(root, dst, create=True)
        try:
            name = dst.rsplit("/", 1)[-1]
            if replace:
                os.rename(src.rsplit("/", 1)[-1], name, src_dir_fd=sfd, dst_dir_fd=dfd)
            else:
                name = _rename_to_free_name(sfd, src.rsplit("/", 1)[-1], dfd, dst, next_name)
            head = dst.rpartition("/")[0]
            return (f"{head}/{name}" if head else name), FileStat.of(os.stat(name, dir_fd=dfd, follow_symlinks=False))
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _open_source(root: str, rel: str) -> int | None:
    """A read-only fd of a local file used as a source (of chunks, of copied ranges), refusing
    symlinked parents and a symlink itself; None if it cannot be had."""
    try:
        dfd = open_parent_dir(root, rel, create=False)
    except (OSError, PathError):
        return None
    try:
        return os.open(rel.rsplit("/", 1)[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)


def read_range(root: str, rel: str, offset: int, length: int) -> bytes | None:
    """Bytes of a local file (a chunk source), refusing symlinked parents; None if unavailable."""
    fd = _open_source(root, rel)
    if fd is None:
        return None
    try:
        data = os.pread(fd, length, offset)
        return data if len(data) == length else None
    finally:
        os.close(fd)


BLOCK = 4096  # extents are shared (reflink) only between block-aligned ranges


def _copy_run(src: int, dst: int, src_off: int, dst_off: int, length: int) -> None:
    """copy_file_range of one range, in the kernel: on a file system that shares extents (xfs with
    reflink, btrfs) the block-aligned part is cloned, not written; elsewhere the bytes are copied
    without passing through Python. When both offsets are equally misaligned, the head up to the next
    block boundary goes first so that the rest can be cloned."""
    parts = []
    head = (-dst_off) % BLOCK
    if (src_off - dst_off) % BLOCK == 0 and 0 < head < length:
        parts.append((src_off, dst_off, head))
        src_off, dst_off, length = src_off + head, dst_off + head, length - head
    parts.append((src_off, dst_off, length))
    for so, do, ln in parts:
        while ln:
            n = os.copy_file_range(src, dst, ln, so, do)
            if n <= 0:
                raise OSError(errno.EIO, "source shorter than its index says")
            so, do, ln = so + n, do + n, ln - n


def copy_ranges(root: str, rel: str, expect: tuple[int, int, int, int], dst: int,
                runs: list[tuple[int, int, int]]) -> bool:
    """Copy (source offset, target offset, length) runs of the local file `rel` into `dst` in the
    kernel (see `_copy_run`), for a new version that shares content with it. The chunks are not read
    or hashed: the source must still be the file that was indexed, `expect` = (size, mtime_ns,
    ctime_ns, inode) before and after the copy (the same test that tells an unchanged file from a
    changed one everywhere else). False when it is not (nothing copied can be trusted) or the copy
    failed; the caller then reads and verifies the chunks instead."""
    src = _open_source(root, rel)
    if src is None:
        return False

    def same() -> bool:
        s = os.fstat(src)
        return st_mod.S_ISREG(s.st_mode) and (s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino) == expect

    try:
        if not same():
            return False
        for so, do, ln in runs:
            _copy_run(src, dst, so, do, ln)
        return same()
    except OSError:
        return False
    finally:
        os.close(src)


def blob_path(base: str, blob_id: str) -> str:
    return os.path.join(base, "blobs", blob_id)


def write_blob(base: str, data: bytes) -> tuple[str, list[list[int | str]]]:
    """Store a chunk-list blob under <volume base>/blobs/<digest> (crash-safe, idempotent) and chunk it
    like file data, so peers fetch it with the same verified chunk protocol. Returns (digest, chunks)."""
    blob_id = chunker.chunk_id(data)
    path = blob_path(base, blob_id)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    content = chunker.scan_file(path)
    return blob_id, [[c.id, c.length] for c in content.chunks]


def read_blob_range(base: str, blob_id: str, offset: int, length: int) -> bytes | None:
    try:
        with open(blob_path(base, blob_id), "rb") as fh:
            data = os.pread(fh.fileno(), length, offset)
    except OSError:
        return None
    return data if len(data) == length else None



def restore_copy(root: str, rel: str, src: str) -> FileStat:
    """Write a kept version (`src`, in the version store) back to `rel` as a new file: copied (the
    kept version must stay as it is), flushed, renamed into place; its mode kept, its time now."""
    dfd = open_parent_dir(root, rel, create=True)
    name = rel.rsplit("/", 1)[-1]
    tmp = f"{TMP_PREFIX}{secrets.token_hex(6)}"
    try:
        sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            mode = os.fstat(sfd).st_mode & 0o7777
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                while os.copy_file_range(sfd, fd, 1 << 30):  # in the kernel; reflinks where the fs can
                    pass
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            os.close(sfd)
        try:
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except IsADirectoryError:
            _remove_tree_at(dfd, name)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        return FileStat.of(os.stat(name, dir_fd=dfd, follow_symlinks=False))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    finally:
        os.close(dfd)
