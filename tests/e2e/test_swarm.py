"""Docker Swarm on real engines (issue 15): three dockerds in network namespaces form a Swarm (one manager,
two workers), the managed plugin installed on each from a registry and pointed at one etcd on the bridge.

- `docker stack deploy` of a stack whose volume is a syncmesh volume; the node running the task is drained;
  the task Swarm starts on another node reads every byte that was written (content digests).
- `docker service create --mount type=volume,...,volume-driver=syncmesh` (global mode: a task per node).
- `docker volume rm` on one node removes the volume on every node, is refused naming the nodes where it
  is mounted, and `docker volume prune` leaves syncmesh volumes alone.
- A plugin upgrade on a Swarm node: drain, `docker plugin disable`, `docker plugin upgrade`, enable; the
  node's copy of a volume is the same files (not re-fetched) and the node still holds the volume.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import NOTES, PLUGIN_VERSION, TIMINGS, _require
from e2e_harness import IMAGE, Etcd, Network, log, wait_for
from swarm_harness import (
    ALIAS,
    MARKER,
    PORT,
    PROGRAM,
    REPO,
    Registry,
    Swarm,
    SwarmNode,
    containers_gone,
    file_digests,
    inodes,
    plugin_variant,
    stack_failover,
)


@pytest.fixture(scope="module")
def swarm(workdir: Path, image_tar: Path, plugin_dir: Path) -> Iterator[Swarm]:
    _require("docker-registry")
    net = Network(3, subnet="10.231.78", tag="s")
    etcd = None
    sw: Swarm | None = None
    try:
        t = time.monotonic()
        net.setup()
        etcd = Etcd(workdir / "swarm-etcd", addrs=(net.gateway,)).start()
        registry = Registry(workdir / "registry", net.gateway).start()
        nodes = [SwarmNode(n, workdir / f"swarm{n}", net, registry.host) for n in (1, 2, 3)]
        sw = Swarm(nodes, registry, etcd.endpoints[0])
        with ThreadPoolExecutor(3) as ex:
            for f in [ex.submit(n.start, image_tar) for n in nodes]:
                f.result()
        TIMINGS["swarm: 3 dockerd up (parallel)"] = time.monotonic() - t

        # Two builds of the plugin in the registry: the one plugin/build.sh made, and the same with one
        # more file in its rootfs (the upgrade). Pushed once from the first node.
        t = time.monotonic()
        sw.images = {"current": f"{registry.host}/{REPO}:{PLUGIN_VERSION}",
                     "next": f"{registry.host}/{REPO}:{PLUGIN_VERSION}-next"}
        sources = {"current": plugin_dir, "next": plugin_variant(plugin_dir, workdir / "plugin-next", "next")}
        for key, ref in sw.images.items():
            nodes[0].docker("plugin", "create", ref, str(sources[key]), timeout=300)
            nodes[0].docker("plugin", "push", ref, timeout=300)
            nodes[0].docker("plugin", "rm", ref)
        TIMINGS["swarm: 2 plugin builds created and pushed"] = time.monotonic() - t

        t = time.monotonic()
        with ThreadPoolExecutor(3) as ex:
            for f in [ex.submit(n.install_plugin, sw.images["current"], sw.etcd_endpoint) for n in nodes]:
                f.result()
        TIMINGS["swarm: plugin install on 3 nodes (parallel)"] = time.monotonic() - t

        t = time.monotonic()
        sw.form()
        TIMINGS["swarm: init + 2 joins"] = time.monotonic() - t
        log(f"swarm formed: {nodes}")
        yield sw
    finally:
        if sw is not None:
            sw.stop()
        if etcd is not None:
            etcd.stop()
        net.close()


def test_swarm_beside_the_plugin(swarm: Swarm) -> None:
    """The plugin on its default port and Swarm (2377, 7946, 4789) share each host without a clash."""
    for n in swarm.nodes:
        assert n.docker("info", "-f", "{{.Swarm.LocalNodeState}}").stdout.strip() == "active"
        assert n.docker("plugin", "inspect", "-f", "{{.Enabled}}", ALIAS).stdout.strip() == "true"
        assert n.api("/api/v1/info")["node_id"] == n.node_id  # answers on PORT, from outside its host
        dockerd_log = (n.dockerd.base / "dockerd.log").read_text(errors="replace")
        for bad in ("address already in use", "failed to create memberlist"):
            assert bad not in dockerd_log, f"{n!r}: {bad!r} in dockerd's log (port {PORT} or Swarm's ports clash)"
    nodes = swarm.manager.docker("node", "ls", "--format", "{{.ManagerStatus}}").stdout.splitlines()
    assert sorted(nodes) == ["", "", "Leader"], nodes


def test_stack_failover_on_drain(swarm: Swarm, workdir: Path, unique: str) -> None:
    """Without placement options: the task that Swarm moves reads everything the first one wrote."""
    fo = stack_failover(swarm, workdir, f"st{unique[-6:]}", f"{unique}-stack", {"conflict_resolution": "timestamp"})
    TIMINGS["swarm failover: drain -> new task read all"] = fo.seconds
    TIMINGS["swarm failover: new container created -> started"] = fo.start_seconds
    NOTES["swarm failover"] = (f"{fo.from_node!r} drained -> task on {fo.to_node!r} read {len(fo.read)} files in "
                               f"{fo.seconds:.1f}s (its container's start, Mount included: {fo.start_seconds:.1f}s); "
                               f"networks {fo.networks}")
    assert fo.to_node is not fo.from_node
    stack = f"st{unique[-6:]}"
    assert fo.networks.get(f"{stack}_default") == "overlay", f"the task is not on the stack's overlay: {fo.networks}"
    assert not any(line.endswith(" WROTE") for line in fo.new_task_logs.splitlines()), \
        f"the task on {fo.to_node!r} found no data and wrote its own:\n{fo.new_task_logs}"
    missing = sorted(set(fo.written) - set(fo.read))
    differ = sorted(p for p in fo.written if p in fo.read and fo.read[p] != fo.written[p])
    assert not missing and not differ, f"on {fo.to_node!r}: missing {missing}, different {differ}"
    assert fo.read == fo.written


def test_stack_failover_with_replicas_all(swarm: Swarm, workdir: Path, unique: str) -> None:
    """With replicas=all every node holds a complete copy before the drain: the moved task's Mount
    has nothing to wait for."""

    def every_node_complete(sw: Swarm, writer: SwarmNode) -> None:
        def complete() -> bool:
            for node in sw.nodes:
                vol = node.api(f"/api/v1/volumes/{volume}")
                sync = vol["sync"]
                if not (sync.get("held") and sync.get("ready") and sync.get("files", 0) >= 22
                        and sync.get("deferred", 1) == 0):
                    return False
            return True

        wait_for(complete, 60, "every node to hold a complete replica (replicas=all)", interval=0.3)

    volume = f"{unique}-all"
    fo = stack_failover(swarm, workdir, f"sa{unique[-6:]}", volume, {"replicas": "all"}, every_node_complete)
    TIMINGS["swarm failover replicas=all: drain -> new task read all"] = fo.seconds
    TIMINGS["swarm failover replicas=all: new container created -> started"] = fo.start_seconds
    NOTES["swarm failover replicas=all"] = (f"{fo.from_node!r} drained -> task on {fo.to_node!r} read {len(fo.read)} "
                                            f"files in {fo.seconds:.1f}s (container start, Mount included: "
                                            f"{fo.start_seconds:.1f}s)")
    assert fo.to_node is not fo.from_node and fo.read == fo.written


def test_service_create_with_volume_driver(swarm: Swarm, unique: str) -> None:
    """`docker service create --mount type=volume,...,volume-driver=syncmesh` in global mode: a task on each
    node writes its own file and sees the other nodes' files."""
    name, vol = f"g{unique[-8:]}", f"{unique}-svc"
    m = swarm.manager
    program = ('trap "exit 0" TERM INT; echo "$NODE" > "/data/from-$NODE"; '
               'until [ "$(ls /data | grep -c ^from-)" -ge 3 ]; do sleep 0.2; done; '
               'echo "SEEN $(ls /data | grep ^from- | sort | tr "\\n" " ")"; echo SEENDONE; sleep 86400 & wait')
    m.docker("service", "create", "--detach", "--name", name, "--mode", "global", "--no-resolve-image",
             "--mount", f"type=volume,source={vol},target=/data,volume-driver={ALIAS},"
             "volume-opt=conflict_resolution=size", "--env", "NODE={{.Node.ID}}", "--stop-grace-period", "5s",
             IMAGE, "sh", "-c", program)
    try:
        want = " ".join(sorted(f"from-{n.swarm_id}" for n in swarm.nodes))

        def all_seen() -> bool:
            tasks = [t for t in swarm.tasks(name) if t.state == "running" and t.container]
            if {t.node.swarm_id for t in tasks} != {n.swarm_id for n in swarm.nodes}:
                return False
            return all(f"SEEN {want}" in t.node.logs(t.container) for t in tasks)

        try:
            wait_for(all_seen, 90, "every node's task to see the three nodes' files", interval=0.5)
        except TimeoutError:
            raise AssertionError(f"not every task saw {want}:\n{swarm.task_report(name)}") from None
        for n in swarm.nodes:
            assert n.volume_status(vol)["options"]["conflict_resolution"] == "size"
            assert (n.mountpoint(vol) / f"from-{n.swarm_id}").read_text() == f"{n.swarm_id}\n"
    finally:
        m.docker("service", "rm", name, check=False)
    for n in swarm.nodes:
        wait_for(lambda n=n: containers_gone(n, vol), 60, f"{name}'s container on {n.node_id} to go")


