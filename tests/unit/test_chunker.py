"""Tests of content-defined chunking, chunk ids and chunk frames."""

from __future__ import annotations

import os
import random
from pathlib import Path

import lz4.block
import pytest
import xxhash

from syncmesh_plugin import chunker
from syncmesh_plugin.chunker import (
    CHUNK_MAX,
    CHUNK_MIN,
    INLINE_MAX,
    FrameError,
    chunk_id,
    decode_frame,
    encode_frame,
    read_chunk,
    scan_file,
    verify,
)

MiB = 1024 * 1024


def _random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def _reference_cuts(data: bytes) -> list[tuple[int, int]]:
    """Chunk the whole content at once: what scan_file must reproduce whatever its buffer size."""
    return [(c.offset, c.length) for c in chunker._make_cdc().cut_buf(data)]


def _check_consistent(fc: chunker.FileContent, data: bytes) -> None:
    assert fc.size == len(data)
    assert fc.digest == xxhash.xxh3_128_hexdigest(data)
    pos = 0
    for c in fc.chunks:
        assert c.offset == pos
        assert c.id == chunk_id(data[c.offset : c.offset + c.length])
        pos += c.length
    assert pos == len(data)


def test_chunk_id_is_xxh3_128_hex() -> None:
    cid = chunk_id(b"hello")
    assert cid == xxhash.xxh3_128_hexdigest(b"hello")
    assert len(cid) == 32
    assert all(ch in "0123456789abcdef" for ch in cid)
    assert chunk_id(memoryview(b"hello")) == cid


def test_verify() -> None:
    cid = chunk_id(b"data")
    assert verify(b"data", cid)
    assert verify(b"data", cid.upper())
    assert not verify(b"dat", cid)


def test_empty_file(tmp_path: Path) -> None:
    fc = scan_file(_write(tmp_path, "e", b""))
    assert fc.size == 0
    assert fc.chunks == []
    assert fc.inline == b""
    assert fc.digest == xxhash.xxh3_128_hexdigest(b"")


@pytest.mark.parametrize("size", [1, 100, INLINE_MAX])
def test_small_file_is_inline_with_one_chunk(tmp_path: Path, size: int) -> None:
    data = _random_bytes(size, size)
    fc = scan_file(_write(tmp_path, "s", data))
    assert fc.inline == data
    assert fc.chunks == [chunker.Chunk(chunk_id(data), 0, size)]
    _check_consistent(fc, data)


def test_just_over_inline_max_is_not_inline(tmp_path: Path) -> None:
    data = _random_bytes(INLINE_MAX + 1, 7)
    fc = scan_file(_write(tmp_path, "s", data))
    assert fc.inline is None
    assert len(fc.chunks) == 1
    _check_consistent(fc, data)


def test_scan_accepts_bytes_path(tmp_path: Path) -> None:
    data = _random_bytes(5000, 1)
    assert scan_file(os.fsencode(_write(tmp_path, "b", data))).digest == chunk_id(data)


def test_multi_chunk_file(tmp_path: Path) -> None:
    data = _random_bytes(8 * MiB, 2)
    fc = scan_file(_write(tmp_path, "m", data))
    _check_consistent(fc, data)
    assert fc.inline is None
    assert len(fc.chunks) > 8
    assert all(c.length <= CHUNK_MAX for c in fc.chunks)
    assert all(c.length >= CHUNK_MIN for c in fc.chunks[:-1])
    mean = len(data) / len(fc.chunks)
    assert 128 * 1024 < mean < 512 * 1024


def test_zero_file_cuts_at_max(tmp_path: Path) -> None:
    """Low-entropy content never hits the gear mask: chunks are bounded by CHUNK_MAX and dedupe."""
    data = bytes(3 * MiB + 5)
    fc = scan_file(_write(tmp_path, "z", data))
    _check_consistent(fc, data)
    assert [c.length for c in fc.chunks] == [MiB, MiB, MiB, 5]
    assert len({c.id for c in fc.chunks[:3]}) == 1


@pytest.mark.parametrize("block_size", [1, 4096, 65536 + 3, CHUNK_MAX - 1, CHUNK_MAX, 3 * MiB + 17, 64 * MiB])
def test_boundaries_independent_of_buffer_size(tmp_path: Path, block_size: int) -> None:
    data = _random_bytes(12 * MiB + 12345, 3)
    path = _write(tmp_path, "f", data)
    fc = scan_file(path, block_size=block_size)
    assert [(c.offset, c.length) for c in fc.chunks] == _reference_cuts(data)
    _check_consistent(fc, data)


def test_block_size_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        scan_file(_write(tmp_path, "f", b"x"), block_size=0)


