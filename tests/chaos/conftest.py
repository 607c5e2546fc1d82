"""Fault-injection suite (issue 6): `make chaos` / `make chaos-short`, or pytest -m chaos tests/chaos.

Options: --chaos-seeds N (runs per scenario), --chaos-seed-base B (first seed), --chaos-short (fast
scenarios, shorter faults). The terminal summary prints one table row per scenario; the raw results
go to $CHAOS_RESULTS (default /tmp/syncmesh-chaos-results.json) for tests/chaos/run.py.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.resolve().parent))

import hostguard  # noqa: E402
from chaoslib import RESULTS, Scenario  # noqa: E402

E2E_NAMES = ("sme2e", "syncmesh-e2e")  # a concurrent `make e2e` run's own namespaces, links, rules


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("chaos")
    g.addoption("--chaos-seeds", type=int, default=1, help="runs (seeds) per chaos scenario")
    g.addoption("--chaos-seed-base", type=int, default=1, help="first seed")
    g.addoption("--chaos-short", action="store_true", help="fast scenarios only, shorter faults (CI)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos_slow: chaos scenario left out of --chaos-short")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "seed" in metafunc.fixturenames and Path(str(metafunc.definition.fspath)).is_relative_to(HERE):
        base = metafunc.config.getoption("--chaos-seed-base")
        n = max(1, metafunc.config.getoption("--chaos-seeds"))
        metafunc.parametrize("seed", list(range(base, base + n)), ids=[f"seed{s}" for s in range(base, base + n)])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [i for i in items if Path(str(i.fspath)).is_relative_to(HERE)]
    for item in mine:
        item.add_marker(pytest.mark.chaos)
    if "chaos" not in (config.getoption("markexpr") or ""):
        skip = pytest.mark.skip(reason="fault-injection suite: run with `make chaos` (pytest -m chaos)")
        for item in mine:
            item.add_marker(skip)
    elif config.getoption("--chaos-short"):
        skip = pytest.mark.skip(reason="slow scenario: not part of --chaos-short")
        for item in mine:
            if item.get_closest_marker("chaos_slow"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def short(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--chaos-short"))


@pytest.fixture(scope="session", autouse=True)
def host_unchanged(request: pytest.FixtureRequest) -> Iterator[None]:
    """The host's links, routes, iptables rules, mounts, /run/docker/plugins and its Docker engine's
    objects are the same after the suite as before it (tests/hostguard.py); fails naming each change.
    Not root: the scenarios that need root are skipped, and the guard checks links, routes and mounts."""
    if "chaos" not in (request.config.getoption("markexpr") or ""):
        yield
        return
    if os.geteuid() == 0:
        from chaoslib import sweep_stale

        sweep_stale()  # what a killed earlier run left behind is not this run's doing
    try:
        before = hostguard.snapshot()
    except hostguard.GuardError as exc:
        pytest.fail(str(exc))
    yield
    if os.geteuid() == 0:
        hostguard.release_netns_dir(before)
    diffs = hostguard.compare(before, hostguard.snapshot(), ignore=E2E_NAMES)
    if diffs:
        pytest.fail(hostguard.report("the chaos suite", diffs))


@pytest.fixture
def scenario(tmp_path: Path, seed: int, short: bool) -> Iterator[Callable[..., Scenario]]:
    made: list[Scenario] = []

    def make(name: str, **kw: Any) -> Scenario:
        s = Scenario(name, seed, tmp_path, **kw)
        # bound on convergence after healing (the periodic rescan, 30 s, is the engine's safety net)
        # (deferred fetches are retried with a backoff capped at 30 s, so anything below ~45 s is too tight)
        s.converge_timeout = 45.0 if short else 60.0
        made.append(s)
        return s

    yield make
    for s in made:
        failed = not getattr(s, "verdict", None) or s.verdict.problems() or s.extra
        if failed:
            keep = os.environ.get("CHAOS_LOG_DIR")  # whole daemon logs and the write ledger of failed runs
            if keep:
                out = Path(keep) / f"{s.name}-seed{s.seed}"
                out.mkdir(parents=True, exist_ok=True)
                for nd in s.nodes:
                    (out / f"{nd.name}.log").write_text(nd.log())
                for f in s.tmp.glob("etcd/**/etcd.log"):  # the etcd members' own logs
                    (out / f"etcd-{f.parent.name}.log").write_bytes(f.read_bytes())
                (out / "ledger.txt").write_text("\n".join(
                    f"{w.t:.3f} {w.writer}#{w.seq} {w.path} {w.digest[:8]} base={(w.base or '-')[:8]} "
                    f"{'ok' if w.completed else 'failed'}" for w in s.ledger.writes))
                print(f"---- logs kept in {out}")
            for nd in s.nodes:
                print(f"---- {nd.name} log (tail) ----\n{nd.log()[-4000:]}")
        s.close()


def table(rows: list[dict[str, Any]]) -> list[str]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["scenario"], []).append(r)
    head = (f"{'scenario':<30} {'runs':>4} {'seeds':<9} {'writes':>7} {'lost':>5} {'divergent':>9} "
            f"{'converge s (median/max)':>24} {'docker call max s':>17} {'result':<8}")
    out = [head, "-" * len(head)]
    for name, rs in by.items():
        conv = [r["converge_s"] if r["converge_s"] is not None else float("inf") for r in rs]
        seeds = ",".join(str(r["seed"]) for r in rs)
        bad = sum(1 for r in rs if not r["ok"])  # there are no expected failures: every bad run counts
        res = f"{bad} FAIL" if bad else "ok"
        docker = [r["docker_max_s"] for r in rs if r.get("docker_max_s") is not None]
        dmax = f"{max(docker):.2f}" if docker else "-"
        out.append(f"{name:<30} {len(rs):>4} {seeds:<9} {sum(r['writes'] for r in rs):>7} "
                   f"{sum(r['lost'] for r in rs):>5} {sum(r['divergent'] for r in rs):>9} "
                   f"{statistics.median(conv):>11.1f} / {max(conv):<10.1f} {dmax:>17} {res:<8}")
    return out


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    terminalreporter.section("chaos results")
    for line in table(RESULTS):
        terminalreporter.write_line(line)
    for r in RESULTS:
        if r.get("notes"):
            terminalreporter.write_line(f"  {r['scenario']} seed {r['seed']}: {r['notes']}")
    out = Path(os.environ.get("CHAOS_RESULTS", "/tmp/syncmesh-chaos-results.json"))
    out.write_text(json.dumps(RESULTS, indent=1))
