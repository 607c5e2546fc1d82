"""In-process event bus: what the engine and the daemon report, for /api/v1/events and the status page.

Bounded everywhere: a ring buffer of the most recent events (replayed to new subscribers, and from a
`Last-Event-ID`), and one bounded queue per subscriber. A subscriber that does not keep up loses its
oldest undelivered events (counted, and reported to it as a `dropped` event), never slows the
publisher and never grows memory. `publish` is synchronous and cheap: it is called from the sync
engine's hot path (once per published or applied batch, never once per file).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

KINDS = ("published", "applied", "conflict", "volume_ready", "peer_up", "peer_down", "resync", "dropped")


class Subscription:
    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self.bus = bus
        self.queue: deque[dict[str, Any]] = deque()
        self.maxsize = maxsize
        self.dropped = 0
        self._wake = asyncio.Event()
        self.closed = False

    def _push(self, ev: dict[str, Any]) -> None:
        if len(self.queue) >= self.maxsize:
            self.queue.popleft()  # drop-oldest: a slow reader sees the latest state, not stale history
            self.dropped += 1
        self.queue.append(ev)
        self._wake.set()

    async def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, or None after `timeout` seconds without one."""
        while not self.queue:
            if self.closed:
                return None
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                return None
        if self.dropped:
            n, self.dropped = self.dropped, 0
            return {"id": 0, "kind": "dropped", "ts": time.time(), "node": self.bus.node, "data": {"count": n}}
        return self.queue.popleft()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.bus._subs.discard(self)
            self._wake.set()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        while not self.closed:
            ev = await self.get()
            if ev is not None:
                yield ev


class EventBus:
    def __init__(self, node: str, history: int = 1000, queue_size: int = 1000) -> None:
        self.node = node
        self.history: deque[dict[str, Any]] = deque(maxlen=history)
        self.queue_size = queue_size
        self._ids = itertools.count(1)
        self._subs: set[Subscription] = set()
        self.counts: dict[str, int] = {}

    def publish(self, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        ev = {"id": next(self._ids), "kind": kind, "ts": time.time(), "node": self.node, "data": data}
        self.history.append(ev)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        for s in list(self._subs):
            s._push(ev)
        return ev

    def recent(self, limit: int = 100, since: int = 0, kinds: set[str] | None = None) -> list[dict[str, Any]]:
        """Events after id `since` (oldest first), at most `limit` of the newest."""
        out = [e for e in self.history if e["id"] > since and (not kinds or e["kind"] in kinds)]
        return out[-limit:] if limit > 0 else []

    def subscribe(self, since: int | None = None, backlog: int = 0) -> Subscription:
        """A new subscriber; replays events after `since` (or the last `backlog` events) first."""
        s = Subscription(self, self.queue_size)
        if since is not None:
            for ev in self.recent(self.queue_size, since):
                s._push(ev)
        elif backlog:
            for ev in self.recent(backlog):
                s._push(ev)
        self._subs.add(s)
        return s

    def close(self) -> None:
        """Shutting down: end every subscription (open /api/v1/events streams return)."""
        for s in list(self._subs):
            s.close()

    @property
    def subscribers(self) -> int:
        return len(self._subs)
