"""meta.EtcdStore's typed records against a real etcd: what each call writes is what the others read,
and a volume's removal leaves none of its keys behind."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from etcd3aio import Etcd3Client

from syncmesh_plugin.config import EtcdConfig
from syncmesh_plugin.manifest import Manifest
from syncmesh_plugin.meta import EtcdStore, EtcdUnavailable, dumps


async def test_typed_records_round_trip(etcd) -> None:
    prefix = f"/t-{uuid.uuid4().hex[:8]}"
    store = EtcdStore(EtcdConfig(endpoints=[etcd.endpoint], prefix=prefix), [etcd.endpoint])
    await store.connect()
    ks = store.keys
    try:
        created, _ = await store.create_volume("data", dumps({"name": "data"}))
        again, existing = await store.create_volume("data", dumps({"name": "other"}))
        assert created and not again and existing is not None and existing.value == dumps({"name": "data"})
        assert (await store.get_volume("data")) is not None
        _, records = await store.volume_records()
        assert [n for n, _ in records] == ["data"]

        tomb = Manifest(kind="deleted", origin="n1", ts=5.0).encode()
        live = Manifest(kind="dir", mode=0o755, origin="n1").encode()
        ok, rev = await store.publish("data", [("a/gone.txt", tomb, 0), ("a", live, 0)])
        assert ok and await store.latest_revision("data") == rev
        ok, _ = await store.publish("data", [("a", live, 0)])  # its base is no longer 0
        assert not ok
        _, pages = await store.read_files("data")
        assert sorted([store.path_of("data", kv.key) async for page in pages for kv in page]) == ["a", "a/gone.txt"]
        assert [(t.path, t.mod_revision, t.ts) async for t in store.tombstones("data")] == [("a/gone.txt", rev, 5.0)]

        for node, r in (("n1", 7), ("n2", 3)):
            await store.put(ks.holder_key("data", node), b"{}")
            await store.put(ks.applied_key("data", node), dumps({"revision": r}))
        await store.put(ks.mount_key("data", "n2"), b"{}")
        await store.put(ks.node_key("n1"), dumps({"node_id": "n1", "advertise": "http://a:1"}))
        assert sorted(await store.holders("data")) == ["n1", "n2"]
        assert await store.holders_by_node() == {"n1": ["data"], "n2": ["data"]}
        assert sorted(await store.applied("data")) == [("n1", {"revision": 7}), ("n2", {"revision": 3})]
        assert sorted(await store.applied_all()) == [("data", "n1", {"revision": 7}), ("data", "n2", {"revision": 3})]
        assert await store.mounted_on("data") == ["n2"]
        assert (await store.node_records())["n1"]["advertise"] == "http://a:1"

        assert await store.gc_horizon("data") == 0
        await store.set_gc_horizon("data", rev, at=1.0, by="n1")
        assert await store.gc_horizon("data") == rev

        await store.delete_volume("data")
        _, left = await store.get_all(prefix.encode() + b"/")
        # gc/<volume> outlives the volume (as before the keyspace moved to one module).
        assert sorted(kv.key for kv in left) == sorted([ks.node_key("n1"), ks.gc_key("data")])
    finally:
        await store.close()


@pytest.mark.parametrize("grace", ["requests finish on the old channel", "old channel closed at once"])
async def test_new_tls_material_fails_no_request_in_flight(etcd, grace) -> None:
    """A renewed certificate or a rotated CA makes every channel again (EtcdConnection.set_tls). Requests
    already on the old channel still get their answer: it closes once they have one, and a request whose
    channel gRPC closed under it anyway is sent again on the new one (a compare-and-swap is checked instead,
    never applied twice). Before, such requests raised CancelledError and aiohttp dropped Docker's call."""
    prefix = f"/t-{uuid.uuid4().hex[:8]}"
    store = EtcdStore(EtcdConfig(endpoints=[etcd.endpoint], prefix=prefix), [etcd.endpoint])
    await store.connect()
    conn = store.connection
    if grace == "old channel closed at once":
        async def close_at_once(client: Etcd3Client) -> None:
            await client.close()
        conn._close_gracefully = close_at_once  # type: ignore[method-assign]
    try:
        async def put(i: int) -> None:
            await store.put(f"{prefix}/k{i}".encode(), b"x" * 1000)

        async def publish(i: int) -> bool:
            ok, _ = await store.publish("vol", [(f"f{i}.txt", b'{"v":1}', 0)])
            return ok

        async def status() -> str:
            """A request to one member (no failover, no retry: maintenance tries again next round)."""
            try:
                await store.member_status(etcd.endpoint)
            except EtcdUnavailable:
                return "error"
            return "ok"

        published: list[bool] = []
        statuses: list[str] = []
        for r in range(10):
            tasks = [asyncio.create_task(put(r * 100 + i)) for i in range(40)]
            cas = [asyncio.create_task(publish(r * 100 + i)) for i in range(10)]
            one = [asyncio.create_task(status()) for _ in range(5)]
            await asyncio.sleep(0.002)  # the requests are on the channel now
            conn.set_tls(conn.tls)
            await asyncio.gather(*tasks)  # none raises (CancelledError before)
            published += await asyncio.gather(*cas)
            statuses += await asyncio.gather(*one)  # an answer or an error, never a CancelledError
        assert all(published), "a publish in flight was reported as failed"
        if grace == "requests finish on the old channel":
            assert set(statuses) == {"ok"}, statuses
        _, kvs = await store.get_all(f"{prefix}/k".encode())
        assert len(kvs) == 400
        for kv in (await store.get_all(store.keys.file_key("vol", "")))[1]:
            assert kv.create_revision == kv.mod_revision, f"{kv.key!r} was written twice"
    finally:
        await store.close()
