"""Follow stage: the etcd watch (or a full range read) becomes remote changes to apply; deferred ones are retried."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING

from .. import localfs, metrics
from ..manifest import ManifestError, decode
from ..meta import EtcdUnavailable, ResyncRequired, WatchEvent, WatchInterrupted
from ..pathsafe import PathError, is_internal_name, validate_relpath
from .apply import APPLY_PAGE
from .decide import depth, differs
from .fetch import FetchError
from .pending import Pending
from .roles import accepted_origin
from .stage import Stage

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

DEFER_MAX = 5000  # remote changes waiting for unavailable chunks before the watch is no longer read
REFRESH_MAX = 256  # deferred items re-read from etcd before a retry (see Follower.refreshed)


class Follower(Stage):
    """Reads the etcd watch (or a full range read) into remote changes, and retries deferred ones."""

    async def run(self) -> None:
        backoff = 0.2
        rewatch = False  # only the watch broke: follow on from the stored revision, no rescan needed
        while not self.vol.stopping:
            await self.ctx.etcd_ready.wait()
            try:
                rev = self.state.revision(self.name)
                if rev == 0 or not self.state.is_synced(self.name):
                    rev = await self.reconcile()
                elif not rewatch:
                    await self.vol.scanner.rescan("restart")
                rewatch = False
                target = await self.store.latest_revision(self.name)
                if rev >= target:
                    self.vol.mark_ready()
                await self.follow(rev, target)
            except ResyncRequired as exc:
                log.warning("volume %s: %s; reconciling from a full read", self.name, exc)
                self.state.set_synced(self.name, False)
                continue
            except WatchInterrupted as exc:
                log.info("volume %s: %s; following on from revision %d", self.name, exc,
                         self.state.revision(self.name))
                rewatch = True
                continue
            except (EtcdUnavailable, FetchError) as exc:
                self.vol.status.last_error = str(exc)
                log.warning("volume %s: %s; retrying", self.name, exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep syncing other volumes; report and retry this one
                self.vol.status.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("volume %s: sync loop failed; retrying", self.name)
            if self.vol.watcher is None and not self.vol.stopping:
                self.vol.scanner.start_watcher()  # the first copy is stuck: local writes must not wait for it
            await asyncio.sleep(backoff + random.random() * backoff)
            backoff = min(backoff * 2, 5.0)

    async def follow(self, rev: int, ready_at: int) -> None:
        async for batch in self.store.watch_files(self.name, rev + 1):
            if self.vol.root_problem:
                await self.vol.unpaused.wait()
            while len(self.vol.deferred) >= DEFER_MAX:
                # Back-pressure: peers cannot serve what we need; stop reading the watch (gRPC flow
                # control holds the rest in etcd) until retries drain the backlog.
                self.vol.drained.clear()
                await self.vol.drained.wait()
            if batch.events:
                # Filtered against the index without the lock (_unseen); _apply checks again under it.
                items = [p for ev in self.unseen(batch.events)
                         if (p := self.parse(ev.key, ev.value or b"", ev.mod_revision)) is not None]
                if items:
                    async with self.vol.lock:
                        await self.vol.applier.apply(items)
            safe = batch.revision
            if self.vol.deferred:
                safe = min(safe, min(p.rev for p in self.vol.deferred.values()) - 1)
            self.state.set_revision(self.name, safe)
            self.vol.status.revision = batch.revision
            self.vol.status.last_error = ""
            if batch.revision >= ready_at:
                self.vol.mark_ready()

    def unseen(self, events: list[WatchEvent]) -> list[WatchEvent]:
        """The events the index does not have yet, before any is decoded: while this node publishes a
        big tree, nearly every event is its own publish coming back, and decoding each would cost the
        publisher as much CPU again as encoding it."""
        latest: dict[str, WatchEvent] = {}
        for ev in events:
            if ev.value is None:
                continue  # keys are only deleted when the volume is removed
            rel = self.store.path_of(self.name, ev.key)
            cur = latest.get(rel)
            if cur is None or ev.mod_revision > cur.mod_revision:
                latest[rel] = ev
        known = self.state.revisions_for(self.name, latest)
        out = []
        for rel, ev in latest.items():
            if known.get(rel, 0) >= ev.mod_revision:
                old = self.vol.deferred.get(rel)
                if old is not None and old.rev <= ev.mod_revision:
                    del self.vol.deferred[rel]  # superseded by a version already in the index
                continue
            out.append(ev)
        return out

    def parse(self, key: bytes, value: bytes, rev: int) -> Pending | None:
        rel = self.store.path_of(self.name, key)
        try:
            validate_relpath(rel)
            if is_internal_name(rel):
                raise PathError("internal temp name")
            m = decode(value)
        except (PathError, ManifestError) as exc:
            metrics.rejected_input.labels("etcd").inc()
            log.warning("volume %s: rejected manifest for %r at revision %d: %s", self.name, rel[:200], rev, exc)
            return None
        if self.vol.ignored(rel, m.kind == "dir"):
            return None
        if not accepted_origin(m.origin, self.vol.options.writers):
            metrics.rejected_input.labels("writer").inc()
            log.warning("volume %s: ignored %r at revision %d: published by %s, not one of the volume's writers (%s)",
                        self.name, rel[:200], rev, m.origin[:100] or "?", ",".join(self.vol.options.writers))
            return None
        return Pending(rel, m, rev)

    async def reconcile(self) -> int:
        """Full agreement with etcd from a range read: first attach, or history compacted away.

        Streamed: pages of manifests are applied as they arrive, the paths seen are kept in a scratch
        table on disk, then a per-directory rescan publishes what only this node has. Memory follows
        the page size and the widest directory, not the size of the volume."""
        store = self.store
        await self.vol.unpaused.wait()
        async with self.vol.lock:
            rev, pages = await store.read_files(self.name, page=APPLY_PAGE)
            self.state.begin_seen()
            async for page in pages:
                items = []
                names = []
                for kv in page:
                    names.append(store.path_of(self.name, kv.key))
                    p = self.parse(kv.key, kv.value, kv.mod_revision)
                    if p is not None:
                        items.append(p)
                self.state.add_seen(names)
                await self.vol.applier.apply(items)
                if len(self.vol.deferred) >= DEFER_MAX:
                    # Peers cannot serve what we need: stop here with memory bounded; the whole reconcile
                    # runs again later (what was applied is skipped then) and the revision is not advanced.
                    self.vol.deferred.clear()
                    raise FetchError(f"{DEFER_MAX} changes wait for chunks no reachable peer has")
            horizon = await store.gc_horizon(self.name)
            # Index entries etcd no longer has: deleted elsewhere while we were away and their tombstones
            # already collected (delete them here, unless changed since), or never published (publish).
            removed = 0
            for batch in self.state.unseen_files(self.name):
                found = await asyncio.to_thread(localfs.lstat_many, self.root, [r.path for r in batch])
                stats = [found[r.path] for r in batch]
                collected = sorted((r.path for r, fs in zip(batch, stats, strict=True)
                                    if fs is not None and 0 < r.rev <= horizon and not differs(r, fs)),
                                   key=depth, reverse=True)
                kept = set(await asyncio.to_thread(
                    lambda c: [p for p in c if not localfs.remove(self.root, p)], collected))
                gone = [r.path for r, fs in zip(batch, stats, strict=True)
                        if fs is None or (r.path in collected and r.path not in kept)]
                self.state.delete_files(self.name, gone)
                removed += len(gone)
                self.vol.dirty.update(r.path for r, fs in zip(batch, stats, strict=True)
                                  if fs is not None and r.path not in collected)
            if removed:
                log.info("volume %s: %d index entries no longer in etcd dropped (tombstones collected while this "
                         "node was away are deleted here)", self.name, removed, extra={"volume": self.name})
            self.state.set_revision(self.name, rev)
        if self.vol.watcher is None and not self.vol.stopping:
            self.vol.scanner.start_watcher()  # before the rescan, so nothing written from now on is missed
        # Whatever exists only here (not in the index now) is published.
        await self.vol.scanner.rescan("reconcile")
        return rev

    async def retry_loop(self) -> None:
        delay = 1.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.vol.retry_now.wait(), delay)  # a peer came back: retry at once
            self.vol.retry_now.clear()
            if len(self.vol.deferred) < DEFER_MAX // 2:
                self.vol.drained.set()
            if not self.vol.deferred or not self.ctx.etcd_ready.is_set():
                delay = 1.0
                continue
            async with self.vol.lock:
                items, self.vol.deferred = list(self.vol.deferred.values()), {}
                try:
                    items = await self.refreshed(items)
                    await self.vol.applier.apply(items)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # never let the retry loop die: these items would wait forever
                    if not isinstance(exc, EtcdUnavailable):
                        log.exception("volume %s: retrying %d deferred change(s) failed; will retry", self.name,
                                      len(items))
                    for it in items:
                        self.vol.deferred.setdefault(it.rel, it)
            delay = min(delay * 2, 15.0) if self.vol.deferred else 1.0
            if len(self.vol.deferred) < DEFER_MAX // 2:
                self.vol.drained.set()
            self.vol.check_complete()

    async def refreshed(self, items: list[Pending]) -> list[Pending]:
        """Deferred items replaced by the version etcd holds now, when it is newer: a node must never keep
        chasing chunks of a version that every peer has since overwritten. (Bounded: large backlogs are
        mostly new files, refreshed by the watch itself.)"""
        if len(items) > REFRESH_MAX:
            return items
        out = []
        for it in items:
            kv = await self.store.get_file(self.name, it.rel)
            fresh = self.parse(kv.key, kv.value, kv.mod_revision) if kv is not None else None
            out.append(fresh if fresh is not None and fresh.rev > it.rev else it)
        return out
