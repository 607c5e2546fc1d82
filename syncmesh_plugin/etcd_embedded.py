"""Embedded single-node etcd: a child `etcd` process on loopback, for a one-host setup with no config.

It is the same etcd binary a cluster would use, so nothing behaves differently; only its lifetime
is tied to the daemon's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _reuse(port: int | None) -> int:
    """The port if it is still free on loopback, else 0."""
    if not port:
        return 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


class EmbeddedEtcd:
    """Starts `etcd` with its data under <data_root>/etcd and stops it with the daemon."""

    def __init__(self, data_root: str, name: str, client_port: int = 0, peer_port: int = 0) -> None:
        self.data_dir = os.path.join(data_root, "etcd")
        self.name = name
        saved = self._saved_ports()
        self.client_port = client_port or _reuse(saved.get("client")) or free_port()
        self.peer_port = peer_port or _reuse(saved.get("peer")) or free_port()
        self.proc: asyncio.subprocess.Process | None = None

    def _saved_ports(self) -> dict[str, int]:
        """Ports used last time: the member's peer URL is stored in its data dir, so keep it stable."""
        try:
            with open(os.path.join(self.data_dir, "ports.json")) as fh:
                data = json.load(fh)
            return {k: int(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    async def start(self, timeout: float = 20.0) -> str:
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError("embedded etcd needs the `etcd` binary on PATH (Debian: apt-get install etcd-server),"
                               " or set etcd.endpoints / SYNCMESH_ETCD_ENDPOINTS to an existing cluster")
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        with open(os.path.join(self.data_dir, "ports.json"), "w") as fh:
            json.dump({"client": self.client_port, "peer": self.peer_port}, fh)
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        log_path = os.path.join(self.data_dir, "etcd.log")
        logf = open(log_path, "ab")
        # The member's peer URL is stored in its data dir; a restart on other ports must reuse it.
        self.proc = await asyncio.create_subprocess_exec(
            binary, "--name", self.name, "--data-dir", os.path.join(self.data_dir, "data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}", "--auto-compaction-mode", "revision",
            "--auto-compaction-retention", "100000", "--quota-backend-bytes", str(4 * 1024**3),
            stdout=logf, stderr=logf, stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
        logf.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"embedded etcd exited with code {self.proc.returncode}; see {log_path}")
            if await self._healthy():
                return self.endpoint
            await asyncio.sleep(0.05)
        await self.stop()
        raise RuntimeError(f"embedded etcd did not listen on {client} within {timeout:.0f}s; see {log_path}")

    async def _healthy(self) -> bool:
        """etcd's own /health: listening is not enough, it must have elected itself and serve."""
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.client_port), 1)
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
