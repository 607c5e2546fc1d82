"""Processes and network plumbing for the end-to-end tests: dockerd, etcd, syncmesh daemons, netns hosts.

Everything here is started by the tests and stopped by them (also on failure): each class has a
`stop()`/`close()` that is safe to call twice and never raises. Resources get recognisable names
(`sme2e*` namespaces and bridges, iptables rules commented `syncmesh-e2e`) so `sweep_stale()`
can remove what a killed run left behind.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
IMAGE = "syncmesh-e2e/busybox:latest"
IPT_COMMENT = "syncmesh-e2e"


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], check: bool = True, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> rc {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}")
    return res


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except Exception as exc:  # the condition is not met yet
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def stop_process(proc: subprocess.Popen[Any] | None, grace: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL) if _is_group_leader(proc.pid) else proc.kill()
        proc.wait(10)


def _is_group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def unmount_under(base: str) -> None:
    """Lazy-unmount everything mounted at or below `base` (deepest first)."""
    base = base.rstrip("/")
    points = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mp = line.split()[4].replace("\\040", " ")
            if mp == base or mp.startswith(base + "/"):
                points.append(mp)
    for mp in sorted(set(points), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)


def unix_post(sock: str, path: str, body: dict[str, Any], timeout: float = 30) -> tuple[int, dict[str, Any]]:
    """One VolumeDriver call, as dockerd makes it (POST, JSON body, no Content-Type)."""

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(sock)

    c = Conn("localhost", timeout=timeout)
    try:
        c.request("POST", path, body=json.dumps(body))
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        c.close()


def node_health(base_url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(base_url + "/api/v1/health", timeout=3) as r:
        return json.loads(r.read())


def busybox_rootfs_tar(dest: Path) -> Path:
    """A busybox image tarball: /bin/busybox from busybox-static plus one symlink per applet."""
    bb = shutil.which("busybox")
    if bb is None:
        raise RuntimeError("busybox missing (apt-get install busybox-static)")
    applets = run([bb, "--list"]).stdout.split()
    out = dest / "busybox-rootfs.tar"
    with tarfile.open(out, "w") as tar:
        for d in ("bin", "tmp", "data"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(ti)
        tar.add(bb, "bin/busybox")
        for a in applets:
            if a != "busybox":
                ti = tarfile.TarInfo(f"bin/{a}")
                ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(ti)
    return out


class Etcd:
    """A single-member etcd on free ports of the given addresses (data in a temp dir)."""

    def __init__(self, base: Path, addrs: tuple[str, ...] = ("127.0.0.1",)) -> None:
        self.base = base
        self.addrs = addrs
        self.port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoints(self) -> list[str]:
        return [f"http://{a}:{self.port}" for a in self.addrs]

    def start(self) -> Etcd:
        self.base.mkdir(parents=True, exist_ok=True)
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = ",".join(self.endpoints)
        logf = open(self.base / "etcd.log", "wb")
        self.proc = subprocess.Popen(
            ["etcd", "--name", "e2e", "--data-dir", str(self.base / "data"), "--listen-client-urls", client,
             "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"e2e={peer}"],
            stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True)
        logf.close()

        def up() -> bool:
            with socket.create_connection((self.addrs[0], self.port), timeout=1):
                return True

        wait_for(up, 20, f"etcd on {client}")
        return self

    def stop(self) -> None:
        stop_process(self.proc, 10)


class Dockerd:
    """A private dockerd that cannot touch the host it runs on (issue 20).

    - Its own network namespace: `netns` (a simulated host's, owned by a Network), else one of its own
      (`sme2e<pid>d<n>`, loopback only) created in start() and deleted in stop(). In the root namespace,
      `--bridge=none` deleted the host engine's docker0 bridge.
    - Its own mount namespace (`unshare --mount`, private propagation) with a tmpfs on /run: the
      legacy-plugin directory /run/docker/plugins is `plugins_dir` bind-mounted from the host (so a
      legacy plugin's socket goes in `plugins_dir`, and the managed plugins' sockets land there too),
      a system containerd's /run/containerd/containerd.sock is not seen (dockerd starts its own), and
      every mount dockerd makes (overlay, plugin rootfs, nsfs) lives and dies in that namespace.
    - Own data-root, exec-root, pidfile, API socket and trust key (daemon.json's deprecated-key-path;
      otherwise dockerd 20.10 writes /etc/docker/key.json), `--iptables=false`.
    """

    _made = 0

    def __init__(self, base: Path, netns: str | None = None, config: dict[str, Any] | None = None) -> None:
        self.base = base
        self.netns = netns
        self.config = config or {}  # more daemon.json settings (e.g. insecure-registries)
        self.own_netns = netns is None
        if self.own_netns:
            Dockerd._made += 1
            self.netns = f"sme2e{os.getpid() % 10000}d{Dockerd._made}"
        self.sock = str(base / "docker.sock")
        self.plugins_dir = base / "plugins"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run(["docker", "-H", self.host, *args], check=check, timeout=timeout)

    def start(self) -> Dockerd:
        self.base.mkdir(parents=True, exist_ok=True)
        self.plugins_dir.mkdir(mode=0o700, exist_ok=True)
        # {} keeps /etc/docker/daemon.json out; the key path keeps /etc/docker/key.json out.
        (self.base / "daemon.json").write_text(json.dumps({"deprecated-key-path": str(self.base / "key.json"),
                                                           **self.config}))
        dockerd = ["dockerd", "--config-file", str(self.base / "daemon.json"),
                   "--data-root", str(self.base / "data"), "--exec-root", str(self.base / "exec"),
                   "--pidfile", str(self.base / "docker.pid"), "-H", self.host,
                   "--bridge=none", "--iptables=false", "--ip-masq=false"]
        # `nsenter --net`, not `ip netns exec`: the latter remounts /sys and hides the cgroup v1 mounts.
        # sh execs dockerd, so self.proc is dockerd itself.
        setup = (f"mount -t tmpfs -o mode=0755,size=16m sme2e-run /run && mkdir -p /run/docker/plugins && "
                 f"mount --bind {shlex.quote(str(self.plugins_dir))} /run/docker/plugins && "
                 f"exec {shlex.join(dockerd)}")
        cmd = ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--propagation", "private", "--",
               "sh", "-c", setup]

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited: {self.log_tail()}")
            return self.cli("version", "--format", "{{.Server.Version}}", check=False, timeout=10).returncode == 0

        try:
            if self.own_netns:
                run(["ip", "netns", "add", str(self.netns)])
                run(["ip", "-n", str(self.netns), "link", "set", "lo", "up"])
            with open(self.base / "dockerd.log", "wb") as logf:
                self.proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
            wait_for(up, 60, f"dockerd on {self.sock}")
        except Exception:
            self.stop()
            raise
        return self

    def get_json(self, url: str, timeout: float = 3) -> Any:
        """GET url from inside dockerd's network namespace (where a managed plugin's API listens)."""
        code = ("import sys, urllib.request\n"
                "with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:\n"
                "    sys.stdout.write(r.read().decode())\n")
        res = run(["nsenter", f"--net=/run/netns/{self.netns}", sys.executable, "-c", code, url, str(timeout)],
                  timeout=timeout + 10)
        return json.loads(res.stdout)

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.base / "dockerd.log").read_text(errors="replace").splitlines()[-n:])
        return ""

    def import_busybox(self, tar: Path) -> None:
        self.cli("import", "-c", "ENV PATH=/bin", str(tar), IMAGE)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                ids = self.cli("ps", "-aq", check=False, timeout=30).stdout.split()
                if ids:
                    self.cli("rm", "-f", *ids, check=False, timeout=60)
            with contextlib.suppress(Exception):
                for name in self.cli("plugin", "ls", "--format", "{{.Name}}", check=False, timeout=30).stdout.split():
                    self.cli("plugin", "disable", "-f", name, check=False, timeout=60)
        stop_process(self.proc, 30)
        unmount_under(str(self.base))  # nothing is mounted there in the host's namespace; a safety net
        if self.own_netns:
            run(["ip", "netns", "del", str(self.netns)], check=False)


class SyncmeshProcess:
    """`syncmesh-plugin serve` from the venv, on the host (a legacy plugin when its socket is in a Dockerd's
    plugins_dir, which that dockerd sees as /run/docker/plugins)."""

    def __init__(self, base: Path, node_id: str, etcd_endpoints: list[str], socket_path: str) -> None:
        self.base = base
        self.node_id = node_id
        self.socket = socket_path
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCMESH_")}
        self.env.update({
            "SYNCMESH_DATA_ROOT": str(base / "data"), "SYNCMESH_PLUGIN_SOCKET": socket_path,
            "SYNCMESH_ETCD_ENDPOINTS": ",".join(etcd_endpoints), "SYNCMESH_SERVER_HOST": "127.0.0.1",
            "SYNCMESH_SERVER_PORT": str(self.port), "SYNCMESH_NODE_ID": node_id, "SYNCMESH_LOG_FORMAT": "text",
            "SYNCMESH_LOG_LEVEL": "info", "SYNCMESH_SYNC_MOUNT_TIMEOUT": "15s", "PYTHONUNBUFFERED": "1",
            # plain HTTP: the tests read the node API with urllib/http.client, without the cluster's CA
            "SYNCMESH_SECURITY_TLS_ENABLED": "false",
        })
        self.proc: subprocess.Popen[bytes] | None = None

    def mountpoint(self, volume: str) -> Path:
        return self.base / "data" / "volumes" / volume / "_data"

    def start(self) -> SyncmeshProcess:
        self.base.mkdir(parents=True, exist_ok=True)
        logf = open(self.base / "daemon.log", "ab")
        self.proc = subprocess.Popen([str(VENV_BIN / "syncmesh-plugin"), "serve"], env=self.env, stdout=logf,
                                     stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True)
        logf.close()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"syncmesh daemon exited: {self.log_tail()}")
            status, body = self.api("/api/v1/health")
            return status == 200 and body["components"]["etcd"]["ok"] and os.path.exists(self.socket)

        wait_for(ready, 30, f"syncmesh daemon {self.node_id}")
        return self

    def api(self, path: str) -> tuple[int, Any]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, json.loads(r.read() or b"null")
        finally:
            c.close()

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.base / "daemon.log").read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> None:
        stop_process(self.proc, 15)


def sweep_stale() -> None:
    """Remove namespaces, links and iptables rules a killed earlier run left behind."""
    for ns in run(["ip", "netns", "list"], check=False).stdout.split("\n"):
        name = ns.split(" ")[0]
        if name.startswith("sme2e"):
            run(["ip", "netns", "del", name], check=False)
    for line in run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith("sme2e"):
            run(["ip", "link", "del", name], check=False)
    rules = run(["iptables", "-S", "FORWARD"], check=False).stdout.splitlines()
    for rule in rules:
        if IPT_COMMENT in rule and rule.startswith("-A "):
            run(["iptables", "-D", *rule.split()[1:]], check=False)


class Network:
    """A bridge in the root namespace and one netns per simulated host, joined by veth pairs.

    Hosts are 10.231.77.1N/24, the bridge is 10.231.77.1 (etcd listens there). Namespace-to-namespace
    traffic crosses the host's FORWARD chain (bridge-nf-call-iptables), so one ACCEPT rule is added
    for the bridge and removed again in close().
    """

    SUBNET = "10.231.77"

    def __init__(self, count: int, subnet: str = SUBNET, tag: str = "") -> None:
        """`subnet` (a /24's first three octets) and `tag` (a letter or two in the names) keep two networks
        of one run apart."""
        self.SUBNET = subnet
        tag = f"{os.getpid() % 10000}{tag}"
        self.bridge = f"sme2e{tag}br"
        self.count = count
        self.ns = [f"sme2e{tag}h{n}" for n in range(1, count + 1)]
        self.veth = [f"sme2e{tag}v{n}" for n in range(1, count + 1)]
        self.rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-m", "comment", "--comment", IPT_COMMENT,
                     "-j", "ACCEPT"]
        self._rule_added = False

    @property
    def gateway(self) -> str:
        return f"{self.SUBNET}.1"

    def addr(self, n: int) -> str:  # n = 1..count
        return f"{self.SUBNET}.{10 + n}"

    def setup(self) -> Network:
        try:
            run(["ip", "link", "add", self.bridge, "type", "bridge"])
            run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
            run(["ip", "link", "set", self.bridge, "up"])
            for i, (ns, veth) in enumerate(zip(self.ns, self.veth, strict=True), start=1):
                run(["ip", "netns", "add", ns])
                run(["ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "c"])
                run(["ip", "link", "set", veth + "c", "netns", ns])
                run(["ip", "link", "set", veth, "master", self.bridge, "up"])
                run(["ip", "-n", ns, "link", "set", "lo", "up"])
                run(["ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", veth + "c"])
                run(["ip", "-n", ns, "link", "set", veth + "c", "up"])
            run(["iptables", "-I", *self.rule[:1], "1", *self.rule[1:]])
            self._rule_added = True
        except Exception:
            self.close()
            raise
        return self

    def link(self, n: int, up: bool) -> None:
        """Cut (or restore) host n's cable: packets are silently dropped, as on a real partition."""
        run(["ip", "link", "set", self.veth[n - 1], "up" if up else "down"])

    def close(self) -> None:
        if self._rule_added:
            run(["iptables", "-D", *self.rule], check=False)
            self._rule_added = False
        for veth in self.veth:  # at once: with its namespace, a veth only goes away asynchronously
            if run(["ip", "link", "show", veth], check=False).returncode == 0:
                run(["ip", "link", "del", veth], check=False)
        for ns in self.ns:
            run(["ip", "netns", "del", ns], check=False)
        run(["ip", "link", "del", self.bridge], check=False)


class ManagedHost:
    """One simulated host: a dockerd in its own netns running the syncmesh managed plugin."""

    def __init__(self, n: int, base: Path, net: Network, plugin_dir: Path, plugin_ref: str,
                 etcd_endpoint: str) -> None:
        self.n = n
        self.node_id = f"host{n}"
        self.net = net
        self.dockerd = Dockerd(base, netns=net.ns[n - 1])
        self.plugin_dir = plugin_dir
        self.ref = plugin_ref
        self.etcd_endpoint = etcd_endpoint
        self.plugin_id = ""
        self.timings: dict[str, float] = {}

    def start(self, image_tar: Path) -> ManagedHost:
        t = time.monotonic()
        self.dockerd.start()
        self.timings["dockerd_start"] = time.monotonic() - t
        self.dockerd.import_busybox(image_tar)
        t = time.monotonic()
        self.dockerd.cli("plugin", "create", self.ref, str(self.plugin_dir), timeout=300)
        self.timings["plugin_create"] = time.monotonic() - t
        self.dockerd.cli("plugin", "set", self.ref, f"SYNCMESH_ETCD_ENDPOINTS={self.etcd_endpoint}",
                         f"SYNCMESH_NODE_ID={self.node_id}", f"SYNCMESH_SERVER_ADVERTISE={self.net.addr(self.n)}:7734",
                         "SYNCMESH_LOG_FORMAT=text", "SYNCMESH_SYNC_MOUNT_TIMEOUT=15s",
                         "SYNCMESH_SECURITY_TLS_ENABLED=false")  # plain HTTP API, read by node_health()
        t = time.monotonic()
        self.dockerd.cli("plugin", "enable", "--timeout", "120", self.ref)
        self.timings["plugin_enable"] = time.monotonic() - t
        self.plugin_id = self.dockerd.cli("plugin", "inspect", "-f", "{{.Id}}", self.ref).stdout.strip()
        # `enable` returns once the socket listens; etcd connects right after (a Create before that
        # is refused with "cluster unavailable"). The node API is reachable from here over the bridge.
        t = time.monotonic()
        wait_for(lambda: node_health(f"http://{self.net.addr(self.n)}:7734")["components"]["etcd"]["ok"], 30,
                 f"{self.node_id}'s plugin to connect to etcd")
        self.timings["plugin_ready_after_enable"] = time.monotonic() - t
        return self

    def mountpoint(self, volume: str) -> Path:
        """The host-side path of a volume's data (dockerd maps the propagated mount there)."""
        return (self.dockerd.base / "data" / "plugins" / self.plugin_id / "propagated-mount" / "volumes" / volume
                / "_data")

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.dockerd.cli(*args, check=check, timeout=timeout)

    def sh(self, volume: str, script: str, timeout: float = 120) -> str:
        """Run a busybox shell in a throwaway container with the volume at /data."""
        return self.docker("run", "--rm", "-v", f"{volume}:/data", IMAGE, "sh", "-c", script, timeout=timeout).stdout

    def stop(self) -> None:
        self.dockerd.stop()


def make_tempdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every regular file under root (relative path -> bytes)."""
    out: dict[str, bytes] = {}
    if not root.is_dir():
        return out
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with contextlib.suppress(OSError):
                out[str(p.relative_to(root))] = p.read_bytes()
    return out
