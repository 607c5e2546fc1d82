"""etcd as users run it (issue 22): three members, writers on every node, Docker calls on every node, one fault.

Each daemon is given every member's client URL, its own member first (node i talks to member i). Faults:
the leader killed, a member killed, the member a node uses black-holed (iptables DROP inside the member's
network namespace: packets vanish, nothing is refused), a rolling restart of every member, a member
replaced (removed, re-added with an empty data directory), and for the embedded cluster grown with
`join`, one of three hosts lost for good (then forgotten).

Besides the usual invariants (every node converges, no completed write lost), no Docker call may fail
while a quorum answers (DockerProber: Create/Remove of a volume, Mount/Unmount/Get of the scenario's
volume, List, in a loop on every node); the table shows the longest one during the fault.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from chaoslib import (
    ChaosNetwork,
    Scenario,
    conclude,
    embedded_etcd_pid,
    log,
    netns_available,
    ns_iptables,
)

from syncmesh_plugin.devcluster import Etcd, EtcdCluster, Node, wait_for


def cluster_of(s: Scenario) -> EtcdCluster:
    assert isinstance(s.etcd, EtcdCluster)
    return s.etcd


def running(s: Scenario, short: bool) -> Scenario:
    """Three members, the scenario's volume on every node, writers and Docker calls on every node."""
    s.docker_must_succeed = True
    s.start()
    s.start_writers()
    s.start_probers()
    s.sleep(2 if short else 4)
    return s


def talks_to(n: Node) -> str:
    code, body = n.http("GET", "/api/v1/health")
    return str(body["components"]["etcd"].get("endpoint", "")) if code in (200, 503) else ""


def member_serving(m: Etcd) -> bool:
    try:
        st = m.status(timeout=1)
    except (OSError, ValueError):
        return False
    return bool(st.get("leader")) and "header" in st


def test_etcd_leader_killed(scenario: Callable[..., Scenario], seed: int, short: bool) -> None:
    """The leader gets SIGKILL; the others elect a new one; it comes back with its data."""
    s = running(scenario("etcd-leader-killed", members=3), short)
    c = cluster_of(s)
    leader = c.leader()
    s.fault_now()
    leader.kill()
    t0 = time.monotonic()
    new = c.leader()
    s.notes.append(f"killed leader {leader.name}; {new.name} leads after {time.monotonic() - t0:.1f}s")
    s.sleep(max(0.0, (5 if short else 12) - (time.monotonic() - t0)))
    leader.start()
    wait_for(lambda: member_serving(leader), 30, what=f"{leader.name} to serve again")
    s.heal_now()
    conclude(s, timeout=s.converge_timeout)


@pytest.mark.chaos_slow
def test_etcd_member_killed(scenario: Callable[..., Scenario], seed: int, short: bool) -> None:
    """A follower (the member one node talks to) gets SIGKILL, stays down, comes back with its data."""
    s = running(scenario("etcd-member-killed", members=3), short)
    c = cluster_of(s)
    leader = c.leader()
    victim = s.rng.choice([m for m in c.members if m is not leader])
    user = s.nodes[c.members.index(victim)]
    s.fault_now()
    victim.kill()
    s.notes.append(f"killed follower {victim.name} (used by {user.name})")
    s.sleep(5 if short else 12)
    s.expect(talks_to(user) != victim.endpoint, "failover", f"{user.name} still talks to the dead {victim.name}")
    victim.start()
    wait_for(lambda: member_serving(victim), 30, what=f"{victim.name} to serve again")
    s.heal_now()
    conclude(s, timeout=s.converge_timeout)


def test_etcd_member_blackholed(scenario: Callable[..., Scenario], seed: int, short: bool) -> None:
    """The member one node talks to is black-holed: inside its network namespace every packet in or out is
    dropped (iptables DROP), so its clients and peers hear nothing and nothing is refused. The node must move
    to another member through its per-attempt deadline, probes and keepalive."""
    why = netns_available()
    if why:
        pytest.skip(f"network namespaces unavailable: {why}")
    net = ChaosNetwork(6).setup()  # daemons in h1-h3, members in h4-h6
    s = running(scenario("etcd-member-blackholed", members=3, net=net), short)
    c = cluster_of(s)
    k = s.rng.randrange(3)
    victim, user = c.members[k], s.nodes[k]
    ns = net.ns[3 + k]
    rules = [("INPUT", "!", "-i", "lo", "-j", "DROP"), ("OUTPUT", "!", "-o", "lo", "-j", "DROP")]
    was_leader = c.leader() is victim
    s.fault_now()
    for r in rules:
        ns_iptables(ns, *r)
    t0 = time.monotonic()
    dur = 8 if short else 20
    log(f"member {victim.name} (used by {user.name}) black-holed for {dur}s")
    try:
        moved = wait_for(lambda: talks_to(user) not in ("", victim.endpoint), dur, interval=0.1,
                         what=f"{user.name} to leave the black-holed member")
        s.notes.append(f"black-holed {victim.name}{' (leader)' if was_leader else ''}; {user.name} moved in "
                       f"{time.monotonic() - t0:.1f}s")
    except AssertionError:
        moved = False
    s.expect(bool(moved), "failover", f"{user.name} never left the black-holed member {victim.name}")
    s.sleep(max(0.0, dur - (time.monotonic() - t0)))
    for r in rules:
        ns_iptables(ns, *r, add=False)
    wait_for(lambda: member_serving(victim), 30, what=f"{victim.name} to serve again")
    s.heal_now()
    conclude(s, timeout=s.converge_timeout)


