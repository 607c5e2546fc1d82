"""Recursive inotify watcher for one volume directory, driven by the asyncio loop (no thread); the
volumes of a daemon share one inotify instance (InotifyHub).

inotify watches are per directory, so every subdirectory gets its own watch; directories created or
moved in later are walked and watched on arrival, and every entry found inside them is reported
because it may have been created before the watch existed. Events are batched: a path is reported
once it reaches a commit point (close-after-write, rename, delete, attrib, non-regular create) and
the watcher has been quiet for ``debounce`` seconds (bounded to 50 ms latency under load).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from inotify_simple import Event, INotify, flags

from .pathsafe import TMP_PREFIX  # the plugin's own in-flight files: never reported, never watched

__all__ = ["Changes", "InotifyHub", "VolumeWatcher", "WatchLimitError"]

log = logging.getLogger(__name__)

_BASE_MASK = (
    flags.CLOSE_WRITE
    | flags.MOVED_TO
    | flags.MOVED_FROM
    | flags.CREATE
    | flags.DELETE
    | flags.ATTRIB
    | flags.MODIFY
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.ONLYDIR
    | flags.EXCL_UNLINK
)
#: Subdirectories: never follow symlinks (a symlink to a dir is a file entry, not a dir to watch).
_DIR_MASK = _BASE_MASK | flags.DONT_FOLLOW
#: The volume root itself may be reached through a symlink (e.g. a mountpoint alias).
_ROOT_MASK = _BASE_MASK

_MAX_LATENCY = 0.05  # flush at least this often under a continuous event stream
READ_SPACING = 0.002  # seconds between two reads of the inotify fd while events keep coming
_OPEN_WRITE_MAX_AGE = 30.0  # report a file held open and written continuously at least this often
_STALE_CHECK_MIN_INTERVAL = 0.05
#: Paths remembered between two flushes. Past this (a big tree moved in, a burst of writes) the
#: watcher forgets them and asks for a rescan instead, which lists the disk in bounded batches: the
#: memory of a burst does not grow with the number of files in it.
_READY_MAX = 32768
_MAX_USER_WATCHES = "/proc/sys/fs/inotify/max_user_watches"
_NS_MAX_WATCHES = "/proc/sys/user/max_inotify_watches"


class WatchLimitError(RuntimeError):
    """The per-user inotify watch limit is too small for this volume; the caller must poll instead."""

    def __init__(self, root: str, needed: int, max_user_watches: int, knob: str = "fs.inotify.max_user_watches",
                 held: int = -1) -> None:
        self.root = root
        self.needed = needed
        self.max_user_watches = max_user_watches
        self.knob = knob
        self.held = held
        suggest = 1 << max(needed + max(held, 0), 8192).bit_length()
        got = f"{held} held, " if held >= 0 else ""
        super().__init__(
            f"inotify watch limit reached: {root} needs {needed} watches ({got}limit {knob}={max_user_watches}); "
            f"raise it with sysctl {knob}={suggest}"
        )


@dataclass(slots=True)
class Changes:
    """One debounced batch of changes for the caller to reconcile.

    ``paths`` are relative POSIX paths that may have changed (created, written, attrib, deleted, moved in
    or out; a rename reports both names); a path that is (or was) a directory means its whole subtree
    may have changed.
    ``rescan`` means events were lost (overflow, watch limit, root gone): do a full rescan.
    """

    paths: set[str] = field(default_factory=set)
    rescan: bool = False


def _read_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return -1


def max_user_instances() -> int:
    """fs.inotify.max_user_instances (128, the kernel default, when it cannot be read)."""
    v = _read_int("/proc/sys/fs/inotify/max_user_instances")
    return v if v >= 0 else 128


def _read_max_user_watches() -> tuple[int, str]:
    """The limit that applies to us and the sysctl that sets it: the global fs.inotify one, or the
    per-user-namespace one (lower inside a container or a user namespace)."""
    limits = [(v, k) for v, k in ((_read_int(_MAX_USER_WATCHES), "fs.inotify.max_user_watches"),
                                  (_read_int(_NS_MAX_WATCHES), "user.max_inotify_watches")) if v >= 0]
    return min(limits) if limits else (-1, "fs.inotify.max_user_watches")


def _join(parent: str, name: str) -> str:
    return name if not parent else f"{parent}/{name}"


class InotifyHub:
    """One inotify instance for every volume of a daemon. The kernel allows 128 instances per user by
    default (fs.inotify.max_user_instances), shared with every other program of that user; one per
    volume ran out at about a hundred volumes. Watches are per directory anyway, so one instance reads
    the events of all volumes and hands each batch to the watcher that owns the watch descriptor; a
    queue overflow concerns every watcher. The fd is opened with the first watcher and closed with the
    last."""

    def __init__(self) -> None:
        self._ino: INotify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._owners: dict[int, VolumeWatcher] = {}  # wd -> the watcher that added it
        self._watchers: set[VolumeWatcher] = set()
        self._last_read = float("-inf")  # loop time of the last read of the fd

    @property
    def instances(self) -> int:
        """inotify instances open (0 or 1)."""
        return 0 if self._ino is None else 1

    def attach(self, watcher: VolumeWatcher, loop: asyncio.AbstractEventLoop) -> None:
        if self._ino is None:
            self._ino = INotify(nonblocking=True)
            self._loop = loop
            loop.add_reader(self._ino.fileno(), self._on_readable)
        self._watchers.add(watcher)

    def detach(self, watcher: VolumeWatcher) -> None:
        self._watchers.discard(watcher)
        for wd in [wd for wd, w in self._owners.items() if w is watcher]:
            self.rm_watch(wd)
        if not self._watchers and self._ino is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._ino.fileno())
            self._ino.close()
            self._ino = None
            self._owners.clear()

    def add_watch(self, watcher: VolumeWatcher, path: str, mask: int) -> int:
        assert self._ino is not None
        wd = int(self._ino.add_watch(path, mask))
        self._owners[wd] = watcher
        return wd

    def rm_watch(self, wd: int) -> None:
        self._owners.pop(wd, None)
        if self._ino is None:
            return
        try:
            self._ino.rm_watch(wd)
        except OSError:
            pass  # already gone (dir deleted, IN_IGNORED pending)

    def _on_readable(self) -> None:
        """Read at once after a quiet spell; under a stream of events, at most one read per
        READ_SPACING: the events of that time come in one batch instead of one wake-up for each."""
        ino, loop = self._ino, self._loop
        if ino is None or loop is None:
            return
        due = self._last_read + READ_SPACING
        if loop.time() >= due:
            self._read(ino, loop)
            return
        loop.remove_reader(ino.fileno())
        loop.call_at(due, self._read_later, ino)

    def _read_later(self, ino: INotify) -> None:
        current, loop = self._ino, self._loop
        if current is None or current is not ino or loop is None:
            return  # the last watcher detached meanwhile (and a new fd may be open)
        loop.add_reader(current.fileno(), self._on_readable)
        self._read(current, loop)

    def _read(self, ino: INotify, loop: asyncio.AbstractEventLoop) -> None:
        self._last_read = loop.time()
        try:
            events = ino.read(timeout=0)
        except OSError:
            log.exception("reading the inotify fd failed")
            return
        for w, batch in self.route(events).items():
            w.deliver(batch)

    def route(self, events: Sequence[Event]) -> dict[VolumeWatcher, list[Event]]:
        """Each volume's events, in the kernel's order; an overflow to every volume."""
        batches: dict[VolumeWatcher, list[Event]] = {}
        for ev in events:
            if ev.mask & flags.Q_OVERFLOW:
                for w in self._watchers:
                    batches.setdefault(w, []).append(ev)
                continue
            owner = self._owners.get(ev.wd)
            if owner is None:
                continue  # a watch removed since the kernel queued the event
            batches.setdefault(owner, []).append(ev)
            if ev.mask & flags.IGNORED:
                self._owners.pop(ev.wd, None)
        return batches


class VolumeWatcher:
    """Watches ``root`` recursively and calls ``on_changes`` on the event loop with debounced batches.

    The callback runs synchronously inside a loop callback; exceptions it raises are logged, not
    propagated. Paths still open for writing are held back until IN_CLOSE_WRITE, or until
    ``open_write_timeout`` seconds pass without a further write (mmap writers, files held open).
    """

    def __init__(
        self,
        root: str,
        on_changes: Callable[[Changes], None],
        *,
        ignore: Callable[[str], bool] = lambda rel: False,
        debounce: float = 0.005,
        loop: asyncio.AbstractEventLoop | None = None,
        hub: InotifyHub | None = None,
    ) -> None:
        self.root = os.path.abspath(root)
        self.degraded = False
        self.degraded_reason: str | None = None
        self.watch_limit_error: WatchLimitError | None = None
        self.overflows = 0
        #: Seconds without IN_MODIFY after which an unclosed file is reported anyway.
        self.open_write_timeout = 2.0
        self._on_changes = on_changes
        self._ignore = ignore
        self._debounce = max(0.0, debounce)
        self._loop = loop
        self._hub = hub if hub is not None else InotifyHub()  # a watcher alone (tests, tools) has its own
        self._started = False
        self._root_wd: int | None = None
        self._root_lost = False
        self._limited = False  # hit ENOSPC: stop adding watches
        # watch bookkeeping: wd <-> relpath, plus the directory tree so subtree ops are O(subtree)
        self._wd_rel: dict[int, str] = {}
        self._rel_wd: dict[str, int] = {}
        self._parent: dict[int, int] = {}
        self._kids: dict[int, set[int]] = {}
        # pending report state
        self._ready: set[str] = set()
        self._rescan = False
        self._first_pending: float | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._open: dict[str, list[float]] = {}  # rel -> [first_modify, last_modify] for unclosed writes
        self._stale_handle: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def watch_count(self) -> int:
        return len(self._wd_rel)

    def start(self) -> None:
        """Watch the whole tree and start reading; watch-limit exhaustion degrades instead of raising."""
        if self._started:
            raise RuntimeError("watcher already started")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._hub.attach(self, self._loop)
        self._started = True
        try:
            self._walk("", None, report=False)
        except BaseException:
            self._started = False
            self._hub.detach(self)
            self._clear_watches()
            raise
        self._schedule_flush()

    def stop(self) -> None:
        """Stop reading and remove this volume's watches; pending changes are dropped."""
        for handle in (self._flush_handle, self._stale_handle):
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._stale_handle = None
        if self._started:
            self._started = False
            self._hub.detach(self)
        self._clear_watches()

    def flush(self) -> None:
        """Deliver pending changes now instead of waiting for the debounce timer."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._flush()

    # ------------------------------------------------------------------ event processing

    def deliver(self, events: Sequence[Event]) -> None:
        """A batch of this volume's events from the hub."""
        if not self._started or not events:
            return
        try:
            self.handle_events(events)
        except Exception:
            # never let a bookkeeping bug kill the reader; a rescan makes the caller whole again
            log.exception("processing inotify events for %s failed; requesting rescan", self.root)
            self._rescan = True
            self._schedule_flush()

    def handle_events(self, events: Sequence[Event]) -> None:
        """Apply one read batch of inotify events (public so tests can inject synthetic ones)."""
        assert self._loop is not None
        now = self._loop.time()
        to_cookies = {ev.cookie for ev in events if ev.mask & flags.MOVED_TO}
        pending_from: dict[int, tuple[str, int | None, bool]] = {}  # cookie -> (old_rel, dir wd, isdir)
        for ev in events:
            mask = ev.mask
            if mask & flags.Q_OVERFLOW:
                self._on_overflow()
                continue
            if mask & flags.IGNORED:
                self._on_ignored(ev.wd)
                continue
            parent_rel = self._wd_rel.get(ev.wd)
            if parent_rel is None:
                continue  # late event from a watch we already dropped
            if not ev.name:
                if ev.wd == self._root_wd and mask & (flags.DELETE_SELF | flags.MOVE_SELF | flags.UNMOUNT):
                    self._root_gone("was deleted or moved" if not mask & flags.UNMOUNT else "was unmounted")
                elif mask & flags.UNMOUNT:
                    self._rescan = True
                continue  # self-events of subdirs are covered by the parent's named event
            rel = _join(parent_rel, ev.name)
            isdir = bool(mask & flags.ISDIR)
            if mask & flags.MOVED_FROM:
                wd = self._rel_wd.get(rel) if isdir else None
                if ev.cookie in to_cookies:
                    pending_from[ev.cookie] = (rel, wd, isdir)
                else:
                    self._moved_out(rel, isdir, wd)
                continue
            if mask & flags.MOVED_TO:
                src = pending_from.pop(ev.cookie, None)
                if src is None:
                    self._moved_in(rel, ev.wd, isdir)
                else:
                    self._moved(src[0], src[1], rel, ev.wd, isdir)
                continue
            if self._skip(rel):
                continue
            if isdir:
                if mask & flags.CREATE:
                    self._mark(rel)
                    self._walk_new(rel, ev.wd)
                elif mask & flags.DELETE:
                    # rmdir only succeeds on empty dirs, so only this one mapping can remain
                    self._mark(rel)
                    wd = self._rel_wd.get(rel)
                    if wd is not None:
                        self._drop_subtree(wd, rm=False)
                elif mask & flags.ATTRIB:
                    self._mark(rel)
            elif mask & flags.CLOSE_WRITE:
                self._open.pop(rel, None)
                self._mark(rel)
            elif mask & flags.MODIFY:
                self._opened_for_write(rel, now)
            elif mask & flags.CREATE:
                self._on_file_create(rel, now)
            elif mask & flags.DELETE:
                self._open.pop(rel, None)
                self._mark(rel)
            elif mask & flags.ATTRIB and rel not in self._open:
                self._mark(rel)  # attrib on a file mid-write waits for its close
        for old_rel, wd, isdir in pending_from.values():  # MOVED_TO landed on an unknown wd
            self._moved_out(old_rel, isdir, wd)
        self._schedule_flush()
        self._schedule_stale()

    @staticmethod
    def _own_tmp(rel: str) -> bool:
        return rel.rpartition("/")[2].startswith(TMP_PREFIX)

    def _skip(self, rel: str) -> bool:
        return self._own_tmp(rel) or self._ignore(rel)

    def _mark(self, rel: str) -> None:
        if self._rescan:
            return  # a rescan is due: it lists everything, no need to remember paths
        if len(self._ready) >= _READY_MAX:
            self._ready, self._rescan = set(), True
            return
        self._ready.add(rel)

    def _opened_for_write(self, rel: str, now: float) -> None:
        """Hold a file back while it is being written; it is reported on close (or timeout)."""
        self._ready.discard(rel)
        entry = self._open.get(rel)
        if entry is None:
            self._open[rel] = [now, now]
        else:
            entry[1] = now

    def _on_file_create(self, rel: str, now: float) -> None:
        """Regular files get an IN_CLOSE_WRITE later; symlinks, hard links and special files do not."""
        try:
            st = os.lstat(self._abs(rel))
        except OSError:
            self._mark(rel)  # already gone again: its IN_DELETE follows, report either way
            return
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            self._opened_for_write(rel, now)
        else:
            self._mark(rel)

    def _moved(self, old_rel: str, old_wd: int | None, new_rel: str, new_parent_wd: int, isdir: bool) -> None:
        old_skip, new_skip = self._skip(old_rel), self._skip(new_rel)
        if old_skip and new_skip:
            return
        if old_skip:
            if not isdir and self._own_tmp(old_rel):
                # This daemon's own temp file renamed into place (a remote version applied, a version
                # restored, a conflict copy kept): whoever renamed it recorded it in the index or marked
                # it dirty, and a write after the rename brings events of its own. Reporting it would
                # only make the publisher look at every applied file again.
                self._open.pop(new_rel, None)
                return
            self._moved_in(new_rel, new_parent_wd, isdir)  # e.g. x.tmp -> x: a new file to the caller
            return
        if new_skip:
            self._moved_out(old_rel, isdir, old_wd)
            return
        self._mark(old_rel)
        self._mark(new_rel)
        self._open.pop(old_rel, None)
        self._open.pop(new_rel, None)
        if not isdir:
            return
        if old_wd is None or old_wd not in self._wd_rel:
            self._walk_new(new_rel, new_parent_wd)  # was never watched (limit, race): watch it now
        else:
            self._remap(old_wd, new_rel, new_parent_wd)
        prefix = old_rel + "/"
        for rel in [r for r in self._open if r.startswith(prefix)]:
            self._open[new_rel + rel[len(old_rel) :]] = self._open.pop(rel)

    def _moved_in(self, rel: str, parent_wd: int, isdir: bool) -> None:
        if self._skip(rel):
            return
        self._mark(rel)
        self._open.pop(rel, None)
        if isdir:
            self._walk_new(rel, parent_wd)

    def _moved_out(self, rel: str, isdir: bool, wd: int | None) -> None:
        if self._skip(rel):
            return
        self._mark(rel)
        self._open.pop(rel, None)
        if isdir:
            if wd is not None:
                # the kernel keeps watching a dir moved elsewhere; those events are not ours
                self._drop_subtree(wd, rm=True)
            prefix = rel + "/"
            for r in [r for r in self._open if r.startswith(prefix)]:
                del self._open[r]

    def _on_overflow(self) -> None:
        self.overflows += 1
        self._rescan = True
        log.warning("inotify queue overflow on %s (#%d); requesting full rescan", self.root, self.overflows)
        if not self.degraded and self._started:
            self._resync()

    def _on_ignored(self, wd: int) -> None:
        if wd == self._root_wd and wd in self._wd_rel:
            self._root_gone("watch was removed")
        self._unregister(wd)

    def _root_gone(self, why: str) -> None:
        if self._root_lost:
            return
        self._root_lost = True
        self.degraded = True
        self.degraded_reason = f"volume root {self.root} {why}; inotify watching stopped"
        self._rescan = True
        log.warning("%s", self.degraded_reason)
        if self._started:
            for wd in list(self._wd_rel):
                self._rm_watch(wd)
        self._clear_watches()

    # ------------------------------------------------------------------ watch bookkeeping

    def _abs(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def _add_watch(self, path: str, mask: int) -> int:
        assert self._started
        return self._hub.add_watch(self, path, mask)

    def _rm_watch(self, wd: int) -> None:
        if self._started:
            self._hub.rm_watch(wd)

    def _clear_watches(self) -> None:
        self._wd_rel.clear()
        self._rel_wd.clear()
        self._parent.clear()
        self._kids.clear()
        self._root_wd = None

    def _register(self, wd: int, rel: str, parent_wd: int | None) -> None:
        stale = self._rel_wd.get(rel)
        if stale is not None and stale != wd:
            self._drop_subtree(stale, rm=False)
        self._wd_rel[wd] = rel
        self._rel_wd[rel] = wd
        if parent_wd is None:
            self._root_wd = wd
        else:
            self._parent[wd] = parent_wd
            self._kids.setdefault(parent_wd, set()).add(wd)

    def _unregister(self, wd: int) -> None:
        rel = self._wd_rel.pop(wd, None)
        if rel is not None and self._rel_wd.get(rel) == wd:
            del self._rel_wd[rel]
        parent = self._parent.pop(wd, None)
        if parent is not None:
            siblings = self._kids.get(parent)
            if siblings is not None:
                siblings.discard(wd)
        for kid in self._kids.pop(wd, ()):
            self._parent.pop(kid, None)
        if wd == self._root_wd:
            self._root_wd = None

    def _subtree(self, wd: int) -> list[int]:
        out = [wd]
        i = 0
        while i < len(out):
            out.extend(self._kids.get(out[i], ()))
            i += 1
        return out

    def _drop_subtree(self, wd: int, *, rm: bool) -> None:
        for w in self._subtree(wd):
            self._unregister(w)
            if rm:
                self._rm_watch(w)

    def _remap(self, wd: int, new_rel: str, new_parent_wd: int) -> None:
        """A renamed dir keeps its watches (they follow the inode); only the relpaths change."""
        stale = self._rel_wd.get(new_rel)
        if stale is not None and stale != wd:  # rename replaced an empty dir
            self._drop_subtree(stale, rm=False)
        old_rel = self._wd_rel[wd]
        moved = [(w, self._wd_rel[w]) for w in self._subtree(wd)]
        for w, rel in moved:
            if self._rel_wd.get(rel) == w:
                del self._rel_wd[rel]
        for w, rel in moved:
            nrel = new_rel + rel[len(old_rel) :]
            self._wd_rel[w] = nrel
            self._rel_wd[nrel] = w
        old_parent = self._parent.get(wd)
        if old_parent is not None and old_parent in self._kids:
            self._kids[old_parent].discard(wd)
        self._parent[wd] = new_parent_wd
        self._kids.setdefault(new_parent_wd, set()).add(wd)

    def _walk_new(self, rel: str, parent_wd: int) -> None:
        """Watch a dir that appeared at runtime and report everything already inside it."""
        if self._limited or self._root_lost:
            self._rescan = True  # cannot watch it: only a rescan will see its contents
            return
        self._walk(rel, parent_wd, report=True)

    def _walk(self, rel: str, parent_wd: int | None, *, report: bool) -> None:
        """Add watches for ``rel`` and its subdirs (watch before listing, so nothing slips through)."""
        stack: list[tuple[str, int | None]] = [(rel, parent_wd)]
        visited: set[int] = set()
        while stack:
            d_rel, p_wd = stack.pop()
            path = self._abs(d_rel)
            try:
                wd = self._add_watch(path, _ROOT_MASK if not d_rel else _DIR_MASK)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    self._hit_watch_limit()
                    return
                if not d_rel:
                    raise
                if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                    log.warning("cannot watch %s: %s", path, e)
                continue  # raced away or replaced by a non-dir: its own events follow
            if wd in visited:
                continue  # bind-mount loop
            visited.add(wd)
            known = self._wd_rel.get(wd)
            if known is None:
                self._register(wd, d_rel, p_wd)
            elif known != d_rel:
                log.debug("%s is an alias of already watched %s; not descending", d_rel, known)
                continue
            try:
                # Read as listed, never held whole (the DirEntry objects of a 50,000-entry directory
                # are ~25 MB), and without a report only subdirectories matter.
                with os.scandir(path) as it:
                    for entry in it:
                        try:
                            is_dir = entry.is_dir(follow_symlinks=False)
                        except OSError:
                            is_dir = False
                        if not (is_dir or report):
                            continue
                        c_rel = _join(d_rel, entry.name)
                        if self._skip(c_rel):
                            continue
                        if report:
                            self._mark(c_rel)
                        if is_dir:
                            stack.append((c_rel, wd))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                log.warning("cannot list %s: %s", path, e)
                continue

    def _resync(self) -> None:
        """After an overflow the wd map may be stale (missed renames/mkdirs): rebuild it from disk."""
        old = set(self._wd_rel)
        self._clear_watches()
        try:
            self._walk("", None, report=False)
        except OSError as e:
            self._root_gone(f"is not watchable ({e})")
            return
        for wd in old - self._wd_rel.keys():
            self._rm_watch(wd)

    def _hit_watch_limit(self) -> None:
        self._limited = True
        self._rescan = True
        if self.watch_limit_error is not None:
            return
        self._report_limit(self._count_dirs())
        log.warning("%s; falling back to periodic rescans", self.watch_limit_error)

    def _report_limit(self, needed: int) -> None:
        limit, knob = _read_max_user_watches()
        err = WatchLimitError(self.root, needed, limit, knob, len(self._wd_rel))
        self.watch_limit_error = err
        self.degraded = True
        self.degraded_reason = str(err)

    def note_directories(self, count: int) -> None:
        """A full rescan counted the volume's directories: keep the watch-limit report current (the
        tree often keeps growing after the limit was first hit)."""
        if self.watch_limit_error is not None and count != self.watch_limit_error.needed:
            self._report_limit(count)

    def _count_dirs(self) -> int:
        count = 0
        stack = [""]
        while stack:
            rel = stack.pop()
            count += 1
            try:
                with os.scandir(self._abs(rel)) as it:
                    for entry in it:
                        c_rel = _join(rel, entry.name)
                        if entry.is_dir(follow_symlinks=False) and not self._skip(c_rel):
                            stack.append(c_rel)
            except OSError:
                continue
        return count

    # ------------------------------------------------------------------ timers

    def _schedule_flush(self) -> None:
        if not (self._ready or self._rescan) or self._loop is None:
            return
        now = self._loop.time()
        if self._first_pending is None:
            self._first_pending = now
        deadline = min(now + self._debounce, self._first_pending + _MAX_LATENCY)
        if self._flush_handle is not None:
            if self._flush_handle.when() == deadline:
                return
            self._flush_handle.cancel()
        self._flush_handle = self._loop.call_at(deadline, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        self._first_pending = None
        if not (self._ready or self._rescan):
            return
        changes = Changes(paths=self._ready, rescan=self._rescan)
        self._ready, self._rescan = set(), False
        try:
            self._on_changes(changes)
        except Exception:
            log.exception("on_changes callback for %s failed", self.root)

    def _schedule_stale(self) -> None:
        if self._open and self._stale_handle is None and self._loop is not None:
            self._stale_handle = self._loop.call_at(
                self._loop.time() + self.open_write_timeout, self._check_stale
            )

    def _check_stale(self) -> None:
        """Report files that stopped being written without a close (mmap, held-open fds)."""
        self._stale_handle = None
        if self._loop is None or not self._open:
            return
        now = self._loop.time()
        timeout = self.open_write_timeout
        next_due = float("inf")
        for rel, (first, last) in list(self._open.items()):
            due = min(last + timeout, first + _OPEN_WRITE_MAX_AGE)
            if due <= now:
                del self._open[rel]
                self._mark(rel)
            else:
                next_due = min(next_due, due)
        self._schedule_flush()
        if self._open:
            self._stale_handle = self._loop.call_at(
                max(next_due, now + _STALE_CHECK_MIN_INTERVAL), self._check_stale
            )
