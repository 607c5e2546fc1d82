"""One private dockerd (own network and mount namespace), the daemon from the venv as a legacy plugin: its
socket is in that dockerd's plugins_dir, which the dockerd sees as /run/docker/plugins/syncmesh.sock."""

from __future__ import annotations

import json
import time
from pathlib import Path

import docker
import pytest
import yaml
from conftest import TIMINGS
from e2e_harness import IMAGE, ROOT, Dockerd, SyncmeshProcess, unix_post, wait_for

DRIVER = "syncmesh"


def inspect(d: Dockerd, name: str) -> dict:
    return json.loads(d.cli("volume", "inspect", name).stdout)[0]


def test_volume_lifecycle(docker_host: Dockerd, legacy_plugin: SyncmeshProcess, unique: str) -> None:
    d, name = docker_host, f"{unique}-life"
    t = time.monotonic()
    d.cli("volume", "create", "-d", DRIVER, "--opt", "conflict_resolution=size", name)
    TIMINGS["docker volume create (legacy)"] = time.monotonic() - t

    info = inspect(d, name)
    assert info["Driver"] == DRIVER
    assert info["Options"] == {"conflict_resolution": "size"}
    status = info["Status"]
    assert status["options"]["conflict_resolution"] == "size"
    assert status["node"] == "e2e-legacy"
    for key in ("held", "ready", "files", "pending", "revision"):
        assert key in status["sync"], status
    assert info["Mountpoint"] == str(legacy_plugin.mountpoint(name))

    t = time.monotonic()
    d.cli("run", "--rm", "-v", f"{name}:/data", IMAGE, "sh", "-c",
          "echo hello > /data/a.txt && mkdir -p /data/sub && head -c 100000 /dev/urandom > /data/sub/blob")
    TIMINGS["docker run writing 2 files (legacy)"] = time.monotonic() - t
    mp = legacy_plugin.mountpoint(name)
    assert (mp / "a.txt").read_text() == "hello\n"
    assert (mp / "sub" / "blob").stat().st_size == 100000
    wait_for(lambda: inspect(d, name)["Status"]["sync"]["files"] >= 2, 20, "the sync engine to index the files")

    assert name in d.cli("volume", "ls", "-q").stdout.split()
    assert name in d.cli("volume", "ls", "-q", "--filter", f"driver={DRIVER}").stdout.split()

    cid = d.cli("run", "-d", "-v", f"{name}:/data", IMAGE, "sleep", "300").stdout.strip()
    try:
        wait_for(lambda: inspect(d, name)["Status"]["mounts_here"] == 1, 10, "the mount to be counted")
        res = d.cli("volume", "rm", name, check=False)
        assert res.returncode != 0
        assert "in use" in res.stderr, res.stderr
        assert name in d.cli("volume", "ls", "-q").stdout.split()
    finally:
        d.cli("rm", "-f", cid)
    wait_for(lambda: inspect(d, name)["Status"]["mounts_here"] == 0, 10, "Unmount")
    t = time.monotonic()
    d.cli("volume", "rm", name)
    TIMINGS["docker volume rm (legacy)"] = time.monotonic() - t
    assert name not in d.cli("volume", "ls", "-q").stdout.split()
    assert not mp.exists()


def test_bad_option_is_refused_with_reason(docker_host: Dockerd, legacy_plugin: SyncmeshProcess, unique: str) -> None:
    res = docker_host.cli("volume", "create", "-d", DRIVER, "--opt", "conflict_resolution=newest", f"{unique}-bad",
                          check=False)
    assert res.returncode != 0
    assert "conflict_resolution" in res.stderr and "timestamp|size|manual" in res.stderr, res.stderr


def test_compose_style_create(docker_host: Dockerd, legacy_plugin: SyncmeshProcess, unique: str) -> None:
    """What compose does for examples/docker-compose.yml: VolumeCreate with driver, driver_opts, labels."""
    spec = yaml.safe_load((ROOT / "examples" / "docker-compose.yml").read_text())
    vol = next(iter(spec["volumes"].values()))
    assert vol["driver"] == DRIVER and vol["name"] and vol["driver_opts"]
    name = f"{unique}-compose"
    client = docker.DockerClient(base_url=docker_host.host)
    try:
        client.volumes.create(name=name, driver=vol["driver"],
                              driver_opts={k: str(v) for k, v in vol["driver_opts"].items()},
                              labels={"com.docker.compose.project": "example", "com.docker.compose.volume": "shared"})
        info = inspect(docker_host, name)
        assert info["Labels"]["com.docker.compose.project"] == "example"
        opts = info["Status"]["options"]
        for k, v in vol["driver_opts"].items():
            got = opts[k]
            if isinstance(got, list):
                assert got == [p.strip() for p in str(v).split(",")]
            elif isinstance(got, bool):
                assert got == (str(v).lower() == "true")
            else:
                assert str(got) == str(v) or (k == "mount_timeout" and float(got) > 0)
        out = client.containers.run(IMAGE, ["sh", "-c", "echo compose > /data/c && cat /data/c"],
                                    volumes={name: {"bind": "/data", "mode": "rw"}}, remove=True)
        assert out == b"compose\n"
    finally:
        client.volumes.get(name).remove(force=True)
        client.close()


