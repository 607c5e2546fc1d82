"""Fetch stage: the chunks a change needs, found in local files (verified) or fetched from peers."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from .. import chunker, localfs, metrics
from ..manifest import Manifest, ManifestError, parse_chunk_list
from ..state import BLOB_PREFIX
from .pending import Pending
from .stage import Stage

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class FetchError(RuntimeError):
    """Some chunks could not be had from any peer: the change stays pending and is retried."""


class Fetcher(Stage):
    """Gets the chunks a change needs: local files first (verified), then peers."""

    async def resolve_blob(self, it: Pending) -> None:
        """Fetch, verify and parse the chunk list of a manifest that carries it as a blob."""
        m = it.m
        got, _ = await self.gather([Pending(it.rel, Manifest(kind="file", chunks=m.blob, origin=m.origin), it.rev)],
                                    m.origin)
        data = b"".join(got[cid] for cid, _ in m.blob)
        if chunker.chunk_id(data) != m.blob_digest:
            raise ManifestError("chunk-list blob does not match its digest")
        m.chunks = parse_chunk_list(data, m.size)
        blob_id, chunks = await asyncio.to_thread(localfs.write_blob, self.vol.base, data)
        self.state.put_blob(self.name, blob_id, chunks)

    def locations(self, ids: set[str]) -> dict[str, list[tuple[str, str, int, int]]]:
        return {cid: self.state.chunk_locations(cid) for cid in ids}

    def read_local(self, cid: str, length: int, locs: dict[str, list[tuple[str, str, int, int]]]) -> bytes | None:
        for vol, path, off, ln in locs.get(cid, ()):
            if ln != length:
                continue
            base = os.path.join(self.ctx.data_root, "volumes", vol)
            if path.startswith(BLOB_PREFIX):
                data = localfs.read_blob_range(base, path[len(BLOB_PREFIX):], off, ln)
            else:
                data = localfs.read_range(os.path.join(base, "_data"), path, off, ln)
            if data is not None and chunker.verify(data, cid):
                return data
        return None

    async def gather(self, wave: list[Pending], origin_hint: str,
                      lacking_out: set[str] | None = None) -> tuple[dict[str, bytes], dict[str, list]]:
        """Chunks for a wave: found locally (verified) or fetched from peers (verified by the client).
        Chunks no peer could serve raise FetchError, or with `lacking_out` are added to it."""
        need: dict[str, int] = {}
        for it in wave:
            if it.m.kind == "file" and it.m.inline is None:
                for cid, length in it.m.chunks:
                    need[cid] = length
        locs = self.locations(set(need))
        local_hits = await asyncio.to_thread(
            lambda: {cid: d for cid, ln in need.items() if (d := self.read_local(cid, ln, locs)) is not None})
        missing = [cid for cid in need if cid not in local_hits]
        got: dict[str, bytes] = dict(local_hits)
        metrics.bytes_reused.inc(sum(len(d) for d in local_hits.values()))
        if missing:
            t0 = time.monotonic()
            peers = await self.ctx.peers(self.name, origin_hint, False)
            fetched = await self.fetch_unlocked(missing, peers) if peers else {}
            metrics.chunk_fetch_seconds.observe(time.monotonic() - t0)
            got.update(fetched)
            lacking = [cid for cid in missing if cid not in fetched]
            if lacking and lacking_out is not None:
                lacking_out.update(lacking)
            elif lacking:
                raise FetchError(f"{len(lacking)} chunk(s) of volume {self.name} not available from any peer "
                                 f"({', '.join(peers) or 'no peers'})")
        return got, locs

    async def fetch_unlocked(self, ids: list[str], peers: list[str]) -> dict[str, bytes]:
        """Fetch chunks without holding the volume lock: a slow or frozen peer must not stop this
        node from publishing its own changes or applying others meanwhile. Safe because nothing is
        renamed into place before `_commit` re-checks the target against what it saw before."""
        held = self.vol.lock.locked()
        if held:
            self.vol.lock.release()
        try:
            return await self.ctx.fetch(self.name, ids, peers)
        finally:
            if held:
                await self.vol.lock.acquire()
