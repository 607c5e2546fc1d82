"""Version retention and `restore --at`, as tables."""

from __future__ import annotations

import pytest

from syncmesh_plugin.sync.versions import Version, as_of, parse_size, to_drop

NOW = 1_000_000.0
DAY = 86400.0


def v(i: str, path: str, age: float, size: int = 10) -> Version:
    return Version(i, path, NOW - age, size)


HISTORY = [v("a1", "a", 10), v("a2", "a", 20), v("a3", "a", 30), v("b1", "b", 5), v("c1", "c", 8 * DAY)]


@pytest.mark.parametrize(("mode", "keep", "retention", "max_bytes", "dropped"), [
    ("off", 5, 7 * DAY, 0, {"a1", "a2", "a3", "b1", "c1"}),  # versioning turned off: the store empties
    ("trash", 5, 7 * DAY, 0, {"a2", "a3", "c1"}),  # the last version of each path; c1 is past retention
    ("simple", 2, 7 * DAY, 0, {"a3", "c1"}),
    ("simple", 5, 7 * DAY, 0, {"c1"}),
    ("simple", 5, 30 * DAY, 0, set()),
    ("simple", 0, 30 * DAY, 0, {"a2", "a3"}),  # keep 0 still keeps the newest
    ("simple", 5, 30 * DAY, 35, {"c1", "a3"}),  # byte cap: the oldest go first until under it
    # trash leaves a1, b1, c1 (30 bytes); a 10-byte cap removes the oldest first: c1, then a1 (older than b1)
    ("trash", 5, 30 * DAY, 10, {"a2", "a3", "c1", "a1"}),
])
def test_to_drop(mode: str, keep: int, retention: float, max_bytes: int, dropped: set[str]) -> None:
    assert to_drop(HISTORY, mode, keep, retention, max_bytes, NOW) == dropped


def test_staggered_keeps_one_per_interval() -> None:
    # every 10 s for the last 2 minutes: one per 30 s remains (4 buckets), the newest included
    recent = [v(f"r{i}", "p", 10 * i) for i in range(12)]
    kept = {x.id for x in recent} - to_drop(recent, "staggered", 5, 30 * DAY, 0, NOW)
    assert "r0" in kept and len(kept) == 4
    # one an hour for a day: older than an hour are thinned to one per hour
    hourly = [v(f"h{i}", "q", 3660 + 600 * i) for i in range(12)]  # 1h01..2h51, every 10 min
    kept = {x.id for x in hourly} - to_drop(hourly, "staggered", 5, 30 * DAY, 0, NOW)
    assert len(kept) == 2  # the buckets 1h-2h and 2h-3h
    # one a day for a month, then one a week
    daily = [v(f"d{i}", "r", i * DAY / 2 + 2 * DAY) for i in range(10)]
    kept = {x.id for x in daily} - to_drop(daily, "staggered", 5, 60 * DAY, 0, NOW)
    assert len(kept) == 5


def test_as_of_takes_the_first_version_replaced_after_the_time() -> None:
    vs = [Version("1", "a", 100, 1), Version("2", "a", 200, 1), Version("3", "a", 300, 1),
          Version("4", "b", 150, 1), Version("5", "c", 50, 1)]
    got = as_of(vs, 160)
    assert {p: x.id for p, x in got.items()} == {"a": "2"}  # b and c are unchanged since 160
    assert {p: x.id for p, x in as_of(vs, 0).items()} == {"a": "1", "b": "4", "c": "5"}
    assert as_of(vs, 400) == {}


@pytest.mark.parametrize(("text", "n"), [("0", 0), ("1024", 1024), ("10K", 10240), ("500M", 500 << 20),
                                         ("10G", 10 << 30), ("10GiB", 10 << 30), ("1.5G", 3 << 29), ("2tb", 2 << 40)])
def test_parse_size(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "-1", "ten", "5X", "nan"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)
