"""Fault-injection scenarios (issue 6). Each: writers on every node, one fault, heal, check invariants.

Invariants (chaoslib.check): after healing every node converges (bounded) to an identical tree, no
`.syncmesh-tmp-*` file is left, and every completed write is present, superseded (a later write of
the same writer, or a write made on top of it), or kept as a conflict copy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from chaoslib import (
    ChaosNetwork,
    Scenario,
    conclude,
    fill,
    log,
    log_lines,
    mount_tmpfs,
    netns_available,
    sigcont,
    sigstop,
    temp_files,
    wait_for,
)


def first_temp(nodes: list[Any], volume: str) -> Any:
    for nd in nodes:
        if temp_files(nd.vol(volume)):
            return nd
    return None


# ------------------------------------------------------------------------------------------ SIGKILL
def test_sigkill_mid_transfer(scenario, seed, short):
    """A daemon (the receiver or the sender, by seed) is killed with SIGKILL while a large file moves."""
    s = scenario("sigkill-mid-transfer").start()
    a, b, c = s.nodes
    s.start_writers()
    s.sleep(2)
    victim_role = s.rng.choice(["receiver", "sender"])
    size = (24 if short else 64) << 20
    data = s.rng.randbytes(size)
    log(f"writing {size >> 20} MiB on n1; the {victim_role} gets SIGKILL mid-transfer")
    assert s.one_write(a, "large/big.bin", data)
    # mid-transfer = a temp file of the large file exists on a receiver
    deadline = time.monotonic() + 60
    rx = None
    while time.monotonic() < deadline and rx is None:
        rx = first_temp([b, c], s.volume)
        time.sleep(0.01)
    assert rx is not None, "no transfer seen within 60 s"
    victim = rx if victim_role == "receiver" else a
    victim.kill()
    s.notes.append(f"killed {victim.name} ({victim_role}) mid-transfer")
    s.sleep(s.rng.uniform(0.5, 3))
    victim.start()
    s.heal_now()
    s.expect_after(lambda: all((n.vol(s.volume) / "large/big.bin").read_bytes() == data for n in s.nodes),
                   "large", "the large file is not intact on every node")
    conclude(s, timeout=s.converge_timeout)


# ------------------------------------------------------------------------------------------ etcd
@pytest.mark.parametrize("variant", ["stop", pytest.param("compact", marks=pytest.mark.chaos_slow)])
def test_etcd_outage(scenario, seed, short, variant):
    """etcd down (20 s, 8 s short); Mount of a held volume keeps working; queued changes are published.

    compact: a node is frozen (SIGSTOP) across the outage, etcd compacts its history after the restart,
    so the node must reconcile from a full read when it wakes up.
    """
    s = scenario(f"etcd-{variant}").start()
    a, b, c = s.nodes
    s.start_writers()
    s.sleep(3)
    outage = 8 if short else 20
    if variant == "compact":
        sigstop(c)
    s.etcd.stop()
    t_down = time.monotonic()
    log(f"etcd stopped for {outage}s")
    s.sleep(2)
    # graceful degradation: Docker calls on volumes known locally keep working
    t0 = time.monotonic()
    mp = a.mount(s.volume, f"outage-{uuid.uuid4().hex[:6]}")
    took = time.monotonic() - t0
    assert mp == a.vol(s.volume), mp
    assert took < 5, f"Mount of a held volume took {took:.1f}s with etcd down"
    a.ok("VolumeDriver.Get", {"Name": s.volume})
    a.ok("VolumeDriver.Path", {"Name": s.volume})
    s.notes.append(f"Mount with etcd down: {took * 1000:.0f} ms")
    time.sleep(max(0, outage - (time.monotonic() - t_down)))
    s.etcd.start()
    if variant == "compact":
        for nd in (a, b):
            nd.wait_healthy(30)
        s.sleep(3)  # a and b publish what they queued; c stays behind
        rev = s.etcd.compact()
        s.notes.append(f"compacted at revision {rev}")
        sigcont(c)
    s.heal_now()
    if variant == "compact":  # the frozen node really met the compaction (checked once converged)
        s.expect_after(lambda: log_lines(c, "compacted history"), "harness",
                       "n3 never hit the compaction (no 'compacted history' in its log)")
    conclude(s, timeout=s.converge_timeout)


# ------------------------------------------------------------------------------------------ partition
def test_partition(scenario, seed, short):
    """One node's cable is cut (veth down) for 30 s (10 s short), then restored."""
    why = netns_available()
    if why:
        pytest.skip(f"network namespaces unavailable: {why}")
    net = ChaosNetwork(3).setup()
    s = scenario("partition", net=net).start()
    s.start_writers()
    s.sleep(3)
    k = s.rng.randrange(1, 4)
    dur = 10 if short else 30
    log(f"partitioning n{k} for {dur}s")
    net.link(k, up=False)
    t0 = time.monotonic()
    s.notes.append(f"n{k} cut off for {dur}s")
    # the cut is real: a file written elsewhere does not reach the cut-off node
    other = s.nodes[k % 3]
    probe = f"probe-{uuid.uuid4().hex[:6]}.txt"
    assert s.one_write(other, probe, b"written during the partition")
    s.sleep(3)
    s.expect(not (s.nodes[k - 1].vol(s.volume) / probe).exists(), "harness", "the partition did not cut the node off")
    s.sleep(max(0, dur - (time.monotonic() - t0)))
    net.link(k, up=True)
    s.heal_now()
    conclude(s, timeout=s.converge_timeout)


