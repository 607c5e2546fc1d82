"""VolumeWatcher against real inotify on tmp dirs."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import inotify_simple
import pytest
import pytest_asyncio
from inotify_simple import Event, flags

from syncmesh_plugin.watcher import READ_SPACING, Changes, InotifyHub, VolumeWatcher, WatchLimitError


class Collector:
    """Accumulates every delivered batch and lets a test await a condition on them."""

    def __init__(self) -> None:
        self.batches: list[Changes] = []
        self._event = asyncio.Event()

    def __call__(self, changes: Changes) -> None:
        self.batches.append(changes)
        self._event.set()

    @property
    def paths(self) -> set[str]:
        return set().union(*(b.paths for b in self.batches))

    @property
    def rescans(self) -> int:
        return sum(b.rescan for b in self.batches)

    def count(self, rel: str) -> int:
        return sum(rel in b.paths for b in self.batches)

    async def wait(self, pred: Callable[[], bool], timeout: float = 3.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self._event.clear()
                await self._event.wait()

    def clear(self) -> None:
        self.batches.clear()


Made = tuple[VolumeWatcher, Collector]


@pytest_asyncio.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Made]]:
    watchers: list[VolumeWatcher] = []

    def _make(root: Path | None = None, **kw: object) -> Made:
        col = Collector()
        w = VolumeWatcher(str(root or tmp_path / "vol"), col, **kw)  # type: ignore[arg-type]
        w.start()
        watchers.append(w)
        return w, col

    (tmp_path / "vol").mkdir()
    yield _make
    for w in watchers:
        w.stop()


async def marker(col: Collector, path: Path) -> None:
    """Write `path` and wait until it is reported. inotify delivers events in order, so whatever
    happened before the marker was written has been reported by then, or never will be."""
    path.write_text("marker")
    await col.wait(lambda: path.name in col.paths)


@pytest.mark.asyncio
async def test_create_write_close_reported_once(make: Callable[..., Made], tmp_path: Path) -> None:
    w, col = make()
    with open(tmp_path / "vol" / "f.txt", "w") as f:
        f.write("hello")
        f.flush()
        await marker(col, tmp_path / "vol" / "m1")
        assert "f.txt" not in col.paths  # still open for writing: held back
        f.write(" world")
    await col.wait(lambda: "f.txt" in col.paths)
    await marker(col, tmp_path / "vol" / "m2")
    assert col.count("f.txt") == 1
    assert col.rescans == 0
    assert w.watch_count == 1


@pytest.mark.asyncio
async def test_nested_mkdir_then_file_race(make: Callable[..., Made], tmp_path: Path) -> None:
    w, col = make()
    vol = tmp_path / "vol"
    (vol / "a" / "b" / "c").mkdir(parents=True)
    (vol / "a" / "b" / "c" / "f").write_text("x")  # created before the watch on c may exist
    want = {"a", "a/b", "a/b/c", "a/b/c/f"}
    await col.wait(lambda: want <= col.paths)
    await col.wait(lambda: w.watch_count == 4)
    (vol / "a" / "b" / "c" / "g").write_text("y")
    await col.wait(lambda: "a/b/c/g" in col.paths)


@pytest.mark.asyncio
async def test_file_rename_within_and_across_dirs(make: Callable[..., Made], tmp_path: Path) -> None:
    _, col = make()
    vol = tmp_path / "vol"
    (vol / "d").mkdir()
    (vol / "f").write_text("x")
    await col.wait(lambda: {"d", "f"} <= col.paths)
    col.clear()
    os.rename(vol / "f", vol / "g")
    await col.wait(lambda: {"f", "g"} <= col.paths)  # both names: the old one is gone, the new one is there
    col.clear()
    os.rename(vol / "g", vol / "d" / "g")
    await col.wait(lambda: {"g", "d/g"} <= col.paths)


@pytest.mark.asyncio
async def test_directory_rename_remaps_subtree(make: Callable[..., Made], tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    (vol / "x" / "y").mkdir(parents=True)
    (vol / "other").mkdir()
    w, col = make()
    assert w.watch_count == 4
    os.rename(vol / "x", vol / "other" / "z")
    await col.wait(lambda: {"x", "other/z"} <= col.paths)
    assert w.watch_count == 4  # re-mapped, not re-added
    col.clear()
    (vol / "other" / "z" / "y" / "new.txt").write_text("n")
    await col.wait(lambda: "other/z/y/new.txt" in col.paths)
    assert not any(p.startswith("x") for p in col.paths)


@pytest.mark.asyncio
async def test_delete_and_chmod_reported(make: Callable[..., Made], tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    (vol / "del").write_text("x")
    (vol / "mod").write_text("x")
    (vol / "sub").mkdir()
    w, col = make()
    (vol / "del").unlink()
    os.chmod(vol / "mod", 0o600)
    (vol / "sub").rmdir()
    await col.wait(lambda: {"del", "mod", "sub"} <= col.paths)
    await col.wait(lambda: w.watch_count == 1)


@pytest.mark.asyncio
async def test_ignore_predicate_and_tmp_prefix(make: Callable[..., Made], tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    (vol / "cache").mkdir()
    w, col = make(ignore=lambda rel: rel == "cache" or rel.startswith("cache/") or rel.endswith(".log"))
    assert w.watch_count == 1  # ignored dir is not watched
    (vol / "cache" / "f").write_text("x")
    (vol / "app.log").write_text("x")
    (vol / ".syncmesh-tmp-x").write_text("x")
    os.rename(vol / ".syncmesh-tmp-x", vol / "final")  # the daemon's own commit: it records that itself
    os.rename(vol / "app.log", vol / "saved")  # an ignored name saved under its real name: a new file
    (vol / "ok").write_text("x")
    await col.wait(lambda: {"saved", "ok"} <= col.paths)  # "ok" came last: everything before it is in
    assert col.paths == {"saved", "ok"}  # neither the temp name nor the committed file is reported
    (vol / "final").write_text("y")  # a write after the commit is, as any write
    await col.wait(lambda: "final" in col.paths)


@pytest.mark.asyncio
async def test_symlink_to_dir_is_a_file_entry(make: Callable[..., Made], tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    outside = tmp_path / "outside"
    outside.mkdir()
    w, col = make()
    os.symlink(outside, vol / "link")
    await col.wait(lambda: "link" in col.paths)
    assert w.watch_count == 1
    (outside / "f").write_text("x")
    await marker(col, vol / "marker")
    assert "link/f" not in col.paths


@pytest.mark.asyncio
async def test_dir_moved_in_and_out(make: Callable[..., Made], tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    outside = tmp_path / "outside"
    (outside / "s").mkdir(parents=True)
    (outside / "s" / "f1").write_text("1")
    (outside / "top").write_text("t")
    w, col = make()
    os.rename(outside, vol / "in")
    await col.wait(lambda: {"in", "in/s", "in/s/f1", "in/top"} <= col.paths)
    assert w.watch_count == 3
    os.rename(vol / "in", tmp_path / "gone")
    await col.wait(lambda: w.watch_count == 1)
    col.clear()
    (tmp_path / "gone" / "s" / "later").write_text("x")
    (vol / "marker").write_text("x")
    await col.wait(lambda: "marker" in col.paths)
    assert not any("later" in p for p in col.paths)


@pytest.mark.asyncio
async def test_unclosed_write_reported_after_quiet_period(make: Callable[..., Made], tmp_path: Path) -> None:
    w, col = make()
    w.open_write_timeout = 1.0
    with open(tmp_path / "vol" / "held", "w") as f:
        f.write("data")
        f.flush()
        await marker(col, tmp_path / "vol" / "marker")
        assert "held" not in col.paths
        await col.wait(lambda: "held" in col.paths, timeout=4)
    await col.wait(lambda: col.count("held") == 2)  # the close is a commit point again


@pytest.mark.asyncio
async def test_synthetic_overflow_requests_rescan_and_keeps_watching(
    make: Callable[..., Made], tmp_path: Path
) -> None:
    vol = tmp_path / "vol"
    (vol / "d").mkdir()
    w, col = make()
    w.handle_events([Event(-1, flags.Q_OVERFLOW, 0, "")])
    assert w.overflows == 1
    await col.wait(lambda: col.rescans == 1)
    assert w.watch_count == 2 and not w.degraded
    (vol / "d" / "after").write_text("x")
    await col.wait(lambda: "d/after" in col.paths)


@pytest.mark.asyncio
async def test_burst_of_2000_files_all_reported(make: Callable[..., Made], tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    (vol / "burst").mkdir()
    _, col = make()
    names = {f"burst/f{i:04d}" for i in range(2000)}
    for rel in names:
        with open(vol / rel, "wb") as f:
            f.write(b"x" * 64)
    await col.wait(lambda: names <= col.paths, timeout=5)
    assert col.rescans == 0


def _enospc_after(limit: int) -> Callable[..., int]:
    real = inotify_simple.INotify.add_watch
    calls = {"n": 0}

    def fake(self: inotify_simple.INotify, path: str, mask: int) -> int:
        calls["n"] += 1
        if calls["n"] > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, path, mask)

    return fake


@pytest.mark.asyncio
async def test_watch_limit_at_start_degrades(
    make: Callable[..., Made], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = tmp_path / "vol"
    for d in ("a", "b", "c"):
        (vol / d).mkdir()
    monkeypatch.setattr(inotify_simple.INotify, "add_watch", _enospc_after(1))
    w, col = make()
    assert w.degraded
    assert w.degraded_reason is not None and "needs 4 watches (1 held, limit " in w.degraded_reason
    assert "max_user_watches=" in w.degraded_reason or "max_inotify_watches=" in w.degraded_reason
    assert "raise it with sysctl " in w.degraded_reason
    assert isinstance(w.watch_limit_error, WatchLimitError) and w.watch_limit_error.needed == 4
    for d in ("d", "e", "f", "g"):  # the tree grows; a full rescan brings the report up to date
        (vol / d).mkdir()
    w.note_directories(8)
    assert w.watch_limit_error.needed == 8 and "needs 8 watches" in (w.degraded_reason or "")
    await col.wait(lambda: col.rescans >= 1)
    (vol / "rootfile").write_text("x")  # the watches that did fit keep working
    await col.wait(lambda: "rootfile" in col.paths)


@pytest.mark.asyncio
async def test_watch_limit_at_runtime_degrades(
    make: Callable[..., Made], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w, col = make()
    assert not w.degraded
    monkeypatch.setattr(inotify_simple.INotify, "add_watch", _enospc_after(0))
    (tmp_path / "vol" / "newdir").mkdir()
    await col.wait(lambda: col.rescans >= 1 and "newdir" in col.paths)
    assert w.degraded and "max_user_watches" in (w.degraded_reason or "")


@pytest.mark.asyncio
async def test_root_deleted_degrades(make: Callable[..., Made], tmp_path: Path) -> None:
    w, col = make()
    (tmp_path / "vol").rmdir()
    await col.wait(lambda: col.rescans >= 1)
    assert w.degraded and w.watch_count == 0


def test_the_lower_of_the_global_and_the_user_namespace_limit_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from syncmesh_plugin import watcher as watcher_mod

    glob, ns = tmp_path / "global", tmp_path / "ns"
    glob.write_text("8192\n")
    ns.write_text("64\n")
    monkeypatch.setattr(watcher_mod, "_MAX_USER_WATCHES", str(glob))
    monkeypatch.setattr(watcher_mod, "_NS_MAX_WATCHES", str(ns))
    assert watcher_mod._read_max_user_watches() == (64, "user.max_inotify_watches")
    ns.write_text("100000\n")
    assert watcher_mod._read_max_user_watches() == (8192, "fs.inotify.max_user_watches")
    err = WatchLimitError("/v", 211, 64, "user.max_inotify_watches", 64)
    assert "needs 211 watches (64 held, limit user.max_inotify_watches=64); raise it with sysctl " \
           "user.max_inotify_watches=16384" in str(err)


@pytest.mark.asyncio
async def test_a_huge_tree_moved_in_is_left_to_a_rescan(make: Callable[..., Made], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from syncmesh_plugin import watcher as watcher_mod

    monkeypatch.setattr(watcher_mod, "_READY_MAX", 6)
    vol = tmp_path / "vol"
    for name in ("outside", "second"):  # each below the bound on its own, together above it
        (tmp_path / name / "sub").mkdir(parents=True)
        for i in range(3):
            (tmp_path / name / "sub" / f"f{i}").write_text("x")
    w, col = make()
    os.rename(tmp_path / "outside", vol / "big")
    os.rename(tmp_path / "second", vol / "big2")
    await col.wait(lambda: col.rescans >= 1)  # the rest is listed by the engine's streamed rescan
    assert len([p for p in col.paths if p.startswith("big")]) <= 6
    assert w.watch_count == 5  # every directory is still watched
    (vol / "big" / "sub" / "later").write_text("y")
    await col.wait(lambda: "big/sub/later" in col.paths)


def _inotify_fds() -> int:
    """inotify instances this process holds (its fds that are inotify instances)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            pass
    return n


