"""Tests for syncmesh_plugin.manifest: encode/decode round trips and rejection of hostile manifests."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from syncmesh_plugin.chunker import CHUNK_MAX, INLINE_MAX
from syncmesh_plugin.manifest import MAX_FILE_SIZE, Manifest, ManifestError, decode

DIGEST = "0123456789abcdef0123456789abcdef"
CID1 = "a" * 32
CID2 = "b" * 32


def roundtrip(m: Manifest) -> Manifest:
    raw = m.encode()
    assert isinstance(raw, bytes)
    return decode(raw)


def raw(d: dict[str, Any]) -> bytes:
    return json.dumps(d).encode()


def file_dict(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"k": "file", "o": "node-a", "ts": 1.5, "m": 0o644, "u": 1000, "g": 1000,
                         "s": 10, "t": 1_700_000_000_000_000_000, "d": DIGEST, "c": [[CID1, 6], [CID2, 4]]}
    d.update(over)
    return d


# ---- round trips


def test_roundtrip_file_inline() -> None:
    m = Manifest(kind="file", size=5, mode=0o640, uid=1, gid=2, mtime_ns=123456789, digest=DIGEST,
                 inline=b"hello", origin="n1", ts=1700000000.123456)
    out = roundtrip(m)
    assert out == m
    assert out.inline == b"hello"
    assert out.chunks == []


@pytest.mark.parametrize("renamed_from", ["", "old \"quoted\" name"])
def test_inline_manifest_is_plain_json(renamed_from: str) -> None:
    """The inline data is appended to the encoder's output by hand: still one JSON object, every field in it."""
    m = Manifest(kind="file", size=3, mode=0o600, digest=DIGEST, inline=b"\x00\xff\n", origin="n1",
                 renamed_from=renamed_from)
    d = json.loads(m.encode())
    assert d["i"] == base64.b64encode(b"\x00\xff\n").decode()
    assert d.get("r", "") == renamed_from
    assert set(d) == {"k", "o", "ts", "m", "u", "g", "s", "t", "d", "i"} | ({"r"} if renamed_from else set())


def test_roundtrip_file_inline_empty() -> None:
    m = Manifest(kind="file", size=0, mode=0o600, digest=DIGEST, inline=b"", origin="n1")
    assert roundtrip(m) == m


