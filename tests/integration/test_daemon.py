"""The plugin daemon as dockerd sees it: real processes, the Unix socket, a real etcd."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import time
import uuid
from pathlib import Path

import pytest
from conftest import Etcd, Node, free_port, wait_for

from syncmesh_plugin.devcluster import write


def test_dockerd_call_sequence(cluster, volume):
    n = cluster("n1")
    # docker volume create -d syncmesh --opt conflict_resolution=size NAME
    assert n.ok("Plugin.Activate") == {"Implements": ["VolumeDriver"]}
    assert n.ok("VolumeDriver.Capabilities", {})["Capabilities"]["Scope"] in ("local", "global")
    _code, data = n.docker("VolumeDriver.Get", {"Name": volume})
    assert data["Err"].startswith("no such volume")
    n.ok("VolumeDriver.Create", {"Name": volume, "Opts": {"conflict_resolution": "size"}})
    vol = n.ok("VolumeDriver.Get", {"Name": volume})["Volume"]
    assert vol["Name"] == volume and vol["Mountpoint"].endswith(f"/volumes/{volume}/_data")
    assert time.strptime(vol["CreatedAt"], "%Y-%m-%dT%H:%M:%SZ")
    assert vol["Status"]["options"]["conflict_resolution"] == "size"
    # docker run -v NAME:/data
    n.ok("VolumeDriver.Get", {"Name": volume})
    mp = n.ok("VolumeDriver.Mount", {"Name": volume, "ID": "a" * 64})["Mountpoint"]
    assert os.path.isdir(mp)
    assert n.ok("VolumeDriver.Path", {"Name": volume})["Mountpoint"] == mp
    n.ok("VolumeDriver.Get", {"Name": volume})
    n.ok("VolumeDriver.Unmount", {"Name": volume, "ID": "a" * 64})
    # docker volume ls / rm
    assert volume in [v["Name"] for v in n.ok("VolumeDriver.List", {})["Volumes"]]
    n.ok("VolumeDriver.Remove", {"Name": volume})
    assert volume not in [v["Name"] for v in n.ok("VolumeDriver.List", {})["Volumes"]]
    assert not Path(mp).exists()


def test_socket_mode_and_health(cluster):
    n = cluster("n1")
    assert stat.S_IMODE(os.stat(n.socket).st_mode) == 0o600
    code, h = n.http("GET", "/api/v1/health")
    assert code == 200 and h["components"]["etcd"]["ok"] and h["components"]["plugin_socket"]["ok"]
    code, info = n.http("GET", "/api/v1/info")
    assert code == 200 and info["node_id"] == "n1"
    code, body = n.http("GET", "/metrics")
    assert code == 200 and b"syncmesh_docker_requests_total" in body


def test_create_is_idempotent_across_nodes(cluster, volume):
    a, b = cluster("n1"), cluster("n2")
    a.ok("VolumeDriver.Create", {"Name": volume, "Opts": {"conflict_resolution": "manual"}})
    # the second Create, on another node and with other options, succeeds and changes nothing
    b.ok("VolumeDriver.Create", {"Name": volume, "Opts": {"conflict_resolution": "size"}})
    for n in (a, b):
        st = n.ok("VolumeDriver.Get", {"Name": volume})["Volume"]["Status"]
        assert st["options"]["conflict_resolution"] == "manual" and st["created_by"] == "n1"
    # a third node learns of the volume through the registry watch
    c = cluster("n3")
    wait_for(lambda: volume in [v["Name"] for v in c.ok("VolumeDriver.List", {})["Volumes"]], 10)


def test_remove_refused_while_mounted_on_another_node(cluster, volume):
    a, b, c = cluster("n1"), cluster("n2"), cluster("n3")
    a.ok("VolumeDriver.Create", {"Name": volume})
    b.mount(volume, "m1")
    code, data = a.docker("VolumeDriver.Remove", {"Name": volume})
    assert code == 500
    assert data["Err"] == (f"volume {volume} is in use: mounted on node(s) n2; stop the containers using it there "
                           "first (docker volume rm removes a syncmesh volume on every node)")
    # mounted here too (twice) and on a third node: every node is named, this one first
    c.mount(volume, "m3")
    a.mount(volume, "m1a")
    a.mount(volume, "m1b")
    code, data = a.docker("VolumeDriver.Remove", {"Name": volume})
    assert code == 500
    assert data["Err"].startswith(f"volume {volume} is in use: mounted on node(s) n1 (this node, 2 mounts), n2, n3; ")
    code, data = b.docker("VolumeDriver.Remove", {"Name": volume})
    assert data["Err"].startswith(f"volume {volume} is in use: mounted on node(s) n2 (this node, 1 mount), n1, n3; ")
    for node, mid in ((a, "m1a"), (a, "m1b"), (c, "m3")):
        node.ok("VolumeDriver.Unmount", {"Name": volume, "ID": mid})
    b.ok("VolumeDriver.Unmount", {"Name": volume, "ID": "m1"})
    a.ok("VolumeDriver.Remove", {"Name": volume})
    # the other node drops its copy when it sees the removal
    wait_for(lambda: not b.vol(volume).exists(), 10, what="n2 to drop the volume")
    assert volume not in [v["Name"] for v in b.ok("VolumeDriver.List", {})["Volumes"]]


def test_mounts_of_a_killed_node_do_not_block_remove(cluster, volume):
    a, b = cluster("n1"), cluster("n2", SYNCMESH_ETCD_LEASE_TTL="2")
    a.ok("VolumeDriver.Create", {"Name": volume})
    b.mount(volume)
    b.kill()
    # its lease expires (TTL 2 s): the mount record goes with it
    wait_for(lambda: a.docker("VolumeDriver.Remove", {"Name": volume})[1]["Err"] == "", 15, interval=0.5)


BAD_BODIES = [b"{not json", b"[1,2]", b'"str"', b"\xff\xfe", b'{"Name": 123}', b'{"Name": null}',
              b'{"Name": "../../etc"}', b'{"Name": "a/b"}', b'{"Name": "' + b"x" * 300 + b'"}']


@pytest.mark.parametrize("method", ["Create", "Remove", "Mount", "Unmount", "Path", "Get"])
def test_bad_input_on_every_endpoint(cluster, method):
    n = cluster("n1")
    for body in BAD_BODIES:
        code, data = n.docker(f"VolumeDriver.{method}", raw=body)
        assert code == 500 and data["Err"], (method, body, data)
        assert "Traceback" not in data["Err"]
    code, data = n.docker("VolumeDriver.Create", {"Name": "okname", "Opts": {"conflict_resolution": "bogus"}})
    assert "conflict_resolution" in data["Err"] and "timestamp" in data["Err"]
    code, data = n.docker("VolumeDriver.Create", {"Name": "okname", "Opts": {"nope": "1"}})
    assert "unknown volume option" in data["Err"] and "ignore" in data["Err"]
    code, data = n.docker("VolumeDriver.Create", {"Name": "okname", "Opts": ["x"]})
    assert data["Err"]
    code, data = n.docker("VolumeDriver.Mount", {"Name": "okname"})
    assert data["Err"]
    code, data = n.docker("VolumeDriver.Frobnicate", {})
    assert code == 404 and data["Err"]
    # still serving
    assert n.ok("VolumeDriver.List", {})["Volumes"] == []


def test_sigterm_exits_cleanly_and_removes_socket(cluster):
    n = cluster("n1")
    assert n.stop(signal.SIGTERM) == 0  # (a daemon still running after 10 s is killed: -9)
    assert not os.path.exists(n.socket)


def test_stale_socket_is_replaced(cluster, tmp_path):
    n = cluster("n1", start=False)
    s = socket.socket(socket.AF_UNIX)
    s.bind(n.socket)  # a stale socket file left by a crashed daemon
    s.close()
    n.start()
    assert n.ok("VolumeDriver.List", {})


def test_node_id_conflict_is_refused(cluster, etcd, tmp_path):
    cluster("n1")
    other = Node(tmp_path / "other", "n1", etcd, cluster.prefix)
    other.start(wait=False)
    assert other.proc is not None
    assert other.proc.wait(20) == 2
    assert "already live" in other.log()


def test_same_node_restart_after_kill_takes_registration_back(cluster):
    n = cluster("n1", SYNCMESH_ETCD_LEASE_TTL="60")
    n.kill()
    n.start()  # healthy (within 20 s) while its old lease (60 s) still lives: it took the registration back
    assert n.proc is not None and n.proc.poll() is None and "already live" not in n.log()


def test_socket_binds_before_etcd_answers_and_calls_get_clear_errors(tmp_path):
    port = free_port()  # nothing listens there
    n = Node(tmp_path, "lonely", None, "/x", SYNCMESH_ETCD_ENDPOINTS=f"http://127.0.0.1:{port}")
    n.start(wait=False)
    try:
        wait_for(lambda: os.path.exists(n.socket), 10, what="the plugin socket (etcd never answers here)")
        code, data = n.docker("VolumeDriver.Create", {"Name": "v"})
        assert code == 500 and "cluster unavailable" in data["Err"]
        assert n.ok("VolumeDriver.List", {})["Volumes"] == []
        code, h = n.http("GET", "/api/v1/health")
        assert code == 503 and not h["components"]["etcd"]["ok"]
    finally:
        n.stop()


def test_get_and_mount_keep_working_while_etcd_is_down(tmp_path, volume):
    e = Etcd(tmp_path / "own-etcd")
    (tmp_path / "own-etcd").mkdir()
    e.start()
    n = Node(tmp_path, "n1", e, "/own").start()
    try:
        n.ok("VolumeDriver.Create", {"Name": volume})
        e.stop()
        vol = n.ok("VolumeDriver.Get", {"Name": volume})["Volume"]
        assert vol["Name"] == volume
        assert n.mount(volume).is_dir()
        (n.vol(volume) / "queued.txt").write_text("written while etcd was down")
        wait_for(lambda: n.http("GET", "/api/v1/health")[0] == 503, 10)
        e.start()
        n.wait_healthy(30)
        # the local change queued meanwhile is published once etcd is back
        from conftest import converged

        m = Node(tmp_path, "n2", e, "/own").start()
        try:
            m.mount(volume)
            converged([n, m], volume, expect=lambda t: "queued.txt" in t)
        finally:
            m.stop()
    finally:
        n.stop()
        e.stop()


def test_embedded_etcd_mode(tmp_path, volume):
    n = Node(tmp_path, "solo", None, "/syncmesh/v1")
    n.start()
    try:
        _code, info = n.http("GET", "/api/v1/info")
        assert info["embedded_etcd"] is True
        n.ok("VolumeDriver.Create", {"Name": volume})
        assert n.mount(volume).is_dir()
        assert (n.data_root / "etcd").is_dir()
        etcd_pids = [p for p in os.listdir("/proc") if p.isdigit() and "--data-dir" in _cmd(p)
                     and str(n.data_root / "etcd") in _cmd(p)]
        assert etcd_pids
    finally:
        assert n.stop() == 0
    # the embedded etcd stops with the daemon, and its data survives a restart
    assert not [p for p in os.listdir("/proc") if p.isdigit() and str(n.data_root) in _cmd(p)]
    n.start()
    try:
        assert volume in [v["Name"] for v in n.ok("VolumeDriver.List", {})["Volumes"]]
    finally:
        n.stop()


def _cmd(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_one_inotify_instance_for_all_volumes(cluster):
    """fs.inotify.max_user_instances (128 by default) is per user, not per volume: the daemon holds one."""
    a = cluster("n1")
    names = [f"ino{uuid.uuid4().hex[:6]}" for _ in range(4)]
    for name in names:
        a.ok("VolumeDriver.Create", {"Name": name})
        a.mount(name, "m")
        (a.vol(name) / "sub").mkdir()
    assert a.proc is not None

    def inotify_fds() -> int:
        n = 0
        for fd in os.listdir(f"/proc/{a.proc.pid}/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/{a.proc.pid}/fd/{fd}") == "anon_inode:inotify"
        return n

    assert inotify_fds() == 1
    write(a.vol(names[-1]) / "sub" / "seen.txt", "watched through the shared instance")
    wait_for(lambda: a.http("GET", f"/api/v1/volumes/{names[-1]}/files/sub/seen.txt")[0] == 200, 10,
             what="the write to be published")
    for name in names:
        a.ok("VolumeDriver.Unmount", {"Name": name, "ID": "m"})
        a.ok("VolumeDriver.Remove", {"Name": name})
    wait_for(lambda: inotify_fds() == 0, 10, what="the instance to close with the last volume")
