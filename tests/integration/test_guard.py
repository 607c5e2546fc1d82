"""The mass-damage guard on real daemons: ordinary churn never pauses a volume; a wipe, a replaced
volume directory and a wiped subtree that held most of the volume still do, and a paused volume keeps
syncing everything but the held deletions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from conftest import converged, tree, wait_for, write

WINDOW = 1.0  # sync.mass_delete_window for these daemons: the seed must be older than it to count
# Fewer losses than sync.mass_delete_min_files (20) are published at once: a wipe that inotify delivers in
# slices (a loaded machine) may have published its first slice, at most 19 paths, before the guard holds
# the rest. The assertions below allow exactly that and no more.
EARLY_MAX = 19


def _status(n, volume: str) -> dict:  # type: ignore[no-untyped-def]
    return n.http("GET", f"/api/v1/volumes/{volume}")[1]["sync"]


def _paused(n, volume: str) -> str:  # type: ignore[no-untyped-def]
    return _status(n, volume).get("paused", "")


def _seed(cluster, volume: str, count: int = 40, layout=None):  # type: ignore[no-untyped-def]
    """Two nodes holding `volume` with `count` files (or `layout`: relpath -> text) that existed
    before the guard's window (the window is 1 s here; data created within it is churn)."""
    a = cluster("n1", SYNCMESH_SYNC_MASS_DELETE_WINDOW=f"{WINDOW}s")
    b = cluster("n2", SYNCMESH_SYNC_MASS_DELETE_WINDOW=f"{WINDOW}s")
    a.ok("VolumeDriver.Create", {"Name": volume})
    a.mount(volume)
    b.mount(volume)
    files = layout or {f"f{i}.txt": f"file {i}" for i in range(count)}
    for rel, text in files.items():
        write(a.vol(volume) / rel, text)
    converged([a, b], volume, expect=lambda t: all(k in t for k in files))
    time.sleep(WINDOW + 0.2)  # let the seed age past the window (a precondition, not an assertion)
    return a, b


def _marker(src, dst, volume: str, name: str) -> None:  # type: ignore[no-untyped-def]
    """Write a file on `src` and wait until `dst` has it: everything `src` published before it has
    been applied on `dst` too (one node publishes in order)."""
    write(src.vol(volume) / name, name)
    wait_for(lambda: (dst.vol(volume) / name).exists(), 20, what=f"{name} on {dst.name}")


def _not_paused_after_churn(a, b, volume: str) -> None:  # type: ignore[no-untyped-def]
    """The churn's deletions are published (once the marker is through, and after any held burst
    was judged) and neither node paused."""
    wait_for(lambda: _status(a, volume).get("held_deletions", 0) == 0, 10, what="no held deletions on n1")
    _marker(a, b, volume, "zz-marker")
    assert _paused(a, volume) == "" and _paused(b, volume) == ""
    assert a.http("GET", "/api/v1/health")[0] == 200
    converged([a, b], volume)


# ---- ordinary workloads: never paused
def test_a_work_queue_never_pauses(cluster, volume):
    a, b = _seed(cluster, volume, count=2)
    q = a.vol(volume)
    for i in range(30):  # jobs that live for a moment
        write(q / f"job{i}.json", "{}")
        time.sleep(0.1)
        (q / f"job{i}.json").unlink()
        time.sleep(0.1)
    _not_paused_after_churn(a, b, volume)
    assert not any(p.startswith("job") for p in tree(b.vol(volume)))


def test_temp_files_and_replace_by_rename_never_pause(cluster, volume):
    a, b = _seed(cluster, volume, count=30)
    v = a.vol(volume)
    for i in range(30):  # an editor or a config tool: write a temp file, rename it over the target
        write(v / f".f{i}.txt.swp", f"new {i}")
        os.replace(v / f".f{i}.txt.swp", v / f"f{i}.txt")
    _not_paused_after_churn(a, b, volume)
    assert (b.vol(volume) / "f7.txt").read_text() == "new 7"


def test_log_rotation_never_pauses(cluster, volume):
    a, b = _seed(cluster, volume, layout={f"log/app.log.{i}": f"old {i}" for i in range(1, 6)} |
                 {f"keep{i}": "x" for i in range(20)})
    logd = a.vol(volume) / "log"
    for r in range(30):  # logrotate: drop the oldest, shift the others, start a new app.log
        (logd / "app.log.5").unlink(missing_ok=True)
        for i in range(4, 0, -1):
            if (logd / f"app.log.{i}").exists():
                os.rename(logd / f"app.log.{i}", logd / f"app.log.{i + 1}")
        if (logd / "app.log").exists():
            os.rename(logd / "app.log", logd / "app.log.1")
        write(logd / "app.log", f"rotation {r}\n")
    _not_paused_after_churn(a, b, volume)
    assert (b.vol(volume) / "log" / "app.log").read_text() == "rotation 29\n"


