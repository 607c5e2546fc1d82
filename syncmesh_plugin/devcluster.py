"""A local multi-node cluster on one machine: a real etcd and real daemons as separate processes.

Used by the integration tests and the benchmarks, so both drive the product exactly as a user does:
through the Docker plugin socket, the HTTP API and the volume directories.

A Node speaks plain HTTP (security.tls_enabled false, set explicitly) unless made with `tls=True`: then it
runs with the product's defaults (mutual TLS with the cluster's own CA), joins with `join_token`, and
the harness reaches its API the way the CLI does on a node's host, with the node's own certificate
read from its data root.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .etcd_embedded import free_port

BIN = Path(sys.executable).parent / "syncmesh-plugin"


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except (OSError, ConnectionError, http.client.HTTPException, ValueError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Etcd:
    """A real etcd server on free ports: alone (the default), or one member of an EtcdCluster."""

    def __init__(self, tmp: Path, *, name: str = "t", host: str = "127.0.0.1") -> None:
        self.dir = tmp
        self.name = name
        self.host = host  # where it listens for clients and peers (a namespace's address, say)
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.initial_cluster = ""  # name=peer_url,... of every member ("": a cluster of this member alone)
        self.cluster_state = "new"  # "existing": joining a running cluster (added through the member API first)
        self.command_prefix: list[str] = []  # e.g. nsenter into a network namespace

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def client_urls(self) -> str:
        """Where etcd serves clients (subclasses: TLS, a bridge address as well)."""
        return f"http://{self.host}:{self.client_port}"

    def extra_args(self) -> list[str]:
        """More etcd flags (subclasses: certificates, a quota)."""
        return []

    def pre_vote(self) -> list[str]:
        """A member of several asks before it campaigns (etcd 3.5's default, off in 3.4): one that was cut off
        does not depose a working leader when it comes back."""
        return ["--pre-vote"] if self.initial_cluster.count("=") > 1 else []

    def start(self) -> None:
        self.launch()
        wait_for(self._up, 20, what="etcd to listen")

    def launch(self) -> None:
        """Start the process without waiting (the members of a new cluster start together)."""
        binary = shutil.which("etcd")
        assert binary, "etcd binary not found (apt-get install etcd-server)"
        self.dir.mkdir(parents=True, exist_ok=True)
        c, p = self.client_urls(), self.peer_url
        with open(self.dir / "etcd.log", "ab") as log:
            self.proc = subprocess.Popen(
                [*self.command_prefix, binary, "--name", self.name, "--data-dir", str(self.dir / "data"),
                 "--listen-client-urls", c, "--advertise-client-urls", c, "--listen-peer-urls", p,
                 "--initial-advertise-peer-urls", p, "--initial-cluster", self.initial_cluster or f"{self.name}={p}",
                 "--initial-cluster-state", self.cluster_state, *self.pre_vote(), *self.extra_args()],
                stdout=log, stderr=log, start_new_session=True)

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"etcd {self.name} exited with {self.proc.returncode}: "
                                 f"{(self.dir / 'etcd.log').read_text(errors='replace')[-2000:]}")
        with socket.create_connection((self.host, self.client_port), timeout=0.5):
            return True

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: the member dies without a word to its peers or clients."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wipe(self) -> None:
        """Delete its data directory (stopped first): it comes back as a new, empty member."""
        self.stop()
        shutil.rmtree(self.dir / "data", ignore_errors=True)

    def etcd_api(self, path: str, body: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        """etcd's JSON gateway (v3): used by tests to plant hostile values and compact history."""
        conn = http.client.HTTPConnection(self.host, self.client_port, timeout=timeout)
        try:
            conn.request("POST", path, json.dumps(body))
            resp = conn.getresponse()
            data = json.loads(resp.read() or b"{}")
        finally:
            conn.close()
        return data

    def put(self, key: str | bytes, value: bytes) -> int:
        import base64

        k = key if isinstance(key, bytes) else key.encode()
        r = self.etcd_api("/v3/kv/put", {"key": base64.b64encode(k).decode(),
                                         "value": base64.b64encode(value).decode()})
        return int(r["header"]["revision"])

    def get(self, key: str | bytes) -> bytes | None:
        import base64

        k = key if isinstance(key, bytes) else key.encode()
        r = self.etcd_api("/v3/kv/range", {"key": base64.b64encode(k).decode()})
        kvs = r.get("kvs") or []
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def compact(self) -> int:
        r = self.etcd_api("/v3/kv/range", {"key": "AA=="})
        rev = int(r["header"]["revision"])
        self.etcd_api("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev

    def status(self, timeout: float = 2) -> dict[str, Any]:
        """This member's own status: its id (`header.member_id`), the leader's id, its revision."""
        return self.etcd_api("/v3/maintenance/status", {}, timeout=timeout)


class EtcdCluster:
    """Several etcd members (three by default) forming one cluster, as production etcd runs: what Node
    gets as its endpoints is every member's client URL. Members can be stopped, killed, removed and
    added back through etcd's member API; requests of the harness go to any member that answers."""

    def __init__(self, tmp: Path, size: int = 3, *, hosts: list[str] | None = None) -> None:
        self.dir = tmp
        self.members = [Etcd(tmp / f"m{i}", name=f"m{i}", host=(hosts[i - 1] if hosts else "127.0.0.1"))
                        for i in range(1, size + 1)]
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = cluster

    @property
    def endpoint(self) -> str:
        """Every member's client URL, comma-separated (SYNCMESH_ETCD_ENDPOINTS)."""
        return ",".join(m.endpoint for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def endpoints_from(self, i: int) -> str:
        """Every client URL, member i first (0-based): the member a node given this list talks to."""
        eps = self.endpoints
        return ",".join(eps[i % len(eps):] + eps[:i % len(eps)])

    def start(self) -> EtcdCluster:
        for m in self.members:
            m.launch()
        for m in self.members:
            wait_for(m._up, 20, what=f"etcd member {m.name} to listen")
        wait_for(lambda: "header" in self.etcd_api("/v3/kv/range", {"key": "AA=="}), 30,
                 what="the etcd cluster to elect a leader")
        return self

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def _live(self) -> list[Etcd]:
        return [m for m in self.members if m.running]

    def etcd_api(self, path: str, body: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        """A gateway request to the first live member that answers (with a header: it has quorum)."""
        last: Exception | None = None
        for m in self._live():
            try:
                r = m.etcd_api(path, body, timeout=timeout)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                last = exc
                continue
            if "header" in r or not r.get("error"):
                return r
            last = RuntimeError(f"{m.name}: {r}")
        raise ConnectionError(f"no etcd member answered {path}: {last!r}")

    def put(self, key: str | bytes, value: bytes) -> int:
        return Etcd.put(self, key, value)  # type: ignore[arg-type]  # uses only etcd_api

    def get(self, key: str | bytes) -> bytes | None:
        return Etcd.get(self, key)  # type: ignore[arg-type]

    def compact(self) -> int:
        return Etcd.compact(self)  # type: ignore[arg-type]

    def member_ids(self) -> dict[str, str]:
        """member name -> id (decimal string, as the gateway writes uint64s)."""
        r = self.etcd_api("/v3/cluster/member/list", {})
        return {m.get("name", ""): str(m["ID"]) for m in r.get("members", [])}

    def leader(self, timeout: float = 20) -> Etcd:
        """The member that leads now (waits through an election)."""

        def find() -> Etcd | None:
            for m in self._live():
                try:
                    st = m.status(timeout=1)
                except (OSError, http.client.HTTPException, ValueError):
                    continue
                if st.get("leader") and st.get("leader") == st.get("header", {}).get("member_id"):
                    return m
            return None

        return wait_for(find, timeout, interval=0.1, what="an etcd leader")

    def remove(self, m: Etcd) -> None:
        """Remove a member through the member API (its process is stopped first)."""
        mid = self.member_ids()[m.name]
        m.stop()
        self.etcd_api("/v3/cluster/member/remove", {"ID": mid})

    def add(self, m: Etcd) -> None:
        """Add a member through the member API and start it (empty data dir) as joining the cluster."""
        r = self.etcd_api("/v3/cluster/member/add", {"peerURLs": [m.peer_url]})
        names = {str(x.get("name") or ""): x for x in r.get("members", [])}
        peers = [f"{n}={x['peerURLs'][0]}" for n, x in names.items() if n]
        m.initial_cluster = ",".join([*peers, f"{m.name}={m.peer_url}"])
        m.cluster_state = "existing"
        m.start()

    def replace(self, m: Etcd) -> None:
        """The member is removed, its data deleted, and it is added back as a new, empty member."""
        self.remove(m)
        m.wipe()
        self.add(m)


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 130) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


class Node:
    """One syncmesh daemon as a separate process, with its own data root, socket and port."""

    def __init__(self, base: Path, name: str, etcd: Etcd | EtcdCluster | None, prefix: str, *, tls: bool = False,
                 join_token: str = "", **env: str) -> None:
        self.name = name
        self.base = base / name
        self.base.mkdir(parents=True, exist_ok=True)
        self.data_root = self.base / "data"
        self.socket = str(self.base / "plugin.sock")
        self.port = free_port()
        self.env = {
            **os.environ,
            "SYNCMESH_NODE_ID": name, "SYNCMESH_DATA_ROOT": str(self.data_root), "SYNCMESH_PLUGIN_SOCKET": self.socket,
            "SYNCMESH_SERVER_HOST": "127.0.0.1", "SYNCMESH_SERVER_PORT": str(self.port),
            "SYNCMESH_ETCD_ENDPOINTS": etcd.endpoint if etcd else "", "SYNCMESH_ETCD_PREFIX": prefix,
            "SYNCMESH_LOG_FORMAT": "text", "SYNCMESH_LOG_LEVEL": "info", "SYNCMESH_SYNC_INTERVAL": "30s",
            **({"SYNCMESH_JOIN_TOKEN": join_token} if join_token else {}),
            **({} if tls else {"SYNCMESH_SECURITY_TLS_ENABLED": "false"}),
            **env,
        }
        self.env = {k: v for k, v in self.env.items() if not (k == "SYNCMESH_ETCD_ENDPOINTS" and not v)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.base / "daemon.log"
        self.api_host = "127.0.0.1"  # where tests reach its HTTP API
        self.http_timeout = 30.0
        self.command_prefix: list[str] = []  # e.g. nsenter into a network namespace
        self._ssl: tuple[float, ssl.SSLContext] | None = None

    @property
    def api_url(self) -> str:
        """The node's API as other hosts and the CLI reach it (https under the cluster's own PKI)."""
        return f"{'https' if self.auto_tls else 'http'}://{self.api_host}:{self.port}"

    @property
    def auto_tls(self) -> bool:
        """Whether the node runs the cluster's own PKI (the defaults): TLS on, no certificate files."""
        on = self.env.get("SYNCMESH_SECURITY_TLS_ENABLED", "true").strip().lower() not in ("0", "false", "no", "off")
        return on and not self.env.get("SYNCMESH_SECURITY_TLS_CERT_FILE")

    @property
    def pki_dir(self) -> Path:
        return self.data_root / "pki"

    def join_token(self) -> str:
        """What `syncmesh-plugin token` prints on this node (the cluster's first node)."""
        p = self.pki_dir / "join-token"
        return p.read_text().strip() if p.exists() else ""

    def ssl_context(self) -> ssl.SSLContext:
        """The node's own certificate and trust, as the CLI on its host uses them (reloaded after a renewal)."""
        # the one identity file: a renewal replaces key and certificate together (never a pair that mismatches)
        cert, key, trust = (self.pki_dir / "node-identity.pem", self.pki_dir / "node-identity.pem",
                            self.pki_dir / "trust.pem")
        try:
            stamp = max(cert.stat().st_mtime, trust.stat().st_mtime)
        except FileNotFoundError:
            raise ConnectionRefusedError(f"{self.name} has no certificate yet") from None
        if self._ssl is None or self._ssl[0] != stamp:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.load_verify_locations(cafile=str(trust))
            ctx.load_cert_chain(str(cert), str(key))
            self._ssl = (stamp, ctx)
        return self._ssl[1]

    def start(self, wait: bool = True) -> Node:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*self.command_prefix, str(BIN), "serve"], env=self.env, stdout=log,
                                         stderr=log, start_new_session=True)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 20) -> None:
        def ok() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            code, _ = self.http("GET", "/api/v1/health")
            return code == 200

        wait_for(ok, timeout, what=f"{self.name} healthy")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def docker(self, method: str, body: Any = None, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
        """Call the plugin socket the way dockerd does: POST, JSON, no Content-Type."""
        conn = UnixHTTP(self.socket)
        payload = raw if raw is not None else (b"" if body is None else json.dumps(body).encode() + b"\n")
        conn.putrequest("POST", f"/{method}", skip_accept_encoding=True)
        conn.putheader("Accept", "application/vnd.docker.plugins.v1.2+json")
        conn.putheader("Content-Length", str(len(payload)))
        conn.endheaders(payload)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, json.loads(data)

    def ok(self, method: str, body: Any = None) -> dict[str, Any]:
        code, data = self.docker(method, body)
        assert code == 200 and not data.get("Err"), f"{self.name} {method} {body}: {code} {data}"
        return data

    def connection(self) -> http.client.HTTPConnection:
        """A connection to the node's API: HTTPS with the node's certificate under the defaults (subclasses:
        HTTPS with other client certificates)."""
        if self.auto_tls:
            return http.client.HTTPSConnection(self.api_host, self.port, timeout=self.http_timeout,
                                               context=self.ssl_context())
        return http.client.HTTPConnection(self.api_host, self.port, timeout=self.http_timeout)

    def http(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        conn = self.connection()
        try:
            conn.request(method, path, body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data

    def vol(self, name: str) -> Path:
        return self.data_root / "volumes" / name / "_data"

    def mount(self, name: str, mount_id: str | None = None) -> Path:
        data = self.ok("VolumeDriver.Mount", {"Name": name, "ID": mount_id or uuid.uuid4().hex})
        return Path(data["Mountpoint"])


def embedded_etcd_pid(n: Node) -> int | None:
    """The pid of a node's embedded etcd, found by its data directory (never by a process name)."""
    data = str(n.data_root / "etcd" / "data").encode()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        if data in args and args[0].endswith(b"etcd"):
            return int(d)
    return None


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Content digest of a whole tree: kind, content hash / target, mode. Temp files excluded."""
    out: dict[str, tuple[Any, ...]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if name.startswith(".syncmesh-tmp-"):
                continue
            st = p.lstat()
            mode = st.st_mode & 0o7777
            if p.is_symlink():
                out[rel] = ("symlink", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", mode)
            else:
                h = hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
                out[rel] = ("file", h, mode)
    return out


def converged(nodes: list[Node], volume: str, timeout: float = 30.0,
              expect: Callable[[dict[str, tuple[Any, ...]]], bool] | None = None) -> dict[str, tuple[Any, ...]]:
    """Wait until every node holds the same tree (and it satisfies `expect`); return it."""

    def same() -> dict[str, tuple[Any, ...]] | None:
        trees = [tree(n.vol(volume)) for n in nodes]
        if all(t == trees[0] for t in trees[1:]) and (expect is None or expect(trees[0])):
            return trees[0] or {"": ("empty",)}
        return None

    try:
        return wait_for(same, timeout, interval=0.1, what=f"{volume} to converge")
    except AssertionError:
        trees = [tree(n.vol(volume)) for n in nodes]
        diff = {}
        keys = set().union(*trees)
        for k in sorted(keys):
            vals = [t.get(k) for t in trees]
            if any(v != vals[0] for v in vals):
                diff[k] = vals
        raise AssertionError(f"{volume} did not converge; differences (first 20): "
                             f"{dict(list(diff.items())[:20])}; {len(diff)} in all") from None


def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
