"""Structured logs: one JSON object per line by default (text with log_format: text)."""

from __future__ import annotations

import json
import logging
import sys
import time

_EXTRA_FIELDS = ("volume", "path", "node", "duration", "peer", "count")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _EXTRA_FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _NodeField(logging.Filter):
    """Every line names the node it comes from (a field set explicitly, e.g. a peer's id, wins)."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "node"):
            record.node = self.node
        return True


def setup_logging(level: str, fmt: str, node: str = "") -> None:
    # stdout: dockerd records a managed plugin's stdout at info level and its stderr at error level.
    handler = logging.StreamHandler(sys.stdout)
    if node:
        handler.addFilter(_NodeField(node))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc/aiohttp access logs are noise at info level.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("etcd3aio").setLevel(logging.ERROR if level != "debug" else logging.DEBUG)