def test_directories_renamed_back_to_back_never_pause(cluster, volume):
    layout = {f"d{n}/f{i}.txt": f"{n}-{i}" for n in range(3) for i in range(100)}
    a, b = _seed(cluster, volume, layout=layout)
    v = a.vol(volume)
    os.rename(v / "d0", v / "e0")  # a deploy rotating directories, a build moving its output
    os.rename(v / "d1", v / "e1")
    _not_paused_after_churn(a, b, volume)
    t = tree(b.vol(volume))
    assert "e0/f5.txt" in t and "d0/f5.txt" not in t and "e1/f99.txt" in t and "d2/f0.txt" in t


def test_a_removed_subtree_written_again_never_pauses(cluster, volume):
    layout = {f"build/obj{i}.o": f"old {i}" for i in range(150)} | {f"src/{i}.c": "c" for i in range(10)}
    a, b = _seed(cluster, volume, layout=layout)
    v = a.vol(volume)
    shutil.rmtree(v / "build")  # rm -rf build && make
    for i in range(150):
        write(v / "build" / f"obj{i}.o", f"new {i}")
    _not_paused_after_churn(a, b, volume)
    assert (b.vol(volume) / "build" / "obj3.o").read_text() == "new 3"


def test_a_build_directory_replaced_by_a_new_tree_never_pauses(cluster, volume):
    layout = {f"current/{i}.html": f"v1 {i}" for i in range(120)} | {"README": "r"}
    a, b = _seed(cluster, volume, layout=layout)
    v = a.vol(volume)
    for i in range(120):  # the new release is built beside the old one, then swapped in
        write(v / "next" / f"{i}.html", f"v2 {i}")
    shutil.rmtree(v / "current")
    os.rename(v / "next", v / "current")
    _not_paused_after_churn(a, b, volume)
    assert (b.vol(volume) / "current" / "9.html").read_text() == "v2 9"


def test_a_git_checkout_never_pauses(cluster, volume):
    git = shutil.which("git")
    assert git, "git is not installed (apt-get install git); this test needs it"
    a, b = _seed(cluster, volume, count=2)
    repo = a.vol(volume) / "repo"
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}

    def g(*args: str) -> None:
        subprocess.run([git, "-C", str(repo), *args], check=True, capture_output=True, env=env)

    repo.mkdir()
    g("init", "-q", "-b", "main")
    for i in range(40):
        write(repo / f"m{i}.txt", f"main {i}")
    g("add", "-A")
    g("commit", "-q", "-m", "main")
    g("checkout", "-q", "-b", "other")
    g("rm", "-q", *[f"m{i}.txt" for i in range(40)])
    for i in range(40):
        write(repo / f"o{i}.txt", f"other {i}")
    g("add", "-A")
    g("commit", "-q", "-m", "other")
    g("checkout", "-q", "main")
    g("gc", "-q")  # packs loose objects: many files of .git removed at once
    _not_paused_after_churn(a, b, volume)
    assert (b.vol(volume) / "repo" / "m3.txt").read_text() == "main 3"


