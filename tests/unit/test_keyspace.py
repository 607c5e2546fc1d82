"""The etcd keyspace: every key built in keyspace.py parses back to what built it; records are decoded."""

from __future__ import annotations

import pytest

from syncmesh_plugin.keyspace import Keyspace
from syncmesh_plugin.manifest import Manifest
from syncmesh_plugin.meta import record, tombstone_time

KS = Keyspace("/syncmesh/v1")


def test_keys_have_the_documented_shape() -> None:
    assert KS.node_key("n1") == b"/syncmesh/v1/nodes/n1"
    assert KS.volume_key("data") == b"/syncmesh/v1/volumes/data"
    assert KS.file_key("data", "a/b.txt") == b"/syncmesh/v1/files/data/a/b.txt"
    assert KS.head_key("data") == b"/syncmesh/v1/head/data"
    assert KS.gc_key("data") == b"/syncmesh/v1/gc/data"
    assert KS.mount_key("data", "n1") == b"/syncmesh/v1/mounts/data/n1"
    assert KS.holder_key("data", "n1") == b"/syncmesh/v1/holders/data/n1"
    assert KS.applied_key("data", "n1") == b"/syncmesh/v1/applied/data/n1"
    assert KS.election_key("housekeeper", "n1") == b"/syncmesh/v1/election/housekeeper/n1"
    assert KS.ping_key() == b"/syncmesh/v1/ping"
    assert KS.rev_key() == b"/syncmesh/v1/rev"


def test_every_key_lies_under_its_prefix() -> None:
    pairs = [(KS.node_key("n1"), KS.nodes_prefix()), (KS.volume_key("v"), KS.volumes_prefix()),
             (KS.file_key("v", "p"), KS.files_prefix("v")), (KS.mount_key("v", "n"), KS.mounts_prefix("v")),
             (KS.holder_key("v", "n"), KS.holders_prefix("v")), (KS.holder_key("v", "n"), KS.holders_prefix()),
             (KS.applied_key("v", "n"), KS.applied_prefix("v")), (KS.applied_key("v", "n"), KS.applied_prefix()),
             (KS.election_key("e", "n"), KS.election_prefix("e"))]
    for key, prefix in pairs:
        assert key.startswith(prefix) and prefix.endswith(b"/"), (key, prefix)


def test_a_volume_prefix_never_covers_another_volume() -> None:
    assert not KS.file_key("data2", "x").startswith(KS.files_prefix("data"))
    assert not KS.holder_key("data2", "n").startswith(KS.holders_prefix("data"))


@pytest.mark.parametrize("path", ["a", "a/b/c.txt", "dir/with space/ü.bin", "x" * 300,
                                  b"caf\xe9.txt".decode("utf-8", "surrogateescape")])
def test_file_paths_round_trip(path: str) -> None:
    assert KS.path_of("data", KS.file_key("data", path)) == path


def test_names_and_pairs_parse_back() -> None:
    assert KS.name_under(KS.holders_prefix("v"), KS.holder_key("v", "n7")) == "n7"
    assert KS.name_under(KS.volumes_prefix(), KS.volume_key("data")) == "data"
    assert KS.name_under(KS.nodes_prefix(), KS.node_key("n1")) == "n1"
    assert KS.pair_under(KS.applied_prefix(), KS.applied_key("v", "n2")) == ("v", "n2")
    assert KS.pair_under(KS.holders_prefix(), KS.holder_key("v", "n2")) == ("v", "n2")
    # Any other shape (written by something else) is not a (volume, node) pair.
    assert KS.pair_under(KS.applied_prefix(), KS.join("applied", "v")) is None
    assert KS.pair_under(KS.applied_prefix(), KS.join("applied", "v", "n", "x")) is None
    assert KS.name_under(KS.nodes_prefix(), KS.nodes_prefix() + b"\xff") == "\ufffd"


def test_volume_removal_covers_every_per_volume_prefix() -> None:
    assert KS.volume_prefixes("v") == [KS.files_prefix("v"), KS.mounts_prefix("v"), KS.holders_prefix("v"),
                                       KS.applied_prefix("v"), KS.replicas_prefix("v")]
    assert KS.replica_key("v", "n1") == KS.replicas_prefix("v") + b"n1"
    assert KS.pair_under(KS.replicas_prefix(), KS.replica_key("v", "n1")) == ("v", "n1")


def test_another_prefix_is_another_cluster() -> None:
    other = Keyspace("/custom")
    assert other.file_key("v", "p") == b"/custom/files/v/p"
    assert not other.file_key("v", "p").startswith(KS.files_prefix("v"))


def test_tombstones_are_found_by_decoding() -> None:
    tomb = Manifest(kind="deleted", origin="n1", ts=12.5)
    assert tombstone_time(tomb.encode()) == 12.5
    assert tombstone_time(b'{"k": "deleted", "o": "n1", "ts": 3}') == 3.0  # any JSON spelling
    assert tombstone_time(Manifest(kind="dir", mode=0o755, origin="n1").encode()) is None
    # A symlink whose target spells a tombstone is not one.
    link = Manifest(kind="symlink", mode=0o777, target='"k":"deleted"', origin="n1")
    assert tombstone_time(link.encode()) is None
    assert tombstone_time(b"not json") is None
    assert tombstone_time(b'{"k":"deleted","o":7}') is None  # invalid tombstone: never collected
    assert tombstone_time(b"[" * 50_000 + b"]" * 50_000) is None


def test_records_are_json_objects_or_nothing() -> None:
    assert record(b'{"revision": 3}') == {"revision": 3}
    assert record(b"[1, 2]") is None
    assert record(b"\xff") is None
    assert record(b"") is None
