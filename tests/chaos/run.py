#!/usr/bin/env python3
"""Run the fault-injection suite and print the results table (also `make chaos` / `make chaos-short`).

    python tests/chaos/run.py --seeds 3          # every scenario, seeds 1..3
    python tests/chaos/run.py --short            # fast scenarios, one seed, shorter faults (CI)
    python tests/chaos/run.py --seeds 2 -k partition --seed-base 7

The table comes from the pytest plugin in tests/chaos/conftest.py; this wrapper only builds the
pytest command line, prints the total time, and exits non-zero if any run broke an invariant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=1, help="runs (seeds) per scenario")
    ap.add_argument("--seed-base", type=int, default=1, help="first seed")
    ap.add_argument("--short", action="store_true", help="fast scenarios, one seed, shorter faults")
    ap.add_argument("-k", default="", help="pytest -k expression (scenario selection)")
    ap.add_argument("-v", action="store_true", help="show the scenario progress lines")
    ap.add_argument("--json", default="", help="also write the result rows to this file")
    args, extra = ap.parse_known_args()
    if os.geteuid() != 0:
        print("not root: the partition and disk-full scenarios will be skipped", file=sys.stderr)
    fd, res_path = tempfile.mkstemp(prefix="syncmesh-chaos-", suffix=".json")
    os.close(fd)
    os.environ["CHAOS_RESULTS"] = res_path
    cmd = [str(HERE), "-m", "chaos", "-p", "no:cacheprovider", "-q", "-rfEsx",
           "--chaos-seeds", str(1 if args.short else args.seeds), "--chaos-seed-base", str(args.seed_base)]
    if args.short:
        cmd.append("--chaos-short")
    if args.k:
        cmd += ["-k", args.k]
    if args.v:
        cmd.append("-s")
    cmd += extra
    t0 = time.monotonic()
    rc = pytest.main(cmd)
    took = time.monotonic() - t0
    rows = json.loads(Path(res_path).read_text() or "[]") if Path(res_path).stat().st_size else []
    os.unlink(res_path)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    lost = sum(r["lost"] for r in rows)
    div = sum(r["divergent"] for r in rows)
    print(f"\nchaos: {len(rows)} run(s) in {took / 60:.1f} min; writes lost {lost}, divergent files {div}; "
          f"pytest exit {int(rc)}")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
