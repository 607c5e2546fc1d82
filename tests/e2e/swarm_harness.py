"""A Docker Swarm of private dockerds for the end-to-end tests (issue 15).

Three simulated hosts (network namespaces on one bridge, see e2e_harness.Network), each with its own
dockerd (own network and mount namespace), form a Swarm: the first is the manager, the others join as
workers. A registry (Debian's docker-registry, on the bridge's address in the root namespace) serves the
managed plugin, pushed once from the plugin directory that plugin/build.sh made, so every node installs
it as a user would: `docker plugin install --alias syncmesh REGISTRY/syncmesh/syncmesh-plugin:TAG`. A
second tag of the same plugin (its rootfs differs by one file) is there for `docker plugin upgrade`.

Everything is stopped by the fixture that made it (also on failure); names follow e2e_harness's
conventions (`sme2e*` namespaces and links) so a killed run is swept by sweep_stale().
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from e2e_harness import IMAGE, Dockerd, Network, free_port, log, run, stop_process, wait_for

ALIAS = "syncmesh"
PORT = 7734  # the plugin's default API/peer port, beside Swarm's 2377, 7946 and 4789 on the same hosts
REPO = "syncmesh/syncmesh-plugin"
MARKER = "etc/syncmesh-e2e-build"  # the file that tells two builds of the plugin apart

# The service's program (busybox sh). First start: write files of many sizes, then mark the volume
# written. Every start: print the sha256 of every file it sees (`SUM <digest>  ./path`), then READDONE,
# then wait to be stopped. A task that starts on another node after a drain therefore reports exactly
# what it found there, and writes nothing if the data is there.
PROGRAM = r"""trap 'exit 0' TERM INT
if [ ! -e /data/.written ]; then
  mkdir -p /data/sub/deeper
  i=0
  while [ $i -lt 20 ]; do head -c $((i * 50000 + 1)) /dev/urandom > /data/f$i; i=$((i + 1)); done
  head -c 2000000 /dev/urandom > /data/sub/deeper/big
  : > /data/sub/empty
  sync
  touch /data/.written
  echo WROTE
fi
cd /data && find . -type f ! -name .written | sort | while read -r f; do echo "SUM $(sha256sum "$f")"; done
echo READDONE
sleep 86400 & wait
"""


def digests(logs: str) -> dict[str, str]:
    """path -> sha256 from a task's `SUM <digest>  ./path` lines."""
    out: dict[str, str] = {}
    for line in logs.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == "SUM":  # docker logs -t: TIMESTAMP SUM DIGEST ./PATH
            out[parts[3].removeprefix("./")] = parts[2]
    return out


def log_time(logs: str, marker: str) -> float | None:
    """The wall-clock time (epoch seconds) of the first `docker logs -t` line that is `marker`."""
    for line in logs.splitlines():
        ts, _, text = line.partition(" ")
        if text.strip() == marker:
            return parse_time(ts)
    return None


def parse_time(ts: str) -> float:
    """Docker's RFC 3339 timestamps (nanoseconds, `Z` or an offset) -> epoch seconds."""
    ts = ts.strip()
    if ts.endswith("Z"):
        ts = ts[:-1] + "+00:00"
    main, _, rest = ts.partition(".")
    frac, tz = "", ""
    if rest:
        i = next((k for k, c in enumerate(rest) if c in "+-"), len(rest))
        frac, tz = rest[:i], rest[i:]
    elif "+" in main[10:] or "-" in main[10:]:
        i = max(main.rfind("+"), main.rfind("-"))
        main, tz = main[:i], main[i:]
    dt = datetime.datetime.fromisoformat(main + (tz or "+00:00"))
    return dt.timestamp() + (float("0." + frac) if frac else 0.0)