async def test_volumes_share_one_inotify_instance_and_get_only_their_own_events(tmp_path: Path) -> None:
    """The kernel allows 128 instances per user by default: a daemon uses one for all its volumes."""
    hub = InotifyHub()
    before = _inotify_fds()
    roots = [tmp_path / f"v{i}" for i in range(3)]
    cols = [Collector() for _ in roots]
    watchers = []
    for root, col in zip(roots, cols, strict=True):
        (root / "sub").mkdir(parents=True)
        w = VolumeWatcher(str(root), col, hub=hub)
        w.start()
        watchers.append(w)
    assert hub.instances == 1 and _inotify_fds() == before + 1
    for i, root in enumerate(roots):
        (root / "sub" / f"only-{i}.txt").write_text(str(i))
    for i, col in enumerate(cols):
        await col.wait(lambda col=col, i=i: f"sub/only-{i}.txt" in col.paths)
    for w in watchers:
        w.flush()
    for i, col in enumerate(cols):
        assert {p for p in col.paths if p.startswith("sub/only-")} == {f"sub/only-{i}.txt"}
    # a volume that stops takes its watches along; the others go on with the same instance
    watchers[0].stop()
    assert hub.instances == 1
    (roots[0] / "sub" / "after.txt").write_text("unwatched")
    (roots[1] / "sub" / "after.txt").write_text("watched")
    await cols[1].wait(lambda: "sub/after.txt" in cols[1].paths)
    assert "sub/after.txt" not in cols[0].paths
    for w in watchers[1:]:
        w.stop()
    assert hub.instances == 0 and _inotify_fds() == before