# ------------------------------------------------------------------------------------------ sole holder
def test_peer_unreachable_sole_holder(scenario, seed, short):
    """The only holder of new chunks becomes unreachable (frozen or killed) before anyone fetched them.

    The others must not stall: their own changes keep flowing between them meanwhile. When the holder
    returns, the deferred file arrives.
    """
    s = scenario("sole-holder-unreachable").start()
    a, b, c = s.nodes
    s.start_writers()
    s.sleep(2)
    how = s.rng.choice(["sigstop", "sigkill"])
    sigstop(b)
    sigstop(c)
    data = s.rng.randbytes(s.rng.choice([200_000, 3 << 20, 20 << 20]))
    assert s.one_write(a, "sole/only-on-n1.bin", data)
    t_pub = time.monotonic()
    try:
        s.wait_published(a, "sole/only-on-n1.bin", len(data), timeout=40)
    except AssertionError:
        pass
    took_pub = time.monotonic() - t_pub
    s.notes.append(f"n1 published its file in {took_pub:.1f}s with n2/n3 frozen")
    s.expect(took_pub < 10, "stall", f"n1 needed {took_pub:.0f}s to publish a local file while n2/n3 were frozen")
    if how == "sigstop":
        sigstop(a)
    else:
        a.kill()
    sigcont(b)
    sigcont(c)
    log(f"n1 ({how}) is the only holder; n2/n3 resumed")
    # later changes still flow between the reachable nodes
    probe = f"probe-{uuid.uuid4().hex[:6]}.txt"
    assert s.one_write(c, probe, b"written on n3 while n1 is away " + os.urandom(8))
    t0 = time.monotonic()
    deadline = t0 + 30
    while time.monotonic() < deadline and not (b.vol(s.volume) / probe).exists():
        time.sleep(0.1)
    took = time.monotonic() - t0
    flowed = (b.vol(s.volume) / probe).exists() and took < 10
    arrived = (b.vol(s.volume) / probe).exists()
    s.notes.append(f"n1 {how}; n3->n2 while n1 away: {f'{took:.1f}s' if arrived else 'STALLED'}")
    s.sleep(max(0, 12 - (time.monotonic() - t0)))
    if how == "sigstop":
        sigcont(a)
    else:
        a.start()
    s.notes.append(f"deferred while n1 away: {bool(log_lines(b, 'only-on-n1.bin deferred', limit=1))}")
    s.heal_now()
    s.expect(flowed, "stall", f"changes between reachable nodes stalled while the sole holder was away "
                              f"({took:.0f}s for one small file from n3 to n2)")
    # A frozen holder costs one read timeout (5 s) per fetch: the wave defers the file and later changes flow.
    conclude(s, timeout=s.converge_timeout)


