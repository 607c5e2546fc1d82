"""Admin CLI against a fake node API: tables, --json, and the documented exit codes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from syncmesh_plugin import admin
from syncmesh_plugin.cli import main

NODES = {"nodes": [{"node_id": "n1", "advertise": "http://a:1", "volumes": ["data"], "self": True},
                   {"node_id": "n2", "advertise": "http://b:2", "volumes": ["data"], "self": False}], "leader": "n1"}


def fake_api(monkeypatch, routes):
    calls = []
    # the volume's replicas, live and offline (verify asks); last, so more specific routes match first
    routes.setdefault(("", "/api/v1/volumes/data"), (200, {"convergence": {"nodes": []}}))

    def request(self, method, path, *, exit_on_error=True):
        calls.append((self.base, method, path))
        for (base, prefix), answer in routes.items():
            if self.base.endswith(base) and path.startswith(prefix):
                if answer is ConnectionError:
                    if not exit_on_error:
                        raise ConnectionError("refused")
                    raise SystemExit(admin.EXIT_UNREACHABLE)
                return answer
        return 404, {"error": f"no route {path}"}

    monkeypatch.setattr(admin.Client, "request", request)
    monkeypatch.setenv("SYNCMESH_NODE_ID", "n1")
    return calls


def digests(entries):
    return 200, {"volume": "data", "node": "x", "entries": entries, "next_cursor": None}


def test_verify_identical(monkeypatch):
    same = [["a.txt", "file", "d1", "644"], ["dir", "dir", "", "755"]]
    fake_api(monkeypatch, {("", "/api/v1/cluster/nodes"): (200, NODES),
                           ("a:1", "/api/v1/volumes/data/digests"): digests(same),
                           ("b:2", "/api/v1/volumes/data/digests"): digests(same)})
    r = CliRunner().invoke(main, ["verify", "data", "--api", "http://a:1"])
    assert r.exit_code == 0, r.output
    assert "identical on 2 node(s)" in r.output and "2 path(s)" in r.output


def test_verify_names_an_offline_replica_and_exits_3(monkeypatch):
    """A replica whose node is down cannot be asked: never "identical"."""
    same = [["a.txt", "file", "d1", "644"]]
    conv = {"convergence": {"nodes": [{"node": "n1", "live": True}, {"node": "n2", "live": True},
                                      {"node": "n3", "live": False, "last_seen": 1700000000.0}]}}
    fake_api(monkeypatch, {("", "/api/v1/cluster/nodes"): (200, NODES),
                           ("a:1", "/api/v1/volumes/data/digests"): digests(same),
                           ("b:2", "/api/v1/volumes/data/digests"): digests(same),
                           ("", "/api/v1/volumes/data"): (200, conv)})
    r = CliRunner().invoke(main, ["verify", "data", "--api", "http://a:1"])
    assert r.exit_code == 3, r.output
    assert "n3: unreachable: offline: its replica cannot be asked (last seen" in r.output
    assert "identical" not in r.output
    r = CliRunner().invoke(main, ["verify", "data", "--api", "http://a:1", "--json"])
    data = json.loads(r.output)
    assert r.exit_code == 3 and not data["identical"] and "n3" in data["unreachable"]


def test_hold_release_forget(monkeypatch):
    calls = fake_api(monkeypatch, {
        ("", "/api/v1/volumes/data/hold"): (200, {"volume": "data", "node": "n1", "held": True, "already": False}),
        ("", "/api/v1/volumes/data/release"): (409, {"error": "cannot release data: n1 holds the last complete "
                                                              "replica of data", "status": 409}),
        ("", "/api/v1/cluster/nodes/n9/forget"): (200, {"node": "n9", "forgotten": True,
                                                         "replicas_removed": ["data"]})})
    r = CliRunner().invoke(main, ["hold", "data", "--api", "http://a:1"])
    assert r.exit_code == 0 and "held on n1" in r.output
    r = CliRunner().invoke(main, ["release", "data", "--api", "http://a:1"])
    assert r.exit_code == 1 and "last complete replica" in r.output
    r = CliRunner().invoke(main, ["forget", "n9", "--api", "http://a:1"])
    assert r.exit_code == 0 and "1 replica record(s) removed (data)" in r.output
    assert [(m, p) for _, m, p in calls] == [("POST", "/api/v1/volumes/data/hold"),
                                             ("POST", "/api/v1/volumes/data/release"),
                                             ("POST", "/api/v1/cluster/nodes/n9/forget")]


def test_verify_lists_differences_and_exits_1(monkeypatch):
    fake_api(monkeypatch, {("", "/api/v1/cluster/nodes"): (200, NODES),
                           ("a:1", "/api/v1/volumes/data/digests"): digests([["a.txt", "file", "d1", "644"],
                                                                             ["only-a", "file", "d9", "644"]]),
                           ("b:2", "/api/v1/volumes/data/digests"): digests([["a.txt", "file", "d2", "644"]])})
    r = CliRunner().invoke(main, ["verify", "data", "--api", "http://a:1", "--settle", "0"])
    assert r.exit_code == 1, r.output
    assert "2 path(s) differ" in r.output and "a.txt" in r.output and "only-a" in r.output
    r = CliRunner().invoke(main, ["verify", "data", "--api", "http://a:1", "--settle", "0", "--json"])
    data = json.loads(r.output)
    assert r.exit_code == 1 and not data["identical"]
    assert data["differences"]["only-a"] == {"n1": ["file", "d9", "644"], "n2": None}


def test_verify_unreachable_holder_exits_3(monkeypatch):
    fake_api(monkeypatch, {("", "/api/v1/cluster/nodes"): (200, NODES),
                           ("a:1", "/api/v1/volumes/data/digests"): digests([]),
                           ("b:2", "/api/v1/volumes/data/digests"): ConnectionError})
    r = CliRunner().invoke(main, ["verify", "data", "--api", "http://a:1"])
    assert r.exit_code == 3 and "n2: unreachable" in r.output


def test_unknown_volume_exits_1_with_the_nodes_message(monkeypatch):
    fake_api(monkeypatch, {("", "/api/v1/volumes/nope"): (404, {"error": "no such volume: nope"})})
    r = CliRunner().invoke(main, ["inspect", "nope", "--api", "http://a:1"])
    assert r.exit_code == 1 and "no such volume: nope" in r.output


def test_node_unreachable_exits_3():
    r = CliRunner().invoke(main, ["volumes", "--api", "http://127.0.0.1:1"])
    assert r.exit_code == 3 and "cannot reach the node API" in r.output


def test_bad_config_exits_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("no_such_key: 1\n")
    r = CliRunner().invoke(main, ["status", "--config", str(cfg)])
    assert r.exit_code == 2 and "configuration error" in r.output


def test_volumes_table_and_json(monkeypatch):
    vols = {"volumes": [{"name": "data", "options": {}, "mounts_here": 1,
                         "sync": {"held": True, "ready": True, "files": 3, "bytes": 2048, "pending": 0}}]}
    fake_api(monkeypatch, {("", "/api/v1/volumes"): (200, vols)})
    r = CliRunner().invoke(main, ["volumes", "--api", "http://a:1"])
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].split()[:3] == ["NAME", "HELD", "STATE"] and "2.0 KiB" in lines[1] and "in sync" in lines[1]
    r = CliRunner().invoke(main, ["volumes", "--api", "http://a:1", "--json"])
    assert json.loads(r.output) == vols


def test_files_follows_pages_and_resync_posts(monkeypatch):
    pages = iter([(200, {"volume": "data", "files": [{"path": "a", "kind": "file", "size": 1, "mode": "644",
                                                       "revision": 5, "digest": "d"}], "next_cursor": "YQ"}),
                  (200, {"volume": "data", "files": [{"path": "b", "kind": "dir", "size": 0, "mode": "755",
                                                       "revision": 6}], "next_cursor": None})])
    calls = []

    def request(self, method, path, *, exit_on_error=True):
        calls.append((method, path))
        if method == "POST":
            return 200, {"volume": "data", "path": "x/y z", "action": "refetch"}
        return next(pages)

    monkeypatch.setattr(admin.Client, "request", request)
    r = CliRunner().invoke(main, ["files", "data", "--api", "http://a:1", "--limit", "1"])
    assert r.exit_code == 0 and [ln.split()[0] for ln in r.output.splitlines()] == ["PATH", "a", "b"]
    assert calls[1][1].endswith("&cursor=YQ")
    r = CliRunner().invoke(main, ["resync", "data", "x/y z", "--api", "http://a:1"])
    assert r.exit_code == 0 and "refetch" in r.output
    assert calls[-1] == ("POST", "/api/v1/volumes/data/files/x/y%20z/sync")


@pytest.mark.parametrize("cmd", ["status", "nodes", "volumes", "inspect", "files", "conflicts", "verify",
                                 "resync", "watch"])
def test_every_admin_command_has_help(cmd):
    r = CliRunner().invoke(main, [cmd, "--help"])
    assert r.exit_code == 0 and "--api" in r.output and "--json" in r.output
