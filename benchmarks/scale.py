"""Scale benchmark (issue 9): a million-file volume, twelve nodes, 200 volumes, etcd footprint, inotify limits.

Every node is a real daemon process (syncmesh_plugin.devcluster), every figure is measured from the outside:
etcd's JSON gateway (key counts, revisions, database size), each daemon's /metrics and HTTP API, /proc
(RSS, CPU, inotify fds), `ss` (TCP connections), and the volume directories themselves (file counts,
content digests against what was written).

Scenarios (``--only 1,2``):
  1. one volume of N files (default 1,000,000; two directories 50,000 entries wide): initial publish from
     node A, a fresh node B joining (Mount returns with everything), B restarted with nothing changed,
     1,000 random edits converging; peak RSS of every daemon, etcd database size, keys and bytes per file
  2. twelve nodes, one writer of a 512 MiB file, eleven readers: bytes uploaded by the origin versus the
     others; then every node writing at once
  3. 200 volumes on one node, idle: CPU over 30 s, inotify watches, etcd watches, TCP connections to etcd
  4. etcd footprint under a steady edit load: compaction/defragmentation by the housekeeping leader keeps
     the database under a small quota; then, with compaction off, the NOSPACE alarm in health and metrics
  5. inotify limit: a node whose user namespace allows 64 watches holds a volume of 200 directories: what
     it reports, and that the volume still converges through periodic rescans

Usage: python benchmarks/scale.py [--quick] [--files N] [--only 1,3] [--nodes 12] [--big-mib 512]
Prints one table and writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent))
from systems import proc_stats

from syncmesh_plugin.devcluster import BIN, Etcd, Node, UnixHTTP, wait_for

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2**20
ENTRY_TIMEOUT = 3600  # default bound of each step of scenario 1 (--step-timeout)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ etcd
def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def prefix_end(p: bytes) -> bytes:
    return p[:-1] + bytes([p[-1] + 1])


class ScaleEtcd(Etcd):
    """devcluster's etcd with a chosen backend quota; JSON-gateway helpers for counts, status and metrics."""

    def __init__(self, tmp: Path, quota: int = 8 * 2**30) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        super().__init__(tmp)
        self.quota = quota

    def extra_args(self) -> list[str]:
        return ["--quota-backend-bytes", str(self.quota)]

    def api(self, path: str, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=timeout)
        try:
            conn.request("POST", path, json.dumps(body))
            return json.loads(conn.getresponse().read() or b"{}")
        finally:
            conn.close()

    def count(self, prefix: bytes) -> int:
        r = self.api("/v3/kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix)), "count_only": True})
        return int(r.get("count", 0))

    def revision(self) -> int:
        return int(self.api("/v3/kv/range", {"key": "AA=="})["header"]["revision"])

    def status(self) -> dict[str, int]:
        r = self.api("/v3/maintenance/status", {})
        return {"db_size": int(r.get("dbSize", 0)), "db_size_in_use": int(r.get("dbSizeInUse", 0)),
                "revision": int(r["header"]["revision"])}

    def alarms(self) -> list[str]:
        r = self.api("/v3/maintenance/alarm", {"action": "GET"})
        return [a.get("alarm", "?") for a in r.get("alarms", []) or []]

    def db_file(self) -> int:
        p = self.dir / "data" / "member" / "snap" / "db"
        return p.stat().st_size if p.exists() else 0

    def values(self, start: bytes, end: bytes, limit: int) -> list[tuple[bytes, bytes]]:
        r = self.api("/v3/kv/range", {"key": b64(start), "range_end": b64(end), "limit": limit})
        return [(base64.b64decode(kv["key"]), base64.b64decode(kv.get("value", ""))) for kv in r.get("kvs", [])]

    def metrics(self) -> dict[str, float]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        return parse_metrics(text)


# ------------------------------------------------------------------------------------------------ nodes
def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
    return out


def node_metrics(nd: Node) -> dict[str, float]:
    _, body = nd.http("GET", "/metrics")
    return parse_metrics(body.decode() if isinstance(body, bytes) else str(body))


def metric(m: dict[str, float], name: str) -> float:
    """Sum of a metric over its label sets."""
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def docker_long(nd: Node, method: str, body: Any, timeout: float) -> dict[str, Any]:
    """A VolumeDriver call with a long socket timeout (a Mount that waits for a million files)."""
    conn = UnixHTTP(nd.socket, timeout=timeout)
    payload = json.dumps(body).encode() + b"\n"
    conn.putrequest("POST", f"/{method}", skip_accept_encoding=True)
    conn.putheader("Accept", "application/vnd.docker.plugins.v1.2+json")
    conn.putheader("Content-Length", str(len(payload)))
    conn.endheaders(payload)
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    assert resp.status == 200 and not data.get("Err"), f"{nd.name} {method}: {resp.status} {data}"
    return data


def etcd_ops(nd: Node) -> dict[str, float]:
    """etcd requests made by a daemon so far, by operation."""
    pre = "syncmesh_etcd_request_duration_seconds_count{"
    return {k[len(pre):-1]: v for k, v in node_metrics(nd).items() if k.startswith(pre)}


def vol_status(nd: Node, volume: str) -> dict[str, Any]:
    code, body = nd.http("GET", f"/api/v1/volumes/{volume}")
    return body.get("sync", {}) if code == 200 and isinstance(body, dict) else {}


class LimitedNode(Node):
    """A daemon in its own user namespace whose inotify watch limit is `max_watches`
    (/proc/sys/user/max_inotify_watches is per user namespace): nothing else on the machine is affected."""

    def __init__(self, *a: Any, max_watches: int, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.max_watches = max_watches

    def start(self, wait: bool = True) -> Node:
        logf = open(self.log_path, "ab")
        script = f"echo {self.max_watches} > /proc/sys/user/max_inotify_watches && exec {BIN} serve"
        self.proc = subprocess.Popen(["unshare", "--user", "--map-root-user", "sh", "-c", script], env=self.env,
                                     stdout=logf, stderr=logf, start_new_session=True)
        if wait:
            self.wait_healthy()
        return self


LEVELS = ("WARNING", "ERROR", "CRITICAL", "Traceback")


def log_tail(nd: Node, n: int = 15, levels: tuple[str, ...] = LEVELS) -> list[str]:
    lines = [ln for ln in nd.log().splitlines() if any(x in ln for x in levels)]
    return lines[-n:]


# ------------------------------------------------------------------------------------------------ /proc
def status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Peak:
    """Samples the RSS of named processes every 0.25 s; `take()` returns the peaks since the last take."""

    def __init__(self, procs: Callable[[], dict[str, int | None]]) -> None:
        self.procs = procs
        self.peaks: dict[str, int] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.procs().items():
                if pid:
                    kb = status_kb(pid, "VmRSS")
                    with self.lock:
                        self.peaks[name] = max(self.peaks.get(name, 0), kb)
            self._stop.wait(0.25)

    def take(self) -> dict[str, float]:
        with self.lock:
            out = {k: round(v / 1024, 1) for k, v in self.peaks.items()}
            self.peaks = {}
        return out

    def stop(self) -> None:
        self._stop.set()
        self.t.join()


def inotify_fdinfo(pid: int) -> tuple[int, int]:
    """(inotify instances, watches) held by a process, from /proc/PID/fdinfo."""
    inst = watches = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return 0, 0
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                n = sum(1 for line in fh if line.startswith("inotify wd:"))
        except OSError:
            continue
        if n or os.path.realpath(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
            inst += 1
            watches += n
    return inst, watches


def tcp_connections(pid: int, port: int | None = None) -> int:
    out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True, text=True).stdout
    n = 0
    for line in out.splitlines():
        if f"pid={pid}," not in line:
            continue
        parts = line.split()
        if port is None or (len(parts) >= 4 and parts[3].endswith(f":{port}")):
            n += 1
    return n


# ------------------------------------------------------------------------------------------------ the tree
class Tree:
    """A deterministic tree of `n` files: two directories `wide` entries wide, the rest `per_dir` per
    directory, 30 directories per top-level directory. Sizes: 85% 32 B..4 KiB (inline in their manifest),
    14% 4..16 KiB, 1% 16..128 KiB (chunked). Content is a function of (index, generation)."""

    def __init__(self, n: int, wide: int, per_dir: int = 1000) -> None:
        self.n = n
        self.wide = min(wide, n // 4) if n >= 8 else 0
        self.per_dir = per_dir
        self.rest = n - 2 * self.wide
        self.ndirs = math.ceil(self.rest / per_dir)
        self.ntops = math.ceil(self.ndirs / 30)
        self.dirs_total = (3 if self.wide else 0) + self.ntops + self.ndirs
        rnd = random.Random(42)
        self.buf = rnd.randbytes(256 * 1024)

    def rel(self, i: int) -> str:
        if i < 2 * self.wide:
            return f"wide/w{i // self.wide}/f{i % self.wide:05d}"
        j = i - 2 * self.wide
        d = j // self.per_dir
        return f"t{d // 30:02d}/d{d % 30:02d}/f{j % self.per_dir:04d}"

    def tops(self) -> list[str]:
        return (["wide"] if self.wide else []) + [f"t{t:02d}" for t in range(self.ntops)]

    def dir_groups(self) -> Iterator[tuple[str, range]]:
        if self.wide:
            yield "wide/w0", range(0, self.wide)
            yield "wide/w1", range(self.wide, 2 * self.wide)
        for d in range(self.ndirs):
            lo = 2 * self.wide + d * self.per_dir
            yield f"t{d // 30:02d}/d{d % 30:02d}", range(lo, min(lo + self.per_dir, self.n))

    @staticmethod
    def size(i: int, gen: int = 0) -> int:
        h = ((i + 1) * 2654435761 + gen * 40503) & 0xFFFFFFFF
        u = ((h * 2246822519) & 0xFFFFFFFF) / 2**32
        c = h % 100
        if c < 85:
            return int(32 * 128**u)
        if c < 99:
            return 4097 + int(u * 12 * 1024)
        return 16 * 1024 + int(u * 112 * 1024)

    def content(self, i: int, gen: int = 0) -> bytes:
        size = self.size(i, gen)
        head = f"{i}:{gen}\n".encode()
        off = (i * 7919 + gen * 104729) % (len(self.buf) - 128 * 1024)
        body = self.buf[off:off + max(0, size - len(head))]
        if len(body) < size - len(head):
            body = body * (1 + (size - len(head)) // max(1, len(body)))
        return (head + body)[:size] if size >= len(head) else head[:size]

    def generate(self, root: Path, threads: int = 4) -> int:
        """Write the tree under root; returns total bytes."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC

        def one(group: tuple[str, range]) -> int:
            d, idx = group
            os.makedirs(root / d, exist_ok=True)
            total = 0
            base = str(root) + "/"
            for i in idx:
                data = self.content(i)
                fd = os.open(base + self.rel(i), flags, 0o644)
                os.write(fd, data)
                os.close(fd)
                total += len(data)
            return total

        with ThreadPoolExecutor(threads) as ex:
            return sum(ex.map(one, list(self.dir_groups())))


def digest(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def file_digest(p: Path) -> str | None:
    try:
        h = xxhash.xxh3_128()
        with open(p, "rb") as fh:
            while chunk := fh.read(4 * MiB):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


def walk_counts(root: Path) -> tuple[int, int, int]:
    """(files, dirs, bytes) below root, temp files excluded."""
    files = dirs = total = 0
    stack = [str(root)]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.name.startswith(".syncmesh-tmp-"):
                    continue
                if e.is_dir(follow_symlinks=False):
                    dirs += 1
                    stack.append(e.path)
                else:
                    files += 1
                    total += e.stat(follow_symlinks=False).st_size
    return files, dirs, total


# ------------------------------------------------------------------------------------------------ harness
class Scenario:
    def __init__(self, cfg: argparse.Namespace, key: str, title: str) -> None:
        self.cfg = cfg
        self.key = key
        self.title = title
        self.base = Path(tempfile.mkdtemp(prefix=f"scale{key}-", dir=cfg.bench_dir))
        self.nodes: list[Node] = []
        self.etcds: list[ScaleEtcd] = []
        self.rows: list[dict[str, Any]] = []
        self.data: dict[str, Any] = {}
        self.findings: list[str] = []
        self.prefix = f"/scale{key}-{uuid.uuid4().hex[:6]}"

    def etcd(self, quota: int = 8 * 2**30) -> ScaleEtcd:
        e = ScaleEtcd(self.base / f"etcd{len(self.etcds)}", quota)
        e.start()
        self.etcds.append(e)
        return e

    def node(self, name: str, etcd: ScaleEtcd, cls: type[Node] = Node, start: bool = True, **kw: Any) -> Node:
        env = {"SYNCMESH_LOG_LEVEL": "info", "SYNCMESH_SYNC_INTERVAL": "300s", **kw.pop("env", {})}
        nd = cls(self.base, name, etcd, self.prefix, **kw, **env)
        self.nodes.append(nd)
        if start:
            nd.start()
        return nd

    def row(self, step: str, value: str, **extra: Any) -> None:
        self.rows.append({"step": step, "value": value, **extra})
        log(f"  {self.key}. {step}: {value}")

    def close(self) -> None:
        for nd in self.nodes:
            with contextlib.suppress(Exception):
                nd.stop(timeout=20)
        for e in self.etcds:
            with contextlib.suppress(Exception):
                e.stop()
        if not self.cfg.keep:
            shutil.rmtree(self.base, ignore_errors=True)

    def fail_context(self) -> dict[str, list[str]]:
        return {nd.name: [ln for ln in nd.log().splitlines() if " INFO " not in ln][-25:] for nd in self.nodes}


# ------------------------------------------------------------------------------------------------ 1
def s_million(sc: Scenario) -> None:
    cfg = sc.cfg
    tree = Tree(cfg.files, cfg.wide)
    expected_keys = tree.n + tree.dirs_total
    log(f"1. tree: {tree.n} files, {tree.dirs_total} directories (2 x {tree.wide} wide, {tree.ndirs} x "
        f"{tree.per_dir}); etcd keys expected under files/: {expected_keys}")
    etcd = sc.etcd(quota=8 * 2**30)
    a = sc.node("a", etcd)
    b = sc.node("b", etcd, start=False)
    peak = Peak(lambda: {"a": a.proc.pid if a.proc else None, "b": b.proc.pid if b.proc and b.proc.poll() is None
                         else None, "etcd": etcd.proc.pid if etcd.proc else None})
    try:
        _million(sc, tree, expected_keys, etcd, a, b, peak)
    finally:
        peak.stop()


def _million(sc: Scenario, tree: Tree, expected_keys: int, etcd: ScaleEtcd, a: Node, b: Node, peak: Peak) -> None:
    vol = "big"
    files_prefix = f"{sc.prefix}/files/{vol}/".encode()
    limit = sc.cfg.step_timeout
    a.ok("VolumeDriver.Create", {"Name": vol})
    a.mount(vol, "scale")
    gen = sc.base / "gen"
    t0 = time.monotonic()
    total_bytes = tree.generate(gen)
    gen_s = time.monotonic() - t0
    sc.row("generate tree (outside the volume)", f"{tree.n:,} files, {total_bytes / MiB:.0f} MiB in {gen_s:.0f} s",
           seconds=round(gen_s, 1), bytes=total_bytes)
    sc.data["tree"] = {"files": tree.n, "dirs": tree.dirs_total, "bytes": total_bytes, "wide": tree.wide,
                       "per_dir": tree.per_dir}
    peak.take()
    cpu0 = proc_stats(a.proc.pid)[1]
    # -- initial publish: the tree renamed into A's volume, one top-level directory at a time
    t0 = time.monotonic()
    for top in tree.tops():
        os.rename(gen / top, a.vol(vol) / top)
    counts: list[tuple[float, int]] = []

    def published() -> bool:
        c = etcd.count(files_prefix)
        counts.append((time.monotonic() - t0, c))
        if len(counts) % 10 == 0:
            log(f"     publish: {c:,}/{expected_keys:,} keys after {time.monotonic() - t0:.0f} s")
        return c >= expected_keys

    wait_for(published, limit, interval=2.0, what="every manifest in etcd")
    t_etcd = time.monotonic() - t0
    wait_for(lambda: vol_status(a, vol).get("pending", 1) == 0, 600, interval=0.5, what="A pending 0")
    t_idle = time.monotonic() - t0
    pk = peak.take()
    st = etcd.status()
    sc.data["publish"] = {"seconds_all_keys": round(t_etcd, 1), "seconds_pending0": round(t_idle, 1),
                          "files_per_s": round(tree.n / t_etcd), "peak_rss_mb": pk, "a_cpu_s":
                          round(proc_stats(a.proc.pid)[1] - cpu0, 1), "etcd": st, "etcd_db_file": etcd.db_file(),
                          "keys_files_prefix": etcd.count(files_prefix),
                          "progress": counts[:: max(1, len(counts) // 40)]}
    sc.row("initial publish from A (all manifests in etcd)",
           f"{t_etcd:.0f} s ({tree.n / t_etcd:,.0f} files/s), peak RSS A {pk.get('a', 0):.0f} MB, etcd "
           f"{pk.get('etcd', 0):.0f} MB, etcd db {st['db_size'] / MiB:.0f} MiB",
           seconds=round(t_etcd, 1), peak_rss_mb=pk)
    # -- a fresh node joins: each Mount answers within dockerd's deadline, refused while the first copy
    # goes on ("still syncing"); retried as Swarm retries a task, until it returns with everything
    b.start()
    cpu_a0 = proc_stats(a.proc.pid)[1]
    t0 = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        code, answer = b.docker("VolumeDriver.Mount", {"Name": vol, "ID": "scale"})
        if code == 200 and not answer.get("Err"):
            break
        assert "still syncing" in str(answer.get("Err")) and time.monotonic() - t0 < limit, \
            f"B's Mount: {code} {answer}"
    t_mount = time.monotonic() - t0
    pk = peak.take()
    files, dirs, nbytes = walk_counts(b.vol(vol))
    sample = random.Random(7).sample(range(tree.n), min(2000, tree.n))
    bad = [i for i in sample if file_digest(b.vol(vol) / tree.rel(i)) != digest(tree.content(i))]
    mets = node_metrics(b)
    ok = files == tree.n and dirs == tree.dirs_total and nbytes == total_bytes and not bad
    sc.data["join"] = {"mount_seconds": round(t_mount, 1), "mount_attempts": attempts, "files": files, "dirs": dirs,
                       "bytes": nbytes,
                       "sample_digests": len(sample), "sample_mismatches": len(bad), "complete": ok,
                       "peak_rss_mb": pk, "a_cpu_s_serving": round(proc_stats(a.proc.pid)[1] - cpu_a0, 1),
                       "b_cpu_s": round(proc_stats(b.proc.pid)[1], 1),
                       "b_bytes_received": metric(mets, "syncmesh_bytes_received_total"),
                       "b_bytes_inline": metric(mets, "syncmesh_bytes_inline_total")}
    if not ok:
        sc.findings.append(f"join: B's Mount returned after {t_mount:.0f} s with {files}/{tree.n} files, "
                           f"{dirs}/{tree.dirs_total} dirs, {nbytes}/{total_bytes} bytes, {len(bad)} of "
                           f"{len(sample)} sampled digests wrong")
    sc.row("fresh node B joins (Mount returns)",
           f"{t_mount:.0f} s ({tree.n / t_mount:,.0f} files/s), complete={ok} ({files:,} files, {len(sample)} digests "
           f"checked), peak RSS B {pk.get('b', 0):.0f} MB, A {pk.get('a', 0):.0f} MB",
           seconds=round(t_mount, 1), peak_rss_mb=pk)
    # -- B restarts with nothing changed
    b.stop(timeout=60)
    peak.take()
    t0 = time.monotonic()
    b.start(wait=False)

    def ready() -> bool:
        s = vol_status(b, vol)
        return bool(s.get("ready")) and s.get("pending", 1) == 0

    wait_for(ready, limit, interval=0.2, what="B ready after restart")
    t_restart = time.monotonic() - t0
    pk = peak.take()
    # idle afterwards (periodic rescans at 300 s here; the housekeeping leader's rounds are included)
    c0 = {n.name: proc_stats(n.proc.pid)[1] for n in (a, b)}
    ops0 = {n.name: etcd_ops(n) for n in (a, b)}
    time.sleep(sc.cfg.idle_seconds)
    idle = {n.name: round((proc_stats(n.proc.pid)[1] - c0[n.name]) / sc.cfg.idle_seconds * 100, 1) for n in (a, b)}
    ops = {n.name: {k: v - ops0[n.name].get(k, 0) for k, v in etcd_ops(n).items() if v - ops0[n.name].get(k, 0)}
           for n in (a, b)}
    code, cs = a.http("GET", "/api/v1/cluster/status")
    sc.data["restart"] = {"seconds": round(t_restart, 1), "peak_rss_mb": pk, "idle_cpu_percent": idle,
                          "idle_etcd_requests": ops, "housekeeping_leader": cs.get("leader") if code == 200 else None,
                          "rescan_metric": metric(node_metrics(b), "syncmesh_rescan_duration_seconds_sum")}
    sc.row("B restarts, nothing changed (ready, pending 0)",
           f"{t_restart:.1f} s, peak RSS B {pk.get('b', 0):.0f} MB; idle CPU afterwards A (housekeeping leader) "
           f"{idle['a']}%, B {idle['b']}%",
           seconds=round(t_restart, 1), peak_rss_mb=pk)
    # -- 1,000 random edits on A
    rev0 = etcd.revision()
    n_edits = min(sc.cfg.edits, tree.n)
    picks = random.Random(11).sample(range(tree.n), n_edits)
    want = {}
    t0 = time.monotonic()
    for i in picks:
        data = tree.content(i, gen=1)
        (a.vol(vol) / tree.rel(i)).write_bytes(data)
        want[i] = digest(data)
    write_s = time.monotonic() - t0
    left = set(picks)

    def edits_done() -> bool:
        for i in list(left):
            if file_digest(b.vol(vol) / tree.rel(i)) == want[i]:
                left.discard(i)
        return not left

    wait_for(edits_done, 600, interval=0.1, what="edits on B")
    t_edits = time.monotonic() - t0
    wait_for(lambda: vol_status(a, vol).get("pending", 1) == 0, 120, interval=0.2, what="A settled")
    rev1 = etcd.revision()
    pk = peak.take()
    sc.data["edits"] = {"count": n_edits, "write_seconds": round(write_s, 2), "seconds": round(t_edits, 2),
                        "revisions": rev1 - rev0, "revisions_per_edit": round((rev1 - rev0) / n_edits, 3),
                        "peak_rss_mb": pk}
    sc.row(f"{n_edits:,} random edits on A converge on B", f"{t_edits:.1f} s, etcd revision +{rev1 - rev0} "
           f"({(rev1 - rev0) / n_edits:.3f} per edit: CAS transactions of up to 127 paths)",
           seconds=round(t_edits, 2))
    # -- etcd footprint
    st = etcd.status()
    all_keys = etcd.count(sc.prefix.encode() + b"/")
    file_keys = etcd.count(files_prefix)
    sizes_inline, sizes_chunked, sizes_dir, key_bytes = [], [], [], []
    rnd = random.Random(3)
    for _ in range(20):
        i = rnd.randrange(tree.n)
        start = files_prefix + tree.rel(i).rsplit("/", 1)[0].encode() + b"/"
        for k, v in etcd.values(start, prefix_end(files_prefix), 500):
            key_bytes.append(len(k))
            if b'"k":"dir"' in v:
                sizes_dir.append(len(v))
            elif b'"i":' in v:
                sizes_inline.append(len(v))
            else:
                sizes_chunked.append(len(v))

    for top in tree.tops()[:5]:
        for _, v in etcd.values(files_prefix + top.encode(), files_prefix + top.encode() + b"\x00", 1):
            sizes_dir.append(len(v))

    def avg(xs: list[int]) -> int:
        return round(sum(xs) / len(xs)) if xs else 0

    mix = (avg(sizes_inline) * len(sizes_inline) + avg(sizes_chunked) * len(sizes_chunked)) / max(
        1, len(sizes_inline) + len(sizes_chunked))
    fp = {"keys_under_prefix": all_keys, "keys_under_files": file_keys, "files": tree.n, "dirs": tree.dirs_total,
          "keys_per_file": round(all_keys / tree.n, 4), "db_size": st["db_size"],
          "db_size_in_use": st["db_size_in_use"],
          "db_file": etcd.db_file(), "db_bytes_per_file": round(st["db_size"] / tree.n),
          "manifest_bytes_inline_avg": avg(sizes_inline), "manifest_bytes_chunked_avg": avg(sizes_chunked),
          "manifest_bytes_dir_avg": avg(sizes_dir), "manifest_bytes_file_avg": round(mix),
          "key_bytes_avg": avg(key_bytes), "sampled_manifests": len(key_bytes),
          "revisions_per_edit": sc.data["edits"]["revisions_per_edit"], "revision": st["revision"]}
    sc.data["etcd"] = fp
    in_use = st["db_size_in_use"] / MiB
    sc.row("etcd footprint", f"{all_keys:,} keys for {tree.n:,} files ({all_keys / tree.n:.3f} keys/file), db "
           f"{st['db_size'] / MiB:.0f} MiB ({st['db_size'] / tree.n:.0f} B/file, in use {in_use:.0f} MiB), "
           f"manifest avg {mix:.0f} B "
           f"(inline {avg(sizes_inline)}, chunked {avg(sizes_chunked)}, dir "
           f"{avg(sizes_dir)}), key {avg(key_bytes)} B")
    hwm = {n.name: round(status_kb(n.proc.pid, "VmHWM") / 1024, 1) for n in (a, b)}
    sc.data["vmhwm_mb_end"] = hwm


# ------------------------------------------------------------------------------------------------ 2
def s_twelve(sc: Scenario) -> None:
    cfg = sc.cfg
    etcd = sc.etcd()
    nodes = [sc.node(f"n{i:02d}", etcd, start=False) for i in range(cfg.nodes)]
    for nd in nodes:
        nd.start(wait=False)
    for nd in nodes:
        nd.wait_healthy(60)
    peak = Peak(lambda: {nd.name: nd.proc.pid if nd.proc else None for nd in nodes})
    try:
        vol = "fan"
        nodes[0].ok("VolumeDriver.Create", {"Name": vol, "Opts": None})
        for nd in nodes:
            docker_long(nd, "VolumeDriver.Mount", {"Name": vol, "ID": "scale"}, 300)
        time.sleep(3)  # holders registered and seen by every node's 2 s cache
        size = cfg.big_mib * MiB
        prep = sc.base / ".big.prep"
        h = xxhash.xxh3_128()
        with open(prep, "wb") as fh:
            for _ in range(size // (8 * MiB)):
                block = os.urandom(8 * MiB)
                h.update(block)
                fh.write(block)
        want = h.hexdigest()
        sent0 = {nd.name: metric(node_metrics(nd), "syncmesh_bytes_sent_total") for nd in nodes}
        recv0 = {nd.name: metric(node_metrics(nd), "syncmesh_bytes_received_total") for nd in nodes}
        peak.take()
        t0 = time.monotonic()
        os.rename(prep, nodes[0].vol(vol) / "big.bin")
        arrived: dict[str, float] = {}

        def all_have() -> bool:
            for nd in nodes[1:]:
                if nd.name in arrived:
                    continue
                try:
                    if (nd.vol(vol) / "big.bin").stat().st_size == size:
                        arrived[nd.name] = time.monotonic() - t0
                except FileNotFoundError:
                    pass
            return len(arrived) == len(nodes) - 1

        wait_for(all_have, 1800, interval=0.1, what="the big file on every reader")
        secs = max(arrived.values())
        bad = [nd.name for nd in nodes[1:] if file_digest(nd.vol(vol) / "big.bin") != want]
        pk = peak.take()
        time.sleep(1.5)  # the ops loop refreshes counters; metrics are cumulative anyway
        sent = {nd.name: metric(node_metrics(nd), "syncmesh_bytes_sent_total") - sent0[nd.name] for nd in nodes}
        recv = {nd.name: metric(node_metrics(nd), "syncmesh_bytes_received_total") - recv0[nd.name] for nd in nodes}
        origin = sent[nodes[0].name]
        others = sum(v for k, v in sent.items() if k != nodes[0].name)
        sc.data["fanout"] = {"nodes": len(nodes), "file_mib": cfg.big_mib, "seconds_last_reader": round(secs, 1),
                             "arrival_seconds": {k: round(v, 1) for k, v in sorted(arrived.items())},
                             "digest_mismatches": bad, "bytes_sent": sent, "bytes_received": recv,
                             "origin_sent": origin, "others_sent": others,
                             "origin_sent_x_file": round(origin / size, 2), "peak_rss_mb": pk}
        if bad:
            sc.findings.append(f"fan-out: digest mismatch on {bad}")
        sc.row(f"{cfg.big_mib} MiB file from n00 to {len(nodes) - 1} readers",
               f"{secs:.0f} s to the last reader; origin uploaded {origin / MiB:.0f} MiB ({origin / size:.1f} x the "
               f"file), all others {others / MiB:.0f} MiB; peak RSS max {max(pk.values()):.0f} MB",
               seconds=round(secs, 1))
        # -- every node writing at once
        per_node = cfg.all_write_files
        rnd = random.Random(5)
        plan = {nd.name: [(f"w/{nd.name}/f{k:03d}", rnd.randint(1024, 256 * 1024)) for k in range(per_node)]
                for nd in nodes}
        want_all: dict[str, tuple[int, str]] = {}
        blobs = {}
        for nd in nodes:
            for rel, sz in plan[nd.name]:
                blobs[rel] = os.urandom(sz)
                want_all[rel] = (sz, digest(blobs[rel]))
        peak.take()
        t0 = time.monotonic()

        def writer(nd: Node) -> None:
            d = nd.vol(vol) / "w" / nd.name
            d.mkdir(parents=True, exist_ok=True)
            for rel, _ in plan[nd.name]:
                (nd.vol(vol) / rel).write_bytes(blobs[rel])

        with ThreadPoolExecutor(len(nodes)) as ex:
            list(ex.map(writer, nodes))
        todo = {(nd.name, rel) for nd in nodes for rel in want_all}

        def everyone() -> bool:
            for name, rel in list(todo):
                nd = next(x for x in nodes if x.name == name)
                try:
                    if (nd.vol(vol) / rel).stat().st_size == want_all[rel][0]:
                        todo.discard((name, rel))
                except FileNotFoundError:
                    pass
            return not todo

        wait_for(everyone, 1200, interval=0.2, what="every node's writes everywhere")
        secs = time.monotonic() - t0
        bad2 = sum(1 for nd in nodes for rel, (_, d) in want_all.items() if file_digest(nd.vol(vol) / rel) != d)
        pk = peak.take()
        nfiles = len(want_all)
        total = sum(s for s, _ in want_all.values())
        sc.data["all_write"] = {"files": nfiles, "bytes": total, "seconds": round(secs, 1),
                                "digest_mismatches": bad2, "peak_rss_mb": pk}
        if bad2:
            sc.findings.append(f"all-write: {bad2} file copies with wrong digests")
        sc.row(f"all {len(nodes)} nodes write {per_node} files each at once",
               f"{nfiles} files ({total / MiB:.0f} MiB) on all {len(nodes)} nodes in {secs:.1f} s, "
               f"{bad2} digest mismatches", seconds=round(secs, 1))
    finally:
        peak.stop()


# ------------------------------------------------------------------------------------------------ 3
def s_volumes(sc: Scenario) -> None:
    cfg = sc.cfg
    etcd = sc.etcd()
    nd = sc.node("solo", etcd, env={"SYNCMESH_SYNC_INTERVAL": "30s"})
    names = [f"v{i:03d}" for i in range(cfg.volumes)]
    limit_path = "/proc/sys/fs/inotify/max_user_instances"
    original = Path(limit_path).read_text().strip()
    t0 = time.monotonic()
    try:
        i = 0
        while i < len(names):
            code, resp = nd.docker("VolumeDriver.Create", {"Name": names[i], "Opts": None})
            if code != 200 or resp.get("Err"):
                # One inotify instance per volume: the per-user instance limit (default 128, shared by every
                # process of the user) ends it. Reported, then raised for this run only, and restored.
                sc.data["instance_limit"] = {
                    "failed_at_volume": i, "error": resp.get("Err", str(code)),
                    "max_user_instances": int(original), "daemon_log": log_tail(nd, 12, ("ERROR", "Error"))}
                sc.findings.append(f"volume {i + 1} of {len(names)}: Create failed: {resp.get('Err')} "
                                   f"(fs.inotify.max_user_instances={original})")
                sc.row(f"{len(names)} volumes, fs.inotify.max_user_instances={original}",
                       f"Create of volume {i + 1} failed: {resp.get('Err')}")
                if os.geteuid() != 0 or "raised_to" in sc.data["instance_limit"] or int(original) >= 4096:
                    raise AssertionError(f"Create {names[i]}: {resp}")
                nd.stop()
                Path(limit_path).write_text("4096")
                sc.data["instance_limit"]["raised_to"] = 4096
                log("  3. raised fs.inotify.max_user_instances to 4096 for this scenario (restored afterwards)")
                nd.start()
                continue
            docker_long(nd, "VolumeDriver.Mount", {"Name": names[i], "ID": "scale"}, 120)
            i += 1
        t_create = time.monotonic() - t0
        _idle_volumes(sc, etcd, nd, names, t_create)
    finally:
        if Path(limit_path).read_text().strip() != original:
            nd.stop()
            Path(limit_path).write_text(original)


def _idle_volumes(sc: Scenario, etcd: ScaleEtcd, nd: Node, names: list[str], t_create: float) -> None:
    cfg = sc.cfg
    for n in names:
        root = nd.vol(n)
        for d in ("a", "b"):
            (root / d).mkdir(exist_ok=True)
            for k in range(2):
                (root / d / f"f{k}").write_bytes(os.urandom(512))
        (root / "top.txt").write_bytes(b"idle volume\n")
    expected = cfg.volumes * 7
    wait_for(lambda: etcd.count(f"{sc.prefix}/files/".encode()) >= expected, 300, interval=0.5,
             what="every volume's files in etcd")
    time.sleep(5)
    pid = nd.proc.pid
    cpu0 = proc_stats(pid)[1]
    etcd_cpu0 = proc_stats(etcd.proc.pid)[1]
    rev0 = etcd.revision()
    time.sleep(cfg.idle_seconds)
    cpu = (proc_stats(pid)[1] - cpu0) / cfg.idle_seconds * 100
    etcd_cpu = (proc_stats(etcd.proc.pid)[1] - etcd_cpu0) / cfg.idle_seconds * 100
    rev1 = etcd.revision()
    m = node_metrics(nd)
    inst, wds = inotify_fdinfo(pid)
    em = etcd.metrics()
    conns_etcd = tcp_connections(pid, etcd.client_port)
    conns_all = tcp_connections(pid)
    threads = status_kb(pid, "Threads")
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = status_kb(pid, "VmRSS") / 1024
    d = {"volumes": cfg.volumes, "create_mount_seconds": round(t_create, 1), "idle_seconds": cfg.idle_seconds,
         "idle_cpu_percent": round(cpu, 2), "etcd_idle_cpu_percent": round(etcd_cpu, 2),
         "etcd_revisions_while_idle": rev1 - rev0, "rss_mb": round(rss, 1), "threads": threads, "fds": fds,
         "metric_inotify_watches": metric(m, "syncmesh_inotify_watches"),
         "metric_volumes_held": metric(m, "syncmesh_volumes_held"), "inotify_instances": inst,
         "inotify_watches_fdinfo": wds, "tcp_to_etcd": conns_etcd, "tcp_established_total": conns_all,
         "etcd_watch_streams": em.get("etcd_debugging_mvcc_watch_stream_total", -1),
         "etcd_watchers": em.get("etcd_debugging_mvcc_watcher_total", -1),
         "rescans_interval": m.get('syncmesh_rescans_total{reason="interval"}', 0)}
    sc.data["volumes"] = d
    sc.row(f"{cfg.volumes} volumes on one node, idle {cfg.idle_seconds} s",
           f"CPU {cpu:.1f}% (etcd {etcd_cpu:.1f}%), RSS {rss:.0f} MB, {threads} threads; inotify: {inst} instances, "
           f"{wds} watches (metric {d['metric_inotify_watches']:.0f}); etcd: {d['etcd_watchers']:.0f} watchers on "
           f"{d['etcd_watch_streams']:.0f} streams, {conns_etcd} TCP connection(s) to etcd; "
           f"{rev1 - rev0} etcd revisions while idle", seconds=round(t_create, 1))


# ------------------------------------------------------------------------------------------------ 4
def _steady(sc: Scenario, label: str, size: int, seconds: int) -> dict[str, Any]:
    """Rewrite `churn_paths` files of `size` bytes at `churn_rate`/s for `seconds` on one node whose housekeeping
    runs every 2 s and keeps `keep_revisions` revisions; sample etcd's database size every second."""
    cfg = sc.cfg
    quota = cfg.quota_mib * MiB
    etcd = sc.etcd(quota=quota)
    nd = sc.node(label, etcd, env={"SYNCMESH_HOUSEKEEPING_INTERVAL": "2s",
                                   "SYNCMESH_HOUSEKEEPING_COMPACT_KEEP_REVISIONS": str(cfg.keep_revisions)})
    vol = "churn"
    nd.ok("VolumeDriver.Create", {"Name": vol, "Opts": None})
    root = nd.mount(vol, "scale")
    paths = [f"d{k % 20:02d}/f{k:04d}" for k in range(cfg.churn_paths)]
    for d in {p.split("/")[0] for p in paths}:
        (root / d).mkdir(exist_ok=True)
    stop = threading.Event()
    writes = [0]

    def churn() -> None:
        rnd = random.Random(1)
        k = 0
        t_next = time.monotonic()
        while not stop.is_set():
            p = paths[k % len(paths)]
            with open(root / p, "wb") as fh:
                fh.write(rnd.randbytes(size))
            k += 1
            writes[0] = k
            t_next += 1 / cfg.churn_rate
            time.sleep(max(0.0, t_next - time.monotonic()))

    th = threading.Thread(target=churn, daemon=True)
    rev0 = etcd.revision()
    m0 = node_metrics(nd)
    t0 = time.monotonic()
    th.start()
    samples = []
    alarm_at = None
    while time.monotonic() - t0 < seconds:
        st = etcd.status()
        samples.append((round(time.monotonic() - t0, 1), st["db_size"], st["db_size_in_use"], st["revision"]))
        if alarm_at is None and etcd.alarms():
            alarm_at = round(time.monotonic() - t0, 1)
        time.sleep(1.0)
    stop.set()
    th.join()
    alarms = etcd.alarms()
    if not alarms:
        wait_for(lambda: vol_status(nd, vol).get("pending", 1) == 0, 120, interval=0.2, what="churn published")
    m1 = node_metrics(nd)
    rev1 = etcd.revision()
    published = metric(m1, "syncmesh_operations_published_total") - metric(m0, "syncmesh_operations_published_total")
    max_db = max(x[1] for x in samples)
    history = published * (size * 4 / 3 + 250)  # inline values are base64 in the manifest
    d = {"file_bytes": size, "quota_mib": cfg.quota_mib, "seconds": seconds, "writes": writes[0],
         "published": published, "published_per_s": round(published / seconds), "revisions": rev1 - rev0,
         "history_mib_written": round(history / MiB, 1), "db_max_mib": round(max_db / MiB, 1),
         "db_end_mib": round(samples[-1][1] / MiB, 1), "db_in_use_end_mib": round(samples[-1][2] / MiB, 1),
         "compactions": metric(m1, "syncmesh_etcd_compactions_total"),
         "defragmentations": metric(m1, "syncmesh_etcd_defragmentations_total"),
         "alarms": alarms, "alarm_after_s": alarm_at, "keep_revisions": cfg.keep_revisions,
         "etcd_errors": {k: v for k, v in m1.items() if k.startswith("syncmesh_etcd_errors_total")},
         "housekeeping_skipped_lines": [ln[:300] for ln in nd.log().splitlines() if "housekeeping" in ln][-3:],
         "samples": samples[:: max(1, len(samples) // 30)]}
    sc.row(f"steady edits of {size} B files for {seconds} s, quota {cfg.quota_mib} MiB",
           f"{published:.0f} manifests published ({published / seconds:.0f}/s, "
           f"~{d['history_mib_written']:.0f} MiB of values), db max {d['db_max_mib']} MiB, "
           f"end {d['db_end_mib']} MiB (in use "
           f"{d['db_in_use_end_mib']}); {d['compactions']:.0f} compactions, {d['defragmentations']:.0f} defrags, "
           f"alarms {alarms or 'none'}" + (f" after {alarm_at} s" if alarm_at is not None else ""))
    if alarms or max_db > quota:
        sc.findings.append(f"steady edits of {size} B files: etcd reached its quota after {alarm_at} s with "
                           f"{d['compactions']:.0f} compactions")
    nd.stop()
    etcd.stop()
    return d


def s_etcd(sc: Scenario) -> None:
    cfg = sc.cfg
    # (a) steady edits under a small quota; the housekeeping leader compacts (and defragments when worth it)
    sc.data["steady"] = _steady(sc, "hk", 2000, cfg.churn_seconds)
    # (a') the same with files just under the inline limit (manifests of ~5.5 KB)
    sc.data["steady_4k"] = _steady(sc, "hk4k", 4000, min(cfg.churn_seconds, 30))
    vol = "churn"
    # (b) the default compact_keep_revisions (100,000: never reached here), a tiny quota: the NOSPACE alarm
    #     must show in health and metrics
    etcd2 = sc.etcd(quota=cfg.alarm_quota_mib * MiB)
    nd2 = sc.node("alarm", etcd2, env={"SYNCMESH_HOUSEKEEPING_INTERVAL": "2s"})  # default keep_revisions
    nd2.ok("VolumeDriver.Create", {"Name": vol, "Opts": None})
    root2 = nd2.mount(vol, "scale")
    rnd = random.Random(2)
    t0 = time.monotonic()
    seen: dict[str, Any] = {}

    def alarmed() -> bool:
        for k in range(200):
            (root2 / f"f{k:03d}").write_bytes(rnd.randbytes(4000))
        if not seen.get("etcd_alarm_at") and etcd2.alarms():
            seen["etcd_alarm_at"] = round(time.monotonic() - t0, 1)
        code, body = nd2.http("GET", "/api/v1/health")
        m = node_metrics(nd2)
        if metric(m, "syncmesh_etcd_alarm") >= 1 and code == 503:
            seen.update({"health_status": code, "etcd_component": body.get("components", {}).get("etcd"),
                         "metric_syncmesh_etcd_alarm": metric(m, "syncmesh_etcd_alarm")})
            return True
        return False

    wait_for(alarmed, 600, interval=0.3, what="the quota alarm in health and metrics")
    seen["seconds"] = round(time.monotonic() - t0, 1)
    seen["log"] = [ln for ln in nd2.log().splitlines() if "alarm" in ln.lower()][:2]
    sc.data["alarm"] = seen
    sc.row(f"quota {cfg.alarm_quota_mib} MiB, default compact_keep_revisions",
           f"NOSPACE after {seen.get('etcd_alarm_at')} s; health {seen['health_status']} with etcd "
           f"{json.dumps(seen['etcd_component'])[:160]}; syncmesh_etcd_alarm {seen['metric_syncmesh_etcd_alarm']:.0f}")


# ------------------------------------------------------------------------------------------------ 5
def s_inotify(sc: Scenario) -> None:
    cfg = sc.cfg
    etcd = sc.etcd()
    lim = sc.node("lim", etcd, cls=LimitedNode, max_watches=cfg.max_watches,
                  env={"SYNCMESH_SYNC_INTERVAL": f"{cfg.limited_interval}s"})
    rd = sc.node("reader", etcd)
    vol = "deep"
    lim.ok("VolumeDriver.Create", {"Name": vol, "Opts": None})
    ndirs = cfg.limit_dirs
    root = lim.vol(vol)  # the tree exists before the node holds the volume: the limit is hit at start
    for k in range(ndirs):
        d = root / f"g{k // 20:02d}" / f"d{k:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "seed.txt").write_bytes(f"seed {k}\n".encode())
    t_mount = time.monotonic()
    lim.mount(vol, "scale")
    rd.mount(vol, "scale")
    t_mount = time.monotonic() - t_mount

    def degraded() -> dict[str, Any] | None:
        s = vol_status(lim, vol)
        return s if s.get("watcher_degraded") else None

    s = wait_for(degraded, 60, interval=0.2, what="the watcher to report the limit")
    time.sleep(cfg.limited_interval + 2)  # the rescan triggered by the limit itself is over
    code, health = lim.http("GET", "/api/v1/health")
    _, wds = inotify_fdinfo(lim.proc.pid)
    # writes in every directory, most of them unwatched: must still reach the reader (rescans)
    t0 = time.monotonic()
    want = {}
    for k in range(0, ndirs, max(1, ndirs // 50)):
        rel = f"g{k // 20:02d}/d{k:03d}/late.txt"
        data = os.urandom(300)
        (root / rel).write_bytes(data)
        want[rel] = digest(data)

    def arrived() -> bool:
        return all(file_digest(rd.vol(vol) / rel) == dg for rel, dg in want.items())

    wait_for(arrived, 300, interval=0.2, what="writes in unwatched directories on the reader")
    secs = time.monotonic() - t0
    m = node_metrics(lim)
    d = {"max_user_watches_in_namespace": cfg.max_watches, "directories": ndirs + ndirs // 20 + 1,
         "watcher_reason": s.get("watcher_reason"), "watches_held": s.get("watches"), "fdinfo_watches": wds,
         "health_status": code, "health_watchers": health.get("components", {}).get("watchers"),
         "rescans": {k: v for k, v in m.items() if k.startswith("syncmesh_rescans_total")},
         "writes": len(want), "converge_seconds": round(secs, 1),
         "mount_seconds": round(t_mount, 1), "sync_interval_s": cfg.limited_interval,
         "log": [ln for ln in lim.log().splitlines() if "watch limit" in ln][:2]}
    sc.data["inotify"] = d
    sc.row(f"inotify limit {cfg.max_watches} watches, {d['directories']} directories",
           f"health {code} (watchers ok, the volume listed as degraded), {d['watches_held']} watches held; the "
           f"volume says: \"{str(d['watcher_reason']).replace(str(root), '<volume>')}\"; "
           f"{len(want)} writes in mostly unwatched directories reached the other node in "
           f"{secs:.1f} s (rescans every {cfg.limited_interval} s)")


# ------------------------------------------------------------------------------------------------ main
SCENARIOS: list[tuple[str, str, Callable[[Scenario], None]]] = [
    ("1", "million-file volume", s_million),
    ("2", "twelve nodes", s_twelve),
    ("3", "many volumes", s_volumes),
    ("4", "etcd footprint", s_etcd),
    ("5", "inotify limit", s_inotify),
]


def table(all_rows: list[tuple[str, dict[str, Any]]]) -> str:
    rows = [("#", "step", "result")] + [(k, r["step"], r["value"]) for k, r in all_rows]
    w = [max(len(str(row[i])) for row in rows) for i in range(2)]
    lines = [f"| {a.ljust(w[0])} | {b.ljust(w[1])} | {c} |" for a, b, c in rows]
    lines.insert(1, f"|{'-' * (w[0] + 2)}|{'-' * (w[1] + 2)}|---|")
    return "\n".join(lines)


def save(report: dict[str, Any], path: str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: 20,000 files, 4 nodes, 32 MiB, 20 volumes")
    ap.add_argument("--only", default="", help="comma-separated scenario numbers, e.g. 1,3")
    ap.add_argument("--files", type=int, default=None, help="files in scenario 1 (default 1,000,000)")
    ap.add_argument("--wide", type=int, default=None, help="entries of the two wide directories (default 50,000)")
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=None, help="nodes in scenario 2 (default 12)")
    ap.add_argument("--big-mib", type=int, default=None, help="file size in scenario 2 (default 512)")
    ap.add_argument("--all-write-files", type=int, default=None)
    ap.add_argument("--volumes", type=int, default=None, help="volumes in scenario 3 (default 200)")
    ap.add_argument("--idle-seconds", type=int, default=30)
    ap.add_argument("--quota-mib", type=int, default=128)
    ap.add_argument("--keep-revisions", type=int, default=20,
                    help="housekeeping.compact_keep_revisions in the steady-edit run (a revision = up to 127 paths)")
    ap.add_argument("--churn-seconds", type=int, default=None)
    ap.add_argument("--churn-rate", type=float, default=1500.0, help="writes/s of the steady edit load")
    ap.add_argument("--churn-paths", type=int, default=2000)
    ap.add_argument("--alarm-quota-mib", type=int, default=24)
    ap.add_argument("--max-watches", type=int, default=64)
    ap.add_argument("--limit-dirs", type=int, default=200)
    ap.add_argument("--limited-interval", type=int, default=2)
    ap.add_argument("--step-timeout", type=int, default=ENTRY_TIMEOUT,
                    help="bound of each step of scenario 1 in seconds (also the volume's mount_timeout)")
    ap.add_argument("--bench-dir", default=os.environ.get("BENCH_DIR", "/var/tmp"))
    ap.add_argument("--keep", action="store_true", help="keep the data directories (debugging)")
    ap.add_argument("--out", default=str(RESULTS / "scale.json"))
    cfg = ap.parse_args()
    q = cfg.quick
    cfg.files = cfg.files or (20_000 if q else 1_000_000)
    cfg.wide = cfg.wide or (2_000 if q else 50_000)
    cfg.nodes = cfg.nodes or (4 if q else 12)
    cfg.big_mib = cfg.big_mib or (32 if q else 512)
    cfg.all_write_files = cfg.all_write_files or (20 if q else 50)
    cfg.volumes = cfg.volumes or (20 if q else 200)
    cfg.churn_seconds = cfg.churn_seconds or (15 if q else 60)
    if q:
        cfg.idle_seconds = min(cfg.idle_seconds, 10)
    only = set(filter(None, cfg.only.split(",")))
    started = time.monotonic()
    report: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": q, "args": vars(cfg),
                              "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release}, "scenarios": {}}
    all_rows: list[tuple[str, dict[str, Any]]] = []
    for key, title, fn in SCENARIOS:
        if only and key not in only:
            continue
        log(f"== {key}. {title}")
        sc = Scenario(cfg, key, title)
        t0 = time.monotonic()
        entry: dict[str, Any] = {"title": title}
        try:
            fn(sc)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            entry["traceback"] = traceback.format_exc()[-3000:]
            entry["daemon_logs"] = sc.fail_context()
            sc.row("FAILED", entry["error"][:300])
            log(entry["traceback"])
            for name, lines in entry["daemon_logs"].items():
                for ln in lines:
                    log(f"     {name}: {ln[:300]}")
        finally:
            sc.close()
        entry.update({"seconds": round(time.monotonic() - t0, 1), "rows": sc.rows, "data": sc.data,
                      "findings": sc.findings})
        report["scenarios"][key] = entry
        all_rows += [(key, r) for r in sc.rows]
        save(report, cfg.out)  # after every scenario, so a long run interrupted later keeps what it measured
    report["total_seconds"] = round(time.monotonic() - started, 1)
    print()
    print(table(all_rows))
    print(f"\ntotal {report['total_seconds']:.0f} s")
    print(f"written {save(report, cfg.out)}")
    if any("error" in e for e in report["scenarios"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
