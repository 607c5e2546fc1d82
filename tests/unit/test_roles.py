"""Writers and roles, as tables."""

from __future__ import annotations

import pytest

from syncmesh_plugin.sync.roles import Role, accepted_origin, effective_role, parse_role, parse_writers


@pytest.mark.parametrize(("text", "expected"), [("n1", ("n1",)), ("n1, n2", ("n1", "n2")), ("n1,n1,n2", ("n1", "n2")),
                                                ("host-1.example", ("host-1.example",)), (" a ,,b ", ("a", "b"))])
def test_parse_writers(text: str, expected: tuple[str, ...]) -> None:
    assert parse_writers(text) == expected


@pytest.mark.parametrize("text", ["", ",", "n/1", "-n", "a b", "x" * 300])
def test_parse_writers_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_writers(text)


@pytest.mark.parametrize(("text", "expected"), [("receive-only", Role.RECEIVE_ONLY), ("SEND-ONLY", Role.SEND_ONLY),
                                                ("send-receive", Role.SEND_RECEIVE), ("", None), ("default", None)])
def test_parse_role(text: str, expected: Role | None) -> None:
    assert parse_role(text) is expected


def test_parse_role_rejects() -> None:
    with pytest.raises(ValueError):
        parse_role("read-only")


@pytest.mark.parametrize(("node", "writers", "override", "expected"), [
    ("n1", (), None, Role.SEND_RECEIVE),  # no writers: everyone writes
    ("n1", ("n1",), None, Role.SEND_RECEIVE),
    ("n2", ("n1",), None, Role.RECEIVE_ONLY),
    ("n2", ("n1", "n2"), None, Role.SEND_RECEIVE),
    ("n1", ("n1",), Role.RECEIVE_ONLY, Role.RECEIVE_ONLY),  # the operator's role wins
    ("n2", ("n1",), Role.SEND_ONLY, Role.SEND_ONLY),
    ("n2", (), Role.SEND_RECEIVE, Role.SEND_RECEIVE),
])
def test_effective_role(node: str, writers: tuple[str, ...], override: Role | None, expected: Role) -> None:
    assert effective_role(node, writers, override) is expected


@pytest.mark.parametrize(("origin", "writers", "ok"), [("n1", (), True), ("n1", ("n1",), True), ("n2", ("n1",), False),
                                                       ("", ("n1",), False), ("?", (), True)])
def test_accepted_origin(origin: str, writers: tuple[str, ...], ok: bool) -> None:
    assert accepted_origin(origin, writers) is ok
