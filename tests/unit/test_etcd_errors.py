"""Which etcd errors send a request to another member, and which ones prove it was never applied."""

from __future__ import annotations

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from syncmesh_plugin.etcd_client import failover_kind, never_sent

S = grpc.StatusCode


def rpc(code: grpc.StatusCode, details: str) -> AioRpcError:
    return AioRpcError(code, Metadata(), Metadata(), details=details)


@pytest.mark.parametrize(("code", "details", "kind", "unsent"), [
    (S.UNAVAILABLE, "failed to connect to all addresses; Connection refused", "refused", True),
    (S.UNAVAILABLE, "Stream removed (Socket closed)", "unavailable", False),  # it may have been applied
    (S.UNAVAILABLE, "etcdserver: rpc not supported for learner", "unavailable", True),  # turned away, not proposed
    (S.UNAVAILABLE, "etcdserver: unhealthy cluster", "unavailable", True),  # a member change refused for now
    (S.FAILED_PRECONDITION, "etcdserver: rpc not supported for learner", "learner", True),
    (S.FAILED_PRECONDITION, "etcdserver: too many learner members in cluster", None, False),  # the cluster's answer
    (S.DEADLINE_EXCEEDED, "deadline exceeded", "timeout", False),
    (S.UNKNOWN, "No status received", "unavailable", False),  # the member stopped under the call
    (S.UNKNOWN, "etcdserver: something else", None, False),
    (S.RESOURCE_EXHAUSTED, "etcdserver: too many requests", "busy", False),
    (S.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded", None, False),  # full on every member
    (S.PERMISSION_DENIED, "etcdserver: permission denied", None, False),
    (S.OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted", None, False),
])
def test_failover_kind_and_never_sent(code: grpc.StatusCode, details: str, kind: str | None, unsent: bool) -> None:
    exc = rpc(code, details)
    assert failover_kind(exc) == kind
    assert never_sent(exc) is unsent
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = exc  # etcd3aio wraps the gRPC error: its cause is what counts
    assert failover_kind(wrapped) == kind and never_sent(wrapped) is unsent


def test_timeouts_and_socket_errors_fail_over() -> None:
    assert failover_kind(TimeoutError()) == "timeout" and not never_sent(TimeoutError())
    assert failover_kind(OSError("name resolution")) == "unavailable"
    assert failover_kind(ValueError("a bug")) is None
