"""Fixtures for the end-to-end tests (real dockerd; root). Run with `make e2e` (pytest -m e2e)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from e2e_harness import (
    LEGACY_SOCKET,
    ROOT,
    VENV_BIN,
    Dockerd,
    Etcd,
    ManagedHost,
    Network,
    SyncmeshProcess,
    busybox_rootfs_tar,
    log,
    make_tempdir,
    run,
    sweep_stale,
)

PLUGIN_VERSION = next(line.split('"')[1] for line in (ROOT / "syncmesh_plugin" / "__init__.py").read_text().splitlines()
                      if line.startswith("__version__"))
TIMINGS: dict[str, float] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.e2e)
    # Only when asked for (-m e2e / make e2e): they need root, dockerd and a few minutes.
    if "e2e" not in (config.getoption("markexpr") or ""):
        skip = pytest.mark.skip(reason="end-to-end test: run with `make e2e` (pytest -m e2e)")
        for item in items:
            if Path(str(item.fspath)).is_relative_to(here):
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("e2e timings (s)")
        for k, v in TIMINGS.items():
            terminalreporter.write_line(f"{k:<40} {v:7.2f}")


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} not found: run `make e2e` (it apt-installs docker.io, busybox-static, mmdebstrap, "
                    "iproute2, iptables, etcd-server)")


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests need root (dockerd, network namespaces, iptables)")
    for tool in ("dockerd", "docker", "etcd", "busybox", "ip", "iptables", "nsenter"):
        _require(tool)
    sweep_stale()
    d = make_tempdir("sme2e-")
    yield d
    from e2e_harness import unmount_under

    unmount_under(str(d))
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def image_tar(workdir: Path) -> Path:
    return busybox_rootfs_tar(workdir)


@pytest.fixture(scope="session")
def docker_host(workdir: Path, image_tar: Path) -> Iterator[Dockerd]:
    """The machine's dockerd if one answers on the default socket, else a private one."""
    existing = Dockerd(workdir / "unused")
    existing.sock = "/var/run/docker.sock"
    started = None
    if os.path.exists(existing.sock) and existing.cli("version", check=False, timeout=15).returncode == 0:
        d = existing
        log("using the running dockerd on /var/run/docker.sock")
    else:
        t = time.monotonic()
        d = started = Dockerd(workdir / "dockerd").start()
        TIMINGS["dockerd start (private)"] = time.monotonic() - t
        log(f"started a private dockerd on {d.sock}")
    t = time.monotonic()
    d.import_busybox(image_tar)
    TIMINGS["busybox docker import"] = time.monotonic() - t
    try:
        yield d
    finally:
        if started is not None:
            started.stop()
        else:
            d.cli("image", "rm", "-f", "syncmesh-e2e/busybox:latest", check=False)


@pytest.fixture(scope="session")
def etcd(workdir: Path) -> Iterator[Etcd]:
    e = Etcd(workdir / "etcd").start()
    try:
        yield e
    finally:
        e.stop()


@pytest.fixture(scope="session")
def legacy_plugin(workdir: Path, etcd: Etcd, docker_host: Dockerd) -> Iterator[SyncmeshProcess]:
    """The daemon from the venv as a legacy plugin: dockerd finds /run/docker/plugins/syncmesh.sock."""
    if not (VENV_BIN / "syncmesh-plugin").exists():
        pytest.fail("the venv is missing: run `make install`")
    if os.path.exists(LEGACY_SOCKET):
        with contextlib.suppress(OSError):
            import socket

            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(LEGACY_SOCKET)
                pytest.fail(f"another syncmesh plugin already listens on {LEGACY_SOCKET}; stop it first")
            finally:
                s.close()
    t = time.monotonic()
    p = SyncmeshProcess(workdir / "legacy", "e2e-legacy", etcd.endpoints, LEGACY_SOCKET).start()
    TIMINGS["legacy daemon start"] = time.monotonic() - t
    try:
        yield p
    finally:
        # Volumes left in dockerd's DB would make it retry a missing plugin; remove ours first.
        for name in docker_host.cli("volume", "ls", "-q", "--filter", "driver=syncmesh", check=False).stdout.split():
            docker_host.cli("volume", "rm", "-f", name, check=False)
        p.stop()


@pytest.fixture(scope="session")
def plugin_dir() -> Path:
    """plugin/dist (config.json + rootfs) built by plugin/build.sh, the recipe behind `make plugin`."""
    _require("mmdebstrap")
    t = time.monotonic()
    env = dict(os.environ, NO_CREATE="1", PYTHON=str(VENV_BIN / "python"))
    res = subprocess.run([str(ROOT / "plugin" / "build.sh")], env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        pytest.fail(f"plugin/build.sh failed:\n{res.stdout}\n{res.stderr}")
    TIMINGS["plugin/build.sh (NO_CREATE)"] = time.monotonic() - t
    log(res.stdout.strip().splitlines()[-1])
    return ROOT / "plugin" / "dist"


@pytest.fixture(scope="module")
def mesh(workdir: Path, image_tar: Path, plugin_dir: Path) -> Iterator[tuple[Network, list[ManagedHost]]]:
    """Two simulated hosts (netns + dockerd + managed syncmesh plugin) and one etcd on the bridge."""
    net = Network(2)
    hosts: list[ManagedHost] = []
    etcd_m = None
    try:
        t = time.monotonic()
        net.setup()
        TIMINGS["network setup (bridge, 2 netns)"] = time.monotonic() - t
        etcd_m = Etcd(workdir / "mesh-etcd", addrs=(net.gateway, "127.0.0.1")).start()
        ref = f"syncmesh/syncmesh-plugin:{PLUGIN_VERSION}"
        hosts = [ManagedHost(n, workdir / f"host{n}", net, plugin_dir, ref, etcd_m.endpoints[0]) for n in (1, 2)]
        t = time.monotonic()
        with ThreadPoolExecutor(2) as ex:
            for f in [ex.submit(h.start, image_tar) for h in hosts]:
                f.result()
        TIMINGS["2 hosts up (dockerd+create+enable, parallel)"] = time.monotonic() - t
        for h in hosts:
            for k, v in h.timings.items():
                TIMINGS[f"host{h.n} {k}"] = v
        yield net, hosts
    finally:
        for h in hosts:
            if h.dockerd.proc is not None and h.dockerd.proc.poll() is None:
                with contextlib.suppress(Exception):
                    h.dockerd.cli("plugin", "disable", "-f", h.ref, check=False, timeout=60)
            h.stop()
        if etcd_m is not None:
            etcd_m.stop()
        net.close()


@pytest.fixture
def unique() -> str:
    return f"e2e{int(time.time() * 1000) % 10**9}"


__all__ = ["run"]
