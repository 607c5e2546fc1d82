"""Property-based tests (hypothesis) of everything that parses input from the network or etcd.

`make test` runs them briefly (profile `ci`, a few seconds); `make fuzz` runs the same properties for
minutes (profile `fuzz`). Properties:

- path validation: accepts exactly the relative, `..`-free, NUL-free paths with short components, and
  a symlink-safe walk of any path never creates or opens anything outside the volume root;
- manifest decoding: arbitrary bytes and arbitrary JSON only ever raise ManifestError, and every
  manifest `decode` accepts satisfies the invariants the engine relies on (and round-trips);
- the Docker protocol handlers: any body, name and options give a JSON answer with `Err` (never a
  traceback, never a crash) and nothing appears outside the data root;
- the peer chunk routes and the auth middleware: any body and header is a 2xx/4xx, never a 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import string
import tempfile
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncmesh_plugin import auth, chunker, manifest, pathsafe, transfer
from syncmesh_plugin.driver import make_app as make_driver_app
from syncmesh_plugin.engine import Engine, EngineContext
from syncmesh_plugin.state import LocalState
from syncmesh_plugin.volumes import VolumeManager

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                     HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=60, derandomize=True, **_COMMON)
settings.register_profile("fuzz", max_examples=12000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# The async properties start a server per example: fewer, fatter examples.
_ASYNC_SCALE = 0.1 if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "fuzz" else 0.5

pytestmark = pytest.mark.fuzz


def _examples(scale: float) -> int:
    return max(10, int(settings().max_examples * scale))


# ---- strategies

_COMPONENTS = st.one_of(
    st.sampled_from(["a", "b", "..", ".", "", "escape", "x" * 255, "x" * 256, "nul\x00", "\\", "é", "\udcff",
                     "\ud800", ".syncmesh-tmp-1", "a b"]),
    st.text(alphabet=string.printable + "é\x00/", max_size=12),
)
PATHS = st.one_of(
    st.builds("/".join, st.lists(_COMPONENTS, min_size=1, max_size=6)),
    st.builds(lambda p: "/" + p, st.text(max_size=20)),
    st.text(max_size=60),
)


def _is_valid(p: str) -> bool:
    try:
        raw = p.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    comps = p.split("/")
    return (bool(p) and "\x00" not in p and not p.startswith("/") and len(raw) <= pathsafe.PATH_MAX
            and all(c not in ("", ".", "..") and len(c.encode("utf-8", "surrogateescape")) <= pathsafe.NAME_MAX
                    for c in comps))


# ---- path validation


@given(PATHS)
def test_validate_relpath_accepts_exactly_safe_paths(p: str) -> None:
    try:
        out = pathsafe.validate_relpath(p)
    except pathsafe.PathError:
        assert not _is_valid(p), f"valid path refused: {p!r}"
        return
    assert out == p and _is_valid(p), f"unsafe path accepted: {p!r}"
    assert not os.path.isabs(out) and ".." not in out.split("/")


@given(st.lists(PATHS, min_size=1, max_size=8))
def test_walk_never_leaves_the_root(paths: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root, outside = Path(tmp, "root"), Path(tmp, "outside")
        root.mkdir()
        outside.mkdir()
        os.symlink(outside, root / "escape")
        os.symlink("../outside", root / "a")  # relative symlink as a parent: also never followed
        for p in paths:
            try:
                fd = pathsafe.open_parent_dir(str(root), p, create=True)
            except (pathsafe.PathError, OSError):
                continue
            try:
                where = os.readlink(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            assert where == str(root) or where.startswith(str(root) + "/"), (p, where)
        assert list(outside.iterdir()) == []
        assert sorted(os.listdir(tmp)) == ["outside", "root"]


# ---- manifest decoding

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64) | st.floats(allow_nan=True)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=5),
    max_leaves=20,
)
_HEX = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
_FIELDS = {
    "k": st.sampled_from([*manifest.KINDS, "bogus", None, 1]),
    "o": st.text(max_size=70),
    "ts": st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=3)),
    "m": st.integers(min_value=-1, max_value=0o10000),
    "u": st.integers(min_value=-1, max_value=2**33),
    "g": st.integers(min_value=-1, max_value=2**33),
    "s": st.one_of(st.integers(min_value=-1, max_value=2**51), st.sampled_from([0, 10, 2**50])),
    "t": st.integers(min_value=-(2**63), max_value=2**63),
    "d": st.one_of(_HEX, st.text(max_size=40)),
    "c": st.lists(st.one_of(st.tuples(_HEX, st.integers(min_value=-1, max_value=chunker.CHUNK_MAX + 1)).map(list),
                            _JSON), max_size=5),
    "i": st.one_of(st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()), st.text(max_size=10)),
    "l": st.text(max_size=30),
    "r": PATHS,
}
MANIFEST_DICTS = st.fixed_dictionaries({}, optional={k: v | _JSON for k, v in _FIELDS.items()})


def _check_invariants(m: manifest.Manifest) -> None:
    assert m.kind in manifest.KINDS
    assert len(m.origin) <= 63 and "\x00" not in m.origin
    if m.kind == "file":
        assert 0 <= m.size <= manifest.MAX_FILE_SIZE
        assert len(m.digest) == 32
        if m.inline is not None:
            assert len(m.inline) == m.size <= chunker.INLINE_MAX
        else:
            assert sum(c[1] for c in m.chunks) == m.size
            assert all(transfer.is_valid_chunk_id(c[0]) and 0 < c[1] <= chunker.CHUNK_MAX for c in m.chunks)
    if m.kind == "symlink":
        assert m.target and "\x00" not in m.target
    if m.renamed_from:
        pathsafe.validate_relpath(m.renamed_from)


@given(st.one_of(st.binary(max_size=300), _JSON.map(lambda v: json.dumps(v).encode())))
def test_decode_arbitrary_bytes_only_raises_manifest_error(raw: bytes) -> None:
    try:
        m = manifest.decode(raw)
    except manifest.ManifestError:
        return
    _check_invariants(m)


@given(MANIFEST_DICTS)
def test_decode_hostile_fields(d: dict[str, Any]) -> None:
    try:
        raw = json.dumps(d).encode()
    except ValueError:
        return
    try:
        m = manifest.decode(raw)
    except manifest.ManifestError:
        return
    _check_invariants(m)
    again = manifest.decode(m.encode())
    assert again.kind == m.kind and again.content_equal(m) and again.attrs_equal(m)


# ---- the Docker protocol handlers

NAMES = st.one_of(
    st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,20}", fullmatch=True),
    st.sampled_from(["..", "../x", "a/b", "/abs", "", "x" * 256, "nul\x00", ".hidden", "-dash", "ünï"]),
    st.text(max_size=30), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2),
)
OPTS = st.one_of(
    st.dictionaries(st.sampled_from(["conflict_resolution", "keep_conflict_copies", "compression", "ignore",
                                     "mount_timeout", "bogus", ""]),
                    st.one_of(st.text(max_size=20), st.integers(), st.booleans(), st.none()), max_size=4),
    _JSON,
)
BODIES = st.one_of(
    st.builds(lambda n, o, i: json.dumps({"Name": n, "Opts": o, "ID": i}).encode(), NAMES, OPTS,
              st.one_of(st.text(max_size=70), st.integers(), st.none())),
    st.binary(max_size=200),
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"[" * 200_000, b'{"Name": ' * 50_000]),  # nesting that overflows the JSON parser
)
METHODS = st.sampled_from(["Create", "Remove", "Mount", "Unmount", "Path", "Get", "List", "Capabilities",
                           "Bogus", "Create/extra"])


async def _noop_fetch(volume: str, ids: list[str], peers: list[str]) -> dict[str, bytes]:
    return {}


async def _no_peers(volume: str, origin: str, spread: bool = False) -> list[str]:
    return []


async def _driver_session(tmp: str, calls: list[tuple[str, bytes]]) -> None:
    data_root = os.path.join(tmp, "root")
    state = LocalState(os.path.join(data_root, "state"))
    ctx = EngineContext(node_id="n1", data_root=data_root, state=state, conflict_default="timestamp",
                        keep_copies_default=True, interval=30.0, debounce=0.005, get_store=lambda: None,
                        etcd_ready=asyncio.Event(), fetch=_noop_fetch, peers=_no_peers)
    engine = Engine(ctx)
    vm = VolumeManager(node_id="n1", data_root=data_root, state=state, engine=engine, get_store=lambda: None,
                       get_membership=lambda: None, mount_timeout=0.05, connect_wait=0.0)
    state.put_volume("known", {"name": "known", "options": {}, "created_at": 1.0, "created_by": "n"}, 1)
    client: TestClient[Any, Any] = TestClient(TestServer(make_driver_app(lambda: vm)))
    await client.start_server()
    try:
        for method, body in calls:
            resp = await client.post(f"/VolumeDriver.{method}", data=body, skip_auto_headers=["Content-Type"])
            assert resp.status in (200, 404, 500), (method, body, resp.status)
            if "/" in method:  # no such route at all: aiohttp's plain 404
                assert resp.status == 404
                continue
            data = await resp.json()
            assert isinstance(data, dict) and isinstance(data.get("Err", ""), str), data
            if resp.status != 200:
                assert data["Err"] and "Traceback" not in data["Err"]
        # still serving
        resp = await client.post("/VolumeDriver.List", data=b"{}")
        assert resp.status == 200
    finally:
        await client.close()
        await engine.close()
        state.close()


@settings(max_examples=_examples(_ASYNC_SCALE))
@given(st.lists(st.tuples(METHODS, BODIES), min_size=1, max_size=12))
def test_docker_handlers_never_crash(calls: list[tuple[str, bytes]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_driver_session(tmp, calls))
        assert os.listdir(tmp) == ["root"]  # nothing outside the data root
        vols = os.path.join(tmp, "root", "volumes")
        for name in os.listdir(vols) if os.path.isdir(vols) else []:
            assert transfer.is_valid_volume(name), name


# ---- the peer chunk routes and the auth middleware

ADMIN, READER = "admin-token-0123456789", "reader-token-0123456789"


class _Source:
    def __init__(self) -> None:
        self.data = b"chunk" * 100
        self.cid = chunker.chunk_id(self.data)

    async def read_chunk(self, volume: str, chunk_id: str) -> bytes | None:
        return self.data if chunk_id == self.cid else None


HEADERS = st.one_of(
    st.just(f"Bearer {ADMIN}"), st.just(f"Bearer {READER}"), st.just(f"bearer {ADMIN}"),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    st.builds(lambda t: f"Bearer {t}", st.text(alphabet=string.ascii_letters + string.digits, max_size=30)),
)
BATCH_BODIES = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"[" * 60_000, b'{"ids": ' * 8_000]),
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda ids, c: json.dumps({"ids": ids, "compress": c}).encode(),
              st.lists(st.one_of(_HEX, st.text(max_size=33), st.integers()), max_size=5),
              st.one_of(st.booleans(), st.integers(), st.none())),
)
API_PATHS = st.one_of(
    st.sampled_from(["/api/v1/chunks/vol/batch", "/api/v1/chunks/../batch", "/api/v1/chunks/vol/" + "0" * 32,
                     "/api/v1/health", "/api/v1/chunks/v%00l/batch", "/api/v1/chunks/" + "v" * 300 + "/batch"]),
    st.builds(lambda v, c: f"/api/v1/chunks/{v}/{c}", st.text(alphabet=string.ascii_letters + "._-%", min_size=1,
                                                               max_size=12), st.text(alphabet="0123456789abcdefg",
                                                                                     max_size=33)),
)


async def _api_session(requests: list[tuple[str, str, str, bytes]]) -> None:
    src = _Source()
    app = web.Application(client_max_size=1024 * 1024)
    app.middlewares.append(auth.make_middleware(enabled=True, admin_tokens=[ADMIN], readonly_tokens=[READER],
                                                max_body=1024 * 1024))

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/api/v1/health", health)
    transfer.add_routes(app, src, encode_frame=chunker.encode_frame, compress_default=True)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        for method, path, header, body in requests:
            resp = await client.request(method, path, data=body, headers={"Authorization": header})
            await resp.read()
            assert resp.status < 500, (method, path, header, body, resp.status)
            if resp.status == 200 and path != "/api/v1/health":
                assert header == f"Bearer {ADMIN}" or header == f"bearer {ADMIN}"
        resp = await client.post("/api/v1/chunks/vol/batch", json={"ids": [src.cid]},
                                 headers={"Authorization": f"Bearer {ADMIN}"})
        payload = await resp.read()
        assert resp.status == 200
        raw_id, status, frame_len = transfer.RECORD_HEADER.unpack_from(payload)  # one record, nothing after
        frame = payload[transfer.RECORD_HEADER.size :]
        assert len(frame) == frame_len and raw_id.hex() == src.cid and status == transfer.STATUS_FOUND
        assert chunker.decode_frame(frame) == src.data
    finally:
        await client.close()


@settings(max_examples=_examples(_ASYNC_SCALE))
@given(st.lists(st.tuples(st.sampled_from(["GET", "POST", "PUT", "DELETE"]), API_PATHS, HEADERS, BATCH_BODIES),
                min_size=1, max_size=15))
def test_chunk_routes_and_auth_never_5xx(requests: list[tuple[str, str, str, bytes]]) -> None:
    asyncio.run(_api_session(requests))


@given(st.text(max_size=50), st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]), PATHS)
def test_token_roles(token: str, method: str, path: str) -> None:
    checker = auth.TokenChecker([ADMIN], [READER])
    role = checker.role(token)
    assert role == (auth.ADMIN if token == ADMIN else auth.READONLY if token == READER else None)
    need = auth.required_role(method, "/" + path)
    if method not in ("GET", "HEAD") or ("/" + path).startswith(auth.CHUNKS_PREFIX):
        assert need == auth.ADMIN