@pytest.mark.chaos_slow
def test_etcd_rolling_restart(scenario: Callable[..., Scenario], seed: int, short: bool) -> None:
    """Every member restarted in turn (SIGTERM, a pause, started again, serving before the next one)."""
    s = running(scenario("etcd-rolling-restart", members=3), short)
    c = cluster_of(s)
    s.fault_now()
    order = list(c.members)
    s.rng.shuffle(order)
    for m in order:
        m.stop()
        s.sleep(s.rng.uniform(1, 3))
        m.start()
        wait_for(lambda m=m: member_serving(m), 30, what=f"{m.name} to serve again")
        s.sleep(2)
    s.notes.append("restarted " + ", ".join(m.name for m in order))
    s.heal_now()
    conclude(s, timeout=s.converge_timeout)


@pytest.mark.chaos_slow
def test_etcd_member_replaced(scenario: Callable[..., Scenario], seed: int, short: bool) -> None:
    """A member is removed through the member API, its data deleted, and it is added back empty (the way a
    broken disk is replaced); it catches up from the others."""
    s = running(scenario("etcd-member-replaced", members=3), short)
    c = cluster_of(s)
    victim = s.rng.choice(c.members)
    s.fault_now()
    before = c.member_ids()[victim.name]
    c.remove(victim)
    s.sleep(3 if short else 6)
    victim.wipe()
    c.add(victim)
    wait_for(lambda: member_serving(victim), 30, what=f"{victim.name} to serve again")

    def caught_up() -> bool:
        revs = {m.status(timeout=1)["header"]["revision"] for m in c.members}
        return len(revs) == 1

    wait_for(caught_up, 30, interval=0.2, what=f"{victim.name} to catch up")
    s.notes.append(f"replaced {victim.name} (id {before} -> {c.member_ids()[victim.name]})")
    s.heal_now()
    conclude(s, timeout=s.converge_timeout)


@pytest.mark.chaos_slow
def test_embedded_host_lost(scenario: Callable[..., Scenario], seed: int, short: bool) -> None:
    """Three hosts (network namespaces) with the embedded cluster (n1 alone, n2 and n3 join it; n1's member moves
    from loopback to its address when n2 joins): one host is lost for good (its daemon and member SIGKILLed,
    its link cut), the two others keep a quorum and go on, then forget it. Its writer stops
    first and its daemon publishes what it saw, so none of its completed writes may be lost."""
    why = netns_available()
    if why:
        pytest.skip(f"network namespaces unavailable: {why}")
    net = ChaosNetwork(3).setup()  # three hosts on their own addresses: the members listen there, not on loopback
    s = scenario("embedded-host-lost", embedded=True, net=net, SYNCMESH_ETCD_TIMEOUT="5s")
    running(s, short)
    victim = s.rng.choice(s.nodes)
    survivors = [n for n in s.nodes if n is not victim]
    [w] = [w for w in s.writers if w.wname == victim.name]
    w.stop()
    [p] = [p for p in s.probers if p.node is victim]
    p.stop()

    def published() -> bool:
        code, body = victim.http("GET", "/api/v1/sync/status")
        return code == 200 and all(v["pending"] == 0 for v in body["volumes"])

    wait_for(published, 30, what=f"{victim.name} to publish what it saw")
    s.sleep(1)
    s.fault_now()
    pid = embedded_etcd_pid(victim)
    victim.kill()
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    net.link(s.nodes.index(victim) + 1, up=False)  # and its cable: nothing of it answers any more
    s.gone.append(victim)
    s.notes.append(f"host {victim.name} lost for good")
    s.sleep(6 if short else 12)

    def forgotten() -> bool:
        out = subprocess.run([sys.executable, "-m", "syncmesh_plugin", "forget", victim.name], env=survivors[0].env,
                             capture_output=True, text=True, timeout=60)
        return out.returncode == 0 and "etcd member" in out.stdout

    wait_for(forgotten, 40, interval=1, what=f"forget {victim.name} to remove its member")
    s.sleep(2)
    s.heal_now()
    conclude(s, timeout=s.converge_timeout)
