"""Render benchmarks/results/latest.json as the README's side-by-side table (syncmesh vs Syncthing).

Usage: python benchmarks/report.py [results.json] [--readme README.md]   (rewrites the marked block)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
START, END = "<!-- BENCH-TABLE -->", "<!-- /BENCH-TABLE -->"


def _key(workload: str) -> str:
    return workload.split(".", 1)[0].strip()


def render(data: dict[str, Any]) -> str:
    by: dict[str, dict[str, dict[str, Any]]] = {}
    names: dict[str, str] = {}
    for r in data["results"]:
        by.setdefault(_key(r["workload"]), {})[r["system"]] = r
        names.setdefault(_key(r["workload"]), r["workload"])
    lines = [f"Run of {data['when']} on this machine (2 cores, all {data['nodes']} nodes of each system on one "
             f"host{', quick sizes' if data.get('quick') else ''}); convergence verified by content digests.", "",
             "| workload | syncmesh | Syncthing | speed-up | limit (same writes, this disk) | syncmesh of limit | "
             "CPU s / 1k files (syncmesh / Syncthing) | syncmesh peer MiB | syncmesh peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]

    def order(k: str) -> tuple[int, str]:
        digits = "".join(ch for ch in k if ch.isdigit())
        return (int(digits) if digits else 99, k)

    def per_1k(r: dict[str, Any] | None) -> str:
        if not r or not r.get("files") or r.get("error"):
            return "-"
        return f"{r['cpu_s_total'] / r['files'] * 1000:.2f}"

    for k in sorted(by, key=order):
        sm, st = by[k].get("syncmesh"), by[k].get("syncthing")

        def cell(r: dict[str, Any] | None) -> str:
            if r is None:
                return "not run"
            if r.get("error"):
                return "failed: " + r["error"][:60]
            return f"{r['seconds']:.2f} s ({r['rate']})"

        ratio = ""
        if sm and st and not sm.get("error") and not st.get("error"):
            if k == "6":
                a, b = sm["extra"].get("median_ms"), st["extra"].get("median_ms")
            elif k == "5":
                a, b = sm["extra"].get("lag_median_ms"), st["extra"].get("lag_median_ms")
            elif k == "9":
                a = sm["extra"].get("overwrite_bytes_per_peer", 0) + sm["extra"].get("insert_bytes_per_peer", 0)
                b = st["extra"].get("overwrite_bytes_per_peer", 0) + st["extra"].get("insert_bytes_per_peer", 0)
            else:
                a, b = sm["seconds"], st["seconds"]
            if a and b:
                ratio = f"{b / a:.1f}x" + (" fewer bytes" if k == "9" else "")
        limit = share = ""
        if sm and sm.get("limit_s") and not sm.get("error"):
            limit = f"{sm['limit_s']:.2f} s"
            share = f"{sm['limit_s'] / sm['seconds'] * 100:.0f} %"
        cpu = f"{per_1k(sm)} / {per_1k(st)}" if (sm or {}).get("files") else ""
        lines.append(f"| {names[k]} | {cell(sm)} | {cell(st)} | {ratio} | {limit} | {share} | {cpu} | "
                     f"{(sm or {}).get('peer_bytes', 0) / 2**20:.1f} | {(sm or {}).get('peak_rss_mb', 0):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("results", nargs="?", default=str(HERE / "results" / "latest.json"))
    ap.add_argument("--readme", help="rewrite the block between the BENCH-TABLE markers in this file")
    a = ap.parse_args()
    table = render(json.loads(Path(a.results).read_text()))
    if not a.readme:
        print(table)
        return
    path = Path(a.readme)
    text = path.read_text()
    block = f"{START}\n{table}\n{END}"
    if END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.replace(START, block)
    path.write_text(text)
    print(f"updated {path}")


if __name__ == "__main__":
    main()
