"""Convergence benchmarks: each workload is written on node 0 and timed until every node holds the
same content (verified by comparing content digests of whole trees, never by trusting logs).

Usage: python benchmarks/bench.py [--systems syncmesh,syncthing] [--nodes 3] [--quick] [--only 6,7] [--plain]
syncmesh runs with its defaults (mutual TLS with the cluster's own CA); --plain adds a syncmesh-plain run
(security.tls_enabled false) to measure what TLS costs.
Prints one table and writes benchmarks/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import stat
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent))
from systems import Syncmesh, System, proc_stats

from syncmesh_plugin.localfs import syncfs

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- convergence checks
SKIP_NAMES = (".syncmesh-tmp-", ".syncthing.", "~syncthing~", ".stfolder", ".stversions")


def entry(path: str, st: os.stat_result) -> tuple[Any, ...]:
    """What the poll compares of one path: kind, size and mtime (a symlink's target)."""
    if stat.S_ISLNK(st.st_mode):
        return ("l", os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return ("d",)
    return ("f", st.st_size, st.st_mtime_ns // 1_000_000_000)


def signature(root: Path) -> dict[str, tuple[Any, ...]]:
    """Cheap per-path signature (kind, size, mtime) used to poll; digests confirm at the end. A scandir
    walk (a tree of 10,000 files in 0.05 s instead of os.walk's 0.1 s)."""
    out: dict[str, tuple[Any, ...]] = {}

    def walk(path: str, prefix: str) -> None:
        try:
            it = os.scandir(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        with it:
            for e in it:
                if e.name.startswith(SKIP_NAMES):
                    continue
                rel = prefix + e.name
                try:
                    out[rel] = entry(e.path, e.stat(follow_symlinks=False))
                except FileNotFoundError:
                    continue
                if out[rel][0] == "d":
                    walk(e.path, rel + "/")

    walk(str(root), "")
    return out


def look(root: Path, rel: str) -> tuple[Any, ...] | None:
    """The signature entry of one path, None where it is missing."""
    path = os.path.join(root, rel)
    try:
        return entry(path, os.lstat(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


def digests(root: Path) -> dict[str, str]:
    out = {}
    for rel, sig in signature(root).items():
        if sig[0] == "f":
            h = xxhash.xxh3_128()
            with open(root / rel, "rb") as fh:
                while chunk := fh.read(4 * 1024 * 1024):
                    h.update(chunk)
            out[rel] = h.hexdigest()
    return out


def wait_converged(sysm: System, t0: float, timeout: float, poll: float = 0.02) -> float:
    """Seconds from t0 until all nodes hold identical trees (digest-verified).

    The poll shares two cores with the systems it measures: walking three trees of 10,000 files every
    20 ms kept one core busy. So one walk of every tree finds the paths where a node differs from node
    0, and the next polls look again at those paths only; once none differs, whole trees are walked and
    their digests compared, and any difference left starts over with a walk."""
    deadline = time.monotonic() + timeout
    ref: dict[str, tuple[Any, ...]] = {}
    behind: list[set[str]] | None = None  # per receiver: the paths that differed at the last look
    while time.monotonic() < deadline:
        sigs: list[dict[str, tuple[Any, ...]]] = []  # whole trees, when this poll walked them
        if behind is None:
            sigs = [signature(d) for d in sysm.dirs]
            ref = sigs[0]
            behind = [{p for p in ref.keys() | sig.keys() if ref.get(p) != sig.get(p)} for sig in sigs[1:]]
        else:
            behind = [{p for p in paths if look(d, p) != ref.get(p)} for d, paths in zip(sysm.dirs[1:], behind,
                                                                                           strict=True)]
        if not any(behind):
            t = time.monotonic() - t0
            sigs = sigs or [signature(d) for d in sysm.dirs]  # not walked twice in one poll
            if all(s == sigs[0] for s in sigs[1:]):
                ds = [digests(d) for d in sysm.dirs]
                if all(x == ds[0] for x in ds[1:]):
                    return t
            behind = None
        time.sleep(poll)
    raise TimeoutError(f"{sysm.name}: no convergence within {timeout:.0f}s")


# ---------------------------------------------------------------- measurement
@dataclass
class Result:
    system: str
    workload: str
    seconds: float = 0.0
    rate: str = ""
    peer_bytes: int = 0
    peak_rss_mb: float = 0.0
    cpu_s_per_daemon: float = 0.0
    cpu_s_total: float = 0.0  # every daemon and etcd added up
    limit_s: float = 0.0  # the same bytes and file creations written on every receiver (see measure_limit)
    files: int = 0  # files moved (the small-file workloads: CPU per 1,000 files)
    extra: dict[str, Any] = field(default_factory=dict)
    error: str = ""


class Sampler:
    """Samples every daemon's RSS while a workload runs; CPU from the before/after difference."""

    def __init__(self, sysm: System) -> None:
        self.sysm = sysm
        self.peak = 0
        self._stop = threading.Event()
        self.cpu0 = [proc_stats(p)[1] for p in sysm.pids()]
        self.aux0 = sum(proc_stats(p)[1] for p in sysm.aux_pids())
        self.bytes0 = sysm.peer_bytes()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self.sysm.pids():
                self.peak = max(self.peak, proc_stats(p)[0])
            self._stop.wait(0.2)

    def finish(self, r: Result) -> Result:
        self._stop.set()
        self.t.join()
        cpu1 = [proc_stats(p)[1] for p in self.sysm.pids()]
        r.peak_rss_mb = round(self.peak / 2**20, 1)
        if cpu1 and len(cpu1) == len(self.cpu0):
            daemons = sum(b - a for a, b in zip(self.cpu0, cpu1, strict=True))
            r.cpu_s_per_daemon = round(daemons / len(cpu1), 2)
            r.cpu_s_total = round(daemons + sum(proc_stats(p)[1] for p in self.sysm.aux_pids()) - self.aux0, 2)
        r.peer_bytes = self.sysm.peer_bytes() - self.bytes0
        return r


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def big_file(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, 8 * 1024 * 1024)
            fh.write(os.urandom(n))
            left -= n


# ---------------------------------------------------------------- the machine's limit
def measure_limit(s: System, sizes: list[int]) -> float:
    """Seconds for every receiver (node 1..n-1, at once, one thread each, as their daemons would) to
    create files of these sizes on the same disk, next to its copy, and make them durable: each file
    of 1 MiB or more with its own fdatasync, the small ones with one syncfs for the lot (what a
    receiver does for a batch; an fdatasync per 4 KiB file would time the journal, not the disk).
    The data is random (an 8 MiB buffer written again and again); nothing is read or hashed."""
    buf = os.urandom(8 << 20)

    def one(root: Path) -> None:
        root.mkdir()
        small = False
        for i, size in enumerate(sizes):
            sub = root / f"d{i // 100}"
            if i % 100 == 0:
                sub.mkdir()
            fd = os.open(sub / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                left = size
                while left:
                    left -= os.write(fd, memoryview(buf)[:min(left, len(buf))])
                if size >= 1 << 20:
                    os.fdatasync(fd)
                else:
                    small = True
            finally:
                os.close(fd)
        if small:
            syncfs(str(root))

    return on_every_receiver(s, lambda root: root, one)


def on_every_receiver(s: System, prepare: Callable[[Path], Any], work: Callable[[Any], None]) -> float:
    """Seconds for `work` to run on every receiver at once (one thread each, as their daemons would), in
    a scratch directory beside its volume on the same disk, given what `prepare` made there first (not
    timed). The better of two tries: the machine is shared, its limit is what it can do."""
    best = float("inf")
    for _ in range(2):
        scratch = [d.parent / f".limit-{uuid.uuid4().hex[:6]}" for d in s.dirs[1:]]
        try:
            made = [prepare(root) for root in scratch]
            os.sync()  # what the workload (or the last try) left dirty is not charged to the limit
            t0 = time.monotonic()
            with ThreadPoolExecutor(len(scratch)) as ex:
                list(ex.map(work, made))
            best = min(best, time.monotonic() - t0)
        finally:
            for d in scratch:
                shutil.rmtree(d, ignore_errors=True)
    return best


def measure_unlink_limit(s: System, n: int) -> float:
    """Seconds for every receiver to delete `n` files of 4 KiB in 100 directories and make that durable
    with one syncfs: the machine's limit for a batch of deletions."""

    def prepare(root: Path) -> list[Path]:
        for i in range(100):
            (root / f"d{i}").mkdir(parents=True)
        files = [root / f"d{i % 100}" / f"f{i}" for i in range(n)]
        for p in files:
            p.write_bytes(b"x" * 4096)
        return files

    def unlink_all(files: list[Path]) -> None:
        for p in files:
            os.unlink(p)
        syncfs(str(files[0].parent.parent))

    return on_every_receiver(s, prepare, unlink_all)


def sizes_under(root: Path, *subs: str) -> list[int]:
    return [p.stat().st_size for sub in subs for p in sorted((root / sub).rglob("*"))
            if p.is_file() and not p.is_symlink()]


# What each workload that moves file data makes every receiver write: the files it created or changed
# (all of them again for the appends: a new version is a new file), the whole big file twice for the
# delta (overwrite, then insert: a crash-safe new version is a new file unless extents are shared).
LIMIT_OF: dict[str, Callable[[System], list[int]]] = {
    "1": lambda s: sizes_under(s.dirs[0], "w1"), "2": lambda s: sizes_under(s.dirs[0], "w1"),
    "3": lambda s: sizes_under(s.dirs[0], "w3"), "4": lambda s: sizes_under(s.dirs[0], "w4"),
    "7": lambda s: sizes_under(s.dirs[0], "w7"), "8": lambda s: sizes_under(s.dirs[0], "w8"),
    "8i": lambda s: sizes_under(s.dirs[0], "w8"), "9": lambda s: sizes_under(s.dirs[0], "w8") * 2,
}
SMALL_FILES = {"1", "2", "4", "7"}  # CPU seconds per 1,000 files in the table


# ---------------------------------------------------------------- workloads
def w_create_1000(s: System, cfg: argparse.Namespace) -> Result:
    n = 100 if cfg.quick else 1000
    d = s.dirs[0]
    t0 = time.monotonic()
    with ThreadPoolExecutor(10) as ex:
        list(ex.map(lambda i: write_file(d / f"w1/dir{i % 10}/file{i}.dat", os.urandom(100_000)), range(n)))
    secs = wait_converged(s, t0, 600)
    return Result(s.name, f"1. create {n} x 100 KB (10 writers)", secs, f"{n / secs:.0f} files/s")


def w_append(s: System, cfg: argparse.Namespace) -> Result:
    d = s.dirs[0]
    files = sorted((d / "w1").rglob("*.dat"))
    t0 = time.monotonic()

    def app(p: Path) -> None:
        with open(p, "ab") as fh:
            fh.write(b"appended line one\nappended line two\n")

    with ThreadPoolExecutor(10) as ex:
        list(ex.map(app, files))
    secs = wait_converged(s, t0, 600)
    return Result(s.name, f"2. append 2 lines to {len(files)} files", secs, f"{len(files) / secs:.0f} files/s")


def w_ten_10mb(s: System, cfg: argparse.Namespace) -> Result:
    d = s.dirs[0]
    t0 = time.monotonic()
    for i in range(10):
        write_file(d / f"w3/big{i}.bin", os.urandom(10 * 1024 * 1024))
    secs = wait_converged(s, t0, 600)
    return Result(s.name, "3. ten files of 10 MB", secs, f"{100 / secs:.0f} MB/s")


def w_burst(s: System, cfg: argparse.Namespace) -> Result:
    d = s.dirs[0]
    t0 = time.monotonic()
    for r in range(50):
        write_file(d / f"w4/round{r}.txt", f"round {r}\n".encode())
        (d / f"w4/dir{r}").mkdir(parents=True, exist_ok=True)
        write_file(d / f"w4/dir{r}/nested/file.txt", os.urandom(2000))
        write_file(d / f"w4/dir{r}/data.json", json.dumps({"round": r, "items": list(range(50))}).encode())
    secs = wait_converged(s, t0, 600)
    return Result(s.name, "4. burst 50 x (file+dir+nested+json)", secs, f"{200 / secs:.0f} ops/s")


def w_mixed(s: System, cfg: argparse.Namespace) -> Result:
    """Steady create/modify/mkdir; lag = time from the write until every other node has it."""
    duration = 10 if cfg.quick else cfg.mixed_seconds
    rate = 20.0
    d = s.dirs[0]
    pending: dict[str, tuple[float, tuple[Any, ...]]] = {}
    lags: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def watcher() -> None:
        while not stop.is_set() or pending:
            with lock:
                items = list(pending.items())
            for rel, (t, sig) in items:
                ok = True
                for other in s.dirs[1:]:
                    try:
                        st = os.lstat(other / rel)
                    except FileNotFoundError:
                        ok = False
                        break
                    if sig and (st.st_size != sig[0]):
                        ok = False
                        break
                if ok:
                    with lock:
                        if pending.get(rel, (None,))[0] == t:
                            lags.append(time.monotonic() - t)
                            del pending[rel]
            time.sleep(0.005)
            if stop.is_set() and time.monotonic() > stop_at + 60:
                break

    stop_at = time.monotonic() + duration
    th = threading.Thread(target=watcher, daemon=True)
    th.start()
    rnd = random.Random(5)
    made: list[str] = []
    i = 0
    t_next = time.monotonic()
    while time.monotonic() < stop_at:
        op = rnd.random()
        if op < 0.5 or not made:
            rel = f"w5/d{i % 20}/new{i}.txt"
            data = os.urandom(rnd.randint(100, 20000))
            write_file(d / rel, data)
            made.append(rel)
            sig: tuple[Any, ...] = (len(data),)
        elif op < 0.85:
            rel = rnd.choice(made)
            data = os.urandom(rnd.randint(100, 20000))
            write_file(d / rel, data)
            sig = (len(data),)
        else:
            rel = f"w5/dirs/m{i}"
            (d / rel).mkdir(parents=True, exist_ok=True)
            sig = ()
        with lock:
            pending[rel] = (time.monotonic(), sig)
        i += 1
        t_next += 1 / rate
        time.sleep(max(0.0, t_next - time.monotonic()))
    stop.set()
    th.join()
    secs = wait_converged(s, stop_at - duration, 120)
    lags.sort()
    extra = {"ops": i, "lag_median_ms": round(statistics.median(lags) * 1000, 1) if lags else None,
             "lag_p99_ms": round(lags[int(len(lags) * 0.99) - 1] * 1000, 1) if lags else None,
             "lag_max_ms": round(lags[-1] * 1000, 1) if lags else None, "unseen": len(pending)}
    return Result(s.name, f"5. mixed ops for {duration}s at {rate:.0f}/s", secs,
                  f"lag p50 {extra['lag_median_ms']} ms, p99 {extra['lag_p99_ms']} ms", extra=extra)


def _wait_until(cond: Callable[[], bool], t0: float, what: str) -> float:
    while not cond():
        if time.monotonic() - t0 > 60:
            raise TimeoutError(f"latency probe: {what}")
        time.sleep(0.0005)
    return time.monotonic() - t0


def _arrived(p: Path, size: int) -> bool:
    try:
        return p.stat().st_size == size
    except FileNotFoundError:
        return False


def w_latency(s: System, cfg: argparse.Namespace) -> Result:
    """One small file created on a node until a peer has it, then deleted until the peer has lost it:
    a delete must travel as fast as a create (no hold for ordinary deletes)."""
    n = 50 if cfg.quick else getattr(s, "latency_probes", 200)
    src, dst = s.dirs[0], s.dirs[1]
    lat, dlat = [], []
    for i in range(n):
        rel = f"w6/lat{i}.bin"
        t0 = time.monotonic()
        write_file(src / rel, os.urandom(1024))
        lat.append(_wait_until(lambda rel=rel: _arrived(dst / rel, 1024), t0, "file never arrived"))
        time.sleep(0.01)
        t0 = time.monotonic()
        (src / rel).unlink()
        dlat.append(_wait_until(lambda rel=rel: not os.path.lexists(dst / rel), t0, "deletion never arrived"))
        time.sleep(0.01)
    lat.sort()
    dlat.sort()

    def p99(xs: list[float]) -> float:
        return xs[max(0, int(len(xs) * 0.99) - 1)]

    med, dmed = statistics.median(lat), statistics.median(dlat)
    return Result(s.name, f"6. latency 1 KiB, {n} creates + {n} deletes", med * n,
                  f"create p50 {med * 1000:.1f} ms, p99 {p99(lat) * 1000:.1f}; "
                  f"delete p50 {dmed * 1000:.1f} ms, p99 {p99(dlat) * 1000:.1f}",
                  extra={"median_ms": round(med * 1000, 2), "p99_ms": round(p99(lat) * 1000, 2),
                         "max_ms": round(lat[-1] * 1000, 2), "delete_median_ms": round(dmed * 1000, 2),
                         "delete_p99_ms": round(p99(dlat) * 1000, 2), "delete_max_ms": round(dlat[-1] * 1000, 2)})


def w_10k_small(s: System, cfg: argparse.Namespace) -> Result:
    n = 2000 if cfg.quick else 10_000
    d = s.dirs[0]
    t0 = time.monotonic()
    for i in range(n):
        write_file(d / f"w7/d{i % 100}/f{i}.bin", os.urandom(4096))
    secs = wait_converged(s, t0, 900)
    return Result(s.name, f"7. {n} files of 4 KiB", secs, f"{n / secs:.0f} files/s")


def w_delete(s: System, cfg: argparse.Namespace) -> Result:
    """A tenth of workload 7's files deleted at once (an ordinary cleanup: below the delete guard's
    share, and older than its window, so nothing is held), until no node has them."""
    d = s.dirs[0]
    files = sorted((d / "w7").rglob("f*.bin"))[::10]
    t0 = time.monotonic()
    for p in files:
        os.unlink(p)
    secs = wait_converged(s, t0, 600)
    r = Result(s.name, f"7d. delete {len(files)} of those files", secs, f"{len(files) / secs:.0f} files/s")
    r.files = len(files)
    return r


def w_1gib(s: System, cfg: argparse.Namespace) -> Result:
    size = (256 if cfg.quick else 1024) * 1024 * 1024
    p = s.dirs[0] / "w8" / "huge.bin"
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = s.base / ".huge.prep"  # written outside the synced folder (same file system), then renamed in:
    big_file(tmp, size)  # the clock starts when the complete file appears
    t0 = time.monotonic()
    os.rename(tmp, p)
    secs = wait_converged(s, t0, 900, poll=0.05)
    return Result(s.name, f"8. one {size // 2**20} MiB incompressible file", secs, f"{size / 2**20 / secs:.0f} MiB/s")


def w_1gib_in_place(s: System, cfg: argparse.Namespace) -> Result:
    """The same file written in place inside the volume, as a container would: one open, writes of
    8 MiB (from a file prepared outside the volume, in the page cache), close. The clock starts at
    the open."""
    size = (256 if cfg.quick else 1024) * 1024 * 1024
    p = s.dirs[0] / "w8" / "huge.bin"
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = s.base / ".huge.prep"
    big_file(tmp, size)
    try:
        with open(tmp, "rb") as src:
            t0 = time.monotonic()
            with open(p, "wb") as dst:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
            wrote = time.monotonic() - t0
    finally:
        tmp.unlink()
    secs = wait_converged(s, t0, 900, poll=0.05)
    return Result(s.name, f"8i. one {size // 2**20} MiB file written in place", secs,
                  f"{size / 2**20 / secs:.0f} MiB/s; writer {wrote:.1f} s",
                  extra={"writer_seconds": round(wrote, 2), "after_close_seconds": round(secs - wrote, 2)})


def w_delta(s: System, cfg: argparse.Namespace) -> Result:
    p = s.dirs[0] / "w8" / "huge.bin"
    size = p.stat().st_size
    b0 = s.peer_bytes()
    t0 = time.monotonic()
    with open(p, "r+b") as fh:  # overwrite 1 MiB in the middle
        fh.seek(size // 2)
        fh.write(os.urandom(1024 * 1024))
    secs1 = wait_converged(s, t0, 900, poll=0.05)
    sent_overwrite = s.peer_bytes() - b0
    # insert 1 MiB in the middle: the file is rewritten with the new bytes spliced in
    b1 = s.peer_bytes()
    tmp = s.base / ".huge.insert"
    with open(p, "rb") as src, open(tmp, "wb") as dst:
        left = size // 3
        while left:
            chunk = src.read(min(left, 8 << 20))
            dst.write(chunk)
            left -= len(chunk)
        dst.write(os.urandom(1024 * 1024))
        while chunk := src.read(8 << 20):
            dst.write(chunk)
    t1 = time.monotonic()
    os.rename(tmp, p)
    secs2 = wait_converged(s, t1, 900, poll=0.05)
    sent_insert = s.peer_bytes() - b1
    per_peer = max(1, s.n - 1)
    extra = {"overwrite_bytes_per_peer": sent_overwrite // per_peer, "insert_bytes_per_peer": sent_insert // per_peer,
             "overwrite_s": round(secs1, 2), "insert_s": round(secs2, 2)}
    return Result(s.name, "9. delta: 1 MiB overwrite / insert in big file", secs1 + secs2,
                  f"{sent_overwrite / per_peer / 2**20:.1f} / {sent_insert / per_peer / 2**20:.1f} MiB per peer",
                  extra=extra)


def w_restart(s: System, cfg: argparse.Namespace) -> Result:
    n = cfg.restart_files or (10_000 if cfg.quick else 100_000)
    d = s.dirs[0]
    t0 = time.monotonic()
    setup_mode = getattr(s, "setup_mode", None)
    if setup_mode is not None:
        setup_mode(True)
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda i: write_file(d / f"w10/d{i % 1000}/f{i}", f"file {i}\n".encode()), range(n)))
    seed_s = wait_converged(s, t0, 1800, poll=0.5)
    if setup_mode is not None:
        setup_mode(False)
    ready_s = s.restart_node(1)
    # in sync: a change made now still arrives on the restarted node
    t1 = time.monotonic()
    write_file(d / "w10/after-restart.txt", b"x")
    wait_converged(s, t1, 120, poll=0.5)
    rss = getattr(s, "rss_after_restart", 0)
    return Result(s.name, f"10. restart holding {n} unchanged files", ready_s, f"ready in {ready_s:.1f} s",
                  extra={"seed_seconds": round(seed_s, 1), "seed_files_per_s": round(n / seed_s),
                         "seeded_without_fsync": setup_mode is not None,
                         "rss_after_restart_mb": round(rss / 2**20, 1) if rss else None})


# Before a workload, not measured: the files to delete are made older than the delete guard's window
# (10 s), as files being cleaned up are.
SETUP: dict[str, Callable[[], None]] = {"7d": lambda: time.sleep(10.5)}

WORKLOADS: list[tuple[str, Callable[[System, argparse.Namespace], Result], bool]] = [
    # (id, function, needs a fresh volume first)
    ("1", w_create_1000, True), ("2", w_append, False), ("3", w_ten_10mb, True), ("4", w_burst, True),
    ("5", w_mixed, True), ("6", w_latency, True), ("7", w_10k_small, True), ("7d", w_delete, False),
    ("8", w_1gib, True), ("9", w_delta, False), ("8i", w_1gib_in_place, True), ("10", w_restart, True),
]


def make_system(name: str, base: Path, nodes: int) -> System:
    if name == "syncmesh":
        return Syncmesh(base, nodes)
    if name == "syncmesh-plain":
        return Syncmesh(base, nodes, tls=False)
    if name == "syncmesh-trash":
        return Syncmesh(base, nodes, versioning="trash")
    if name == "syncthing":
        from syncthing_system import Syncthing

        return Syncthing(base, nodes)
    raise SystemExit(f"unknown system {name}")


def share(r: Result) -> str:
    """The limit's time over the system's: 100 % is as fast as this disk takes the same writes."""
    return f"{r.limit_s / r.seconds * 100:.0f} %" if r.limit_s and r.seconds and not r.error else ""


def cpu_per_1k(r: Result) -> str:
    return f"{r.cpu_s_total / r.files * 1000:.2f}" if r.files else ""


def table(results: list[Result]) -> str:
    rows = [("workload", "system", "converged s", "rate", "limit s", "of limit", "peer MiB", "peak RSS MiB",
             "CPU s/daemon", "CPU s/1k files")]
    for r in results:
        rows.append((r.workload, r.system, f"{r.seconds:.2f}" if not r.error else "FAILED", r.rate or r.error[:40],
                     f"{r.limit_s:.2f}" if r.limit_s else "", share(r), f"{r.peer_bytes / 2**20:.1f}",
                     f"{r.peak_rss_mb:.0f}", f"{r.cpu_s_per_daemon:.1f}", cpu_per_1k(r)))
    w = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(row)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (x + 2) for x in w) + "|")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--systems", default="syncmesh,syncthing")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run of every workload)")
    ap.add_argument("--only", default="", help="comma-separated workload ids, e.g. 6,7")
    ap.add_argument("--mixed-seconds", type=int, default=60)
    ap.add_argument("--restart-files", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "latest.json"))
    ap.add_argument("--plain", action="store_true", help="also run syncmesh with plain HTTP (the cost of TLS)")
    cfg = ap.parse_args()
    if cfg.plain and "syncmesh-plain" not in cfg.systems.split(","):
        cfg.systems += ",syncmesh-plain"
    only = set(filter(None, cfg.only.split(",")))
    results: list[Result] = []
    started = time.monotonic()
    for name in cfg.systems.split(","):
        base = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
        try:
            s = make_system(name, base, cfg.nodes)
            print(f"== {name}: starting {cfg.nodes} nodes in {base}", flush=True)
            s.start()
        except BaseException:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
            raise
        try:
            first = True
            for wid, fn, fresh in WORKLOADS:
                if only and wid not in only:
                    continue
                w0 = time.monotonic()
                if fresh and not first:
                    s.reset()
                first = False
                if wid in SETUP:
                    SETUP[wid]()
                load = os.getloadavg()[0]
                sampler = Sampler(s)
                try:
                    r = fn(s, cfg)
                except Exception as exc:  # a failed workload is reported, the rest still run
                    r = Result(name, f"{wid}. {fn.__name__}", error=f"{type(exc).__name__}: {exc}")
                r = sampler.finish(r)
                if wid in LIMIT_OF and not r.error and s.n > 1:
                    sizes = LIMIT_OF[wid](s)
                    r.files = len(sizes) if wid in SMALL_FILES else 0
                    r.limit_s = round(measure_limit(s, sizes), 3)
                if wid == "7d" and not r.error and s.n > 1:
                    r.limit_s = round(measure_unlink_limit(s, r.files), 3)
                r.extra.update(s.extra())
                r.extra["load1_before"] = round(load, 2)
                r.extra["wall_seconds_with_setup"] = round(time.monotonic() - w0, 1)
                results.append(r)
                print(f"   {r.workload}: {r.seconds:.2f}s {r.rate} {r.error}", flush=True)
        finally:
            s.stop()
            import shutil

            shutil.rmtree(base, ignore_errors=True)
    print()
    print(table(results))
    print("\nlimit s: every receiver writing the same files on the same disk at once, made durable "
          "(fdatasync per file of 1 MiB or more, one syncfs for small files); of limit: limit s / converged s. "
          "CPU s/1k files: all daemons and etcd.")
    total = time.monotonic() - started
    print(f"\nwhole run: {total / 60:.1f} min")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "nodes": cfg.nodes, "quick": cfg.quick,
                               "total_seconds": round(total, 1),
                               "results": [asdict(r) for r in results]}, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
