"""Content-defined chunking, chunk ids and the wire framing of chunk bytes.

Files are cut with FastCDC so that an insertion in the middle of a large file only changes the chunks
around the edit: every other chunk keeps its id and is never transferred again. A chunk id is the
xxh3_128 hex digest of the chunk bytes.

Every node of a cluster MUST use the same chunking parameters (``CHUNK_MIN``, ``CHUNK_AVG``, ``CHUNK_MAX``,
``CDC_NORMALIZATION``, ``CDC_SEED``): a node that cuts differently produces different chunk ids for
the same content, and deduplication between it and its peers silently stops working. Changing them is
a cluster-wide format change.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import lz4.block
import xxhash

try:
    # The pure-Python fallback of pyfastcdc is about 500x slower: refuse it instead of crawling.
    from pyfastcdc.cy import FastCDC
except ImportError as exc:  # pragma: no cover - depends on the installed wheel
    raise ImportError(
        "syncmesh_plugin.chunker needs the compiled Cython extension of pyfastcdc "
        "(pyfastcdc.cy); the pure-Python fallback is far too slow. Reinstall pyfastcdc from a binary "
        "wheel or with a C compiler available."
    ) from exc

__all__ = [
    "CHUNK_AVG",
    "CHUNK_MAX",
    "CHUNK_MIN",
    "FLAG_LZ4",
    "FLAG_RAW",
    "INLINE_MAX",
    "READ_BLOCK",
    "Chunk",
    "FileContent",
    "FrameError",
    "chunk_id",
    "decode_frame",
    "encode_frame",
    "read_chunk",
    "scan_file",
    "verify",
]

INLINE_MAX = 4096
"""Files of at most this many bytes travel inline in the manifest (no chunk fetch round trip)."""

CHUNK_MIN = 64 * 1024
CHUNK_AVG = 256 * 1024
CHUNK_MAX = 1024 * 1024

CDC_NORMALIZATION = 1
"""FastCDC normalized-chunking level (pyfastcdc's default, the same as fastcdc-rs)."""

CDC_SEED = 0
"""Gear table seed; 0 is the reference table of the FastCDC paper."""

READ_BLOCK = 8 * 1024 * 1024
"""How many bytes scan_file reads per syscall round; memory use is about READ_BLOCK + CHUNK_MAX."""

FLAG_RAW = 0
FLAG_LZ4 = 1
_LZ4_SIZE_HEADER = 4  # lz4.block store_size=True prepends the uncompressed size, 32-bit little endian


def _make_cdc() -> FastCDC:
    """Build the one chunker configuration of the cluster.

    pyfastcdc's real average chunk size is ``avg_size + min_size`` (cut-point skipping), so it gets
    ``CHUNK_AVG - CHUNK_MIN`` to land near CHUNK_AVG (about 280 KiB measured on random data).
    """
    return FastCDC(
        CHUNK_AVG - CHUNK_MIN,
        min_size=CHUNK_MIN,
        max_size=CHUNK_MAX,
        normalized_chunking=CDC_NORMALIZATION,
        seed=CDC_SEED,
    )


def chunk_id(data: bytes | bytearray | memoryview) -> str:
    """Content address of a chunk: xxh3_128 as 32 lowercase hex chars (fast; integrity, not security)."""
    return xxhash.xxh3_128_hexdigest(data)


def verify(data: bytes | bytearray | memoryview, expected_id: str) -> bool:
    """Check that bytes received from a peer are really the chunk that was asked for."""
    return chunk_id(data) == expected_id.lower()


@dataclass(frozen=True, slots=True)
class Chunk:
    """One content-defined slice of a file: its id and where it lies in the file."""

    id: str
    offset: int
    length: int


@dataclass(slots=True)
class FileContent:
    """What a manifest needs to know about a regular file's bytes.

    ``digest`` is the xxh3_128 of the whole content. For files of at most INLINE_MAX bytes ``inline``
    holds the bytes, and ``chunks`` is still filled (one chunk, none for an empty file) so that the
    receiver can index the chunk as locally available.
    """

    size: int
    digest: str
    chunks: list[Chunk]
    inline: bytes | None


def scan_file(path: str | bytes, *, block_size: int = READ_BLOCK) -> FileContent:
    """Chunk and hash a file in one streaming pass; synchronous, run it in a worker thread.

    The file is read with ``readinto`` into one reusable buffer of ``block_size + CHUNK_MAX`` bytes;
    the file itself is never mapped (a concurrent truncate would SIGBUS) nor held whole in memory. A
    chunk is only cut while at least CHUNK_MAX bytes follow its start in the buffer (or at EOF):
    FastCDC looks at no more than CHUNK_MAX bytes from a chunk start, so the boundaries are exactly
    those of chunking the whole content at once, whatever ``block_size`` is.

    If the file changes while it is read, the result describes the bytes that were actually read;
    the caller is expected to compare mtime/size before and after and rescan.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    small = _scan_small(path)
    if small is not None:
        return small
    cdc = _make_cdc()
    whole = xxhash.xxh3_128()
    chunks: list[Chunk] = []
    capacity = block_size + CHUNK_MAX
    # An anonymous mapping, not a bytearray: bytearray(n) zeroes all n bytes (9 MiB for a file of 100 KB;
    # 0.20 against 0.13 ms of CPU per such file), a mapping only faults in the pages read into.
    buf = mmap.mmap(-1, capacity)
    view = memoryview(buf)
    base = 0  # file offset of view[0]
    filled = 0  # valid bytes in view
    eof = False
    inline: bytes | None = None
    try:
        with open(path, "rb", buffering=0) as f:
            while True:
                while filled < capacity:
                    n = f.readinto(view[filled:])
                    if not n:
                        eof = True
                        break
                    whole.update(view[filled : filled + n])
                    filled += n
                consumed = 0
                for c in cdc.cut_buf(view[:filled]):
                    if not eof and filled - c.offset < CHUNK_MAX:
                        break  # the cut could still move: re-cut it after the next read
                    chunks.append(Chunk(chunk_id(c.data), base + c.offset, c.length))
                    consumed = c.offset + c.length
                if eof:
                    if base + filled <= INLINE_MAX:  # only possible when the whole file fit in one read
                        inline = bytes(view[:filled])
                    break
                # Move the uncut tail (< CHUNK_MAX bytes) to the front; memoryview copies use memmove.
                tail = filled - consumed
                view[:tail] = view[consumed:filled]
                base += consumed
                filled = tail
    finally:
        view.release()  # the mapping goes with the last view of it (a chunk's data may still be one)
    return FileContent(size=base + filled, digest=whole.hexdigest(), chunks=chunks, inline=inline)


def _scan_small(path: str | bytes) -> FileContent | None:
    """Most files are small: below CHUNK_MIN FastCDC never cuts, so the file is one chunk whose id is
    the file digest. One read, one hash, no 9 MiB buffer: this is the per-file cost of a burst."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size > CHUNK_MIN:
            return None
        # The size it has, and one byte to see it grow: a read of CHUNK_MIN + 1 allocated 64 KiB for
        # every file of a burst and shrank it (700 MB allocated for 10,000 files of 4 KiB).
        data = f.read(size + 1)
    if len(data) > size:
        return None  # it grew meanwhile: take the streaming path
    digest = chunk_id(data)
    chunks = [Chunk(digest, 0, len(data))] if data else []
    return FileContent(size=len(data), digest=digest, chunks=chunks,
                       inline=data if len(data) <= INLINE_MAX else None)


def read_chunk(path: str | bytes, offset: int, length: int) -> bytes:
    """Read one chunk by position (to serve a peer) without touching a shared file offset.

    Returns fewer than ``length`` bytes only if the file is now shorter; callers verify() the
    result against the chunk id anyway since the file may have changed since it was scanned.
    """
    if offset < 0 or length < 0:
        raise ValueError(f"negative offset/length: {offset}/{length}")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, length, offset)
        if len(data) == length or not data:
            return data
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(fd, length - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)
    finally:
        os.close(fd)