def test_roundtrip_file_inline_binary_at_limit() -> None:
    data = bytes(range(256)) * (INLINE_MAX // 256)
    m = Manifest(kind="file", size=len(data), mode=0o644, digest=DIGEST, inline=data, origin="n")
    assert roundtrip(m).inline == data


def test_roundtrip_file_chunked() -> None:
    m = Manifest(kind="file", size=CHUNK_MAX + 7, mode=0o755, uid=0, gid=0, mtime_ns=-5, digest=DIGEST,
                 chunks=[[CID1, CHUNK_MAX], [CID2, 7]], origin="n2", ts=2.25)
    out = roundtrip(m)
    assert out == m
    assert out.inline is None
    assert out.chunks == [[CID1, CHUNK_MAX], [CID2, 7]]


def test_roundtrip_file_chunked_empty_file() -> None:
    m = Manifest(kind="file", size=0, digest=DIGEST, chunks=[], origin="n")
    assert roundtrip(m) == m


def test_roundtrip_dir() -> None:
    m = Manifest(kind="dir", mode=0o2775, uid=33, gid=33, origin="n", ts=3.0)
    out = roundtrip(m)
    assert out == m
    assert json.loads(m.encode()) == {"k": "dir", "o": "n", "ts": 3.0, "m": 0o2775, "u": 33, "g": 33}


def test_roundtrip_symlink() -> None:
    m = Manifest(kind="symlink", mode=0o777, target="../shared/target file", origin="n")
    out = roundtrip(m)
    assert out == m
    assert out.target == "../shared/target file"


def test_roundtrip_deleted() -> None:
    m = Manifest(kind="deleted", origin="n", ts=9.0)
    out = roundtrip(m)
    assert out == m
    assert set(json.loads(m.encode())) == {"k", "o", "ts"}  # no attributes for a tombstone


def test_roundtrip_renamed_from() -> None:
    m = Manifest(kind="file", size=3, digest=DIGEST, inline=b"abc", renamed_from="old dir/old.txt", origin="n")
    out = roundtrip(m)
    assert out == m
    assert out.renamed_from == "old dir/old.txt"
    d = Manifest(kind="dir", renamed_from="a/b", origin="n")
    assert roundtrip(d).renamed_from == "a/b"


def test_ts_is_rounded_to_microseconds() -> None:
    m = Manifest(kind="deleted", ts=1.23456789)
    assert decode(m.encode()).ts == 1.234568


def test_content_and_attrs_equality() -> None:
    a = Manifest(kind="file", size=3, digest=DIGEST, mode=0o644, mtime_ns=1)
    b = Manifest(kind="file", size=3, digest=DIGEST, mode=0o600, mtime_ns=2)
    assert a.content_equal(b)
    assert not a.attrs_equal(b)
    assert not a.content_equal(Manifest(kind="file", size=3, digest="f" * 32))
    assert not a.content_equal(Manifest(kind="dir"))
    assert Manifest(kind="symlink", target="x").content_equal(Manifest(kind="symlink", target="x"))
    assert not Manifest(kind="symlink", target="x").content_equal(Manifest(kind="symlink", target="y"))
    assert Manifest(kind="dir", mtime_ns=1).attrs_equal(Manifest(kind="dir", mtime_ns=2))  # dirs ignore mtime


def test_valid_hand_written_manifest() -> None:
    m = decode(raw(file_dict()))
    assert (m.kind, m.size, m.mode, m.uid, m.gid, m.digest) == ("file", 10, 0o644, 1000, 1000, DIGEST)
    assert m.chunks == [[CID1, 6], [CID2, 4]]


def test_limits_that_are_accepted() -> None:
    assert decode(raw(file_dict(m=0o7777))).mode == 0o7777
    assert decode(raw(file_dict(u=2**32 - 1, g=2**32 - 1))).uid == 2**32 - 1
    assert decode(raw(file_dict(s=CHUNK_MAX, c=[[CID1, CHUNK_MAX]]))).size == CHUNK_MAX
    assert decode(raw(file_dict(s=1, c=[[CID1, 1]]))).chunks == [[CID1, 1]]


# ---- hostile manifests


def expect_reject(data: bytes, match: str | None = None) -> ManifestError:
    with pytest.raises(ManifestError, match=match) as ei:
        decode(data)
    return ei.value


@pytest.mark.parametrize("data", [b"", b"not json", b"{", b"\xff\xfe\x00", b'{"k": "file",}'])
def test_not_json(data: bytes) -> None:
    expect_reject(data, "^not JSON")


@pytest.mark.parametrize("data", [b"[]", b'"file"', b"42", b"null", b'[{"k": "dir"}]'])
def test_not_an_object(data: bytes) -> None:
    expect_reject(data, "^manifest must be a JSON object$")


@pytest.mark.parametrize("kind", ["fifo", "", None, 1, "FILE"])
def test_unknown_kind(kind: Any) -> None:
    expect_reject(raw({"k": kind, "o": "n"}), f"^unknown kind {kind!r}$")


def test_missing_kind() -> None:
    expect_reject(raw({"o": "n"}), "^unknown kind None$")


@pytest.mark.parametrize("size", [2**50, MAX_FILE_SIZE + 1])
def test_absurd_size(size: int) -> None:
    expect_reject(raw(file_dict(s=size, c=[[CID1, CHUNK_MAX]])), "field 's' must be an integer")


def test_negative_size() -> None:
    expect_reject(raw(file_dict(s=-1, c=[])), "field 's' must be an integer in")


def test_chunk_lengths_not_summing_to_size() -> None:
    err = expect_reject(raw(file_dict(s=11)))
    assert str(err) == "chunk lengths add up to 10, not the declared size 11"
    expect_reject(raw(file_dict(s=10, c=[[CID1, 6]])), "add up to 6")


@pytest.mark.parametrize("cid", ["A" * 32, "g" * 32, "a" * 31, "a" * 33, "", 123, None])
def test_bad_chunk_id(cid: Any) -> None:
    expect_reject(raw(file_dict(s=4, c=[[cid, 4]])), "^bad chunk entry")


@pytest.mark.parametrize("length", [CHUNK_MAX + 1, 0, -1, 1.5, "4", True])
def test_bad_chunk_length(length: Any) -> None:
    expect_reject(raw(file_dict(s=4, c=[[CID1, length]])), "^bad chunk entry")


@pytest.mark.parametrize("entry", [[CID1], [CID1, 4, 0], {"id": CID1, "len": 4}, CID1])
def test_bad_chunk_entry_shape(entry: Any) -> None:
    expect_reject(raw(file_dict(s=4, c=[entry])), "^bad chunk entry")


@pytest.mark.parametrize("chunks", [None, "x", {"a": 1}])
def test_chunk_list_missing_or_wrong_type(chunks: Any) -> None:
    d = file_dict()
    if chunks is None:
        del d["c"]
    else:
        d["c"] = chunks
    expect_reject(raw(d), "^chunk list missing or too long$")


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 57, 58, 59, 60, 4095, INLINE_MAX])
def test_inline_round_trip_every_padding(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    m = Manifest(kind="file", size=size, digest="0" * 32, inline=data)
    assert json.loads(m.encode())["i"] == base64.b64encode(data).decode()  # the standard alphabet on the wire
    assert decode(m.encode()).inline == data


def test_inline_size_mismatch() -> None:
    d = file_dict(s=4, i=base64.b64encode(b"abc").decode())
    del d["c"]
    expect_reject(raw(d), "^inline data does not match the declared size$")


def test_inline_larger_than_inline_max() -> None:
    data = b"x" * (INLINE_MAX + 1)
    d = file_dict(s=len(data), i=base64.b64encode(data).decode())
    del d["c"]
    expect_reject(raw(d), "inline data does not match the declared size")


# Strict base64 only: padding inside or missing, whitespace, another alphabet, non-ASCII.
@pytest.mark.parametrize("inline", ["***", "abc", 5, "YWJj\n", "YW Jj", "YQ==YWI=", "YWJ", "YWI===", "YW-j", "YW_j",
                                    "\u00e9YWJ", "YWJj\u00e9"])
def test_inline_not_base64(inline: Any) -> None:
    d = file_dict(s=3, i=inline)
    del d["c"]
    expect_reject(raw(d))


@pytest.mark.parametrize("mode", [0o10000, -1, 2**40])
def test_mode_out_of_range(mode: int) -> None:
    expect_reject(raw(file_dict(m=mode)), "field 'm' must be an integer in")
    expect_reject(raw({"k": "dir", "m": mode}), "field 'm'")


@pytest.mark.parametrize("field", ["u", "g"])
def test_uid_gid_out_of_range(field: str) -> None:
    expect_reject(raw(file_dict(**{field: 2**32})), f"field '{field}'")
    expect_reject(raw(file_dict(**{field: -1})), f"field '{field}'")


@pytest.mark.parametrize(("field", "value"), [("s", True), ("m", False), ("u", True), ("t", True), ("m", "420"),
                                              ("s", 10.0), ("m", None)])
def test_bool_or_other_type_where_int_expected(field: str, value: Any) -> None:
    expect_reject(raw(file_dict(**{field: value})), f"field '{field}' must be an integer")


def test_nul_in_symlink_target() -> None:
    expect_reject(raw({"k": "symlink", "l": "a\x00b"}), "field 'l' must be a string")


def test_symlink_without_target() -> None:
    expect_reject(raw({"k": "symlink"}), "^symlink without a target$")
    expect_reject(raw({"k": "symlink", "l": 5}), "field 'l'")
    expect_reject(raw({"k": "symlink", "l": "x" * 4097}), "field 'l'")


@pytest.mark.parametrize("src", ["../etc/passwd", "a/../../b", "/abs/path", "a//b", "", "a/./b", "..", "x\x00y"])
def test_bad_renamed_from(src: str) -> None:
    expect_reject(raw({"k": "dir", "r": src}), "(bad rename source|field 'r')")


def test_renamed_from_wrong_type() -> None:
    expect_reject(raw({"k": "dir", "r": ["a"]}), "field 'r'")


def test_huge_raw_rejected_before_parsing() -> None:
    big = b'{"k":"deleted","o":"' + b"x" * (2 * 1024 * 1024) + b'"}'
    expect_reject(big, "^manifest larger than 2 MiB$")


@pytest.mark.parametrize("digest", ["", "A" * 32, "z" * 32, "a" * 31, "a" * 33, 5])
def test_bad_digest(digest: Any) -> None:
    expect_reject(raw(file_dict(d=digest)))


def test_origin_too_long_or_bad_type() -> None:
    expect_reject(raw({"k": "deleted", "o": "n" * 64}), "field 'o'")
    expect_reject(raw({"k": "deleted", "o": 7}), "field 'o'")


def test_mtime_out_of_range() -> None:
    expect_reject(raw(file_dict(t=2**63)), "field 't'")


def test_non_numeric_ts_is_ignored_not_trusted() -> None:
    assert decode(raw({"k": "deleted", "ts": "yesterday"})).ts == 0.0




@pytest.mark.parametrize("data", [
    b"[" * 100_000,
    b'{"k":"deleted","ts":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
])
def test_deeply_nested_json_is_a_manifest_error(data: bytes) -> None:
    assert len(data) < 2 * 1024 * 1024
    expect_reject(data)
