"""Fault injection for syncmesh: writer workload, write ledger, invariant checker, fault plumbing.

Everything is driven from outside the product, as a user would see it: daemons are real processes
(syncmesh_plugin.devcluster.Node), the workload writes straight into each node's volume directory
(what a container's bind mount does), and the checker only compares trees and the ledger of completed
writes. Network partitions reuse the e2e harness' netns plumbing (tests/e2e/e2e_harness.Network) with
chaos-specific names and subnet, so a concurrent `make e2e` never collides with us.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from syncmesh_plugin.devcluster import Etcd, EtcdCluster, Node, embedded_etcd_pid, wait_for
from syncmesh_plugin.devcluster import tree as _tree

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from e2e_harness import Network, run

TMP_PREFIX = ".syncmesh-tmp-"
CONFLICT_RE = re.compile(r"^(?P<stem>.*)\.sync-conflict-\d{8}-\d{6}-(?P<node>[^/.]+)(?P<ext>\.[^/]*)?$")
NS_PREFIX = "smchaos"
RESULTS: list[dict[str, Any]] = []  # one row per finished run, printed by conftest's terminal summary
MOUNT_MARK = "smchaos-"


def record(row: dict[str, Any]) -> None:
    RESULTS.append(row)


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- ledger
@dataclass
class Write:
    writer: str
    seq: int
    path: str
    digest: str  # content written ("" for an attempt that failed)
    base: str | None  # digest of the file this writer saw at the path just before writing (None: absent)
    t: float
    completed: bool


@dataclass
class Ledger:
    writes: list[Write] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, w: Write) -> None:
        with self.lock:
            self.writes.append(w)

    @property
    def completed(self) -> list[Write]:
        return [w for w in self.writes if w.completed]


# ---------------------------------------------------------------------------------------------- writer
class Writer(threading.Thread):
    """Writes into one node's volume dir until stopped; records every write it completed.

    Operations: create a new file of its own, rewrite one of its own files in place, rewrite a shared
    file that writers on other nodes also write (the conflicts), now and then a bigger file. Every
    content is unique (writer, sequence number, random bytes), so a digest identifies one write.
    Errors (ENOSPC, a directory renamed away) end that write as not completed, and the writer goes on.
    """

    def __init__(self, name: str, root: Path, ledger: Ledger, seed: int, shared: int = 4,
                 pause: tuple[float, float] = (0.03, 0.09)) -> None:
        super().__init__(name=f"writer-{name}", daemon=True)
        self.wname = name
        self.root = root
        self.ledger = ledger
        self.rng = random.Random(f"{seed}-{name}")
        self.shared = shared
        self.pause = pause
        self.stop_evt = threading.Event()
        self.seq = 0
        self.own: list[str] = []
        self.errors: dict[str, int] = {}

    def stop(self) -> None:
        self.stop_evt.set()
        self.join(30)

    def _content(self, size: int) -> bytes:
        head = f"{self.wname} #{self.seq} {uuid.uuid4().hex}\n".encode()
        if size <= len(head):
            return head
        return head + self.rng.randbytes(size - len(head))

    def write_one(self, rel: str, data: bytes) -> bool:
        self.seq += 1
        p = self.root / rel
        base: str | None = None
        with contextlib.suppress(OSError):
            base = digest(p.read_bytes())
        t = time.time()
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "wb") as fh:  # in place, as most programs in a container do
                fh.write(data)
        except OSError as exc:
            key = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            self.errors[key] = self.errors.get(key, 0) + 1
            self.ledger.add(Write(self.wname, self.seq, rel, "", base, t, False))
            return False
        self.ledger.add(Write(self.wname, self.seq, rel, digest(data), base, t, True))
        return True

    def step(self) -> None:
        r = self.rng.random()
        if r < 0.35 or not self.own:
            rel = f"w-{self.wname}/d{self.rng.randrange(4)}/f{self.seq}.dat"
            if self.write_one(rel, self._content(self.rng.choice([60, 900, 3000, 20_000]))):
                self.own.append(rel)
        elif r < 0.75:
            self.write_one(self.rng.choice(self.own), self._content(self.rng.choice([80, 5000, 40_000])))
        elif r < 0.95:
            self.write_one(f"shared/s{self.rng.randrange(self.shared)}.txt",
                           self._content(self.rng.choice([100, 6000])))
        else:
            rel = f"w-{self.wname}/big{self.seq}.bin"
            if self.write_one(rel, self._content(self.rng.choice([300_000, 1_500_000]))):
                self.own.append(rel)

    def run(self) -> None:
        while not self.stop_evt.is_set():
            try:
                self.step()
            except Exception as exc:  # never let the workload die silently
                self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
            self.stop_evt.wait(self.rng.uniform(*self.pause))


# ---------------------------------------------------------------------------------------------- docker calls
@dataclass
class Call:
    node: str
    method: str
    t0: float  # monotonic
    seconds: float
    error: str  # "" when the call succeeded


class DockerProber(threading.Thread):
    """Docker calls on one node in a loop, as dockerd makes them while containers come and go: Create and Remove
    of a volume of its own, Mount and Unmount of the scenario's volume, Get, List. Every call is recorded (start,
    duration, error), so a scenario can tell the longest call during its fault and any error."""

    def __init__(self, node: Node, volume: str, pause: float = 0.2) -> None:
        super().__init__(name=f"docker-{node.name}", daemon=True)
        self.node = node
        self.volume = volume
        self.pause = pause
        self.calls: list[Call] = []
        self.stop_evt = threading.Event()

    def call(self, method: str, body: dict[str, Any]) -> None:
        t0 = time.monotonic()
        try:
            code, data = self.node.docker(method, body)
            err = str(data.get("Err") or "") or ("" if code == 200 else f"HTTP {code}")
        except Exception as exc:  # the socket gone (a killed daemon) counts as an error too
            err = f"{type(exc).__name__}: {exc}"
        self.calls.append(Call(self.node.name, method, t0, time.monotonic() - t0, err))

    def run(self) -> None:
        i = 0
        while not self.stop_evt.is_set():
            i += 1
            own = f"probe{self.node.name}x{os.getpid() % 1000}x{i}"
            mid = uuid.uuid4().hex
            self.call("VolumeDriver.Create", {"Name": own})
            self.call("VolumeDriver.Mount", {"Name": self.volume, "ID": mid})
            self.call("VolumeDriver.Get", {"Name": self.volume})
            self.call("VolumeDriver.Unmount", {"Name": self.volume, "ID": mid})
            self.call("VolumeDriver.Remove", {"Name": own})
            self.call("VolumeDriver.List", {})
            self.stop_evt.wait(self.pause)

    def stop(self) -> None:
        self.stop_evt.set()
        self.join(150)


# ---------------------------------------------------------------------------------------------- checker
def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """devcluster.tree, retried while the daemon renames or replaces files under our feet."""
    for _ in range(20):
        try:
            return _tree(root)
        except OSError:
            time.sleep(0.05)
    return _tree(root)


def file_digests(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for rel, v in tree(root).items():
        if v[0] == "file":
            out[rel] = v[1]
    return out


def temp_files(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            if n.startswith(TMP_PREFIX):
                found.append(str((Path(dirpath) / n).relative_to(root)))
    return found


def copy_of(path: str, candidate: str) -> bool:
    """True if `candidate` is a conflict copy of `path` (NAME.sync-conflict-YYYYMMDD-HHMMSS-NODE.EXT)."""
    m = CONFLICT_RE.match(candidate)
    if not m:
        return False
    stem, ext = os.path.splitext(path)
    return m.group("stem") == stem and (m.group("ext") or "") == ext


def divergence(nodes: list[Node], volume: str) -> dict[str, list[Any]]:
    trees = [tree(n.vol(volume)) for n in nodes]
    diff: dict[str, list[Any]] = {}
    for k in sorted(set().union(*trees)):
        vals = [t.get(k) for t in trees]
        if any(v != vals[0] for v in vals):
            diff[k] = vals
    return diff


def wait_converged(nodes: list[Node], volume: str, timeout: float, stable: float = 2.0) -> tuple[bool, float]:
    """Wait (bounded) until every node holds the same tree, unchanged for `stable` seconds.

    Returns (converged, monotonic time at which the trees became identical for good)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    since: float | None = None
    last: Any = None
    while time.monotonic() < deadline:
        trees = [tree(n.vol(volume)) for n in nodes]
        same = all(t == trees[0] for t in trees[1:])
        if same and trees[0] == last:
            if since is not None and time.monotonic() - since >= stable:
                return True, since
        else:
            since = time.monotonic() if same else None
        last = trees[0] if same else None
        time.sleep(0.25)
    return False, time.monotonic()


