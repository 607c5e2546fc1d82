"""Tests for syncmesh_plugin.transfer against real aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
import lz4.block
import pytest
import pytest_asyncio
import xxhash
from aiohttp import web

from syncmesh_plugin.transfer import (
    RECORD_HEADER,
    STATUS_FOUND,
    STATUS_MISSING,
    PeerClient,
    TransferMetrics,
    add_routes,
)

pytestmark = pytest.mark.asyncio

VOLUME = "vol-1"
MiB = 1024 * 1024


# -- local stand-ins for chunker.py's frame codec and id function ------------------------------------


def parse_batch(payload: bytes) -> list[tuple[str, int, bytes]]:
    """A complete batch body as (id, status, frame) records; the wire format of transfer's docstring."""
    records: list[tuple[str, int, bytes]] = []
    offset = 0
    while offset < len(payload):
        assert len(payload) - offset >= RECORD_HEADER.size, "truncated record header"
        raw_id, status, frame_len = RECORD_HEADER.unpack_from(payload, offset)
        offset += RECORD_HEADER.size
        assert offset + frame_len <= len(payload), "truncated frame"
        records.append((raw_id.hex(), status, payload[offset : offset + frame_len]))
        offset += frame_len
    return records


def chunk_id(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def encode_frame(data: bytes, compress: bool) -> bytes:
    if compress:
        return b"\x01" + lz4.block.compress(data, store_size=True)
    return b"\x00" + data


def decode_frame(frame: bytes, max_size: int) -> bytes:
    if not frame:
        raise ValueError("empty frame")
    flag, body = frame[0], frame[1:]
    if flag == 0:
        if len(body) > max_size:
            raise ValueError("raw frame too large")
        return bytes(body)
    if flag == 1:
        if len(body) < 4 or int.from_bytes(body[:4], "little") > max_size:
            raise ValueError("bad lz4 size")
        try:
            return lz4.block.decompress(body)
        except lz4.block.LZ4BlockError as exc:
            raise ValueError(str(exc)) from exc
    raise ValueError(f"unknown frame flag {flag}")


def verify(data: bytes, cid: str) -> bool:
    return chunk_id(data) == cid


class DictSource:
    """A ChunkSource backed by a dict; ``corrupt`` makes it lie about content like a broken peer."""

    def __init__(self, chunks: dict[str, bytes], *, corrupt: bool = False, delay: float = 0.0) -> None:
        self.chunks = chunks
        self.corrupt = corrupt
        self.delay = delay
        self.reads = 0
        self.active = 0
        self.max_active = 0

    async def read_chunk(self, volume: str, cid: str) -> bytes | None:
        self.reads += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
        if volume != VOLUME:
            return None
        data = self.chunks.get(cid)
        if data is not None and self.corrupt:
            return b"X" + data[1:]
        return data


def make_chunks(n: int, size: int, *, compressible: bool) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for i in range(n):
        if compressible:
            data = (f"chunk {i} ".encode() * (size // 8 + 1))[:size]
        else:
            data = os.urandom(size)
        out[chunk_id(data)] = data
    return out


# -- server helpers -----------------------------------------------------------------------------------


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def chunk_app(source: DictSource, **kwargs: object) -> web.Application:
    app = web.Application()
    kwargs.setdefault("compress_default", True)
    add_routes(app, source, encode_frame=encode_frame, **kwargs)  # type: ignore[arg-type]
    return app


def handler_app(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.Application:
    """An app answering every chunk request with ``handler``: for faulty and hostile peers."""
    app = web.Application()
    app.router.add_route("*", "/api/v1/chunks/{volume}/{tail}", handler)
    return app


def dead_peer() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def client(session: aiohttp.ClientSession, **kwargs: object) -> PeerClient:
    kwargs.setdefault("backoff", 0.01)
    kwargs.setdefault("request_timeout", 5.0)
    return PeerClient(session, decode_frame=decode_frame, verify=verify, **kwargs)  # type: ignore[arg-type]


# -- round trips ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressible", [True, False])
@pytest.mark.parametrize("compress", [True, False])
async def test_batch_round_trip_1mib(
    session: aiohttp.ClientSession, compressible: bool, compress: bool
) -> None:
    chunks = make_chunks(6, MiB, compressible=compressible)
    source = DictSource(chunks)
    metrics = TransferMetrics()
    async with serve(chunk_app(source)) as url:
        got = await client(session, metrics=metrics).fetch(VOLUME, list(chunks), [url], compress=compress)
    assert got == chunks
    assert metrics.chunks_received == 6
    assert metrics.requests == 1
    assert metrics.corrupt == metrics.failures == 0
    if compress and compressible:
        assert metrics.bytes_received < 6 * MiB // 10
    else:
        assert metrics.bytes_received >= 6 * MiB


async def test_single_fetch_round_trip(session: aiohttp.ClientSession) -> None:
    chunks = make_chunks(1, MiB, compressible=False)
    async with serve(chunk_app(DictSource(chunks))) as url:
        got = await client(session).fetch(VOLUME, list(chunks), [url + "/"])
    assert got == chunks


async def test_many_batches_respect_per_peer_limit(session: aiohttp.ClientSession) -> None:
    chunks = make_chunks(40, 1024, compressible=False)
    source = DictSource(chunks, delay=0.02)
    metrics = TransferMetrics()
    async with serve(chunk_app(source)) as url:
        pc = client(session, batch_size=2, per_peer_concurrency=4, metrics=metrics)
        ids = list(chunks)
        got = await pc.fetch(VOLUME, ids + ids[:5], [url])
    assert got == chunks
    assert metrics.requests == 20
    assert 2 <= source.max_active <= 4


async def test_empty_inputs(session: aiohttp.ClientSession) -> None:
    pc = client(session)
    assert await pc.fetch(VOLUME, [], ["http://127.0.0.1:1"]) == {}
    assert await pc.fetch(VOLUME, ["0" * 32], []) == {}


async def test_client_rejects_malformed_input(session: aiohttp.ClientSession) -> None:
    pc = client(session)
    with pytest.raises(ValueError):
        await pc.fetch(VOLUME, ["A" * 32], ["http://127.0.0.1:1"])
    with pytest.raises(ValueError):
        await pc.fetch("../etc", ["0" * 32], ["http://127.0.0.1:1"])


# -- failover -------------------------------------------------------------------------------------------


async def test_missing_chunks_come_from_second_peer(session: aiohttp.ClientSession) -> None:
    chunks = make_chunks(10, 4096, compressible=False)
    ids = list(chunks)
    partial = DictSource({cid: chunks[cid] for cid in ids[:4]})
    full = DictSource(chunks)
    metrics = TransferMetrics()
    async with serve(chunk_app(partial)) as first, serve(chunk_app(full)) as second:
        pc = client(session, metrics=metrics)
        got = await pc.fetch(VOLUME, [*ids, "f" * 32], [first, second])
        assert pc.breaker_state(first) == "closed"
    assert got == chunks
    assert full.reads == 7  # the six the first peer lacked, plus the id nobody holds
    assert metrics.failures == 0


async def test_single_missing_falls_through_on_404(session: aiohttp.ClientSession) -> None:
    chunks = make_chunks(1, 100, compressible=True)
    async with serve(chunk_app(DictSource({}))) as first, serve(chunk_app(DictSource(chunks))) as second:
        got = await client(session).fetch(VOLUME, list(chunks), [first, second])
    assert got == chunks


async def test_corrupt_peer_is_not_believed(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    chunks = make_chunks(5, 64 * 1024, compressible=False)
    metrics = TransferMetrics()
    async with (
        serve(chunk_app(DictSource(chunks, corrupt=True))) as liar,
        serve(chunk_app(DictSource(chunks))) as good,
    ):
        got = await client(session, metrics=metrics).fetch(VOLUME, list(chunks), [liar, good])
        alone = await client(session).fetch(VOLUME, list(chunks), [liar])
    assert got == chunks
    assert alone == {}
    assert metrics.corrupt == 5
    assert metrics.chunks_received == 5
    assert any(liar in rec.getMessage() and "corrupt" in rec.getMessage() for rec in caplog.records)


async def test_dead_peer_retried_then_next(session: aiohttp.ClientSession) -> None:
    chunks = make_chunks(3, 1000, compressible=False)
    metrics = TransferMetrics()
    async with serve(chunk_app(DictSource(chunks))) as good:
        got = await client(session, retries=2, metrics=metrics).fetch(
            VOLUME, list(chunks), [dead_peer(), good]
        )
    assert got == chunks
    assert metrics.failures == 3
    assert metrics.retries == 2
    assert metrics.requests == 4


async def test_5xx_retried_on_same_peer_until_it_recovers(session: aiohttp.ClientSession) -> None:
    chunks = make_chunks(4, 1000, compressible=False)
    inner = web.Application()
    source = DictSource(chunks)
    add_routes(inner, source, encode_frame=encode_frame, compress_default=False)
    calls = 0

    @web.middleware
    async def flaky(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        nonlocal calls
        calls += 1
        if calls <= 2:
            return web.json_response({"error": "busy"}, status=503)
        return await handler(request)

    inner.middlewares.append(flaky)
    metrics = TransferMetrics()
    async with serve(inner) as url:
        got = await client(session, retries=3, metrics=metrics).fetch(VOLUME, list(chunks), [url])
    assert got == chunks
    assert calls == 3
    assert metrics.failures == 2


# -- circuit breaker ------------------------------------------------------------------------------------


async def test_breaker_opens_skips_and_half_opens(session: aiohttp.ClientSession) -> None:
    chunks = make_chunks(2, 1000, compressible=False)
    ids = list(chunks)
    hits = 0
    healthy = False
    good_source = DictSource(chunks)

    async def sometimes_broken(request: web.Request) -> web.StreamResponse:
        nonlocal hits
        hits += 1
        if healthy:
            # Recovered: serve the batch correctly (raw frames) so the trial request succeeds.
            body = await request.json()
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            for cid in body["ids"]:
                frame = encode_frame(chunks[cid], False)
                await response.write(RECORD_HEADER.pack(bytes.fromhex(cid), STATUS_FOUND, len(frame)) + frame)
            await response.write_eof()
            return response
        return web.json_response({"error": "boom"}, status=500)

    async with serve(handler_app(sometimes_broken)) as sick, serve(chunk_app(good_source)) as good:
        pc = client(session, retries=0, breaker_threshold=2, breaker_reset=0.3)
        for _ in range(2):
            assert await pc.fetch(VOLUME, ids, [sick, good]) == chunks
        assert hits == 2
        assert pc.breaker_state(sick) == "open"

        assert await pc.fetch(VOLUME, ids, [sick, good]) == chunks
        assert hits == 2  # skipped while open
        assert await pc.fetch(VOLUME, ids, [sick]) == {}
        assert hits == 2

        await asyncio.sleep(0.35)
        assert pc.breaker_state(sick) == "half-open"
        assert await pc.fetch(VOLUME, ids, [sick, good]) == chunks
        assert hits == 3  # one trial request, which failed
        assert pc.breaker_state(sick) == "open"

        await asyncio.sleep(0.35)
        healthy = True
        reads_before = good_source.reads
        assert await pc.fetch(VOLUME, ids, [sick, good]) == chunks
        assert hits == 4
        assert good_source.reads == reads_before
        assert pc.breaker_state(sick) == "closed"


async def test_corruption_trips_breaker(session: aiohttp.ClientSession) -> None:
    chunks = make_chunks(2, 1000, compressible=False)
    async with serve(chunk_app(DictSource(chunks, corrupt=True))) as liar:
        pc = client(session, breaker_threshold=2, breaker_reset=60)
        for _ in range(2):
            assert await pc.fetch(VOLUME, list(chunks), [liar]) == {}
        assert pc.breaker_state(liar) == "open"


# -- hostile peers ----------------------------------------------------------------------------------------


async def test_garbage_forever_bounded(session: aiohttp.ClientSession) -> None:
    async def garbage(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        while True:
            await response.write(os.urandom(4096))
            await asyncio.sleep(0.001)

    chunks = make_chunks(3, 1000, compressible=False)
    metrics = TransferMetrics()
    async with serve(handler_app(garbage)) as hostile:
        pc = client(session, retries=1, request_timeout=1.0, metrics=metrics)
        got = await pc.fetch(VOLUME, list(chunks), [hostile])  # an endless body ends (the pytest timeout says if not)
        single = await pc.fetch(VOLUME, list(chunks)[:1], [hostile])
    assert got == {} and single == {}
    assert metrics.failures >= 2


async def test_trickling_peer_bounded_by_timeout(session: aiohttp.ClientSession) -> None:
    chunks = make_chunks(2, 1000, compressible=False)
    first = next(iter(chunks))

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        await response.write(RECORD_HEADER.pack(bytes.fromhex(first), STATUS_FOUND, 100_000))
        while True:
            await response.write(b"\x00")
            await asyncio.sleep(0.02)

    async with serve(handler_app(trickle)) as hostile, serve(chunk_app(DictSource(chunks))) as good:
        pc = client(session, retries=1, request_timeout=0.4)
        alone = await pc.fetch(VOLUME, list(chunks), [hostile])  # ends: the request timeout cuts the trickle
        assert alone == {}
        assert await pc.fetch(VOLUME, list(chunks), [hostile, good]) == chunks


async def test_a_silent_peer_is_not_asked_again_within_one_fetch(session: aiohttp.ClientSession) -> None:
    """A frozen peer (accepts, never answers) costs one timeout per fetch, not one per retry: the
    caller's later changes wait behind it (the engine defers the file and retries later)."""
    chunks = make_chunks(2, 1000, compressible=False)

    async def silent(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    metrics = TransferMetrics()
    async with serve(handler_app(silent)) as frozen, serve(chunk_app(DictSource(chunks))) as good:
        pc = client(session, retries=3, request_timeout=0.3, metrics=metrics)
        assert await pc.fetch(VOLUME, list(chunks), [frozen]) == {}
        assert metrics.requests == 1 and metrics.retries == 0  # one timeout, not one per retry
        assert pc.breaker_state(frozen) == "open"  # the next waves skip it instead of timing out again
        assert await pc.fetch(VOLUME, list(chunks), [frozen, good]) == chunks
        assert metrics.requests == 2  # only the good peer was asked
        pc.forget_failures(frozen + "/")  # it came back as a new process: asked again at once
        assert pc.breaker_state(frozen) == "closed"


async def test_oversized_frame_and_unknown_ids_rejected(session: aiohttp.ClientSession) -> None:
    chunks = make_chunks(2, 1000, compressible=False)
    ids = list(chunks)
    mode = "oversize"

    async def hostile(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        if mode == "oversize":
            await response.write(RECORD_HEADER.pack(bytes.fromhex(ids[0]), STATUS_FOUND, 50 * MiB))
            await response.write(b"\x00" * MiB)
        elif mode == "unknown":
            data = b"not requested"
            frame = encode_frame(data, False)
            await response.write(RECORD_HEADER.pack(bytes.fromhex(chunk_id(data)), STATUS_FOUND, len(frame)))
            await response.write(frame)
        else:  # found-then-missing records, then trailing junk
            for cid in ids:
                frame = encode_frame(chunks[cid], False)
                await response.write(RECORD_HEADER.pack(bytes.fromhex(cid), STATUS_FOUND, len(frame)) + frame)
            await response.write(b"junk")
        await response.write_eof()
        return response

    metrics = TransferMetrics()
    async with serve(handler_app(hostile)) as url:
        pc = client(session, retries=3, max_chunk=64 * 1024, metrics=metrics)
        assert await pc.fetch(VOLUME, ids, [url]) == {}
        assert metrics.requests == 1  # protocol violations are not retried
        mode = "unknown"
        assert await pc.fetch(VOLUME, ids, [url]) == {}
        mode = "trailing"
        # Verified chunks are kept, but the violation still counts against the peer.
        assert await pc.fetch(VOLUME, ids, [url]) == chunks
        assert metrics.failures == 3
        assert metrics.requests == 3


async def test_single_oversized_body_rejected(session: aiohttp.ClientSession) -> None:
    chunks = make_chunks(1, 1000, compressible=False)

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        for _ in range(64):
            await response.write(b"\x00" * 65536)
        await response.write_eof()
        return response

    metrics = TransferMetrics()
    async with serve(handler_app(huge)) as url:
        pc = client(session, retries=0, max_chunk=1024 * 1024, metrics=metrics)
        assert await pc.fetch(VOLUME, list(chunks), [url]) == {}
    assert metrics.failures == 1 and metrics.corrupt == 0


# -- server validation ------------------------------------------------------------------------------------


async def test_server_validation(session: aiohttp.ClientSession) -> None:
    chunks = make_chunks(1, 1000, compressible=False)
    cid = next(iter(chunks))
    async with serve(chunk_app(DictSource(chunks), max_batch=4, max_body=1024)) as url:
        base = f"{url}/api/v1/chunks"

        async def status_of(method: str, path: str, **kw: object) -> tuple[int, object]:
            async with session.request(method, base + path, **kw) as resp:  # type: ignore[arg-type]
                body = await resp.read()
                if resp.content_type == "application/json":
                    return resp.status, json.loads(body)
                return resp.status, body

        assert (await status_of("GET", f"/{VOLUME}/{cid}"))[0] == 200
        status, body = await status_of("GET", f"/{VOLUME}/{'0' * 32}")
        assert status == 404 and "error" in body  # type: ignore[operator]
        for bad_id in (cid.upper(), cid[:-1], cid + "0", "g" * 32):
            status, body = await status_of("GET", f"/{VOLUME}/{bad_id}")
            assert status == 400 and "error" in body  # type: ignore[operator]
        for bad_volume in ("-lead", "x" * 256, "a%20b", "_x"):
            assert (await status_of("GET", f"/{bad_volume}/{cid}"))[0] == 400
            assert (await status_of("POST", f"/{bad_volume}/batch", json={"ids": [cid]}))[0] == 400
        assert (await status_of("GET", f"/{VOLUME}/{cid}?compress=maybe"))[0] == 400
        assert (await status_of("GET", f"/{'v' * 255}/{cid}"))[0] == 404

        assert (await status_of("POST", f"/{VOLUME}/batch", json={"ids": [cid] * 5}))[0] == 400
        assert (await status_of("POST", f"/{VOLUME}/batch", json={"ids": [cid, "nope"]}))[0] == 400
        assert (await status_of("POST", f"/{VOLUME}/batch", json={"ids": cid}))[0] == 400
        assert (await status_of("POST", f"/{VOLUME}/batch", json={"ids": [cid], "compress": "yes"}))[0] == 400
        assert (await status_of("POST", f"/{VOLUME}/batch", data=b"{not json"))[0] == 400
        assert (await status_of("POST", f"/{VOLUME}/batch", data=b" " * 2048))[0] == 413

        status, raw = await status_of(
            "POST", f"/{VOLUME}/batch", json={"ids": [cid, "0" * 32], "compress": False}
        )
        assert status == 200
        records = parse_batch(raw)  # type: ignore[arg-type]
        assert records == [
            (cid, STATUS_FOUND, encode_frame(chunks[cid], False)),
            ("0" * 32, STATUS_MISSING, b""),
        ]


async def test_authorize_hook(session: aiohttp.ClientSession) -> None:
    chunks = make_chunks(1, 1000, compressible=False)
    cid = next(iter(chunks))

    async def authorize(request: web.Request) -> None:
        if request.headers.get("Authorization") != "Bearer s3cret":
            raise web.HTTPUnauthorized()

    async with serve(chunk_app(DictSource(chunks), authorize=authorize)) as url:
        async with session.get(f"{url}/api/v1/chunks/{VOLUME}/{'Z' * 3}") as resp:
            assert resp.status == 401  # auth runs before validation
        async with session.post(f"{url}/api/v1/chunks/{VOLUME}/batch", json={"ids": [cid]}) as resp:
            assert resp.status == 401
        metrics = TransferMetrics()
        pc = client(session, metrics=metrics)
        assert await pc.fetch(VOLUME, [cid], [url]) == {}
        assert metrics.requests == 1  # 401 is not retried
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer s3cret"}) as authed:
            assert await client(authed).fetch(VOLUME, [cid], [url]) == chunks


async def test_source_errors_become_missing_records(session: aiohttp.ClientSession) -> None:
    chunks = make_chunks(3, 1000, compressible=False)
    ids = list(chunks)

    class FlakySource(DictSource):
        async def read_chunk(self, volume: str, cid: str) -> bytes | None:
            if cid == ids[1]:
                raise OSError("disk on fire")
            return await super().read_chunk(volume, cid)

    async with serve(chunk_app(FlakySource(chunks))) as first, serve(chunk_app(DictSource(chunks))) as second:
        got = await client(session).fetch(VOLUME, ids, [first, second])
    assert got == chunks


async def test_record_header_layout() -> None:
    assert RECORD_HEADER.size == 21
    assert RECORD_HEADER.pack(b"\x01" * 16, 1, 2) == b"\x01" * 16 + b"\x01" + struct.pack(">I", 2)
