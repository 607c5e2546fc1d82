"""monitoring/: every metric the Grafana dashboard queries exists; the scrape config parses; logs are JSON."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import yaml

from syncmesh_plugin import logs, metrics

ROOT = Path(__file__).resolve().parents[2]
_FUNCS = {"sum", "max", "min", "avg", "count", "rate", "increase", "irate", "histogram_quantile", "by", "without",
          "label_values", "on", "ignoring", "le"}


def _exported_names() -> set[str]:
    names = set()
    for fam in metrics.REGISTRY.collect():
        for s in fam.samples:
            names.add(s.name)
        names.add(fam.name)
        if fam.type == "histogram":
            names.update(fam.name + suf for suf in ("_bucket", "_sum", "_count"))
        if fam.type == "counter":
            names.add(fam.name + "_total")
    return names


def _queried(dash: dict) -> set[str]:
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "query") and isinstance(v, str):
                    exprs.append(v)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dash)
    found = set()
    for e in exprs:
        e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
        e = re.sub(r"\[[^\]]*\]", "", e)  # ranges
        e = re.sub(r"\([^()]*\)\s*(?=\()", "(", e)  # "by (kind) (" groupings
        for name in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
            if name not in _FUNCS and (name.startswith(("syncmesh_", "process_", "python_"))):
                found.add(name)
    return found


def test_every_dashboard_metric_exists():
    dash = json.loads((ROOT / "monitoring" / "grafana-dashboard.json").read_text())
    queried = _queried(dash)
    assert len(queried) >= 20
    missing = queried - _exported_names()
    assert not missing, f"dashboard queries metrics the daemon does not export: {sorted(missing)}"
    titles = {p["title"] for p in dash["panels"] if p["type"] == "row"}
    assert {"Cluster overview", "Per-volume sync", "Peers", "Errors"} <= titles


def test_scrape_config_parses():
    cfg = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    job = cfg["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"]


def test_metric_names_have_prefix_units_and_bounded_labels():
    allowed = {"kind", "mode", "reason", "op", "volume", "peer", "source", "method", "result"}
    for fam in metrics.REGISTRY.collect():
        if fam.name.startswith(("process_", "python_")):
            continue
        assert fam.name.startswith("syncmesh_"), fam.name
        for s in fam.samples:
            assert set(s.labels) - {"le"} <= allowed, (fam.name, s.labels)  # never a path or a chunk id


def test_json_log_lines_carry_node_and_fields():
    buf = io.StringIO()
    logs.setup_logging("info", "json", node="n7")
    handler = logging.getLogger().handlers[0]
    handler.setStream(buf)
    try:
        logging.getLogger("syncmesh_plugin.test").info("volume %s: applied %d", "v", 3,
                                                       extra={"volume": "v", "count": 3, "duration": 0.5})
        logging.getLogger("syncmesh_plugin.test").info("plain")
    finally:
        logging.getLogger().handlers[:] = []
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(x) for x in lines)
    assert first["msg"] == "volume v: applied 3" and first["volume"] == "v" and first["node"] == "n7"
    assert first["count"] == 3 and first["duration"] == 0.5 and first["level"] == "info"
    assert second["node"] == "n7" and "volume" not in second