@dataclass
class Verdict:
    writes: int
    lost: list[Write]
    divergent: dict[str, list[Any]]
    temp_left: dict[str, list[str]]
    converged_at: float
    converged: bool

    def problems(self) -> list[tuple[str, str]]:
        """(kind, description) for every broken invariant; kind is divergent, lost or temp."""
        out = []
        if not self.converged or self.divergent:
            out.append(("divergent", f"{len(self.divergent)} divergent path(s), e.g. "
                        f"{dict(list(self.divergent.items())[:5])}"))
        if self.lost:
            out.append(("lost", f"{len(self.lost)} completed write(s) lost, e.g. "
                        + "; ".join(f"{w.writer}#{w.seq} {w.path} {w.digest[:8]} at {w.t:.3f}" for w in self.lost[:8])))
        if any(self.temp_left.values()):
            out.append(("temp", f"temp files left behind: {self.temp_left}"))
        return out


def lost_writes(ledger: Ledger, final: dict[str, str]) -> list[Write]:
    """Completed writes that are neither present, nor superseded, nor kept as a conflict copy."""
    by_path: dict[str, list[Write]] = {}
    for w in ledger.writes:
        by_path.setdefault(w.path, []).append(w)
    present: dict[str, set[str]] = {}  # path -> digests at the path or in its conflict copies
    for rel, d in final.items():
        present.setdefault(rel, set()).add(d)
        m = CONFLICT_RE.match(rel)
        if m:
            present.setdefault(m.group("stem") + (m.group("ext") or ""), set()).add(d)
    lost = []
    for w in ledger.completed:
        if w.digest in present.get(w.path, ()):
            continue
        later = by_path[w.path]
        # superseded: a later write (completed or not) by the same writer, or any write made on top of it
        if any((o.writer == w.writer and o.seq > w.seq) or (o.base == w.digest and o is not w) for o in later):
            continue
        lost.append(w)
    return lost