def test_volume_rm_is_global(swarm: Swarm, unique: str) -> None:
    """`docker volume rm` on one node removes the volume on every node; while it is mounted anywhere it is
    refused with the nodes named; `docker volume prune` never removes a syncmesh volume."""
    n1, n2, n3 = swarm.nodes
    vol = f"{unique}-rm"
    n1.docker("volume", "create", "-d", ALIAS, vol)
    for n in swarm.nodes:
        n.docker("run", "--rm", "-v", f"{vol}:/data", IMAGE, "sh", "-c", f"echo {n.node_id} > /data/{n.node_id}")
    for n in swarm.nodes:
        wait_for(lambda n=n: sorted(p.name for p in n.mountpoint(vol).iterdir()) == ["swarm1", "swarm2", "swarm3"],
                 30, f"{n.node_id}'s copy of {vol}")
    cid = n3.docker("run", "-d", "-v", f"{vol}:/data", IMAGE, "sleep", "600").stdout.strip()
    try:
        wait_for(lambda: n3.volume_status(vol)["mounts_here"] == 1, 10, "the mount on swarm3 to be counted")
        res = n2.docker("volume", "rm", vol, check=False)
        assert res.returncode != 0
        assert "mounted on node(s) swarm3;" in res.stderr and "removes a syncmesh volume on every node" \
            in res.stderr, res.stderr
        # prune on a node where nothing uses it: dockerd prunes only its built-in local driver's volumes
        n1.docker("volume", "prune", "-f")
        assert vol in n1.docker("volume", "ls", "-q").stdout.split()
        assert (n1.mountpoint(vol) / "swarm1").read_text() == "swarm1\n"
    finally:
        n3.docker("rm", "-f", cid)
    wait_for(lambda: n3.volume_status(vol)["mounts_here"] == 0, 10, "swarm3's Unmount")
    n2.docker("volume", "rm", vol)
    for n in swarm.nodes:
        wait_for(lambda n=n: not n.mountpoint(vol).exists(), 15, f"{n.node_id} to drop its copy of {vol}")
        res = n.docker("volume", "inspect", vol, check=False)
        assert res.returncode != 0, f"{n.node_id} still knows {vol}: {res.stdout}"