# ------------------------------------------------------------------------------------------ disk full
def test_disk_full(scenario, seed, short):
    """n2's volumes live on a 64 MiB tmpfs that fills up: clear errors, no temp files, resumes later."""
    holder: dict[str, Path] = {}

    if os.geteuid() != 0:
        pytest.skip("needs root (tmpfs mount)")

    def pre(s: Scenario) -> None:
        vols = s.nodes[1].data_root / "volumes"
        try:
            mount_tmpfs(vols, 64)
        except RuntimeError as exc:
            pytest.skip(f"cannot mount a tmpfs: {exc}")
        s.mounts.append(vols)
        holder["vols"] = vols

    s = scenario("disk-full", pre_start=pre).start()
    a, b, _c = s.nodes
    s.start_writers()
    s.sleep(3)
    ballast = fill(holder["vols"], 128 << 10)
    log("n2's disk is full")
    data = s.rng.randbytes(s.rng.choice([3 << 20] if short else [3 << 20, 24 << 20]))
    assert s.one_write(a, "fat/incoming.bin", data)
    s.sleep(8)
    assert b.proc is not None and b.proc.poll() is None, "n2 died on a full disk"
    # no partial files: no temp files lingering (two looks a second apart), no half-written incoming file
    t1 = set(temp_files(b.vol(s.volume)))
    time.sleep(1)
    lingering = t1 & set(temp_files(b.vol(s.volume)))
    inc = b.vol(s.volume) / "fat/incoming.bin"
    partial = inc.exists() and inc.stat().st_size != len(data)
    errs = log_lines(b, "No space left", "ENOSPC", "disk full", limit=3)
    s.notes.append(f"n2 errors: {errs[:1]}")
    s.expect(bool(errs), "disk", "n2 logged no clear out-of-space error")
    s.expect(not lingering, "disk", f"temp files left on the full disk: {lingering}")
    s.expect(not partial, "disk", "a partial incoming file was visible on the full disk")
    ballast.unlink()
    log("space freed")
    s.heal_now()
    conclude(s, timeout=s.converge_timeout)


# ------------------------------------------------------------------------------------------ restart
def test_plugin_restart_under_writes(scenario, seed, short):
    """n2's daemon is restarted (SIGTERM or SIGKILL, by seed) 3 times while its writer keeps writing."""
    s = scenario("plugin-restart").start()
    b = s.nodes[1]
    s.start_writers()
    s.sleep(2)
    how = []
    for _ in range(2 if short else 3):
        sig = s.rng.choice([signal.SIGTERM, signal.SIGKILL])
        down = s.rng.uniform(0.3, 3)
        b.stop(sig, timeout=10)
        how.append(f"{sig.name} {down:.1f}s")
        s.sleep(down)
        b.start()
        s.sleep(s.rng.uniform(1, 3))
    s.notes.append("n2 restarts: " + ", ".join(how))
    s.heal_now()
    conclude(s, timeout=s.converge_timeout)


# ------------------------------------------------------------------------------------------ undo
def test_restore_while_writers_run(scenario, seed, short):
    """Files deleted by mistake on n1 are restored from n3's kept versions (versioning=trash) while every
    node's writer keeps writing: the restored files come back everywhere with their last content, and
    nothing any writer completed is lost."""
    s = scenario("restore-under-writes", volume_opts={"versioning": "trash"}).start()
    a, c = s.nodes[0], s.nodes[2]
    victims = [f"victim/f{i}.bin" for i in range(12)]
    for i, rel in enumerate(victims):
        assert s.one_write(a, rel, os.urandom(1500 + 97 * i))
    for nd in s.nodes:
        wait_for(lambda nd=nd: all((nd.vol(s.volume) / rel).exists() for rel in victims), 30,
                 what=f"the victims on {nd.name}")
    s.start_writers()
    s.sleep(1.5)
    s.fault_now()
    before = time.time()
    for rel in victims:  # the mistake: below the mass-delete guard's minimum, published at once
        (a.vol(s.volume) / rel).unlink()
    wait_for(lambda: not any((c.vol(s.volume) / rel).exists() for rel in victims), 30, what="the deletions on n3")
    wait_for(lambda: sum(1 for v in c.http("GET", f"/api/v1/volumes/{s.volume}/versions?prefix=victim")[1]
                         ["versions"] if v["reason"] == "deleted") >= len(victims), 30, what="n3's kept versions")
    s.sleep(s.rng.uniform(0.2, 1.5))
    got = subprocess.run([sys.executable, "-m", "syncmesh_plugin", "restore", s.volume, "victim", "--at",
                          str(before - 0.001), "--api", c.api_url],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stdout + got.stderr
    for nd in s.nodes:
        wait_for(lambda nd=nd: all((nd.vol(s.volume) / rel).exists() for rel in victims), 30,
                 what=f"the restored victims on {nd.name}")
    s.notes.append(f"{len(victims)} files deleted on n1 and restored from n3's versions under writes")
    s.sleep(1.0)
    s.heal_now()
    conclude(s, timeout=s.converge_timeout)
