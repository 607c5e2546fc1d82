"""Replica placement and the replica views, as tables: pure functions of the cluster's view."""

from __future__ import annotations

import pytest

from syncmesh_plugin.placement import (
    ReplicaView,
    expected,
    parse_replicas,
    rank,
    release_refusal,
    replica_views,
    wanted,
)

NODES = ["n1", "n2", "n3", "n4", "n5"]


@pytest.mark.parametrize(("text", "expected_text"), [("all", "all"), ("ALL", "all"), (" 2 ", "2"), ("1", "1"),
                                                     ("1000", "1000")])
def test_parse_replicas(text: str, expected_text: str) -> None:
    assert parse_replicas(text) == expected_text


@pytest.mark.parametrize("text", ["0", "-1", "two", "", "1001", "2.5", "some"])
def test_parse_replicas_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_replicas(text)


def test_rank_is_a_stable_total_order() -> None:
    order = rank("data", NODES)
    assert sorted(order) == sorted(NODES)
    assert rank("data", list(reversed(NODES))) == order  # the same whatever the input order
    # removing a node keeps the others' relative order (only that node's volumes move)
    for gone in NODES:
        assert rank("data", [n for n in NODES if n != gone]) == [n for n in order if n != gone]


def test_rank_spreads_volumes() -> None:
    firsts = {rank(f"vol{i}", NODES)[0] for i in range(200)}
    assert firsts == set(NODES)


@pytest.mark.parametrize(("spec", "live", "holders", "expected_holders"), [
    ("", NODES, [], set()),  # no placement: only Mount or Create hold a volume
    ("all", NODES, [], set(NODES)),
    ("all", NODES, ["n1", "n2"], set(NODES)),
    ("2", NODES, [], "top2"),  # the two first in rendezvous order
    ("2", NODES, ["n3", "n5"], set()),  # already two live holders
    ("2", NODES, ["n3"], "top1-not-n3"),  # one more
    ("2", ["n1", "n2", "n4"], ["n3", "n5"], "top2-live"),  # both holders are down: two live ones take over
    ("9", NODES, ["n1"], set(NODES) - {"n1"}),  # more than there are nodes: every live node
    ("1", NODES, ["n2"], set()),
])
def test_wanted(spec: str, live: list[str], holders: list[str], expected_holders: object) -> None:
    order = rank("vol", live)
    if expected_holders == "top2":
        expected_set = set(order[:2])
    elif expected_holders == "top1-not-n3":
        expected_set = {next(n for n in order if n != "n3")}
    elif expected_holders == "top2-live":
        expected_set = set(order[:2])
    else:
        assert isinstance(expected_holders, set)
        expected_set = expected_holders
    got = {n for n in live if n not in holders and wanted("vol", spec, n, live, holders)}
    assert got == expected_set - set(holders)


def test_a_node_that_is_down_is_never_chosen() -> None:
    assert not wanted("vol", "3", "n9", ["n1", "n2"], [])


@pytest.mark.parametrize(("spec", "live", "n"), [("", NODES, 0), ("all", NODES, 5), ("all", ["n1"], 1),
                                                 ("3", NODES, 3), ("3", ["n1"], 3)])
def test_expected(spec: str, live: list[str], n: int) -> None:
    assert expected(spec, live) == n


def test_replica_views_live_and_offline() -> None:
    recs = {"n1": {"applied_revision": 50, "last_seen": 10.0}, "n2": {"applied_revision": 40, "last_seen": 20.0},
            "n3": {"revision": 50, "at": 5.0}}
    views = replica_views(50, recs, live={"n1", "n3"}, now=99.0)
    assert views == [
        ReplicaView("n1", True, 50, 0, 99.0, True),
        ReplicaView("n2", False, 40, 10, 20.0, False),  # offline, behind, last seen when it last reported
        ReplicaView("n3", True, 50, 0, 99.0, True),
    ]


def v(node: str, live: bool, complete: bool) -> ReplicaView:
    return ReplicaView(node, live, 10 if complete else 5, 0 if complete else 5, 0.0, complete)


@pytest.mark.parametrize(("spec", "views", "mounted", "fragment"), [
    ("", [v("n1", True, True), v("n2", True, True)], 0, ""),
    ("", [v("n1", True, True), v("n2", True, True)], 1, "mounted 1 time(s) on this node (n1)"),
    ("", [v("n1", True, True)], 0, "last complete replica"),
    ("", [v("n1", True, True), v("n2", True, False)], 0, "last complete replica"),  # n2 still catching up
    ("", [v("n1", True, True), v("n2", False, True)], 0, "last complete replica"),  # n2 offline
    ("all", [v("n1", True, True), v("n2", True, True)], 0, "replicas=all"),
    ("2", [v("n1", True, True), v("n2", True, True)], 0, "asks for 2 replicas"),
    ("2", [v("n1", True, True), v("n2", True, True), v("n3", True, False)], 0, ""),
])
def test_release_refusal(spec: str, views: list[ReplicaView], mounted: int, fragment: str) -> None:
    reason = release_refusal("vol", spec, "n1", 10, views, mounted)
    assert (fragment in reason) if fragment else reason == ""
    assert bool(reason) == bool(fragment)
