"""The OpenAPI document of the node API (openapi.json next to this module) and a small checker.

`check(doc, schema, value)` validates a JSON value against the subset of JSON Schema the document
uses (type, required, properties, items, enum, allOf, additionalProperties, $ref), so tests can hold
every live response to the document without a dependency.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

_TYPES: dict[str, tuple[type, ...]] = {"object": (dict,), "array": (list,), "string": (str,),
                                       "integer": (int,), "number": (int, float), "boolean": (bool,),
                                       "null": (type(None),)}


def load() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath("openapi.json").read_text())


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = doc
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def response_schema(doc: dict[str, Any], path: str, method: str, status: int,
                    ctype: str = "application/json") -> dict[str, Any]:
    resp = doc["paths"][path][method.lower()]["responses"][str(status)]
    resp = resolve(doc, resp)
    return resp["content"][ctype]["schema"]


def check(doc: dict[str, Any], schema: dict[str, Any], value: Any, where: str = "$") -> list[str]:
    """Problems found (empty: the value conforms)."""
    schema = resolve(doc, schema)
    errors: list[str] = []
    for sub in schema.get("allOf", []):
        errors += check(doc, sub, value, where)
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        ok = any(isinstance(value, _TYPES[t]) and not (t in ("integer", "number") and isinstance(value, bool))
                 for t in names)
        if not ok:
            return [*errors, f"{where}: expected {'/'.join(names)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not one of {schema['enum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing required {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, v in value.items():
            if key in props:
                errors += check(doc, props[key], v, f"{where}.{key}")
            elif isinstance(extra, dict):
                errors += check(doc, extra, v, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += check(doc, schema["items"], v, f"{where}[{i}]")
    return errors