class Registry:
    """Debian's docker-registry (distribution 2.8) on addr:port, storage in a temp dir."""

    def __init__(self, base: Path, addr: str) -> None:
        self.base = base
        self.addr = addr
        self.port = free_port(addr)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"{self.addr}:{self.port}"

    def start(self) -> Registry:
        self.base.mkdir(parents=True, exist_ok=True)
        cfg = {"version": 0.1, "log": {"level": "warn"},
               "storage": {"filesystem": {"rootdirectory": str(self.base / "store")}, "delete": {"enabled": True}},
               "http": {"addr": self.host}}
        (self.base / "config.yml").write_text(yaml.safe_dump(cfg))
        with open(self.base / "registry.log", "wb") as logf:
            self.proc = subprocess.Popen(["docker-registry", "serve", str(self.base / "config.yml")], stdout=logf,
                                         stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {(self.base / 'registry.log').read_text()[-2000:]}")
            with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as r:
                return r.status == 200

        wait_for(up, 20, f"docker-registry on {self.host}")
        return self

    def stop(self) -> None:
        stop_process(self.proc, 10)


def plugin_variant(src: Path, dest: Path, marker: str) -> Path:
    """A copy of a plugin directory (config.json + rootfs) whose rootfs has /MARKER = `marker`: a second
    build of the same plugin (dockerd refuses a second plugin from an identical rootfs layer)."""
    dest.mkdir(parents=True)
    # hard links where possible: only the marker, a new file, differs
    if subprocess.run(["cp", "-al", str(src / "rootfs"), str(dest / "rootfs")], capture_output=True).returncode:
        shutil.rmtree(dest / "rootfs", ignore_errors=True)
        run(["cp", "-a", str(src / "rootfs"), str(dest / "rootfs")], timeout=300)
    (dest / "rootfs" / MARKER).write_text(marker + "\n")
    shutil.copy(src / "config.json", dest / "config.json")
    return dest


class SwarmNode:
    """One simulated host of the Swarm: dockerd in the host's network namespace, the plugin as `syncmesh`."""

    def __init__(self, n: int, base: Path, net: Network, registry: str) -> None:
        self.n = n
        self.node_id = f"swarm{n}"  # syncmesh's node id
        self.net = net
        self.addr = net.addr(n)
        self.dockerd = Dockerd(base, netns=net.ns[n - 1], config={"insecure-registries": [registry]})
        self.swarm_id = ""  # Docker's node ID once in the Swarm

    def __repr__(self) -> str:
        return f"{self.node_id}({self.addr}, {self.swarm_id[:12]})"

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.dockerd.cli(*args, check=check, timeout=timeout)

    def start(self, image_tar: Path) -> SwarmNode:
        self.dockerd.start()
        self.dockerd.import_busybox(image_tar)
        return self

    def install_plugin(self, remote: str, etcd_endpoint: str) -> None:
        """As a user installs it: from the registry, with an alias, settings on the command line."""
        self.docker("plugin", "install", "--grant-all-permissions", "--alias", ALIAS, remote,
                    f"SYNCMESH_ETCD_ENDPOINTS={etcd_endpoint}", f"SYNCMESH_NODE_ID={self.node_id}",
                    f"SYNCMESH_SERVER_ADVERTISE={self.addr}:{PORT}", "SYNCMESH_LOG_FORMAT=text",
                    "SYNCMESH_SYNC_MOUNT_TIMEOUT=30s",
                    "SYNCMESH_SECURITY_TLS_ENABLED=false",  # plain HTTP: api() reads it with urllib, no CA
                    timeout=300)
        self.wait_plugin_ready()

    def wait_plugin_ready(self, timeout: float = 60) -> None:
        """The plugin answers on its default port from outside its host and is connected to etcd."""
        wait_for(lambda: self.api("/api/v1/health")["components"]["etcd"]["ok"], timeout,
                 f"{self.node_id}'s plugin on {self.addr}:{PORT} to connect to etcd")

    def api(self, path: str, timeout: float = 3) -> Any:
        """GET the plugin's API over the bridge (it listens on the host network of its namespace)."""
        with urllib.request.urlopen(f"http://{self.addr}:{PORT}{path}", timeout=timeout) as r:
            return json.loads(r.read())

    def holds(self, volume: str) -> bool:
        """The cluster (as this node's API tells it) lists this node as holding a replica of `volume`."""
        nodes = self.api("/api/v1/cluster/nodes")["nodes"]
        return any(n["node_id"] == self.node_id and volume in n["volumes"] for n in nodes)

    @property
    def plugin_id(self) -> str:
        return self.docker("plugin", "inspect", "-f", "{{.Id}}", ALIAS).stdout.strip()

    def mountpoint(self, volume: str) -> Path:
        """The host-side path of the volume's data (under the plugin's propagated mount)."""
        return (self.dockerd.base / "data" / "plugins" / self.plugin_id / "propagated-mount" / "volumes" / volume
                / "_data")

    def volume_status(self, volume: str) -> dict[str, Any]:
        return dict(json.loads(self.docker("volume", "inspect", "-f", "{{json .Status}}", volume).stdout))

    def logs(self, container: str) -> str:
        res = self.docker("logs", "-t", container, check=False, timeout=30)
        return res.stdout + res.stderr

    def stop(self) -> None:
        self.dockerd.stop()


@dataclass
class Task:
    id: str
    node: SwarmNode
    state: str
    container: str


@dataclass
class Swarm:
    nodes: list[SwarmNode]
    registry: Registry
    etcd_endpoint: str
    images: dict[str, str] = field(default_factory=dict)  # "current"/"next" -> registry reference

    @property
    def manager(self) -> SwarmNode:
        return self.nodes[0]

    def form(self) -> None:
        """`docker swarm init` on the first node, `docker swarm join` as workers on the others."""
        m = self.manager
        m.docker("swarm", "init", "--advertise-addr", m.addr, "--listen-addr", f"{m.addr}:2377")
        token = m.docker("swarm", "join-token", "-q", "worker").stdout.strip()
        for w in self.nodes[1:]:
            w.docker("swarm", "join", "--token", token, "--advertise-addr", w.addr, "--listen-addr",
                     f"{w.addr}:2377", f"{m.addr}:2377")
        for node in self.nodes:
            node.swarm_id = node.docker("info", "-f", "{{.Swarm.NodeID}}").stdout.strip()

        def all_ready() -> bool:
            out = m.docker("node", "ls", "--format", "{{.ID}} {{.Status}} {{.Availability}}").stdout.splitlines()
            ready = {line.split()[0] for line in out if line.split()[1:] == ["Ready", "Active"]}
            return ready >= {n.swarm_id for n in self.nodes}

        wait_for(all_ready, 60, "three Ready nodes in `docker node ls`", interval=0.5)

    def node(self, swarm_id: str) -> SwarmNode:
        return next(n for n in self.nodes if n.swarm_id == swarm_id)

    def tasks(self, service: str) -> list[Task]:
        """The service's tasks whose desired state is running (node, state, container)."""
        ids = self.manager.docker("service", "ps", "-q", "--filter", "desired-state=running", service,
                                  check=False).stdout.split()
        out = []
        for tid in ids:
            res = self.manager.docker("inspect", "-f", "{{.NodeID}} {{.Status.State}} "
                                      "{{if .Status.ContainerStatus}}{{.Status.ContainerStatus.ContainerID}}{{end}}",
                                      tid, check=False)
            parts = res.stdout.split()
            if res.returncode == 0 and len(parts) >= 2 and parts[0]:
                out.append(Task(tid, self.node(parts[0]), parts[1], parts[2] if len(parts) > 2 else ""))
        return out

    def task_report(self, service: str) -> str:
        """For failure messages: every task of the service with its state and error."""
        res = self.manager.docker("service", "ps", "--no-trunc", "--format",
                                  "{{.Name}} {{.Node}} {{.DesiredState}} {{.CurrentState}} {{.Error}}", service,
                                  check=False)
        return (res.stdout + res.stderr).strip()

    def running_with(self, service: str, marker: str, not_on: SwarmNode | None = None,
                     timeout: float = 90) -> tuple[Task, str]:
        """Until one task of the service runs (on a node other than `not_on`) and its log has `marker`."""

        def found() -> tuple[Task, str] | None:
            for t in self.tasks(service):
                if t.state == "running" and t.container and t.node is not not_on:
                    logs = t.node.logs(t.container)
                    if any(line.partition(" ")[2].strip() == marker for line in logs.splitlines()):
                        return t, logs
            return None

        try:
            return wait_for(found, timeout, f"a task of {service} running with {marker!r} in its log", interval=0.3)
        except TimeoutError:
            raise AssertionError(f"no task of {service} reached {marker!r} within {timeout:.0f}s"
                                 f"{' elsewhere than ' + repr(not_on) if not_on else ''}:\n"
                                 f"{self.task_report(service)}") from None

    def wait_published(self, node: SwarmNode, volume: str, files: int, timeout: float = 60) -> None:
        """The node has published what its task wrote: nothing pending, at least `files` paths indexed."""

        def done() -> bool:
            sync = node.volume_status(volume)["sync"]
            return bool(sync["pending"] == 0 and sync["files"] >= files)

        wait_for(done, timeout, f"{node.node_id} to publish {files} paths of {volume}", interval=0.3)

    def drain(self, node: SwarmNode) -> None:
        self.manager.docker("node", "update", "--availability", "drain", node.swarm_id)

    def activate(self, node: SwarmNode) -> None:
        self.manager.docker("node", "update", "--availability", "active", node.swarm_id)

    def stop(self) -> None:
        for n in self.nodes:
            if n.dockerd.proc is not None and n.dockerd.proc.poll() is None:
                with contextlib.suppress(Exception):
                    n.docker("plugin", "disable", "-f", ALIAS, check=False, timeout=60)
            n.stop()
        self.registry.stop()


def stack_file(path: Path, volume: str, driver_opts: dict[str, str]) -> Path:
    """A stack (compose v3) with one service writing into a syncmesh volume, the same on every node."""
    doc = {
        "version": "3.8",
        "services": {"app": {
            "image": IMAGE,
            # compose interpolates $: the program's own variables are written $$
            "command": ["sh", "-c", PROGRAM.replace("$", "$$")],
            "volumes": ["data:/data"],
            "stop_grace_period": "5s",
            "deploy": {"replicas": 1, "restart_policy": {"condition": "any", "delay": "1s"}},
        }},
        "volumes": {"data": {"name": volume, "driver": ALIAS, "driver_opts": driver_opts}},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class Failover:
    volume: str
    from_node: SwarmNode
    to_node: SwarmNode
    written: dict[str, str]  # path -> sha256, as the first task read back what it wrote
    read: dict[str, str]  # path -> sha256, as the task on the other node found it
    seconds: float  # `docker node update --availability drain` -> the new task has read every file
    start_seconds: float  # the new task's container: created -> started (its volume Mount included)
    new_task_logs: str
    networks: dict[str, str]  # the new task's networks -> their drivers (the stack's overlay network)


def stack_failover(swarm: Swarm, workdir: Path, stack: str, volume: str, driver_opts: dict[str, str],
                   before_drain: Callable[[Swarm, SwarmNode], None] | None = None) -> Failover:
    """`docker stack deploy` a writer service with a syncmesh volume (`driver_opts` as given), drain the
    node running its task, and return what the task that Swarm starts on another node found there.

    A variant calls this with other driver_opts (e.g. {"replicas": "all"}) and, as `before_drain`, a
    check made once the writer's node has published its files, given the swarm and that node (e.g. that
    every other node already holds a complete copy); then asserts on the returned timings. The stack is
    removed and the drained node made active again before returning (also on failure)."""
    f = stack_file(workdir / f"{stack}.yml", volume, driver_opts)
    service = f"{stack}_app"
    m = swarm.manager
    m.docker("stack", "deploy", "--resolve-image", "never", "-c", str(f), stack)
    drained: SwarmNode | None = None
    try:
        first, logs = swarm.running_with(service, "READDONE")
        if not any(line.endswith(" WROTE") for line in logs.splitlines()):
            raise AssertionError(f"the first task found data in the new volume {volume}:\n{logs}")
        written = digests(logs)
        assert len(written) == 22, f"the writer should have written 22 files:\n{logs}"
        swarm.wait_published(first.node, volume, len(written))
        if before_drain is not None:
            before_drain(swarm, first.node)
        log(f"{service}: task on {first.node!r} wrote {len(written)} files; draining that node")
        drained = first.node
        t0 = time.time()
        swarm.drain(first.node)
        task, logs = swarm.running_with(service, "READDONE", not_on=first.node)
        t_read = log_time(logs, "READDONE")
        assert t_read is not None
        info = json.loads(task.node.docker("inspect", "-f", "{{json .}}", task.container).stdout)
        start_seconds = parse_time(info["State"]["StartedAt"]) - parse_time(info["Created"])
        networks = {net: task.node.docker("network", "inspect", "-f", "{{.Driver}}", net).stdout.strip()
                    for net in info["NetworkSettings"]["Networks"]}
        return Failover(volume, first.node, task.node, written, digests(logs), t_read - t0, start_seconds, logs,
                        networks)
    finally:
        m.docker("stack", "rm", stack, check=False)
        wait_for(lambda: not m.docker("service", "ls", "-q", "--filter", f"name={service}").stdout.strip(), 60,
                 f"{service} to be removed")
        if drained is not None:
            swarm.activate(drained)


def containers_gone(node: SwarmNode, volume: str) -> bool:
    """No running container on the node uses the volume (Swarm keeps a stopped task's container a while)."""
    return not node.docker("ps", "-q", "--filter", f"volume={volume}").stdout.strip()


def inodes(root: Path) -> dict[str, tuple[int, int, int]]:
    """path -> (inode, size, mtime_ns) of every regular file under root: the same numbers after a plugin
    upgrade mean the files stayed where they were, not re-fetched."""
    out: dict[str, tuple[int, int, int]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink() and p.name != ".written"}

