"""The mass-deletion guard's decisions, as tables: no etcd, no disk, no event loop; time is an argument."""

from __future__ import annotations

import pytest

from syncmesh_plugin.config import ConfigError, load_config
from syncmesh_plugin.sync.guard import DeleteGuard, Entry, crosses, identities


def f(path: str, ino: int, size: int = 100, mtime: int = 1, digest: str = "") -> Entry:
    return Entry(path, "file", ino, size, mtime, digest or f"sum-{path}")


def d(path: str, ino: int) -> Entry:
    return Entry(path, "dir", ino)


def guard(min_files: int = 20, threshold: float = 0.5) -> DeleteGuard:
    return DeleteGuard(threshold, min_files, window=10.0, settle=0.25)


def live(n: int):  # type: ignore[no-untyped-def]
    return lambda: n


# ---- the verdict itself
@pytest.mark.parametrize(("lost", "baseline", "min_files", "threshold", "expected"), [
    (0, 0, 20, 0.5, False),
    (19, 20, 20, 0.5, False),          # below the minimum, even if it is everything
    (20, 40, 20, 0.5, False),          # exactly half is not more than half
    (21, 40, 20, 0.5, True),
    (30, 40, 20, 0.5, True),
    (500, 100_000, 20, 0.5, False),    # a big subtree of a bigger volume
    (60_000, 100_000, 20, 0.5, True),
    (30, 10, 20, 0.5, True),           # more lost than the baseline says: the loss is the floor
    (5, 5, 1, 1.0, False),             # threshold 1.0: only more than everything (never)
    (2, 2, 1, 0.9, True),
])
def test_crosses(lost: int, baseline: int, min_files: int, threshold: float, expected: bool) -> None:
    assert crosses(lost, baseline, min_files, threshold) is expected


@pytest.mark.parametrize(("entry", "expected"), [
    (f("a", 7, 10, 3, "x"), [("ino", 7, 10, 3), ("sum", "x")]),
    (Entry("a", "file", 7, 0, 3, "empty"), [("ino", 7, 0, 3)]),  # an empty file's digest proves nothing
    (d("dir", 9), [("dir", 9)]),
    (Entry("l", "symlink", 4, 5, 6, ""), [("ino", 4, 5, 6)]),
    (Entry("remote", "file", 0, 10, 0, "y"), [("sum", "y")]),  # applied from a peer: content only
])
def test_identities(entry: Entry, expected: list[tuple[object, ...]]) -> None:
    assert identities(entry) == expected


# ---- ordinary patterns: published at once, never held, never paused
def test_a_work_queue_is_churn() -> None:
    g = guard()
    t = 100.0
    for i in range(200):  # a job file created, then consumed, 0.1 s apart
        g.arrived([(f(f"job{i}.json", 1000 + i), True)], t)
        t += 0.1
        v = g.judge([f(f"job{i}.json", 1000 + i)], t)
        assert v.publish == {f"job{i}.json"} and v.reasons[f"job{i}.json"] == "churn"
        t += 0.1
    assert not g.held and g.review(t + 1, live(2)).paused == "" and g.due(t) is None


def test_a_file_replaced_through_a_rename() -> None:
    g = guard()
    g.arrived([(f(".config.tmp", 5), True), (f("config", 5), False)], 1.0)
    v = g.judge([f(".config.tmp", 5)], 1.0)
    assert v.reasons == {".config.tmp": "churn"} and not v.hold


def test_directories_renamed_back_to_back() -> None:
    g = guard()
    t = 50.0
    for n in range(3):  # mv d0 e0; mv d1 e1; mv d2 e2 within ten seconds, 100 files each
        old = [d(f"d{n}", 10 + n)] + [f(f"d{n}/f{i}", 1000 * n + i + 1) for i in range(100)]
        new = [d(f"e{n}", 10 + n)] + [f(f"e{n}/f{i}", 1000 * n + i + 1) for i in range(100)]
        g.arrived([(e, True) for e in new], t)
        v = g.judge(old, t)
        assert v.publish == {e.path for e in old} and not v.hold
        assert set(v.reasons.values()) == {"moved"}
        t += 1
    assert g.review(t, live(303)).release == [] and not g.paused


