"""The benchmark's convergence poll: it looks again only at the paths that differed, so it must still
never report convergence while any node differs (a path that changed after it matched, extra paths,
same size and mtime with other bytes). Each `sleep` of the poll applies the next change, in order."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench

T = 1_700_000_000


def put(root: Path, rel: str, data: bytes) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.utime(p, (T, T))


def tree(root: Path) -> None:
    put(root, "a", b"alpha")
    put(root, "b/c", b"gamma")
    (root / "d").symlink_to("a")


def nodes(tmp_path: Path) -> list[Path]:
    dirs = [tmp_path / f"n{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
        tree(d)
    return dirs


def run(dirs: list[Path], monkeypatch: pytest.MonkeyPatch, steps: list[Callable[[], None]]) -> int:
    """Poll three nodes; return how many steps had been applied when it reported convergence."""
    applied = 0

    def sleep(_: float) -> None:
        nonlocal applied
        assert applied < len(steps), "polled on after the last change: convergence was missed"
        steps[applied]()
        applied += 1

    monkeypatch.setattr(bench.time, "sleep", sleep)
    bench.wait_converged(SimpleNamespace(dirs=dirs, name="t"), 0.0, 60)  # type: ignore[arg-type]
    return applied


def test_converged_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(nodes(tmp_path), monkeypatch, []) == 0


def test_a_path_that_matched_and_then_changed_is_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = nodes(tmp_path)
    (n[2] / "b" / "c").unlink()  # n2 lacks b/c: the first walk finds that only
    steps = [
        lambda: put(n[1], "a", b"alpha, longer"),    # n1's a matched at the walk and now differs
        lambda: put(n[2], "b/c", b"gamma"),          # n2 caught up: the full walk still finds n1's a
        lambda: put(n[1], "a", b"alpha"),            # every node identical
    ]
    assert run(n, monkeypatch, steps) == 3


def test_extra_paths_and_same_size_other_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = nodes(tmp_path)
    put(n[2], "x/extra", b"not on n0")  # an extra path (a deletion not applied yet)
    put(n[1], "b/c", b"GAMMA")  # same size and mtime, other bytes: only the digests see it
    steps = [
        lambda: (n[2] / "x" / "extra").unlink(),
        lambda: (n[2] / "x").rmdir(),
        lambda: put(n[1], "b/c", b"gamma"),
    ]
    assert run(n, monkeypatch, steps) == 3


def test_a_symlink_to_another_target_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = nodes(tmp_path)

    def retarget(root: Path, target: str) -> None:
        (root / "d").unlink()
        (root / "d").symlink_to(target)

    retarget(n[1], "b/c")
    steps = [lambda: None, lambda: retarget(n[1], "a")]
    assert run(n, monkeypatch, steps) == 2