def test_daemon_restart_under_running_container(docker_host: Dockerd, legacy_plugin: SyncmeshProcess,
                                                etcd, workdir: Path, unique: str) -> None:
    """The daemon restarts while a container keeps the volume mounted: the container keeps writing
    and the volume keeps syncing (an observer node that holds the volume receives the new data)."""
    d, name = docker_host, f"{unique}-restart"
    d.cli("volume", "create", "-d", DRIVER, name)
    observer = SyncmeshProcess(workdir / "observer", "e2e-observer", etcd.endpoints, str(workdir / "observer.sock"))
    observer.start()
    cid = ""
    try:
        # The observer is a second node with no dockerd: mount the volume there the way dockerd would.
        status, body = unix_post(observer.socket, "/VolumeDriver.Mount", {"Name": name, "ID": "observer-1"})
        assert status == 200 and not body.get("Err"), body
        cid = d.cli("run", "-d", "-v", f"{name}:/data", IMAGE, "sh", "-c",
                    "i=0; while true; do echo line$i >> /data/log; i=$((i+1)); sleep 0.2; done").stdout.strip()
        mp, obs = legacy_plugin.mountpoint(name), observer.mountpoint(name)
        wait_for(lambda: (obs / "log").exists() and (obs / "log").stat().st_size > 0, 30, "first sync to observer")

        t = time.monotonic()
        legacy_plugin.stop()
        down_size = (mp / "log").stat().st_size
        time.sleep(1.0)  # the container writes while the daemon is down
        legacy_plugin.start()
        TIMINGS["legacy daemon restart (stop+start)"] = time.monotonic() - t

        assert d.cli("inspect", "-f", "{{.State.Running}}", cid).stdout.strip() == "true"
        wait_for(lambda: (mp / "log").stat().st_size > down_size + 50, 10, "the container to keep writing")
        t = time.monotonic()
        # Lines written after the restart reach the observer: the volume kept syncing.
        target = (mp / "log").read_bytes()
        wait_for(lambda: (obs / "log").read_bytes().startswith(target), 60,
                 "data written after the restart to reach the observer")
        TIMINGS["post-restart change visible on observer"] = time.monotonic() - t
        info = inspect(d, name)
        assert info["Status"]["mounts_here"] == 1  # the mount count survived the restart
        assert info["Status"]["sync"]["held"]
    finally:
        if cid:
            d.cli("rm", "-f", cid, check=False)
        try:
            unix_post(observer.socket, "/VolumeDriver.Unmount", {"Name": name, "ID": "observer-1"})
        except OSError:
            pass
        observer.stop()
        d.cli("volume", "rm", "-f", name, check=False)


@pytest.mark.parametrize("n", [3])
def test_parallel_containers_share_volume(docker_host: Dockerd, legacy_plugin: SyncmeshProcess, unique: str,
                                          n: int) -> None:
    d, name = docker_host, f"{unique}-shared"
    d.cli("volume", "create", "-d", DRIVER, name)
    try:
        ids = [d.cli("run", "-d", "-v", f"{name}:/data", IMAGE, "sh", "-c", f"echo {i} > /data/f{i}; sleep 60")
               .stdout.strip() for i in range(n)]
        wait_for(lambda: inspect(d, name)["Status"]["mounts_here"] == n, 15, f"{n} mounts")
        d.cli("rm", "-f", *ids)
        wait_for(lambda: inspect(d, name)["Status"]["mounts_here"] == 0, 15, "all unmounted")
        assert sorted(p.name for p in legacy_plugin.mountpoint(name).iterdir()) == [f"f{i}" for i in range(n)]
    finally:
        d.cli("volume", "rm", "-f", name, check=False)