def test_a_directory_moved_in_a_later_flush_than_its_removal() -> None:
    """The old paths are held (the burst is large), the new ones arrive, the review finds them moved:
    the guard never pauses, and the old paths are published when presented again."""
    g = guard()
    old = [f(f"src/f{i}", 500 + i) for i in range(50)]
    v = g.judge(old, 1.0)
    assert v.hold == {e.path for e in old}
    g.arrived([(f(f"dst/f{i}", 500 + i), True) for i in range(50)], 1.1)
    v = g.judge(old, 1.2)  # presented again before the review: now seen as moved
    assert v.publish == {e.path for e in old} and set(v.reasons.values()) == {"moved"}


def test_a_copy_then_delete_keeps_the_content() -> None:
    g = guard(min_files=2)
    g.arrived([(f("backup/a", 77, digest="abc"), True), (f("backup/b", 78, digest="def"), True)], 1.0)
    v = g.judge([f("a", 1, digest="abc"), f("b", 2, digest="def")], 1.0)
    assert v.reasons == {"a": "moved", "b": "moved"}


def test_log_rotation() -> None:
    g = guard()
    t = 0.0
    for _ in range(30):  # app.log -> app.log.1 -> ... ; app.log.5 removed; a new app.log
        g.arrived([(f("app.log.1", 1, 10, 5), True), (f("app.log", 2, 0, 6), True)], t)
        v = g.judge([f("app.log", 1, 10, 5), f("app.log.5", 3)], t)
        assert v.reasons["app.log.5"] == "loss" and v.publish == {"app.log", "app.log.5"}
        t += 1.0  # one rotation a second: at most ten losses in any window
    assert not g.held


def test_a_rebuilt_directory_is_not_a_mass_deletion() -> None:
    """rm -rf build; the same tree written again (make, npm install, a deploy)."""
    g = guard()
    old = [f(f"build/o{i}", 100 + i) for i in range(300)]
    v = g.judge(old, 1.0)
    assert len(v.hold) == 300
    # written again: the index still has the paths (the deletions were held), so they are not new
    g.arrived([(f(f"build/o{i}", 900 + i), False) for i in range(300)], 1.1)
    assert not g.held
    r = g.review(1.6, live(400))
    assert r == r.__class__() and not g.paused


def test_a_rebuild_slower_than_the_settle_time_lifts_its_own_pause() -> None:
    g = guard()
    old = [f(f"node_modules/p{i}", 100 + i) for i in range(300)]
    g.judge(old, 1.0)
    r = g.review(1.3, live(400))
    assert r.paused and "300 of 400" in r.paused and g.paused
    g.arrived([(f(f"node_modules/p{i}", 900 + i), False) for i in range(290)], 5.0)
    r = g.review(5.1, live(400))
    assert r.lifted and not g.paused and sorted(r.release) == sorted(f"node_modules/p{i}" for i in range(290, 300))


def test_a_single_delete_is_published_at_once() -> None:
    g = guard()
    v = g.judge([f("old.txt", 1)], 1.0)
    assert v.publish == {"old.txt"} and v.reasons == {"old.txt": "loss"} and g.due(1.0) is None


def test_losses_below_the_minimum_are_published_at_once_even_if_they_are_everything() -> None:
    g = guard()
    v = g.judge([f(f"f{i}", i) for i in range(19)], 1.0)
    assert len(v.publish) == 19 and not v.hold


def test_a_subtree_that_is_a_small_share_is_held_briefly_then_released() -> None:
    g = guard()
    gone = [f(f"logs/2025/{i}", i) for i in range(30)]
    assert g.judge(gone, 1.0).hold == {e.path for e in gone}
    assert g.due(1.0) == pytest.approx(0.25)
    assert g.review(1.1, live(1000)).release == []  # not settled yet
    r = g.review(1.3, live(1000))
    assert sorted(r.release) == sorted(e.path for e in gone) and not r.paused
    v = g.judge(gone, 1.31)  # presented again by the engine: published
    assert v.publish == {e.path for e in gone} and set(v.reasons.values()) == {"released"}


# ---- real damage: still caught
def test_the_whole_volume_wiped_pauses() -> None:
    g = guard()
    gone = [f(f"f{i}", i) for i in range(40)]
    v = g.judge(gone, 1.0)
    assert not v.publish and len(v.hold) == 40
    r = g.review(1.3, live(40))
    assert r.paused.startswith("40 of 40 paths that existed before would be deleted")
    assert not r.release and g.held.keys() == {e.path for e in gone}
    assert g.review(100.0, live(40)) == r.__class__()  # stays paused, nothing released by itself


