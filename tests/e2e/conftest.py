"""Fixtures for the end-to-end tests (real dockerd; root). Run with `make e2e` (pytest -m e2e)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hostguard
from e2e_harness import (
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
NOTES: dict[str, str] = {}  # what the tests observed of Docker's behaviour, printed after the timings
CHAOS_NAMES = ("smchaos", "syncmesh-chaos")  # a concurrent `make chaos` run's own namespaces, links, rules, mounts


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
    if NOTES:
        terminalreporter.section("e2e notes")
        for k, v in NOTES.items():
            terminalreporter.write_line(f"{k}: {v}")


TOOLS = ("dockerd", "docker", "etcd", "busybox", "ip", "iptables", "iptables-save", "ip6tables-save", "nsenter",
         "unshare", "mount", "umount", "docker-registry")


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} not found: run `make e2e` (it apt-installs docker.io, busybox-static, mmdebstrap, "
                    "iproute2, iptables, etcd-server, docker-registry)")


@pytest.fixture(scope="session", autouse=True)
def host_unchanged() -> Iterator[None]:
    """The host's links, routes, iptables rules, mounts, /run/docker/plugins and its Docker engine's
    objects are the same after the suite as before it (tests/hostguard.py); fails naming each change."""
    if os.geteuid() != 0:
        pytest.fail("the end-to-end tests need root (dockerd, network and mount namespaces, iptables)")
    for tool in TOOLS:
        _require(tool)
    sweep_stale()  # what a killed earlier run left behind is not this run's doing
    try:
        before = hostguard.snapshot()
    except hostguard.GuardError as exc:
        pytest.fail(str(exc))
    yield
    hostguard.release_netns_dir(before)
    diffs = hostguard.compare(before, hostguard.snapshot(), ignore=CHAOS_NAMES)
    if diffs:
        pytest.fail(hostguard.report("make e2e", diffs))


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
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
    """A private dockerd (own network and mount namespace), also when the machine runs its own engine:
    the tests never use the host's engine, so they cannot leave images, volumes or plugins in it."""
    t = time.monotonic()
    d = Dockerd(workdir / "dockerd").start()
    TIMINGS["dockerd start (private)"] = time.monotonic() - t
    log(f"started a private dockerd on {d.sock} (netns {d.netns})")
    try:
        t = time.monotonic()
        d.import_busybox(image_tar)
        TIMINGS["busybox docker import"] = time.monotonic() - t
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="session")
def etcd(workdir: Path) -> Iterator[Etcd]:
    e = Etcd(workdir / "etcd").start()
    try:
        yield e
    finally:
        e.stop()


@pytest.fixture(scope="session")
def legacy_plugin(workdir: Path, etcd: Etcd, docker_host: Dockerd) -> Iterator[SyncmeshProcess]:
    """The daemon from the venv as a legacy plugin: docker_host finds it as /run/docker/plugins/syncmesh.sock."""
    if not (VENV_BIN / "syncmesh-plugin").exists():
        pytest.fail("the venv is missing: run `make install`")
    t = time.monotonic()
    # docker_host sees its plugins_dir as /run/docker/plugins; the host's own directory stays untouched.
    sock = str(docker_host.plugins_dir / "syncmesh.sock")
    p = SyncmeshProcess(workdir / "legacy", "e2e-legacy", etcd.endpoints, sock).start()
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