def test_sqlite_transactions_never_pause(cluster, volume):
    """A rollback journal is created and removed by every transaction."""
    import sqlite3

    a, b = _seed(cluster, volume, count=2)
    db = sqlite3.connect(a.vol(volume) / "app.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
    for i in range(60):
        db.execute("BEGIN")
        db.execute("INSERT INTO t (v) VALUES (?)", (f"row {i}",))
        db.execute("COMMIT")
    db.close()
    _not_paused_after_churn(a, b, volume)
    copy = sqlite3.connect(b.vol(volume) / "app.db")
    assert copy.execute("SELECT count(*) FROM t").fetchone()[0] == 60
    copy.close()


# ---- real damage: paused, and nothing but the held deletions waits
def test_a_wiped_volume_pauses_only_its_deletions(cluster, volume):
    a, b = _seed(cluster, volume)
    before = tree(a.vol(volume))
    for i in range(40):  # everything the volume held
        (b.vol(volume) / f"f{i}.txt").unlink()
    wait_for(lambda: _paused(b, volume), 10, what="the guard to pause n2")
    reason = _paused(b, volume)
    assert "40 of 40 paths that existed before would be deleted" in reason and "held" in reason
    code, health = b.http("GET", "/api/v1/health")
    assert code == 503 and volume in health["components"]["volumes"]["paused"]
    held = _status(b, volume)["held_deletions"]
    assert 40 - EARLY_MAX <= held <= 40
    # new files and changes keep syncing both ways while the deletions wait
    _marker(b, a, volume, "written-on-n2-after-the-pause")
    _marker(a, b, volume, "written-on-n1-after-the-pause")
    write(a.vol(volume) / "f1.txt", "changed on n1")
    wait_for(lambda: (b.vol(volume) / "f1.txt").exists(), 20, what="n1's change on the paused n2")
    kept = [k for k in before if k in tree(a.vol(volume))]
    assert len(kept) >= held  # no held deletion reached n1
    # the operator restores: n2 takes the files back from the cluster
    r = subprocess.run([sys.executable, "-m", "syncmesh_plugin", "resume", volume, "--restore", "--api",
                        f"http://127.0.0.1:{b.port}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    converged([a, b], volume, expect=lambda t: all(k in t for k in kept) and len(t) == len(kept) + 2)
    assert not _paused(b, volume)


def test_resume_accept_publishes_the_held_deletions(cluster, volume):
    a, b = _seed(cluster, volume)
    for i in range(30):
        (b.vol(volume) / f"f{i}.txt").unlink()
    wait_for(lambda: _paused(b, volume), 10)
    assert "30 of 40" in _paused(b, volume)
    code, body = b.http("POST", f"/api/v1/volumes/{volume}/resume?mode=accept")
    assert code == 200 and body["was_paused"]
    converged([a, b], volume, expect=lambda t: len(t) == 10)  # every deletion, held or not, is through
    assert not _paused(b, volume) and _status(b, volume)["held_deletions"] == 0


def test_a_wiped_subtree_holding_most_of_the_volume_pauses(cluster, volume):
    layout = {f"data/{i}.bin": f"d{i}" for i in range(60)} | {f"etc/{i}.conf": "c" for i in range(10)}
    a, b = _seed(cluster, volume, layout=layout)
    shutil.rmtree(b.vol(volume) / "data")
    wait_for(lambda: _paused(b, volume), 10, what="the guard to pause n2")
    assert "61 of 72 paths" in _paused(b, volume)  # 60 files and their directory, of 70 files and 2 dirs
    _marker(b, a, volume, "still-syncing")
    assert len([p for p in tree(a.vol(volume)) if p.startswith("data/")]) >= 60 - EARLY_MAX


def test_a_paused_subtree_written_again_lifts_the_pause(cluster, volume):
    layout = {f"data/{i}.bin": f"d{i}" for i in range(60)}
    a, b = _seed(cluster, volume, layout=layout)
    saved = {rel: (b.vol(volume) / rel).read_text() for rel in layout}
    shutil.rmtree(b.vol(volume) / "data")
    wait_for(lambda: _paused(b, volume), 10, what="the guard to pause n2")
    for rel, text in saved.items():  # a restore from a backup, or a slow reinstall
        write(b.vol(volume) / rel, text)
    wait_for(lambda: not _paused(b, volume), 10, what="the pause to lift once the paths are back")
    _marker(b, a, volume, "after")
    assert tree(a.vol(volume)).keys() >= saved.keys()


def test_replaced_volume_directory_pauses_everything(cluster, volume):
    a, b = _seed(cluster, volume, count=5)
    # the directory is swapped for an empty one (think: an unmounted disk, a backup restored in its place);
    # its files are not deleted one by one (that is a deletion, which a volume this small does not guard)
    os.rename(b.vol(volume), b.vol(volume).with_name("_data.old"))
    b.vol(volume).mkdir()
    write(b.vol(volume) / "new.txt", "x")
    wait_for(lambda: _paused(b, volume), 40, what="the guard to notice the replaced directory")
    assert "replaced" in _paused(b, volume) and "nothing syncs" in _paused(b, volume)
    assert len(tree(a.vol(volume))) == 5
    b.http("POST", f"/api/v1/volumes/{volume}/resume?mode=restore")
    converged([a, b], volume, expect=lambda t: len(t) == 6)


def test_missing_volume_directory_pauses_everything(cluster, volume):
    a, b = _seed(cluster, volume, count=5)
    root: Path = b.vol(volume)
    os.rename(root, root.with_name("_data.gone"))  # moved away, or a disk that did not mount
    b.http("POST", f"/api/v1/volumes/{volume}/sync")
    wait_for(lambda: "missing" in _paused(b, volume), 40, what="the guard to notice the missing directory")
    assert len(tree(a.vol(volume))) == 5
