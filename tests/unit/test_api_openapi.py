"""The OpenAPI document stays true: every route is documented, every documented path exists, refs resolve."""

from __future__ import annotations

import re

import pytest

from syncmesh_plugin import openapi
from syncmesh_plugin.config import load_config
from syncmesh_plugin.daemon import Daemon


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNCMESH_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("SYNCMESH_NODE_ID", "n1")
    monkeypatch.setenv("SYNCMESH_ETCD_ENDPOINTS", "http://127.0.0.1:1")
    return Daemon(load_config(None)).http_app()


def _routes(app) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "OPTIONS"):
            continue
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter")
        out.add((re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path), route.method.lower()))
    return out


def test_every_route_is_documented_and_every_documented_route_exists(app):
    doc = openapi.load()
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    routes = _routes(app)
    assert routes - documented == set(), "routes missing from openapi.json"
    assert documented - routes == set(), "openapi.json documents routes that do not exist"


def test_refs_resolve_and_operations_are_described():
    doc = openapi.load()
    assert doc["openapi"].startswith("3.")

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                openapi.resolve(doc, node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op.get("summary"), f"{method} {path} has no summary"
            assert "200" in op["responses"], f"{method} {path} documents no 200"
            for name in re.findall(r"\{(\w+)\}", path):
                assert any(p["name"] == name and p["in"] == "path" for p in op.get("parameters", [])), (path, name)


def test_checker_catches_mismatches():
    doc = openapi.load()
    schema = {"$ref": "#/components/schemas/Error"}
    assert openapi.check(doc, schema, {"error": "x", "status": 404}) == []
    assert openapi.check(doc, schema, {"status": 404})  # error is required
    assert openapi.check(doc, schema, {"error": 3})
    page = {"$ref": "#/components/schemas/FilePage"}
    assert openapi.check(doc, page, {"volume": "v", "files": [], "next_cursor": None}) == []
    assert openapi.check(doc, page, {"volume": "v", "files": [{"path": "a"}], "next_cursor": None})