def check(nodes: list[Node], volume: str, ledger: Ledger, timeout: float = 120.0) -> Verdict:
    ok, at = wait_converged(nodes, volume, timeout)
    div = {} if ok else divergence(nodes, volume)
    final = file_digests(nodes[0].vol(volume))
    lost = lost_writes(ledger, final)
    temps = {n.name: temp_files(n.vol(volume)) for n in nodes}
    return Verdict(len(ledger.completed), lost, div, temps, at, ok)


# ---------------------------------------------------------------------------------------------- cluster
class NsNode(Node):
    """A daemon inside its own network namespace (started with nsenter --net), reachable on `ip`."""

    def __init__(self, *a: Any, netns: str, ip: str, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.netns = netns
        self.ip = ip
        self.env.update({"SYNCMESH_SERVER_HOST": ip, "SYNCMESH_SERVER_ADVERTISE": f"{ip}:{self.port}"})
        self.command_prefix = ["nsenter", f"--net=/run/netns/{netns}"]
        self.api_host, self.http_timeout = ip, 10.0


class BridgeEtcd(Etcd):
    """etcd listening on loopback and on the chaos bridge's address (for daemons in namespaces)."""

    def __init__(self, tmp: Path, bridge_ip: str) -> None:
        super().__init__(tmp)
        self.bridge_ip = bridge_ip

    @property
    def endpoint(self) -> str:
        return f"http://{self.bridge_ip}:{self.client_port}"

    def client_urls(self) -> str:
        return f"http://127.0.0.1:{self.client_port},http://{self.bridge_ip}:{self.client_port}"


class ChaosNetwork(Network):
    """e2e_harness.Network with chaos names (smchaos*) and its own subnet."""

    SUBNET = "10.231.79"
    _made = 0

    def __init__(self, count: int) -> None:
        super().__init__(count, subnet=ChaosNetwork.SUBNET)  # not e2e's 10.231.77: a concurrent `make e2e` uses it
        ChaosNetwork._made += 1
        tag = f"{os.getpid() % 100:02d}{ChaosNetwork._made % 1000:03d}"  # names stay within IFNAMSIZ (15)
        self.bridge = f"{NS_PREFIX}{tag}br"
        self.ns = [f"{NS_PREFIX}{tag}h{n}" for n in range(1, count + 1)]
        self.veth = [f"{NS_PREFIX}{tag}v{n}" for n in range(1, count + 1)]
        self.rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-m", "comment", "--comment",
                     "syncmesh-chaos", "-j", "ACCEPT"]

    def close(self) -> None:
        for veth in self.veth:  # explicitly: a veth only goes away asynchronously with its namespace
            run(["ip", "link", "del", veth], check=False)
        super().close()


