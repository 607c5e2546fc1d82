"""monitoring/: every metric the Grafana dashboard queries exists; the scrape config parses; logs are JSON."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import yaml
from prometheus_client import Counter, Gauge, Histogram, Summary
from prometheus_client.metrics import MetricWrapperBase

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


#: Label names a metric may carry: each has a bounded set of values (never a path or a chunk id; state: live|offline;
#: endpoint: the etcd endpoints the node was given, or its embedded cluster's members).
ALLOWED_LABELS = {"kind", "mode", "reason", "op", "volume", "peer", "source", "method", "result", "state", "endpoint"}
#: Spellings of a unit that is not the base unit Prometheus expects (seconds, bytes).
_NON_BASE_UNITS = re.compile(r"_(milli|micro|nano)?(ms|us|ns|millis|milliseconds|microseconds|minutes|hours|days|"
                             r"kb|mb|gb|kib|mib|gib|kilobytes|megabytes|bits)(_|$)")
_TIME_WORDS = re.compile(r"_(duration|latency|lag|age|elapsed|uptime)(_|$)")
#: Byte counters named before the "unit as suffix" rule (syncmesh_<thing>_bytes_total). Renaming them breaks
#: dashboards, so they are listed here; a new byte metric must end in _bytes / _bytes_total.
_LEGACY_BYTE_COUNTERS = {"syncmesh_bytes_sent", "syncmesh_bytes_received", "syncmesh_bytes_reused_locally",
                         "syncmesh_bytes_inline"}


def _wrappers() -> list[MetricWrapperBase]:
    found = [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]
    registered = {f.name for f in metrics.REGISTRY.collect() if not f.name.startswith(("process_", "python_"))}
    declared = {m.name for w in found for m in w.describe()}
    assert declared == registered, f"metrics registered outside syncmesh_plugin.metrics: {registered - declared}"
    return found


def _record(w: MetricWrapperBase, child: MetricWrapperBase) -> None:
    if isinstance(child, Counter):
        child.inc()
    elif isinstance(child, Gauge):
        child.set(1)
    elif isinstance(child, Histogram | Summary):
        child.observe(0.1)
    else:
        raise AssertionError(f"{w}: unknown metric type {type(child).__name__}")


def test_every_family_has_bounded_labels_even_before_a_value_is_recorded():
    """Declared label names are checked for every family, and each labelled family records one value so
    its samples (what a scrape shows) are checked too: a family with no sample yet is not skipped."""
    labelled = 0
    for w in _wrappers():
        names = tuple(w._labelnames)
        assert set(names) <= ALLOWED_LABELS, (w.describe()[0].name, names)
        if not names:
            continue
        labelled += 1
        values = [f"probe-{n}" for n in names]
        child = w.labels(*values)
        try:
            _record(w, child)
            [fam] = [f for f in metrics.REGISTRY.collect() if f.name == w.describe()[0].name]
            probe = [s for s in fam.samples if s.labels.get(names[0]) == values[0]]
            assert probe, f"{fam.name}: recorded a value but the scrape shows no sample"
            for sample in probe:
                assert set(sample.labels) - {"le", "quantile"} == set(names), (fam.name, sample.labels)
        finally:
            w.remove(*values)
    assert labelled >= 12  # 12 labelled families today: the check above did run for each of them


def test_metric_names_have_prefix_and_units_consistent_with_type():
    for w in _wrappers():
        [fam] = w.describe()
        name, kind = fam.name, fam.type
        assert name.startswith("syncmesh_"), name
        assert not _NON_BASE_UNITS.search(name), f"{name}: use base units (seconds, bytes)"
        # prometheus_client strips a counter's _total and adds it back on export: a family name never has it
        assert not name.endswith("_total"), f"{name}: only counters end in _total, and only when exported"
        if kind in ("histogram", "summary"):
            assert name.endswith(("_seconds", "_bytes")), f"{name}: a {kind} observes a unit; name it"
        if _TIME_WORDS.search(name) or "seconds" in name:
            assert name.endswith("_seconds"), f"{name}: a time is in seconds and says so at the end"
        if "bytes" in name and name not in _LEGACY_BYTE_COUNTERS:
            assert name.endswith("_bytes"), f"{name}: a size is in bytes and says so at the end"
    # The exposition (what Prometheus scrapes) agrees: counter samples end in _total, nothing else does.
    for fam in metrics.REGISTRY.collect():
        if fam.name.startswith(("process_", "python_")):
            continue
        for s in fam.samples:
            if fam.type == "counter":
                assert s.name.endswith(("_total", "_created")), s.name
            else:
                assert not s.name.endswith("_total"), s.name


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
