"""Two simulated hosts (network namespace + dockerd + the managed plugin built by plugin/build.sh),
one etcd on the bridge. Containers write on one host and read on the other."""

from __future__ import annotations

import hashlib
import time

from conftest import TIMINGS
from e2e_harness import ManagedHost, Network, snapshot, wait_for

SYNC_TIMEOUT = 60.0


def create_on_both(hosts: list[ManagedHost], name: str, *opts: str) -> None:
    """Create on every host, then mount once on every host so each one holds a replica.

    The second `volume create` never reaches the plugin: dockerd calls Get first, the registry
    already knows the name, so dockerd skips Create. A host starts replicating on its first Mount.
    """
    for h in hosts:
        h.docker("volume", "create", "-d", h.ref, *opts, name)
    for h in hosts:
        h.sh(name, "true")


def wait_same(hosts: list[ManagedHost], name: str, expect: dict[str, bytes] | None, what: str,
              timeout: float = SYNC_TIMEOUT) -> dict[str, bytes]:
    """Until every host's copy is identical (and equals `expect` when given)."""

    def same() -> dict[str, bytes] | None:
        snaps = [snapshot(h.mountpoint(name)) for h in hosts]
        if all(s == snaps[0] for s in snaps) and (expect is None or snaps[0] == expect):
            return snaps[0]
        return None

    try:
        return wait_for(same, timeout, what, interval=0.25)
    except TimeoutError:
        detail = []
        for h in hosts:
            s = snapshot(h.mountpoint(name))
            detail.append(f"{h.node_id}: " + ", ".join(f"{k}({len(v)}B {hashlib.sha256(v).hexdigest()[:8]})"
                                                       for k, v in sorted(s.items())))
            st = h.docker("volume", "inspect", "-f", "{{json .Status}}", name, check=False)
            detail.append(f"{h.node_id} status: {st.stdout.strip() or st.stderr.strip()}")
        raise AssertionError(f"{what}: not converged within {timeout:.0f}s\n" + "\n".join(detail)) from None


def test_hosts_and_plugin_up(mesh: tuple[Network, list[ManagedHost]]) -> None:
    _, hosts = mesh
    for h in hosts:
        out = h.docker("plugin", "inspect", "-f", "{{.Enabled}} {{.Settings.Env}}", h.ref).stdout
        assert out.startswith("true") and f"SYNCMESH_NODE_ID={h.node_id}" in out


def test_write_on_host1_read_on_host2(mesh: tuple[Network, list[ManagedHost]], unique: str) -> None:
    _, (h1, h2) = mesh
    name = f"{unique}-w1r2"
    t = time.monotonic()
    h1.docker("volume", "create", "-d", h1.ref, "--opt", "conflict_resolution=size", name)
    TIMINGS["volume create (managed, host1)"] = time.monotonic() - t
    t = time.monotonic()
    h1.sh(name, "head -c 3000000 /dev/urandom > /data/blob && echo 'hello from host1' > /data/hello.txt"
               " && mkdir -p /data/d/e && echo deep > /data/d/e/f")
    TIMINGS["docker run writing 3 MB (managed, host1)"] = time.monotonic() - t
    want = snapshot(h1.mountpoint(name))
    assert want["hello.txt"] == b"hello from host1\n" and len(want["blob"]) == 3000000

    # host2 never saw a `volume create`: the registry brings the name, as for a compose service on
    # another host. Create (idempotent) + mount there.
    t = time.monotonic()
    wait_for(lambda: name in h2.docker("volume", "ls", "-q").stdout.split(), 30, "the volume to be listed on host2")
    h2.docker("volume", "create", "-d", h2.ref, name)
    out = h2.sh(name, "sha256sum /data/blob /data/hello.txt /data/d/e/f | cut -c1-64")
    TIMINGS["host2 first read (list+create+mount+read)"] = time.monotonic() - t
    got = out.split()
    assert got == [hashlib.sha256(want[p]).hexdigest() for p in ("blob", "hello.txt", "d/e/f")], out
    assert h2.docker("volume", "inspect", "-f", "{{.Status.options.conflict_resolution}}", name).stdout.strip() \
        == "size"


def test_both_write_converge(mesh: tuple[Network, list[ManagedHost]], unique: str) -> None:
    _, hosts = mesh
    h1, h2 = hosts
    name = f"{unique}-both"
    create_on_both(hosts, name)
    h1.sh(name, "echo one > /data/from1 && head -c 200000 /dev/urandom > /data/r1")
    h2.sh(name, "echo two > /data/from2 && head -c 200000 /dev/urandom > /data/r2")
    t = time.monotonic()
    final = wait_same(hosts, name, None, "both hosts' writes on both hosts")
    TIMINGS["two-way convergence"] = time.monotonic() - t
    assert set(final) >= {"from1", "from2", "r1", "r2"}, sorted(final)
    # and what containers see, not only the host paths
    assert h1.sh(name, "cat /data/from2") == "two\n"
    assert h2.sh(name, "cat /data/from1") == "one\n"
    # an edit and a delete travel too
    h2.sh(name, "echo one-edited-on-2 > /data/from1 && rm /data/r1")
    final = wait_same(hosts, name, None, "edit + delete from host2")
    assert final["from1"] == b"one-edited-on-2\n" and "r1" not in final


def test_partition_then_heal(mesh: tuple[Network, list[ManagedHost]], unique: str) -> None:
    net, hosts = mesh
    h1, h2 = hosts
    name = f"{unique}-part"
    create_on_both(hosts, name)
    h1.sh(name, "echo before > /data/before")
    wait_same(hosts, name, {"before": b"before\n"}, "initial sync")

    t0 = time.monotonic()
    net.link(2, up=False)
    try:
        # Both sides keep working while cut off (host2 cannot reach etcd or host1).
        h1.sh(name, "echo a1 > /data/during1 && head -c 500000 /dev/urandom > /data/big1")
        h2.sh(name, "echo b2 > /data/during2 && echo b2-more >> /data/before", timeout=120)
        expected: dict[str, bytes] = {**snapshot(h1.mountpoint(name))}
        expected.update({k: v for k, v in snapshot(h2.mountpoint(name)).items() if k in ("during2", "before")})
        time.sleep(max(0.0, 12.0 - (time.monotonic() - t0)))  # longer than the 10 s etcd lease
        TIMINGS["partition length"] = time.monotonic() - t0
    finally:
        net.link(2, up=True)
    t = time.monotonic()
    final = wait_same(hosts, name, None, "convergence after the partition healed", timeout=90)
    TIMINGS["convergence after heal"] = time.monotonic() - t
    # Nothing lost: every file written on either side during the cut is there, byte for byte.
    # (`before` was only appended to on host2, so host2's version must win.)
    for path, data in expected.items():
        assert final.get(path) == data, f"{path}: {final.get(path)!r} != {data!r}"
    assert h1.sh(name, "cat /data/during2") == "b2\n"
    assert h2.sh(name, "cat /data/during1") == "a1\n"