def sweep_stale() -> None:
    """Namespaces, links, iptables rules and mounts a killed earlier chaos run left behind; never those of a run
    still going (a namespace with processes in it is alive, and so is everything named with its tag, the run's
    iptables rule and its tmpfs mounts)."""
    tag_re = re.compile(rf"^{NS_PREFIX}(\d{{5}})")
    namespaces = [ln.split(" ")[0] for ln in run(["ip", "netns", "list"], check=False).stdout.splitlines()]
    live = set()
    for name in namespaces:
        m = tag_re.match(name)
        if m and run(["ip", "netns", "pids", name], check=False).stdout.strip():
            live.add(m.group(1))

    def stale(name: str) -> bool:
        m = tag_re.match(name)
        return name.startswith(NS_PREFIX) and not (m and m.group(1) in live)

    for name in namespaces:
        if stale(name):
            run(["ip", "netns", "del", name], check=False)
    for line in run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if stale(name):
            run(["ip", "link", "del", name], check=False)
    if not live:
        for rule in run(["iptables", "-S", "FORWARD"], check=False).stdout.splitlines():
            if "syncmesh-chaos" in rule and rule.startswith("-A "):
                run(["iptables", "-D", *rule.split()[1:]], check=False)
    with open("/proc/self/mountinfo") as fh:
        for ln in fh:
            m = re.search(rf" {MOUNT_MARK}(\d+) ", ln)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                run(["umount", "-l", ln.split()[4]], check=False)


