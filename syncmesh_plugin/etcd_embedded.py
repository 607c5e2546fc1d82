"""Embedded etcd: a child `etcd` process, for a setup with no etcd of its own.

Alone on one host it listens on loopback only, as it always did. It can also be one member of an
embedded cluster that grows with the hosts (etcd_cluster.py): a joining node starts its member with the
cluster it was given (`--initial-cluster-state existing`), and a member that other hosts must reach
listens on the node's own address as well (`host`, remembered in ports.json with the ports, since a
member's peer URL is stored in its data directory and the cluster's). It is the same etcd binary a
cluster would use, so nothing behaves differently; only its lifetime is tied to the daemon's.

With the cluster's own PKI (`tls`: security.tls_enabled, the default) every URL of the member is https:
clients and peers alike present a certificate of the cluster's CA (--client-cert-auth,
--peer-client-cert-auth) and etcd names the client by its certificate's common name (the node id) when
authentication is on. The member reads the node's key and certificate from one file, replaced whole at a
renewal (etcd loads it again for every new connection); it reads the trusted CAs when it starts, so the
daemon restarts it when the cluster trusts a new CA (one member at a time, see Daemon._restart_member_in_turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import random
import shutil
import signal
import socket
import ssl
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class MemberTls:
    """The node's identity (key and certificate in one PEM file) and the cluster's trusted CAs (PEM)."""

    identity: str
    trust: str

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.trust)
        ctx.check_hostname = False  # the member's certificate names its node; its CA is all that counts here
        ctx.load_cert_chain(self.identity, self.identity)
        return ctx

    def flags(self) -> list[str]:
        return ["--cert-file", self.identity, "--key-file", self.identity, "--trusted-ca-file", self.trust,
                "--client-cert-auth", "--peer-cert-file", self.identity, "--peer-key-file", self.identity,
                "--peer-trusted-ca-file", self.trust, "--peer-client-cert-auth"]


class MemberRemoved(RuntimeError):
    """The member's data directory belongs to a member the cluster has removed (`forget`): it cannot start."""


EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
LOWEST_CHOSEN_PORT = 20000
_handed_out: set[int] = set()