async def test_a_queue_overflow_reaches_every_volume_of_the_hub(tmp_path: Path) -> None:
    hub = InotifyHub()
    cols = [Collector(), Collector()]
    watchers = []
    for i, col in enumerate(cols):
        (tmp_path / f"v{i}").mkdir()
        w = VolumeWatcher(str(tmp_path / f"v{i}"), col, hub=hub)
        w.start()
        watchers.append(w)
    try:
        batches = hub.route([Event(-1, flags.Q_OVERFLOW, 0, "")])
        assert set(batches) == set(watchers)
        for w, batch in batches.items():
            w.deliver(batch)
        for col in cols:
            await col.wait(lambda col=col: col.rescans > 0)
        assert all(w.overflows == 1 for w in watchers)
    finally:
        for w in watchers:
            w.stop()


def _count_reads(hub: InotifyHub) -> list[tuple[float, str]]:
    """Record the loop time of every read of the hub's fd, and whether it came from a timer."""
    reads: list[tuple[float, str]] = []
    read, read_later = hub._read, hub._read_later
    timed = False

    def counted_read(ino: inotify_simple.INotify, loop: asyncio.AbstractEventLoop) -> None:
        reads.append((loop.time(), "timer" if timed else "at once"))
        read(ino, loop)

    def counted_later(ino: inotify_simple.INotify) -> None:
        nonlocal timed
        timed = True
        try:
            read_later(ino)
        finally:
            timed = False

    hub._read = counted_read  # type: ignore[method-assign]
    hub._read_later = counted_later  # type: ignore[method-assign]
    return reads