def netns_available() -> str | None:
    """None if we can create namespaces, veths and iptables rules; else why not."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "nsenter", "iptables"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"{tool} missing"
    probe = f"{NS_PREFIX}probe{os.getpid() % 10000}"
    res = run(["ip", "netns", "add", probe], check=False)
    run(["ip", "netns", "del", probe], check=False)
    return None if res.returncode == 0 else f"cannot create a network namespace: {res.stderr.strip()}"


def mount_tmpfs(path: Path, size_mb: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", f"{MOUNT_MARK}{os.getpid()}", str(path)])


def umount(path: Path) -> None:
    run(["umount", "-l", str(path)], check=False)


def fill(path: Path, leave_bytes: int) -> Path:
    """Fill the file system holding `path` with a ballast file until `leave_bytes` remain free."""
    ballast = path / "ballast.bin"
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    todo = max(0, free - leave_bytes)
    with open(ballast, "wb") as fh:
        block = b"\0" * (1 << 20)
        while todo > 0:
            n = min(todo, len(block))
            try:
                fh.write(block[:n])
                fh.flush()
            except OSError:
                break
            todo -= n
    return ballast


def sigstop(n: Node) -> None:
    assert n.proc is not None
    n.proc.send_signal(signal.SIGSTOP)


def sigcont(n: Node) -> None:
    if n.proc is not None and n.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            n.proc.send_signal(signal.SIGCONT)


def ns_iptables(netns: str, *rule: str, add: bool = True) -> None:
    """An iptables rule inside a namespace this suite made (never the host's tables)."""
    run(["ip", "netns", "exec", netns, "iptables", "-A" if add else "-D", *rule], check=add)


def log_lines(n: Node, *needles: str, limit: int = 8) -> list[str]:
    out = [ln for ln in n.log().splitlines() if any(x in ln for x in needles)]
    return out[:limit]


# ---------------------------------------------------------------------------------------------- scenario
class Scenario:
    """One run: etcd, N daemons holding one volume, a writer per node, and the cleanup of it all.

    `finish()` stops the writers, waits for convergence (bounded), checks the invariants and returns
    the result row; `close()` undoes everything (called by the fixture, also on failure).
    """

    def __init__(self, name: str, seed: int, tmp: Path, n: int = 3, net: ChaosNetwork | None = None,
                 pre_start: Any = None, members: int = 1, embedded: bool = False,
                 volume_opts: dict[str, str] | None = None, **env: str) -> None:
        self.name = name
        self.seed = seed
        self.rng = random.Random(f"{name}-{seed}")
        self.tmp = tmp
        self.net = net
        self.ledger = Ledger()
        self.volume = f"chaos{uuid.uuid4().hex[:6]}"
        self.notes: list[str] = []
        self.extra: list[tuple[str, str]] = []  # scenario-specific broken expectations (kind, text)
        self.post: list[tuple[Any, str, str]] = []
        self.mounts: list[Path] = []
        self.writers: list[Writer] = []
        self.fault_start = 0.0
        self.fault_end = 0.0
        self.converge_timeout = 60.0
        self.probers: list[DockerProber] = []
        self.docker_must_succeed = False  # a Docker call failing during the fault breaks the run
        self.gone: list[Node] = []  # hosts lost for good: left out of the checks (still cleaned up)
        self.embedded = embedded
        self.volume_opts = volume_opts  # the volume's options at Create (e.g. versioning)
        env = {"SYNCMESH_SYNC_MOUNT_TIMEOUT": "10s", "PYTHONUNBUFFERED": "1", **env}
        (tmp / "etcd").mkdir(parents=True, exist_ok=True)
        self.etcd: Etcd | EtcdCluster | None
        if embedded:
            self.etcd = None  # every node runs a member of the embedded cluster (n2, n3 join n1)
        elif members > 1:
            # members in namespaces of their own (after the daemons') when there is a network: a member can be
            # black-holed there; each daemon talks to its own member first (node i: member i)
            hosts = [net.addr(n + j) for j in range(1, members + 1)] if net else None
            self.etcd = EtcdCluster(tmp / "etcd", members, hosts=hosts)
            if net:
                for j, m in enumerate(self.etcd.members):
                    m.command_prefix = ["nsenter", f"--net=/run/netns/{net.ns[n + j]}"]
        else:
            self.etcd = BridgeEtcd(tmp / "etcd", net.gateway) if net else Etcd(tmp / "etcd")
        prefix = f"/chaos{uuid.uuid4().hex[:8]}"
        self.prefix = prefix

        def env_of(i: int) -> dict[str, str]:
            if isinstance(self.etcd, EtcdCluster):
                return {**env, "SYNCMESH_ETCD_ENDPOINTS": self.etcd.endpoints_from(i - 1)}
            return env

        # the embedded cluster runs as users get it: the cluster's own CA, members and daemons on mutual TLS
        if net:
            self.nodes: list[Node] = [NsNode(tmp, f"n{i}", self.etcd, prefix, netns=net.ns[i - 1], ip=net.addr(i),
                                             tls=embedded, **env_of(i)) for i in range(1, n + 1)]
        else:
            self.nodes = [Node(tmp, f"n{i}", self.etcd, prefix, tls=embedded, **env_of(i)) for i in range(1, n + 1)]
        self.pre_start = pre_start

    def start(self) -> Scenario:
        log(f"{self.name} seed {self.seed}: starting etcd and {len(self.nodes)} daemons")
        if self.etcd is not None:
            self.etcd.start()
        if self.pre_start:
            self.pre_start(self)
        if self.embedded:
            self._start_embedded()
        else:
            for nd in self.nodes:
                nd.start(wait=False)
            for nd in self.nodes:
                nd.wait_healthy(30)
        # as dockerd on each host: Create (idempotent cluster-wide), then Mount
        for nd in self.nodes:
            nd.ok("VolumeDriver.Create", {"Name": self.volume, "Opts": self.volume_opts})
        for nd in self.nodes:
            nd.mount(self.volume)
        return self

    def _start_embedded(self) -> None:
        """n1 starts its member alone, the others join it (SYNCMESH_JOIN) one by one and are promoted."""
        first, rest = self.nodes[0], self.nodes[1:]
        first.start(wait=True)
        for i, nd in enumerate(rest, start=2):
            nd.env["SYNCMESH_JOIN"] = first.api_url
            if first.auto_tls:
                nd.env["SYNCMESH_JOIN_TOKEN"] = first.join_token()
            nd.start(wait=False)
            nd.wait_healthy(60)

            def voting(k: int = i) -> bool:
                code, body = first.http("GET", "/api/v1/cluster/status")
                return code == 200 and sum(1 for m in body["etcd"]["members"] if not m["learner"]) == k

            wait_for(voting, 60, what=f"n{i}'s embedded member to be promoted")

    def start_probers(self) -> None:
        """Docker calls on every node, recorded: the longest one during the fault goes in the table."""
        for nd in self.nodes:
            p = DockerProber(nd, self.volume)
            self.probers.append(p)
            p.start()

    def fault_now(self) -> None:
        self.fault_start = time.monotonic()

    def start_writers(self, which: list[Node] | None = None) -> None:
        for nd in which or self.nodes:
            w = Writer(nd.name, nd.vol(self.volume), self.ledger, self.seed)
            self.writers.append(w)
            w.start()

    def stop_writers(self) -> None:
        for w in self.writers:
            w.stop()
        for w in self.writers:
            if w.errors:
                self.notes.append(f"writer {w.wname} errors {w.errors}")

    def one_write(self, node: Node, rel: str, data: bytes) -> bool:
        """A single recorded write (e.g. the big file), outside the writer threads."""
        w = Writer(f"{node.name}-x", node.vol(self.volume), self.ledger, self.seed)
        w.seq = self.rng.randrange(1 << 30)
        return w.write_one(rel, data)

    def wait_published(self, node: Node, rel: str, size: int, timeout: float = 60) -> None:
        """Wait until etcd holds a file manifest of `rel` with the given size (read straight from etcd)."""
        import json

        key = f"{node.env['SYNCMESH_ETCD_PREFIX'].rstrip('/')}/files/{self.volume}/{rel}"
        assert self.etcd is not None

        def there() -> bool:
            raw = self.etcd.get(key)
            m = json.loads(raw) if raw else {}
            return m.get("k") == "file" and m.get("s") == size

        wait_for(there, timeout, interval=0.1, what=f"{rel} to be published")

    def sleep(self, s: float) -> None:
        time.sleep(s)

    @property
    def live_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n not in self.gone]

    def finish(self, timeout: float = 120.0) -> dict[str, Any]:
        window_end = time.monotonic()  # Docker calls: from the fault's start to the end of the workload
        self.stop_writers()
        for p in self.probers:
            p.stop()
        for nd in self.nodes:
            sigcont(nd)
        t_check = time.monotonic()
        v = check(self.live_nodes, self.volume, self.ledger, timeout)
        # measured from the end of the fault (heal_now()), else from the end of the workload
        conv = v.converged_at - (self.fault_end or t_check)
        for cond, kind, text in self.post:
            try:
                ok = bool(cond())
            except OSError as exc:
                ok, text = False, f"{text} ({exc})"
            self.expect(ok, kind, text)
        final = file_digests(self.live_nodes[0].vol(self.volume))
        self.notes.append(f"conflict copies: {sum(1 for p in final if CONFLICT_RE.match(p))}")
        docker_max = None
        if self.probers:
            during = [c for p in self.probers for c in p.calls if self.fault_start <= c.t0 <= window_end]
            docker_max = round(max((c.seconds for c in during), default=0.0), 2)
            failed = [c for c in during if c.error]
            slowest = max(during, key=lambda c: c.seconds, default=None)
            slow = f", slowest {slowest.node} {slowest.method} {slowest.seconds:.2f}s" if slowest else ""
            self.notes.append(f"docker calls during the fault: {len(during)}, failed {len(failed)}{slow}")
            if self.docker_must_succeed:
                self.expect(not failed, "docker", f"{len(failed)} Docker call(s) failed during the fault, e.g. "
                            + "; ".join(f"{c.node} {c.method}: {c.error[:160]}" for c in failed[:4]))
        probs = v.problems() + self.extra
        row = {"scenario": self.name, "seed": self.seed, "writes": v.writes, "lost": len(v.lost),
               "divergent": len(v.divergent), "converge_s": round(conv, 1) if v.converged else None,
               "docker_max_s": docker_max,
               "ok": not probs, "problems": [f"{k}: {d}" for k, d in probs], "kinds": sorted({k for k, _ in probs}),
               "notes": "; ".join(self.notes)}
        self.verdict = v
        return row

    def expect(self, cond: bool, kind: str, text: str) -> None:
        if not cond:
            self.extra.append((kind, text))

    def expect_after(self, cond: Any, kind: str, text: str) -> None:
        """A check evaluated after convergence (cond is a callable)."""
        self.post.append((cond, kind, text))

    def heal_now(self) -> None:
        self.fault_end = time.monotonic()

    def close(self) -> None:
        for w in self.writers:
            w.stop_evt.set()
        for p in self.probers:
            p.stop_evt.set()
        for nd in self.nodes:
            sigcont(nd)
        for nd in self.nodes:
            with contextlib.suppress(Exception):
                nd.stop(timeout=5)
        if self.embedded:
            for nd in self.nodes:  # a member whose daemon was killed (a lost host) outlives it
                pid = embedded_etcd_pid(nd)
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        if isinstance(self.etcd, EtcdCluster):
            for m in self.etcd.members:
                if m.proc is not None and m.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        m.proc.send_signal(signal.SIGCONT)
        with contextlib.suppress(Exception):
            if self.etcd is not None:
                self.etcd.stop()
        for m in self.mounts:
            umount(m)
        if self.net is not None:
            self.net.close()


def conclude(s: Scenario, timeout: float = 120.0) -> dict[str, Any]:
    """Check the invariants and fail on any broken one (there are no expected failures)."""
    row = s.finish(timeout)
    record(row)
    log(f"{s.name} seed {s.seed}: {row}")
    assert not row["problems"], "\n".join(row["problems"])
    return row