def test_a_wipe_in_slices_is_judged_whole() -> None:
    g = guard()
    t = 1.0
    for s in range(5):  # rm -rf arriving in slices of 25
        g.judge([f(f"f{s}-{i}", 100 * s + i) for i in range(25)], t)
        t += 0.05
        assert g.review(t, live(130)).paused == ""  # not settled while the burst goes on
    assert "125 of 130" in g.review(t + 0.3, live(130)).paused


def test_a_subtree_holding_most_of_the_volume_wiped_and_not_rewritten() -> None:
    g = guard()
    g.judge([f(f"data/{i}", i) for i in range(90)], 1.0)
    assert "90 of 100" in g.review(2.0, live(100)).paused


def test_files_created_in_the_window_do_not_dilute_the_share() -> None:
    g = guard()
    g.arrived([(f(f"new/{i}", 10_000 + i), True) for i in range(1000)], 0.5)
    g.judge([f(f"old/{i}", i) for i in range(30)], 1.0)
    assert "30 of 40" in g.review(1.5, live(1040)).paused  # before the window: 40 paths


def test_inode_reused_by_a_new_file_is_not_a_move() -> None:
    g = guard()
    gone = [f(f"f{i}", 100 + i, size=10, mtime=1) for i in range(30)]
    g.arrived([(f(f"n{i}", 100 + i, size=3, mtime=9, digest="other"), True) for i in range(30)], 1.0)
    assert g.judge(gone, 1.0).hold == {e.path for e in gone}


def test_losses_add_up_over_the_window_and_expire() -> None:
    g = guard()
    assert len(g.judge([f(f"a{i}", i) for i in range(15)], 1.0).publish) == 15
    assert g.judge([f(f"b{i}", 100 + i) for i in range(10)], 5.0).hold  # 25 within ten seconds
    g2 = guard()
    g2.judge([f(f"a{i}", i) for i in range(15)], 1.0)
    assert len(g2.judge([f(f"b{i}", 100 + i) for i in range(15)], 12.0).publish) == 15  # the first 15 expired


# ---- while paused
def test_a_paused_volume_still_publishes_churn_and_holds_new_losses() -> None:
    g = guard()
    g.judge([f(f"f{i}", i) for i in range(40)], 1.0)
    assert g.review(2.0, live(41)).paused
    g.arrived([(f("tmp", 999), True)], 3.0)
    assert g.judge([f("tmp", 999)], 3.1).reasons == {"tmp": "churn"}
    v = g.judge([f("last", 500)], 3.2)
    assert v.hold == {"last"} and "last" in g.held


def test_accept_releases_every_held_deletion() -> None:
    g = guard()
    gone = [f(f"f{i}", i) for i in range(40)]
    g.judge(gone, 1.0)
    g.review(2.0, live(40))
    assert sorted(g.accept(3.0)) == sorted(e.path for e in gone) and not g.paused and not g.held
    assert g.judge(gone, 3.1).publish == {e.path for e in gone}


def test_restore_drops_the_held_deletions() -> None:
    g = guard()
    g.judge([f(f"f{i}", i) for i in range(40)], 1.0)
    g.review(2.0, live(40))
    g.restore()
    assert not g.paused and not g.held and g.due(3.0) is None


def test_paths_a_peer_deleted_too_are_forgotten() -> None:
    g = guard()
    g.judge([f(f"f{i}", i) for i in range(40)], 1.0)
    g.forget(f"f{i}" for i in range(30))
    r = g.review(2.0, live(40))
    assert not r.paused and len(r.release) == 10


def test_accept_flag_publishes_everything() -> None:
    g = guard()
    v = g.judge([f(f"f{i}", i) for i in range(40)], 1.0, accept=True)
    assert len(v.publish) == 40 and set(v.reasons.values()) == {"released"} and not g.held