def test_insert_in_middle_changes_few_chunks(tmp_path: Path) -> None:
    base = _random_bytes(32 * MiB, 4)
    insert = _random_bytes(MiB, 5)
    mid = len(base) // 2
    edited = base[:mid] + insert + base[mid:]
    before = scan_file(_write(tmp_path, "a", base), block_size=3 * MiB)
    after = scan_file(_write(tmp_path, "b", edited), block_size=5 * MiB)
    _check_consistent(before, base)
    _check_consistent(after, edited)
    old_ids = {c.id for c in before.chunks}
    new_chunks = [c for c in after.chunks if c.id not in old_ids]
    new_bytes = sum(c.length for c in new_chunks)
    # The inserted MiB plus at most a few neighbouring chunks (each <= CHUNK_MAX) are new.
    assert new_bytes <= len(insert) + 3 * CHUNK_MAX
    assert len(new_chunks) <= len(insert) // CHUNK_MIN + 4
    lost = [c for c in before.chunks if c.id not in {n.id for n in after.chunks}]
    assert len(lost) <= 3


def test_read_chunk_returns_chunk_bytes(tmp_path: Path) -> None:
    data = _random_bytes(3 * MiB, 6)
    path = _write(tmp_path, "r", data)
    fc = scan_file(path)
    for c in fc.chunks:
        got = read_chunk(path, c.offset, c.length)
        assert verify(got, c.id)
    assert read_chunk(path, len(data) - 10, 100) == data[-10:]
    assert read_chunk(path, len(data) + 10, 100) == b""
    with pytest.raises(ValueError):
        read_chunk(path, -1, 10)


def test_frame_round_trip_compressible() -> None:
    data = b"abcdefgh" * 20000
    frame = encode_frame(data)
    assert frame[0] == chunker.FLAG_LZ4
    assert len(frame) < len(data) // 10
    assert decode_frame(frame) == data


def test_frame_incompressible_stays_raw() -> None:
    data = _random_bytes(100_000, 8)
    frame = encode_frame(data)
    assert frame[0] == chunker.FLAG_RAW
    assert frame[1:] == data
    assert decode_frame(frame) == data


def test_frame_compress_disabled_and_empty() -> None:
    data = b"a" * 10000
    frame = encode_frame(data, compress=False)
    assert frame == b"\x00" + data
    assert decode_frame(frame) == data
    assert encode_frame(b"") == b"\x00"
    assert decode_frame(b"\x00") == b""
    assert decode_frame(encode_frame(memoryview(data))) == data


def test_frame_max_size_chunk_round_trip() -> None:
    data = bytes(CHUNK_MAX)
    assert decode_frame(encode_frame(data)) == data


@pytest.mark.parametrize(
    "frame, message",
    [
        (b"", "flag"),
        (b"\x02abc", "unknown frame flag"),
        (b"\xff", "unknown frame flag"),
        (b"\x01", "size header"),
        (b"\x01\x10\x00", "size header"),
        (b"\x01\x10\x00\x00\x00", "payload missing"),
        (b"\x01\xff\xff\xff\x7f" + b"\x00" * 16, "limit"),  # claims 2 GiB
        (b"\x01\xff\xff\xff\xff" + b"\x00" * 16, "negative"),
        (b"\x01\x10\x00\x00\x00\xff\xff\xff", "corrupt"),
    ],
)
def test_hostile_frames_rejected(frame: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_frame(frame)


def test_frame_over_limit_rejected() -> None:
    data = b"x" * 5000
    with pytest.raises(FrameError, match="limit"):
        decode_frame(encode_frame(data), max_size=4999)
    with pytest.raises(FrameError, match="limit"):
        decode_frame(encode_frame(data, compress=False), max_size=4999)
    assert decode_frame(encode_frame(data), max_size=5000) == data


def test_frame_truncated_compressed_payload_rejected() -> None:
    frame = encode_frame(b"hello world " * 1000)
    with pytest.raises(FrameError):
        decode_frame(frame[:-5])


def test_frame_size_header_lie_rejected() -> None:
    """A header announcing fewer bytes than the block holds must not pass silently."""
    data = b"abc" * 1000
    packed = lz4.block.compress(data, store_size=False)
    lying = b"\x01" + (len(data) - 1).to_bytes(4, "little") + packed
    with pytest.raises(FrameError):
        decode_frame(lying)


def test_frame_error_is_value_error() -> None:
    assert issubclass(FrameError, ValueError)


def test_small_file_fast_path_matches_streaming(tmp_path: Path) -> None:
    """Below CHUNK_MIN the one-read path must give exactly what the streaming chunker gives."""
    for size in (0, 1, INLINE_MAX, INLINE_MAX + 1, CHUNK_MIN - 1, CHUNK_MIN, CHUNK_MIN + 1):
        p = tmp_path / f"f{size}"
        p.write_bytes(os.urandom(size))
        fast = scan_file(p)
        data = p.read_bytes()
        assert fast.size == size and fast.digest == chunk_id(data)
        assert b"".join(data[c.offset:c.offset + c.length] for c in fast.chunks) == data
        assert (fast.inline is not None) == (size <= INLINE_MAX)
        if size <= CHUNK_MIN:
            assert [c.id for c in fast.chunks] == ([chunk_id(data)] if size else [])
