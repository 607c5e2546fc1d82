"""The mass-deletion guard: tells the loss of data that existed from ordinary churn.

A volume whose disk was unmounted, or that a container wiped by mistake, must not be published as
"every file deleted". But queues, temp files, log rotation, renamed directories and rebuilt trees
delete paths all day long, and none of that loses data. So a deleted path counts as a *loss* only
when it held data that existed before the window and that data went nowhere:

- a path created within the window and removed again (a queue entry, a lock, a temp file) is churn;
- a path whose inode (with the same size and mtime) or whose content digest appeared at another
  path in the window was moved or copied (a renamed file or directory, a rotated log): not lost.
  Its new path carries data that existed before, so it does not count as created in the window
  (`mv data trash; rm -rf trash` is still a loss);
- a path written again before its deletion is judged (a rebuilt directory) was never deleted.

Losses below `min_files` within the window are published at once: a single delete travels as fast
as a create. From `min_files` on, a burst may be a wipe in progress (inotify delivers an `rm -rf` in
slices), so its deletions are held until no new loss has come for `settle` seconds, then judged as a
whole against what the volume held before the window: at most `threshold` of it is published, more
pauses the deletions (and only them) until an operator decides, or until the paths are written
again. Everything here is pure: time comes in as an argument, the engine does the I/O.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

WINDOW = 10.0  # seconds over which losses add up
SETTLE = 0.25  # a held burst is judged once no new loss came for this long
TRACKED_MAX = 65536  # born paths and arrived identities remembered (oldest forgotten first: safe side)


@dataclass(frozen=True, slots=True)
class Entry:
    """What the guard knows of a path that appeared or vanished: its kind, identity and content."""

    path: str
    kind: str
    inode: int = 0
    size: int = 0
    mtime_ns: int = 0
    digest: str = ""


def identities(e: Entry) -> list[tuple[str | int, ...]]:
    """Keys under which the data of `e` can be found again at another path.

    A rename keeps the inode, size and mtime of a file (and the inode of a directory); a copy keeps
    the content digest. Empty files carry no data, so their digest proves nothing."""
    ids: list[tuple[str | int, ...]] = []
    if e.inode:
        ids.append(("dir", e.inode) if e.kind == "dir" else ("ino", e.inode, e.size, e.mtime_ns))
    if e.kind == "file" and e.digest and e.size > 0:
        ids.append(("sum", e.digest))
    return ids


def crosses(lost: int, baseline: int, min_files: int, threshold: float) -> bool:
    """The verdict: is losing `lost` of the `baseline` paths a mass deletion?"""
    return lost >= min_files and lost > threshold * max(baseline, lost)


@dataclass
class Verdict:
    """What to do with the deletions of one flush."""

    publish: set[str] = field(default_factory=set)
    hold: set[str] = field(default_factory=set)
    reasons: dict[str, str] = field(default_factory=dict)  # path -> churn | moved | loss | released


@dataclass
class Review:
    """The judgement of a held burst: deletions to publish now, or a pause (or its end)."""

    release: list[str] = field(default_factory=list)
    paused: str = ""  # set when this review pauses the volume
    lifted: bool = False  # a pause ended because the held paths came back or fell below the share


class DeleteGuard:
    """One volume's window of recent creations, arrivals and losses, and the deletions it holds."""

    def __init__(self, threshold: float, min_files: int, window: float = WINDOW, settle: float = SETTLE,
                 tracked_max: int = TRACKED_MAX) -> None:
        self.threshold = threshold
        self.min_files = min_files
        self.window = window
        self.settle = settle
        self.tracked_max = tracked_max
        self._born: OrderedDict[str, float] = OrderedDict()  # paths created within the window
        # identity -> (when, the path it last arrived at)
        self._arrived: OrderedDict[tuple[str | int, ...], tuple[float, str]] = OrderedDict()
        self._lost: deque[tuple[float, str]] = deque()  # losses published within the window
        self.held: dict[str, Entry] = {}
        self._released: OrderedDict[str, float] = OrderedDict()  # judged and cleared: publish when presented
        self._last_loss = 0.0
        self.paused = ""  # why the held deletions wait for an operator ("" when they do not)

    # ---- what the guard is told
    def arrived(self, entries: Iterable[tuple[Entry, bool]], now: float) -> None:
        """Paths written (published locally or applied from a peer); `new` when the path was not live
        before. A held path written again is no longer a deletion. What fell out of the window is
        forgotten here too: a burst of arrivals with no deletion must not fill the memory up to the cap."""
        self._expire(now)
        for e, new in entries:
            if new:
                self._remember(self._born, e.path, now)
            for key in identities(e):
                self._remember(self._arrived, key, (now, e.path))
            self.held.pop(e.path, None)
            self._released.pop(e.path, None)

    def forget(self, paths: Iterable[str]) -> None:
        """Held paths settled otherwise (deleted by a peer too, or back on disk)."""
        for p in paths:
            self.held.pop(p, None)
            self._released.pop(p, None)

    # ---- decisions
    def judge(self, gone: list[Entry], now: float, accept: bool = False) -> Verdict:
        """Sort the deletions of one flush: publish now, or hold for the burst's judgement."""
        self._expire(now)
        v = Verdict()
        losses: list[Entry] = []
        for e in gone:
            if accept or self._released.pop(e.path, None) is not None:
                v.publish.add(e.path)
                v.reasons[e.path] = "released"
            elif self._born.pop(e.path, None) is not None:
                v.publish.add(e.path)
                v.reasons[e.path] = "churn"
            elif self._moved(e):
                v.publish.add(e.path)
                v.reasons[e.path] = "moved"
            elif e.path in self.held:
                v.hold.add(e.path)
                v.reasons[e.path] = "loss"
            else:
                losses.append(e)
        if not losses:
            return v
        burst = len(self._lost) + len(self.held) + len(losses)
        if not self.held and not self.paused and burst < self.min_files:
            for e in losses:
                self._lost.append((now, e.path))
                v.publish.add(e.path)
                v.reasons[e.path] = "loss"
            return v
        for e in losses:
            self.held[e.path] = e
            v.hold.add(e.path)
            v.reasons[e.path] = "loss"
        self._last_loss = now
        return v

    def _moved(self, e: Entry) -> bool:
        """Did the data of `e` arrive at another path in the window? That path then holds old data."""
        for key in identities(e):
            seen = self._arrived.get(key)
            if seen is not None and seen[1] != e.path:
                self._born.pop(seen[1], None)
                return True
        return False

    def due(self, now: float) -> float | None:
        """Seconds until the held burst is to be judged (0: now); None when nothing waits for a review."""
        if not self.held:
            return 0.0 if self.paused else None
        if self.paused:
            return 0.0  # re-judged on every review: paths written again may lift the pause
        return max(0.0, self._last_loss + self.settle - now)

    def baseline(self, live: int) -> int:
        """What the volume held before the window: the live paths now (held deletions are still live),
        less those created within it, plus the losses already published within it."""
        return max(0, live - len(self._born)) + len(self._lost)

    def review(self, now: float, live: Callable[[], int]) -> Review:
        """Judge the held burst once it has settled. `live` counts the volume's live paths (an index
        query, asked for only when the burst is large enough to matter)."""
        self._expire(now)
        due = self.due(now)
        if due is None or due > 0:
            return Review()
        moved = [p for p, e in self.held.items() if self._moved(e)]  # their new paths arrived meanwhile
        for p in moved:
            del self.held[p]
            self._remember(self._released, p, now)
        total = len(self._lost) + len(self.held)
        if self.held and total >= self.min_files:
            base = self.baseline(live())
            if crosses(total, base, self.min_files, self.threshold):
                if self.paused:
                    return Review(release=moved)
                self.paused = (f"{total} of {base} paths that existed before would be deleted within "
                               f"{self.window:.0f}s (more than {self.threshold:.0%}); these deletions are held, "
                               f"every other change keeps syncing")
                return Review(release=moved, paused=self.paused)
        lifted = bool(self.paused)
        self.paused = ""
        release = list(self.held)
        for p in release:
            self._lost.append((now, p))
            self._remember(self._released, p, now)
        self.held.clear()
        return Review(release=moved + release, lifted=lifted)

    def accept(self, now: float) -> list[str]:
        """The operator accepts the deletions: every held path is published when next presented."""
        release = list(self.held)
        for p in release:
            self._remember(self._released, p, now)
        self.held.clear()
        self.paused = ""
        return release

    def restore(self) -> None:
        """The operator restores from the cluster: the held deletions are dropped, never published."""
        self.held.clear()
        self._released.clear()
        self.paused = ""

    # ---- window bookkeeping
    def _remember(self, d: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        d.pop(key, None)
        d[key] = value
        while len(d) > self.tracked_max:
            d.popitem(last=False)

    def _expire(self, now: float) -> None:
        edge = now - self.window
        # Released paths never presented again (written back, or deleted by a peer too) expire as well.
        for d in (self._born, self._released):
            while d and next(iter(d.values())) < edge:
                d.popitem(last=False)
        while self._arrived and next(iter(self._arrived.values()))[0] < edge:
            self._arrived.popitem(last=False)
        while self._lost and self._lost[0][0] < edge:
            self._lost.popleft()

    def describe(self) -> dict[str, int | str]:
        """For the volume's status: what the guard holds and counts now."""
        return {"held_deletions": len(self.held), "losses_in_window": len(self._lost),
                "created_in_window": len(self._born)}