def _counted_watcher(root: Path) -> tuple[VolumeWatcher, Collector, list[tuple[float, str]]]:
    """A started watcher of `root` on a hub of its own whose reads are recorded (see _count_reads)."""
    hub = InotifyHub()
    root.mkdir()
    col = Collector()
    w = VolumeWatcher(str(root), col, hub=hub)
    w.start()
    return w, col, _count_reads(hub)


async def test_a_stream_of_events_is_read_in_batches_spaced_apart(tmp_path: Path) -> None:
    """One read per READ_SPACING while events keep coming (a receiver's own staging makes eight events
    per file, each read alone before), and every file still reported."""
    w, col, reads = _counted_watcher(tmp_path / "v")
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(300):
            (tmp_path / "v" / f"f{i}").write_bytes(b"x")
            await asyncio.sleep(0.0002)
        elapsed = loop.time() - t0
        await col.wait(lambda: all(f"f{i}" in col.paths for i in range(300)))
        times = [t for t, _ in reads]
        assert all(b - a >= READ_SPACING * 0.999 for a, b in itertools.pairwise(times))
        assert len(reads) <= (loop.time() - t0) / READ_SPACING + 1
        assert any(how == "timer" for _, how in reads)  # the stream was read by the timer, not per event
        assert elapsed / READ_SPACING < 300  # the stream was dense enough to need spacing at all
    finally:
        w.stop()


