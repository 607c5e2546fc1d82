"""Peer-to-peer chunk transfer over HTTP: the serving routes and a defensive fetching client.

Chunks are content-addressed, so the client never has to trust a peer: every chunk is verified
against its id, and a peer that serves wrong bytes, garbage or endless streams is treated as a
failed peer rather than a source of data.

Batch wire format (``POST /api/v1/chunks/{volume}/batch``), one record per requested id, in the
requested order::

    id (16 raw bytes) | status (u8: 0 = not held, 1 = found) | frame_len (u32 BE) | frame

A record with status 0 carries ``frame_len == 0`` and no frame. Frames are produced and parsed by
the ``encode_frame``/``decode_frame`` callables handed in by the caller (owned by the chunker).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from aiohttp import web

from .volopts import NAME_RE

log = logging.getLogger(__name__)

EncodeFrame = Callable[[bytes, bool], bytes]
DecodeFrame = Callable[[bytes, int], bytes]
Verify = Callable[[bytes, str], bool]
Authorize = Callable[[web.Request], Awaitable[None]]

CHUNK_ID_RE = re.compile(r"[0-9a-f]{32}")
VOLUME_MAX_LEN = 255

RECORD_HEADER = struct.Struct(">16sBI")
STATUS_MISSING = 0
STATUS_FOUND = 1
# Headroom a frame may add over the raw chunk: flag byte, stored size and slack.
FRAME_OVERHEAD = 64


def max_frame_size(max_chunk: int) -> int:
    """Largest frame a sane peer can send for a chunk of at most ``max_chunk`` bytes.

    lz4 expands incompressible input by up to n/255 + 16 bytes, so a flat +64 would reject
    legitimate compressed frames of random 1 MiB chunks; this is LZ4_compressBound plus headroom.
    """
    return max_chunk + max_chunk // 255 + 16 + FRAME_OVERHEAD


DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_BODY = 64 * 1024
# Above this size, (de)compression and hashing run in a worker thread so the event loop keeps serving.
OFFLOAD_THRESHOLD = 256 * 1024

_JSON_CT = "application/json"
_OCTET_CT = "application/octet-stream"


def is_valid_chunk_id(chunk_id: str) -> bool:
    """Ids go into URLs and become 16 raw bytes on the wire, so only canonical lowercase hex is allowed."""
    return isinstance(chunk_id, str) and CHUNK_ID_RE.fullmatch(chunk_id) is not None


def is_valid_volume(volume: str) -> bool:
    """Volume names go into URLs and storage paths; reject anything that could traverse or inject."""
    return (
        isinstance(volume, str) and len(volume) <= VOLUME_MAX_LEN and NAME_RE.fullmatch(volume) is not None
    )


# --------------------------------------------------------------------------------------------------
# Server side
# --------------------------------------------------------------------------------------------------


class ChunkSource(Protocol):
    """Where the server gets chunk bytes; the transfer layer frames whatever it returns."""

    async def read_chunk(self, volume: str, chunk_id: str) -> bytes | None:
        """Return the verified raw chunk, or None if this host does not hold it."""
        ...


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _parse_bool(value: str) -> bool | None:
    lowered = value.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    return None


async def _encode(encode_frame: EncodeFrame, data: bytes, compress: bool) -> bytes:
    """Compressing a 1 MiB chunk takes milliseconds; keep that off the event loop."""
    if len(data) >= OFFLOAD_THRESHOLD:
        return await asyncio.to_thread(encode_frame, data, compress)
    return encode_frame(data, compress)


async def _read_capped_body(request: web.Request, cap: int) -> bytes | None:
    """Read a request body but give up past ``cap`` bytes, so a peer cannot make us buffer unbounded input."""
    if request.content_length is not None and request.content_length > cap:
        return None
    buf = bytearray()
    async for piece in request.content.iter_any():
        buf += piece
        if len(buf) > cap:
            return None
    return bytes(buf)


def add_routes(
    app: web.Application,
    source: ChunkSource,
    *,
    encode_frame: EncodeFrame,
    compress_default: bool,
    max_batch: int = DEFAULT_MAX_BATCH,
    authorize: Authorize | None = None,
    max_body: int = DEFAULT_MAX_BODY,
) -> None:
    """Register the chunk-serving endpoints on ``app``.

    ``authorize`` runs before anything else on every request and may raise ``web.HTTPException``
    (typically ``HTTPUnauthorized``) to reject it.
    """

    async def get_chunk(request: web.Request) -> web.StreamResponse:
        if authorize is not None:
            await authorize(request)
        volume = request.match_info["volume"]
        chunk_id = request.match_info["chunk_id"]
        if not is_valid_volume(volume):
            return _error(400, "malformed volume name")
        if not is_valid_chunk_id(chunk_id):
            return _error(400, "malformed chunk id")
        compress = compress_default
        if "compress" in request.query:
            parsed = _parse_bool(request.query["compress"])
            if parsed is None:
                return _error(400, "compress must be a boolean")
            compress = parsed
        try:
            data = await source.read_chunk(volume, chunk_id)
        except Exception:
            log.exception("reading chunk %s of volume %s failed", chunk_id, volume)
            return _error(500, "chunk read failed")
        if data is None:
            return _error(404, "chunk not held")
        frame = await _encode(encode_frame, data, compress)
        return web.Response(body=frame, content_type=_OCTET_CT)

    async def post_batch(request: web.Request) -> web.StreamResponse:
        if authorize is not None:
            await authorize(request)
        volume = request.match_info["volume"]
        if not is_valid_volume(volume):
            return _error(400, "malformed volume name")
        body = await _read_capped_body(request, max_body)
        if body is None:
            return _error(413, f"request body exceeds {max_body} bytes")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[..." nested too deep
            return _error(400, "body is not valid JSON")
        if not isinstance(payload, dict) or not isinstance(payload.get("ids"), list):
            return _error(400, "body must be an object with an 'ids' list")
        ids: list[str] = payload["ids"]
        if len(ids) > max_batch:
            return _error(400, f"at most {max_batch} ids per batch")
        if not all(is_valid_chunk_id(cid) for cid in ids):
            return _error(400, "malformed chunk id")
        compress = payload.get("compress", compress_default)
        if not isinstance(compress, bool):
            return _error(400, "compress must be a boolean")

        response = web.StreamResponse(status=200, headers={"Content-Type": _OCTET_CT})
        await response.prepare(request)
        for chunk_id in ids:
            raw_id = bytes.fromhex(chunk_id)
            try:
                data = await source.read_chunk(volume, chunk_id)
            except Exception:
                # One unreadable chunk must not sink the batch; the client fetches it elsewhere.
                log.exception("reading chunk %s of volume %s failed", chunk_id, volume)
                data = None
            if data is None:
                await response.write(RECORD_HEADER.pack(raw_id, STATUS_MISSING, 0))
                continue
            frame = await _encode(encode_frame, data, compress)
            await response.write(RECORD_HEADER.pack(raw_id, STATUS_FOUND, len(frame)))
            await response.write(frame)
        await response.write_eof()
        return response

    app.router.add_get("/api/v1/chunks/{volume}/{chunk_id}", get_chunk)
    app.router.add_post("/api/v1/chunks/{volume}/batch", post_batch)


# --------------------------------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------------------------------


@dataclass
class TransferMetrics:
    """Plain counters so callers can export them however they like (no prometheus dependency here)."""

    bytes_received: int = 0
    chunks_received: int = 0
    corrupt: int = 0
    failures: int = 0
    requests: int = 0
    retries: int = 0
    breaker_skips: int = 0


CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


@dataclass
class _Breaker:
    """Per-peer circuit breaker so a sick peer stops costing every batch a timeout."""

    threshold: int
    reset_after: float
    state: str = CLOSED
    failures: int = 0
    opened_at: float = 0.0
    trial_in_flight: bool = False

    def current(self, now: float) -> str:
        if self.state == OPEN and now - self.opened_at >= self.reset_after:
            self.state = HALF_OPEN
            self.trial_in_flight = False
        return self.state

    def try_acquire(self, now: float) -> bool:
        """Whether a request may go to this peer now; in half-open only one trial at a time."""
        state = self.current(now)
        if state == CLOSED:
            return True
        if state == OPEN or self.trial_in_flight:
            return False
        self.trial_in_flight = True
        return True

    def record_success(self) -> None:
        self.state = CLOSED
        self.failures = 0
        self.trial_in_flight = False

    def record_failure(self, now: float, trip: bool = False) -> None:
        """Count a failure; `trip` opens the breaker at once (a peer that stopped answering)."""
        self.failures += 1
        was_trial = self.state == HALF_OPEN
        self.trial_in_flight = False
        if was_trial or trip or self.failures >= self.threshold:
            self.state = OPEN
            self.opened_at = now

    def release(self) -> None:
        """Give back a half-open trial that ended without a verdict (e.g. cancellation)."""
        self.trial_in_flight = False


class _ProtocolError(Exception):
    """The peer violated the wire format; retrying the same peer is pointless."""


class _RetryableError(Exception):
    """A 5xx: the peer may recover, so it is worth retrying with backoff."""


class _RejectedError(Exception):
    """A non-retryable HTTP status (e.g. 401/403/400) from the peer."""


@dataclass
class _Attempt:
    """What one HTTP request to one peer yielded; partial results survive a broken stream."""

    found: dict[str, bytes] = field(default_factory=dict)
    rejected: set[str] = field(default_factory=set)  # not held or corrupt: ask the next peer
    corrupt: int = 0
    error: BaseException | None = None
    retryable: bool = False


_TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.IncompleteReadError, OSError, TimeoutError)


class PeerClient:
    """Fetches chunks from peers in preference order, verifying every byte and routing around bad peers.

    Results are held in memory until ``fetch`` returns, so callers should bound the ids per call.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        decode_frame: DecodeFrame,
        verify: Verify,
        retries: int = 3,
        backoff: float = 0.05,
        backoff_max: float = 2.0,
        breaker_threshold: int = 5,
        breaker_reset: float = 10.0,
        request_timeout: float = 30.0,
        max_chunk: int = 1024 * 1024,
        metrics: TransferMetrics | None = None,
        batch_size: int = DEFAULT_MAX_BATCH,
        per_peer_concurrency: int = 4,
    ) -> None:
        if batch_size < 1 or per_peer_concurrency < 1 or retries < 0 or breaker_threshold < 1:
            raise ValueError("batch_size, per_peer_concurrency, breaker_threshold must be >= 1; retries >= 0")
        self._session = session
        self._decode_frame = decode_frame
        self._verify = verify
        self._retries = retries
        self._backoff = backoff
        self._backoff_max = backoff_max
        self._breaker_threshold = breaker_threshold
        self._breaker_reset = breaker_reset
        self._request_timeout = request_timeout
        self._max_chunk = max_chunk
        self._max_frame = max_frame_size(max_chunk)
        self._batch_size = batch_size
        self._per_peer_concurrency = per_peer_concurrency
        self.metrics = metrics if metrics is not None else TransferMetrics()
        self._breakers: dict[str, _Breaker] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}

    # -- public ------------------------------------------------------------------------------------

    def forget_failures(self, peer: str) -> None:
        """The peer came back (a new process): its past failures say nothing about it now."""
        self._breakers.pop(_normalize_peer(peer), None)

    def breaker_state(self, peer: str) -> str:
        """'closed', 'open' or 'half-open' for ``peer`` (unknown peers are closed)."""
        breaker = self._breakers.get(_normalize_peer(peer))
        return CLOSED if breaker is None else breaker.current(time.monotonic())

    async def fetch(
        self, volume: str, ids: list[str], peers: list[str], *, compress: bool = True
    ) -> dict[str, bytes]:
        """Return verified bytes for every id obtainable from ``peers``; unobtainable ids are absent.

        Malformed ids or volume names raise ValueError: they are caller bugs, not peer failures.
        """
        if not is_valid_volume(volume):
            raise ValueError(f"malformed volume name: {volume!r}")
        bad = [cid for cid in ids if not is_valid_chunk_id(cid)]
        if bad:
            raise ValueError(f"malformed chunk ids: {bad[:5]!r}")
        unique = list(dict.fromkeys(ids))
        ordered_peers = list(dict.fromkeys(_normalize_peer(p) for p in peers))
        result: dict[str, bytes] = {}
        if not unique or not ordered_peers:
            return result
        batches = [unique[i : i + self._batch_size] for i in range(0, len(unique), self._batch_size)]
        await asyncio.gather(
            *(self._fetch_batch(volume, batch, ordered_peers, compress, result) for batch in batches)
        )
        return result

    # -- per batch / per peer ----------------------------------------------------------------------

    async def _fetch_batch(
        self, volume: str, batch: list[str], peers: list[str], compress: bool, result: dict[str, bytes]
    ) -> None:
        pending = batch
        for peer in peers:
            if not pending:
                return
            pending = await self._fetch_from_peer(volume, pending, peer, compress, result)
        if pending:
            log.debug("%d chunk(s) of volume %s unavailable from all peers", len(pending), volume)

    async def _fetch_from_peer(
        self, volume: str, ids: list[str], peer: str, compress: bool, result: dict[str, bytes]
    ) -> list[str]:
        """Try one peer (with retries); return the ids still missing afterwards."""
        remaining = list(ids)
        passed_on: list[str] = []
        attempt_no = 0
        while remaining:
            attempt = await self._guarded_attempt(peer, volume, remaining, compress)
            if attempt is None:
                self.metrics.breaker_skips += 1
                break
            result.update(attempt.found)
            passed_on.extend(attempt.rejected)
            remaining = [cid for cid in remaining if cid not in attempt.found and cid not in attempt.rejected]
            if attempt.error is None or not remaining:
                break
            if not attempt.retryable or attempt_no >= self._retries:
                log.warning("peer %s failed for volume %s: %s", peer, volume, _describe(attempt.error))
                break
            delay = random.uniform(0.0, min(self._backoff_max, self._backoff * (2**attempt_no)))
            attempt_no += 1
            self.metrics.retries += 1
            log.debug("retrying peer %s in %.3fs after: %s", peer, delay, _describe(attempt.error))
            await asyncio.sleep(delay)
        return passed_on + remaining

    async def _guarded_attempt(
        self, peer: str, volume: str, ids: list[str], compress: bool
    ) -> _Attempt | None:
        """One request under the peer's concurrency limit and breaker; None if the breaker says skip."""
        breaker = self._breaker(peer)
        slots = self._slots.get(peer)
        if slots is None:
            slots = self._slots[peer] = asyncio.Semaphore(self._per_peer_concurrency)
        async with slots:
            # Checked after getting a slot: the breaker may have opened while we queued.
            if not breaker.try_acquire(time.monotonic()):
                return None
            settled = False
            try:
                attempt = await self._attempt(peer, volume, ids, compress)
                if attempt.error is not None or attempt.corrupt > 0:
                    self.metrics.failures += 1
                    # Silence (a timeout) opens the breaker at once: every later wave would otherwise
                    # wait out its own timeout on a frozen peer before the threshold is reached.
                    breaker.record_failure(time.monotonic(), trip=isinstance(attempt.error, TimeoutError))
                else:
                    breaker.record_success()
                settled = True
            finally:
                if not settled:
                    breaker.release()
        return attempt

    def _breaker(self, peer: str) -> _Breaker:
        breaker = self._breakers.get(peer)
        if breaker is None:
            breaker = _Breaker(self._breaker_threshold, self._breaker_reset)
            self._breakers[peer] = breaker
        return breaker

    # -- one HTTP request --------------------------------------------------------------------------

    async def _attempt(self, peer: str, volume: str, ids: list[str], compress: bool) -> _Attempt:
        attempt = _Attempt()
        self.metrics.requests += 1
        try:
            # asyncio.timeout bounds the whole exchange, including a body that trickles forever.
            async with asyncio.timeout(self._request_timeout):
                if len(ids) == 1:
                    await self._get_single(peer, volume, ids[0], compress, attempt)
                else:
                    await self._post_batch(peer, volume, ids, compress, attempt)
        except _RetryableError as exc:
            attempt.error, attempt.retryable = exc, True
        except (_ProtocolError, _RejectedError) as exc:
            attempt.error, attempt.retryable = exc, False
        except TimeoutError as exc:
            # A peer that accepted the request and then said nothing (frozen, swapping, a half-open
            # link): asking it again at once would only cost another timeout while the caller's
            # other changes wait. The next peer is tried; the caller defers and retries later, and
            # the peer's breaker opens (see _guarded_attempt) until a trial request gets an answer.
            attempt.error, attempt.retryable = exc, False
        except _TRANSPORT_ERRORS as exc:
            attempt.error, attempt.retryable = exc, True
        return attempt

    def _timeout(self) -> aiohttp.ClientTimeout:
        # A frozen peer (stopped process, dead host behind a live socket) accepts connections but never
        # answers: give up on it after a few idle seconds, not after the whole request timeout.
        return aiohttp.ClientTimeout(total=self._request_timeout, sock_connect=3.0, sock_read=5.0)

    @staticmethod
    def _check_status(peer: str, status: int) -> None:
        if status >= 500:
            raise _RetryableError(f"HTTP {status} from {peer}")
        if status != 200:
            raise _RejectedError(f"HTTP {status} from {peer}")

    async def _get_single(
        self, peer: str, volume: str, chunk_id: str, compress: bool, attempt: _Attempt
    ) -> None:
        url = f"{peer}/api/v1/chunks/{volume}/{chunk_id}"
        params = {"compress": "1" if compress else "0"}
        async with self._session.get(url, params=params, timeout=self._timeout()) as resp:
            if resp.status == 404:
                attempt.rejected.add(chunk_id)
                return
            self._check_status(peer, resp.status)
            if resp.content_length is not None and resp.content_length > self._max_frame:
                raise _ProtocolError(f"frame of {resp.content_length} bytes exceeds {self._max_frame}")
            frame = bytearray()
            async for piece in resp.content.iter_any():
                frame += piece
                if len(frame) > self._max_frame:
                    raise _ProtocolError(f"frame exceeds {self._max_frame} bytes")
            await self._accept(peer, chunk_id, bytes(frame), attempt)

    async def _post_batch(
        self, peer: str, volume: str, ids: list[str], compress: bool, attempt: _Attempt
    ) -> None:
        url = f"{peer}/api/v1/chunks/{volume}/batch"
        body = {"ids": ids, "compress": compress}
        async with self._session.post(url, json=body, timeout=self._timeout()) as resp:
            self._check_status(peer, resp.status)
            expected = set(ids)
            seen: set[str] = set()
            # Exactly one record per requested id: whatever a peer sends beyond that is never read.
            for _ in range(len(ids)):
                header = await resp.content.readexactly(RECORD_HEADER.size)
                raw_id, status, frame_len = RECORD_HEADER.unpack(header)
                chunk_id = raw_id.hex()
                if chunk_id not in expected or chunk_id in seen:
                    raise _ProtocolError(f"unrequested or repeated chunk id {chunk_id}")
                seen.add(chunk_id)
                if status == STATUS_MISSING:
                    if frame_len != 0:
                        raise _ProtocolError("not-found record carries a frame")
                    attempt.rejected.add(chunk_id)
                    continue
                if status != STATUS_FOUND:
                    raise _ProtocolError(f"unknown record status {status}")
                if frame_len > self._max_frame:
                    raise _ProtocolError(f"frame of {frame_len} bytes exceeds {self._max_frame}")
                frame = await resp.content.readexactly(frame_len)
                await self._accept(peer, chunk_id, frame, attempt)
            # Drain to EOF so the connection can be reused; trailing bytes are a protocol violation.
            if await resp.content.read(1):
                raise _ProtocolError("data after the last record")

    async def _accept(self, peer: str, chunk_id: str, frame: bytes, attempt: _Attempt) -> None:
        """Decode and verify one frame; a peer's bytes are only believed if they hash to the id."""
        self.metrics.bytes_received += len(frame)
        if len(frame) >= OFFLOAD_THRESHOLD:
            data = await asyncio.to_thread(self._decode_and_verify, frame, chunk_id)
        else:
            data = self._decode_and_verify(frame, chunk_id)
        if data is None:
            attempt.corrupt += 1
            attempt.rejected.add(chunk_id)
            self.metrics.corrupt += 1
            log.warning("peer %s served corrupt data for chunk %s; not believed", peer, chunk_id)
            return
        attempt.found[chunk_id] = data
        self.metrics.chunks_received += 1

    def _decode_and_verify(self, frame: bytes, chunk_id: str) -> bytes | None:
        try:
            data = self._decode_frame(frame, self._max_chunk)
        except ValueError:
            return None
        if len(data) > self._max_chunk or not self._verify(data, chunk_id):
            return None
        return data


def _normalize_peer(peer: str) -> str:
    return peer.rstrip("/")


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no error"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
