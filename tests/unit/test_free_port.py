"""A listener's port is chosen outside the kernel's ephemeral range, where no outgoing connection can take it."""

from __future__ import annotations

import socket

import pytest

from syncmesh_plugin.etcd_embedded import ephemeral_range, free_port, port_candidates


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (32768, 60999, [range(20000, 32768), range(61000, 65536)]),  # Linux's default
        (49152, 65535, [range(20000, 49152)]),  # IANA's range: nothing above it
        (1024, 65535, []),  # every port is ephemeral: no choice outside it
        (10000, 30000, [range(30001, 65536)]),  # a range that starts below the lowest port chosen
    ],
)
def test_candidates_leave_out_the_ephemeral_range(lo, hi, expected):
    assert port_candidates(lo, hi) == expected


def test_the_range_is_read_from_the_kernel_or_defaults(tmp_path):
    f = tmp_path / "range"
    f.write_text("40000\t50000\n")
    assert ephemeral_range(str(f)) == (40000, 50000)
    assert ephemeral_range(str(tmp_path / "missing")) == (32768, 60999)
    f.write_text("garbage")
    assert ephemeral_range(str(f)) == (32768, 60999)


def test_free_ports_are_outside_the_range_distinct_and_bindable():
    lo, hi = ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    if port_candidates(lo, hi):
        assert all(not lo <= p <= hi for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))


def test_a_port_with_a_listener_is_never_chosen(monkeypatch):
    listeners = []
    try:
        for port in range(20000, 20010):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            s.listen()
            listeners.append(s)
        taken = {s.getsockname()[1] for s in listeners}
        monkeypatch.setattr("syncmesh_plugin.etcd_embedded.port_candidates", lambda lo, hi: [range(20000, 20012)])
        chosen = {free_port() for _ in range(2)}
        assert chosen and not (chosen & taken)
    finally:
        for s in listeners:
            s.close()