async def test_the_first_event_after_a_quiet_spell_is_read_at_once(tmp_path: Path) -> None:
    w, col, reads = _counted_watcher(tmp_path / "v")
    try:
        await asyncio.sleep(READ_SPACING * 2)
        (tmp_path / "v" / "one").write_bytes(b"x")
        await col.wait(lambda: "one" in col.paths)
        assert reads[0][1] == "at once"
    finally:
        w.stop()


async def test_the_last_volume_leaving_while_a_read_is_due_leaves_no_reader(tmp_path: Path) -> None:
    """A timed read due after the fd was closed does nothing; a new fd for the next volume works."""
    hub = InotifyHub()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    col = Collector()
    w = VolumeWatcher(str(tmp_path / "a"), col, hub=hub)
    w.start()
    (tmp_path / "a" / "one").write_bytes(b"x")
    await col.wait(lambda: "one" in col.paths)
    (tmp_path / "a" / "two").write_bytes(b"x")  # read soon after the last one: goes to the timer
    for _ in range(3):
        await asyncio.sleep(0)
    w.stop()
    assert hub.instances == 0
    await asyncio.sleep(READ_SPACING * 2)  # the timer fired on the closed fd
    col2 = Collector()
    w2 = VolumeWatcher(str(tmp_path / "b"), col2, hub=hub)
    w2.start()
    try:
        (tmp_path / "b" / "three").write_bytes(b"x")
        await col2.wait(lambda: "three" in col2.paths)
    finally:
        w2.stop()