def ephemeral_range(path: str = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The ports the kernel gives to outgoing connections and to bind(0) (Linux's default if unreadable)."""
    try:
        with open(path) as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def port_candidates(lo: int, hi: int, lowest: int = LOWEST_CHOSEN_PORT) -> list[range]:
    """The ports a listener may be given: above `lowest` and outside the ephemeral range [lo, hi]."""
    return [r for r in (range(lowest, min(lo, 65536)), range(max(hi + 1, lowest), 65536)) if len(r)]


def _nth(ranges: list[range], i: int) -> int:
    for r in ranges:
        if i < len(r):
            return r[i]
        i -= len(r)
    raise IndexError(i)


def free_port(host: str = LOOPBACK) -> int:
    """A port free now, for a listener that binds it later, chosen outside the ephemeral range.

    A port from bind(0) is an ephemeral one: until the listener binds it, any outgoing connection on the
    host may be given it as its source port, and the listener then fails with EADDRINUSE (seen in CI, a
    daemon's API port taken between the choice and the bind). Outside that range only another listener
    can take it, so the choice is random there and checked by a bind; this process never hands it out twice.
    """
    ranges = port_candidates(*ephemeral_range())
    total = sum(len(r) for r in ranges)
    rng = random.SystemRandom()
    for _ in range(200 if total else 0):
        port = _nth(ranges, rng.randrange(total))
        if port not in _handed_out and _reuse(port, host):
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no room outside the range: the kernel's pick
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _reuse(port: int | None, host: str = LOOPBACK) -> int:
    """The port if it is still free, else 0."""
    if not port:
        return 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return 0
    return port


def _int(v: object) -> int:
    return v if isinstance(v, int) else 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EmbeddedEtcd:
    """Starts `etcd` with its data under <data_root>/etcd and stops it with the daemon."""

    def __init__(self, data_root: str, name: str, client_port: int = 0, peer_port: int = 0,
                 host: str = LOOPBACK, tls: MemberTls | None = None) -> None:
        self.tls = tls
        self.data_dir = os.path.join(data_root, "etcd")
        self.name = name
        saved = self._saved()
        # A member other hosts reach keeps listening on the address it was exposed on.
        self.host = str(saved.get("host") or LOOPBACK)
        self.wanted_host = host  # where it listens once it is a member of a cluster of several hosts
        self.client_port = client_port or _reuse(_int(saved.get("client"))) or free_port()
        self.peer_port = peer_port or _reuse(_int(saved.get("peer"))) or free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.initial_cluster = ""
        self.cluster_state = "new"

    def _saved(self) -> dict[str, object]:
        """Ports (and address) used last time: the member's peer URL is stored in its data dir, so keep it."""
        try:
            with open(os.path.join(self.data_dir, "ports.json")) as fh:
                data = json.load(fh)
            return {k: (int(v) if k in ("client", "peer") else v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def remember_ports(self) -> None:
        """Keep the ports (and address) for the next start: a join retried, a restart, use the same peer URL."""
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        with open(os.path.join(self.data_dir, "ports.json"), "w") as fh:
            json.dump({"client": self.client_port, "peer": self.peer_port, "host": self.host}, fh)

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def endpoint(self) -> str:
        """Where this node's own daemon reaches it (loopback)."""
        return f"{self.scheme}://{LOOPBACK}:{self.client_port}"

    @property
    def client_url(self) -> str:
        """Where the cluster's other hosts reach it."""
        return f"{self.scheme}://{self.host}:{self.client_port}"

    def client_url_on(self, host: str) -> str:
        return f"{self.scheme}://{host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.peer_port}"

    def peer_url_on(self, host: str) -> str:
        return f"{self.scheme}://{host}:{self.peer_port}"

    def has_data(self) -> bool:
        """It was started before: it is a member already (alone, or of the cluster it joined)."""
        return os.path.isdir(os.path.join(self.data_dir, "data", "member"))

    def set_aside(self) -> str:
        """Move the data of a removed member away (kept, never deleted) so that the node can join afresh."""
        src = os.path.join(self.data_dir, "data")
        dst = os.path.join(self.data_dir, f"data.removed-{int(time.time())}")
        os.rename(src, dst)
        return dst

    async def start(self, timeout: float = 20.0, *, initial_cluster: str = "", existing: bool = False,
                    host: str | None = None) -> str:
        """Start the member: alone (the first node), or joining `initial_cluster` (existing); `host` (a
        member other hosts must reach) listens on that address as well and is remembered."""
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError("embedded etcd needs the `etcd` binary on PATH (Debian: apt-get install etcd-server),"
                               " or set etcd.endpoints / SYNCMESH_ETCD_ENDPOINTS to an existing cluster")
        if host is not None:
            self.host = host
        self.remember_ports()
        if not is_loopback(self.host):
            listen_client = f"{self.endpoint},{self.client_url}"
        else:
            listen_client = self.endpoint
        advertise_client = self.client_url
        peer = self.peer_url
        log_path = os.path.join(self.data_dir, "etcd.log")
        logf = open(log_path, "ab")
        start_at = logf.tell()
        cluster = initial_cluster or f"{self.name}={peer}"
        # The member's peer URL is stored in its data dir; a restart on other ports must reuse it.
        self.proc = await asyncio.create_subprocess_exec(
            binary, "--name", self.name, "--data-dir", os.path.join(self.data_dir, "data"),
            "--listen-client-urls", listen_client, "--advertise-client-urls", advertise_client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", cluster, "--initial-cluster-state", "existing" if existing else "new",
            # a member cut off from the others does not depose a working leader when it comes back
            # (etcd 3.5's default; off in 3.4)
            "--pre-vote",
            "--auto-compaction-mode", "revision",
            "--auto-compaction-retention", "100000", "--quota-backend-bytes", str(4 * 1024**3),
            *(self.tls.flags() if self.tls is not None else []),
            stdout=logf, stderr=logf, stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
        logf.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.proc.returncode is not None:
                tail = self._log_since(log_path, start_at)
                if "permanently removed from the cluster" in tail or "member has already been removed" in tail:
                    raise MemberRemoved(f"this node's etcd member was removed from the cluster; see {log_path}")
                raise RuntimeError(f"embedded etcd exited with code {self.proc.returncode}; see {log_path}")
            if await self.healthy() or (existing and await self._listening()):
                return self.endpoint
            await asyncio.sleep(0.05)
        await self.stop()
        raise RuntimeError(f"embedded etcd did not listen on {listen_client} within {timeout:.0f}s; see {log_path}")

    @staticmethod
    def _log_since(path: str, offset: int) -> str:
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    async def _listening(self) -> bool:
        """A joining member (a learner catching up) serves its port before it is healthy."""
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, self.client_port), 1)
        except (OSError, TimeoutError):
            return False
        w.close()
        return True

    async def healthy(self) -> bool:
        """etcd's own /health: listening is not enough, it must have elected itself and serve."""
        try:
            ctx = self.tls.client_context() if self.tls is not None else None
            r, w = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, self.client_port, ssl=ctx), 1)
        except (OSError, TimeoutError):
            return False
        try:
            w.write(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            await w.drain()
            body = await asyncio.wait_for(r.read(4096), 2)
            return b'"health":"true"' in body or b'"health": "true"' in body
        except (OSError, TimeoutError):
            return False
        finally:
            w.close()

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