def test_a_queue_consumed_on_another_node() -> None:
    """Jobs created by a peer (applied here: content only, no local inode) and consumed here."""
    g = guard()
    for i in range(50):
        g.arrived([(Entry(f"q/{i}", "file", 0, 10, 0, f"job{i}"), True)], 1.0 + i * 0.01)
    v = g.judge([f(f"q/{i}", 300 + i, size=10, digest=f"job{i}") for i in range(50)], 2.0)
    assert len(v.publish) == 50 and set(v.reasons.values()) == {"churn"}


def test_born_paths_beyond_the_cap_count_as_losses() -> None:
    """Memory is bounded: the oldest creations are forgotten first, on the safe side (a loss)."""
    g = DeleteGuard(0.5, 20, tracked_max=10)
    g.arrived([(f(f"n{i}", i), True) for i in range(30)], 1.0)
    v = g.judge([f(f"n{i}", 1000 + i) for i in range(30)], 1.0)
    assert sum(1 for r in v.reasons.values() if r == "churn") == 10 and len(v.hold) == 20


def test_describe_counts() -> None:
    g = guard()
    g.arrived([(f("a", 1), True)], 1.0)
    g.judge([f(f"f{i}", 100 + i) for i in range(25)], 1.0)
    assert g.describe() == {"held_deletions": 25, "losses_in_window": 0, "created_in_window": 1}


def test_moved_aside_then_deleted_is_still_a_loss() -> None:
    """mv data trash; rm -rf trash: the new paths carry data that existed before the window."""
    g = guard()
    old = [f(f"data/{i}", 100 + i) for i in range(40)]
    g.arrived([(f(f"trash/{i}", 100 + i), True) for i in range(40)], 1.0)
    assert set(g.judge(old, 1.0).reasons.values()) == {"moved"}
    v = g.judge([f(f"trash/{i}", 100 + i) for i in range(40)], 2.0)
    assert len(v.hold) == 40 and set(v.reasons.values()) == {"loss"}
    assert "40 of 40" in g.review(2.5, live(40)).paused


def test_data_that_arrived_at_the_same_path_is_not_a_move() -> None:
    """A file rewritten in place and then deleted: its identity arrived at its own path only."""
    g = guard(min_files=1)
    g.arrived([(f("a", 5), False)], 1.0)
    v = g.judge([f("a", 5)], 1.5)
    assert v.reasons == {"a": "loss"} and v.hold == {"a"}


def test_held_paths_whose_new_path_arrives_before_the_review_are_released_as_moves() -> None:
    g = guard()
    g.judge([f(f"src/{i}", 100 + i) for i in range(40)], 1.0)
    g.arrived([(f(f"dst/{i}", 100 + i), True) for i in range(40)], 1.1)
    r = g.review(1.4, live(80))
    assert len(r.release) == 40 and not r.paused and g.describe()["losses_in_window"] == 0
    # dst now holds old data: deleting it is a loss
    assert g.judge([f(f"dst/{i}", 100 + i) for i in range(40)], 2.0).hold


@pytest.mark.parametrize(("value", "ok"), [("10s", True), ("500ms", True), ("1h", True), ("0.1s", False),
                                           ("2h", False)])
def test_the_window_setting_is_checked(value: str, ok: bool, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {"SYNCMESH_SYNC_MASS_DELETE_WINDOW": value, "SYNCMESH_DATA_ROOT": str(tmp_path)}
    if ok:
        assert load_config(None, env).sync.mass_delete_window > 0
    else:
        with pytest.raises(ConfigError, match=r"sync\.mass_delete_window"):
            load_config(None, env)


def test_a_burst_of_arrivals_without_deletions_is_forgotten_as_it_leaves_the_window() -> None:
    """100,000 files arriving with no deletion: only the window's arrivals are remembered (the cap is the
    last resort, not what bounds an ordinary burst), and a path created long ago counts as old data."""
    g = guard()  # window 10 s
    for second in range(30):
        g.arrived([(f(f"s{second}/{i}", second * 1000 + i, digest=f"d{second}-{i}"), True) for i in range(1000)],
                  float(second))
    assert g.describe()["created_in_window"] == 11_000  # seconds 19..29 (the edge is inclusive)
    assert len(g._arrived) <= 2 * 11_000  # two identities per file: inode and content
    v = g.judge([f(f"s0/{i}", 90_000 + i) for i in range(25)], 29.5)  # created 29 s ago: not churn
    assert len(v.hold) == 25
