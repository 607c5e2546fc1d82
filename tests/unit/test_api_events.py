"""The in-process event bus behind /api/v1/events: bounded history, bounded subscribers, drop-oldest."""

from __future__ import annotations

import asyncio

from syncmesh_plugin.events import EventBus


async def test_publish_reaches_subscribers_in_order():
    bus = EventBus("n1")
    with bus.subscribe() as sub:
        bus.publish("published", {"volume": "v", "count": 1})
        bus.publish("applied", {"volume": "v", "count": 2})
        a, b = await sub.get(1), await sub.get(1)
    assert (a["kind"], b["kind"]) == ("published", "applied")
    assert a["id"] < b["id"] and a["node"] == "n1" and b["data"]["count"] == 2
    assert bus.subscribers == 0


async def test_history_is_a_bounded_ring_and_replays_since():
    bus = EventBus("n1", history=5)
    for i in range(12):
        bus.publish("applied", {"i": i})
    assert [e["data"]["i"] for e in bus.recent(100)] == [7, 8, 9, 10, 11]
    assert [e["data"]["i"] for e in bus.recent(2)] == [10, 11]
    with bus.subscribe(since=bus.recent(100)[2]["id"]) as sub:  # Last-Event-ID: resume after it
        got = [(await sub.get(1))["data"]["i"] for _ in range(2)]
    assert got == [10, 11]
    with bus.subscribe(backlog=3) as sub:
        assert [(await sub.get(1))["data"]["i"] for _ in range(3)] == [9, 10, 11]
        assert await sub.get(0.01) is None


async def test_slow_subscriber_drops_oldest_and_is_told():
    bus = EventBus("n1", queue_size=3)
    with bus.subscribe() as sub:
        for i in range(10):
            bus.publish("applied", {"i": i})  # never blocks the publisher
        first = await sub.get(1)
        assert first["kind"] == "dropped" and first["data"]["count"] == 7
        assert [(await sub.get(1))["data"]["i"] for _ in range(3)] == [7, 8, 9]


async def test_close_ends_waiting_subscribers():
    bus = EventBus("n1")
    sub = bus.subscribe()
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0.01)
    bus.close()
    assert await asyncio.wait_for(waiter, 1) is None
    assert sub.closed and bus.subscribers == 0
