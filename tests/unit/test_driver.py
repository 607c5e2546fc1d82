"""The Docker VolumeDriver protocol (driver.make_app) over a real VolumeManager, Engine and LocalState,
with etcd unreachable: no store, no membership, etcd_ready never set."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from syncmesh_plugin import driver
from syncmesh_plugin.driver import MAX_BODY, make_app
from syncmesh_plugin.engine import Engine, EngineContext
from syncmesh_plugin.state import LocalState
from syncmesh_plugin.volumes import VolumeManager

DOCKER_HEADERS = {"Accept": "application/vnd.docker.plugins.v1.2+json"}
RECORD = {"name": "vol1", "options": {}, "created_at": 1700000000.0, "created_by": "n"}


@dataclass
class Harness:
    client: TestClient[Any, Any]
    vm: VolumeManager
    state: LocalState
    engine: Engine
    data_root: str

    async def call(self, method: str, body: Any = None, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
        """POST like dockerd: no Content-Type, the plugin Accept header, a JSON body (or raw bytes)."""
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        resp = await self.client.post(f"/{method}", data=data, headers=DOCKER_HEADERS,
                                      skip_auto_headers=["Content-Type"])
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()

    def seed(self, name: str = "vol1", complete: bool = True, **over: Any) -> None:
        """A volume known here; `complete`: this node had a whole copy of it once (a Mount then never
        waits for a first copy)."""
        self.state.put_volume(name, {**RECORD, "name": name, **over}, 1)
        if complete:
            self.state.set_meta(f"complete:{name}", "1")


async def _fetch(volume: str, ids: list[str], peers: list[str]) -> dict[str, bytes]:
    return {}


async def _peers(volume: str, origin: str, spread: bool = False) -> list[str]:
    return []


@pytest_asyncio.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    data_root = str(tmp_path / "root")
    state = LocalState(os.path.join(data_root, "state"))
    ctx = EngineContext(node_id="n1", data_root=data_root, state=state, conflict_default="timestamp",
                        keep_copies_default=True, interval=30.0, debounce=0.005, get_store=lambda: None,
                        etcd_ready=asyncio.Event(), fetch=_fetch, peers=_peers)
    engine = Engine(ctx)
    vm = VolumeManager(node_id="n1", data_root=data_root, state=state, engine=engine, get_store=lambda: None,
                       get_membership=lambda: None, mount_timeout=0.1, connect_wait=0.1)
    client: TestClient[Any, Any] = TestClient(TestServer(make_app(lambda: vm)))
    await client.start_server()
    try:
        yield Harness(client, vm, state, engine, data_root)
    finally:
        await client.close()
        await engine.close()
        state.close()


# ---- handshake and capabilities


async def test_activate_with_empty_body(h: Harness) -> None:
    status, body = await h.call("Plugin.Activate")
    assert status == 200
    assert body == {"Implements": ["VolumeDriver"]}


async def test_capabilities(h: Harness) -> None:
    status, body = await h.call("VolumeDriver.Capabilities", raw=b"")
    assert status == 200
    assert body == {"Capabilities": {"Scope": "global"}, "Err": ""}


async def test_list_empty(h: Harness) -> None:
    status, body = await h.call("VolumeDriver.List", {})
    assert status == 200
    assert body == {"Volumes": [], "Err": ""}


# ---- etcd unreachable


async def test_create_while_etcd_unreachable(h: Harness) -> None:
    status, body = await h.call("VolumeDriver.Create", {"Name": "newvol", "Opts": {"compression": "false"}})
    assert status == 500
    assert body["Err"].startswith("cluster unavailable: ")
    assert "etcd is not reachable" in body["Err"]
    assert h.state.volume("newvol") is None
    assert "newvol" not in h.engine.volumes


async def test_create_validates_before_needing_etcd(h: Harness) -> None:
    status, body = await h.call("VolumeDriver.Create", {"Name": "../etc", "Opts": None})
    assert status == 500
    assert body["Err"].startswith("invalid volume name '../etc'")
    status, body = await h.call("VolumeDriver.Create", {"Name": "ok", "Opts": {"bogus": "1"}})
    assert status == 500
    assert body["Err"].startswith("unknown volume option 'bogus'")


async def test_remove_unmounted_while_etcd_unreachable(h: Harness) -> None:
    h.seed()
    status, body = await h.call("VolumeDriver.Remove", {"Name": "vol1"})
    assert status == 500
    assert body["Err"].startswith("cluster unavailable: ")
    assert h.state.volume("vol1") is not None  # nothing removed locally


# ---- Get / List / Path from the local registry copy


async def test_get_unknown(h: Harness) -> None:
    status, body = await h.call("VolumeDriver.Get", {"Name": "ghost"})
    assert status == 500
    assert body == {"Err": "no such volume: ghost"}


async def test_get_seeded_volume(h: Harness) -> None:
    h.seed(options={"conflict_resolution": "size"})
    status, body = await h.call("VolumeDriver.Get", {"Name": "vol1"})
    assert status == 200
    assert body["Err"] == ""
    vol = body["Volume"]
    assert vol["Name"] == "vol1"
    assert vol["Mountpoint"] == os.path.join(h.data_root, "volumes", "vol1", "_data")
    assert vol["CreatedAt"] == "2023-11-14T22:13:20Z"
    assert vol["Status"] == {"options": {"conflict_resolution": "size"}, "created_by": "n", "node": "n1",
                             "mounts_here": 0, "sync": {"held": False}}


async def test_list_shows_seeded_volumes_sorted(h: Harness) -> None:
    h.seed("zeta")
    h.seed("vol1")
    status, body = await h.call("VolumeDriver.List")
    assert status == 200
    assert body["Volumes"] == [
        {"Name": "vol1", "Mountpoint": os.path.join(h.data_root, "volumes", "vol1", "_data"),
         "CreatedAt": "2023-11-14T22:13:20Z"},
        {"Name": "zeta", "Mountpoint": os.path.join(h.data_root, "volumes", "zeta", "_data"),
         "CreatedAt": "2023-11-14T22:13:20Z"},
    ]


async def test_path(h: Harness) -> None:
    h.seed()
    status, body = await h.call("VolumeDriver.Path", {"Name": "vol1"})
    assert status == 200
    assert body == {"Mountpoint": os.path.join(h.data_root, "volumes", "vol1", "_data"), "Err": ""}
    status, body = await h.call("VolumeDriver.Path", {"Name": "ghost"})
    assert status == 500
    assert body["Err"] == "no such volume: ghost"


# ---- Mount / Unmount / Remove with etcd down


async def test_first_mount_of_a_never_copied_volume_fails_with_its_progress(h: Harness) -> None:
    """etcd is down and this node never had the volume: the container must not start on a partial
    copy. The Err says how far the copy got and what to do; the node keeps holding the volume."""
    h.seed(complete=False)
    status, body = await h.call("VolumeDriver.Mount", {"Name": "vol1", "ID": "c1"})
    assert status == 500
    assert body["Err"].startswith("volume data: 0 paths on this node (n1), still syncing after 0s; retry")
    assert "replicas=all" in body["Err"] and "mount_partial=true" in body["Err"]
    assert h.state.mounts("vol1") == {}
    assert "vol1" in h.engine.volumes and "vol1" in h.state.held()  # the copy goes on


async def test_first_mount_with_mount_partial_mounts_at_once(h: Harness) -> None:
    h.seed(complete=False, options={"mount_partial": True})
    status, body = await h.call("VolumeDriver.Mount", {"Name": "vol1", "ID": "c1"})
    assert status == 200, body
    assert h.state.mounts("vol1") == {"c1": 1}


async def test_mount_known_volume_while_etcd_down(h: Harness) -> None:
    """A replica that was complete once (before a restart, say) mounts while etcd is away."""
    h.seed()
    status, body = await h.call("VolumeDriver.Mount", {"Name": "vol1", "ID": "c1"})
    assert status == 200, body
    mp = os.path.join(h.data_root, "volumes", "vol1", "_data")
    assert body == {"Mountpoint": mp, "Err": ""}
    assert os.path.isdir(mp)
    assert h.state.mounts("vol1") == {"c1": 1}
    assert "vol1" in h.engine.volumes
    assert "vol1" in h.state.held()
    # Get now reports the replica as held (but not ready: etcd never came)
    _, got = await h.call("VolumeDriver.Get", {"Name": "vol1"})
    assert got["Volume"]["Status"]["mounts_here"] == 1
    assert got["Volume"]["Status"]["sync"]["held"] is True
    assert got["Volume"]["Status"]["sync"]["ready"] is False


async def test_same_id_mounted_twice_unmounted_once(h: Harness) -> None:
    h.seed()
    for _ in range(2):
        status, _ = await h.call("VolumeDriver.Mount", {"Name": "vol1", "ID": "c1"})
        assert status == 200
    assert h.state.mounts("vol1") == {"c1": 2}
    status, body = await h.call("VolumeDriver.Unmount", {"Name": "vol1", "ID": "c1"})
    assert (status, body) == (200, {"Err": ""})
    assert h.state.mounts("vol1") == {"c1": 1}
    # an unknown ID is harmless and leaves the count alone
    status, body = await h.call("VolumeDriver.Unmount", {"Name": "vol1", "ID": "never-mounted"})
    assert (status, body) == (200, {"Err": ""})
    assert h.state.mounts("vol1") == {"c1": 1}
    status, body = await h.call("VolumeDriver.Unmount", {"Name": "vol1", "ID": "c1"})
    assert (status, body) == (200, {"Err": ""})
    assert h.state.mounts("vol1") == {}


async def test_unmount_unknown_volume_is_harmless(h: Harness) -> None:
    status, body = await h.call("VolumeDriver.Unmount", {"Name": "ghost", "ID": "c1"})
    assert (status, body) == (200, {"Err": ""})


async def test_mount_unknown_volume(h: Harness) -> None:
    status, body = await h.call("VolumeDriver.Mount", {"Name": "ghost", "ID": "c1"})
    assert status == 500
    assert body == {"Err": "no such volume: ghost"}
    assert "ghost" not in h.engine.volumes


async def test_remove_while_mounted(h: Harness) -> None:
    h.seed()
    await h.call("VolumeDriver.Mount", {"Name": "vol1", "ID": "c1"})
    status, body = await h.call("VolumeDriver.Remove", {"Name": "vol1"})
    assert status == 500
    assert "in use" in body["Err"]
    # etcd is unreachable here: this node is named, the others cannot be known
    assert body["Err"] == ("volume vol1 is in use: mounted on node(s) n1 (this node, 1 mount) and maybe others "
                           "(etcd unreachable); stop the containers using it there first (docker volume rm "
                           "removes a syncmesh volume on every node)")
    assert h.state.volume("vol1") is not None


# ---- malformed requests: always a JSON Err, never a 5xx HTML page


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b'{"Name": "vol1"'])
async def test_malformed_json(h: Harness, raw: bytes) -> None:
    status, body = await h.call("VolumeDriver.Get", raw=raw)
    assert status == 500
    assert body["Err"].startswith("malformed request body: ")


@pytest.mark.parametrize("raw", [b'["vol1"]', b'"vol1"', b"42", b"null"])
async def test_body_not_an_object(h: Harness, raw: bytes) -> None:
    status, body = await h.call("VolumeDriver.Create", raw=raw)
    assert status == 500
    assert body == {"Err": "malformed request body: expected a JSON object"}


@pytest.mark.parametrize("method", ["Create", "Get", "Path", "Remove", "Mount", "Unmount"])
async def test_name_of_wrong_type(h: Harness, method: str) -> None:
    status, body = await h.call(f"VolumeDriver.{method}", {"Name": 123, "ID": "c1"})
    assert status == 500
    assert body["Err"].startswith("missing volume name: volume names must match")


async def test_missing_name(h: Harness) -> None:
    status, body = await h.call("VolumeDriver.Get", {})
    assert status == 500
    assert body["Err"].startswith("missing volume name")


@pytest.mark.parametrize("mount_id", [None, 5, "", "x" * 257, ["c1"]])
async def test_mount_without_valid_id(h: Harness, mount_id: Any) -> None:
    h.seed()
    req: dict[str, Any] = {"Name": "vol1"}
    if mount_id is not None:
        req["ID"] = mount_id
    status, body = await h.call("VolumeDriver.Mount", req)
    assert status == 500
    assert body == {"Err": "Mount needs the ID field (a string)"}
    assert h.state.mounts("vol1") == {}


async def test_unmount_without_id(h: Harness) -> None:
    status, body = await h.call("VolumeDriver.Unmount", {"Name": "vol1"})
    assert status == 500
    assert body == {"Err": "Unmount needs the ID field (a string)"}


@pytest.mark.parametrize("opts", [["a=b"], "compression=false", 7])
async def test_opts_not_an_object(h: Harness, opts: Any) -> None:
    status, body = await h.call("VolumeDriver.Create", {"Name": "vol1", "Opts": opts})
    assert status == 500
    assert body["Err"].startswith("Opts must be an object of string values; valid options: ")


async def test_unknown_method(h: Harness) -> None:
    status, body = await h.call("VolumeDriver.Frobnicate", {"Name": "vol1"})
    assert status == 404
    assert body == {"Err": "unknown method VolumeDriver.Frobnicate"}


async def test_body_too_large(h: Harness) -> None:
    big = json.dumps({"Name": "vol1", "pad": "x" * (MAX_BODY + 10)}).encode()
    status, body = await h.call("VolumeDriver.Get", raw=big)
    assert status == 500
    assert body == {"Err": f"request body larger than {MAX_BODY} bytes"}


async def test_a_cancellation_from_inside_is_an_error_not_a_dropped_call(h: Harness, monkeypatch) -> None:
    """gRPC cancels the calls on a channel it closes; such a CancelledError is not dockerd's call being
    cancelled, and dockerd must get an error to retry on (a dropped connection failed a Create in CI)."""
    async def interrupted(vm: VolumeManager, body: dict[str, Any]) -> dict[str, Any]:
        raise asyncio.CancelledError

    monkeypatch.setitem(driver.HANDLERS, "Get", interrupted)
    status, body = await h.call("VolumeDriver.Get", {"Name": "vol1"})
    assert status == 500
    assert body == {"Err": "VolumeDriver.Get was interrupted; try again"}
    status, _ = await h.call("VolumeDriver.List", {})  # the server goes on serving
    assert status == 200


async def test_content_type_json_is_also_accepted(h: Harness) -> None:
    h.seed()
    resp = await h.client.post("/VolumeDriver.Path", json={"Name": "vol1"})
    assert resp.status == 200
    assert (await resp.json())["Mountpoint"].endswith("/volumes/vol1/_data")


async def test_manager_not_ready_yet(tmp_path: Path) -> None:
    client: TestClient[Any, Any] = TestClient(TestServer(make_app(lambda: None)))
    await client.start_server()
    try:
        resp = await client.post("/VolumeDriver.List", data=b"{}", headers=DOCKER_HEADERS,
                                 skip_auto_headers=["Content-Type"])
        assert resp.status == 500
        assert await resp.json() == {"Err": "syncmesh is starting; try again in a moment"}
        resp = await client.post("/Plugin.Activate", data=b"", headers=DOCKER_HEADERS)
        assert resp.status == 200
        assert await resp.json() == {"Implements": ["VolumeDriver"]}
    finally:
        await client.close()