def test_plugin_upgrade_on_a_drained_node(swarm: Swarm, unique: str) -> None:
    """The documented upgrade of one Swarm node (docs/operations.md, "Upgrading on a Swarm node"):
    drain, disable, upgrade, enable. The node's copy of the volume is the same files afterwards (same
    inodes: kept, not fetched again), the node still holds the volume, and sync goes on both ways."""
    name, vol = f"u{unique[-8:]}", f"{unique}-up"
    m = swarm.manager
    m.docker("service", "create", "--detach", "--name", name, "--no-resolve-image", "--stop-grace-period", "5s",
             "--mount", f"type=volume,source={vol},target=/data,volume-driver={ALIAS}", IMAGE, "sh", "-c", PROGRAM)
    node: SwarmNode | None = None
    try:
        first, _ = swarm.running_with(name, "READDONE")
        node = first.node
        swarm.wait_published(node, vol, 22)
        # 1. drain: the task moves away; nothing on the node uses a syncmesh volume any more
        swarm.drain(node)
        moved, _ = swarm.running_with(name, "READDONE", not_on=node)
        wait_for(lambda: containers_gone(node, vol), 60, f"the drained node's container of {name} to go")
        before = inodes(node.mountpoint(vol))
        want = file_digests(node.mountpoint(vol))
        assert len(want) == 22, sorted(want)
        plugin_id = node.plugin_id
        assert not (node.dockerd.base / "data" / "plugins" / plugin_id / "rootfs" / MARKER).exists()

        # 2. disable, upgrade, enable. dockerd counts the node's volumes of the driver as uses of the plugin,
        # so a plain disable is refused; no container uses them after the drain, so -f is safe.
        t = time.monotonic()
        res = node.docker("plugin", "disable", ALIAS, check=False)
        if res.returncode != 0:
            assert "is in use" in res.stderr, res.stderr
            node.docker("plugin", "disable", "-f", ALIAS)
        NOTES["plain `docker plugin disable` on a drained node"] = res.stderr.strip() or "accepted"
        # another tag than the installed one: the CLI asks to confirm unless told --skip-remote-check
        out = node.docker("plugin", "upgrade", "--grant-all-permissions", "--skip-remote-check", ALIAS,
                          swarm.images["next"], timeout=300).stdout
        assert f"Upgraded plugin {ALIAS}" in out, out
        node.docker("plugin", "enable", "--timeout", "120", ALIAS)
        node.wait_plugin_ready()
        TIMINGS["swarm upgrade: disable + upgrade + enable + ready"] = time.monotonic() - t

        # 3. the new build runs, with the same settings and the same data
        assert node.docker("plugin", "inspect", "-f", "{{.PluginReference}}", ALIAS).stdout.strip() \
            == swarm.images["next"]
        assert node.plugin_id == plugin_id
        assert (node.dockerd.base / "data" / "plugins" / plugin_id / "rootfs" / MARKER).read_text() == "next\n"
        env = node.docker("plugin", "inspect", "-f", "{{json .Settings.Env}}", ALIAS).stdout
        assert f"SYNCMESH_NODE_ID={node.node_id}" in env, env
        assert inodes(node.mountpoint(vol)) == before, "the node's files were replaced during the upgrade"
        assert file_digests(node.mountpoint(vol)) == want
        wait_for(lambda: node.holds(vol), 15, f"{node.node_id} to be listed as holding {vol}")
        st = node.volume_status(vol)
        assert st["sync"]["held"] and st["sync"]["files"] >= 22, st

        # 4. sync goes on both ways: a write on the task's node arrives, one made here arrives there
        moved.node.docker("exec", moved.container, "sh", "-c", "echo after-upgrade > /data/after")
        wait_for(lambda: (node.mountpoint(vol) / "after").exists()
                 and (node.mountpoint(vol) / "after").read_text() == "after-upgrade\n", 30,
                 "a write on the task's node to reach the upgraded node")
        node.docker("run", "--rm", "-v", f"{vol}:/data", IMAGE, "sh", "-c", "echo from-upgraded > /data/back")
        wait_for(lambda: moved.node.docker("exec", moved.container, "cat", "/data/back", check=False).stdout
                 == "from-upgraded\n", 30, "a write on the upgraded node to reach the task")
    finally:
        m.docker("service", "rm", name, check=False)
        if node is not None:
            swarm.activate(node)
            with contextlib.suppress(Exception):
                if swarm.images and node.docker("plugin", "inspect", "-f", "{{.PluginReference}}", ALIAS,
                                                check=False).stdout.strip() == swarm.images["next"]:
                    log(f"{node.node_id} runs {swarm.images['next']} from here on")