class FrameError(ValueError):
    """A chunk frame from a peer is malformed, truncated, or would decompress too large."""


def encode_frame(data: bytes | bytearray | memoryview, compress: bool = True) -> bytes:
    """Frame chunk bytes for the wire: 1 flag byte then the payload, lz4 only when it actually helps."""
    if compress and len(data) > 0 and _worth_compressing(data):
        packed = lz4.block.compress(data, store_size=True)
        if len(packed) < len(data):
            return bytes((FLAG_LZ4,)) + packed
    return bytes((FLAG_RAW,)) + bytes(data)


_SAMPLE = 8192


def _worth_compressing(data: bytes | bytearray | memoryview) -> bool:
    """Media, archives and encrypted data do not shrink: a probe of the first 8 KiB decides before the
    whole chunk is compressed for nothing (that attempt was the origin's largest cost serving them)."""
    if len(data) <= 4 * _SAMPLE:
        return True
    probe = lz4.block.compress(bytes(memoryview(data)[:_SAMPLE]), store_size=False)
    return len(probe) < _SAMPLE * 0.95


def decode_frame(frame: bytes | bytearray | memoryview, max_size: int = CHUNK_MAX) -> bytes:
    """Undo encode_frame on bytes from an untrusted peer.

    The stored uncompressed size is checked against ``max_size`` before decompressing so that a
    hostile peer cannot make us allocate gigabytes with a tiny frame.
    """
    mv = memoryview(frame)
    if len(mv) < 1:
        raise FrameError("truncated frame: missing flag byte")
    flag = mv[0]
    payload = mv[1:]
    if flag == FLAG_RAW:
        if len(payload) > max_size:
            raise FrameError(f"raw frame of {len(payload)} bytes exceeds limit {max_size}")
        return bytes(payload)
    if flag != FLAG_LZ4:
        raise FrameError(f"unknown frame flag {flag}")
    if len(payload) < _LZ4_SIZE_HEADER:
        raise FrameError("truncated frame: lz4 size header incomplete")
    size = int.from_bytes(payload[:_LZ4_SIZE_HEADER], "little", signed=True)
    if size < 0:
        raise FrameError(f"lz4 frame announces negative size {size}")
    if size > max_size:
        raise FrameError(f"lz4 frame announces {size} bytes, limit is {max_size}")
    if len(payload) == _LZ4_SIZE_HEADER:
        raise FrameError("truncated frame: lz4 payload missing")
    try:
        data = lz4.block.decompress(payload)
    except lz4.block.LZ4BlockError as exc:
        raise FrameError(f"corrupt or truncated lz4 frame: {exc}") from exc
    if len(data) != size:
        raise FrameError(f"lz4 frame decompressed to {len(data)} bytes, header said {size}")
    return data
