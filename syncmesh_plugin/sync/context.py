"""What the engine needs from the daemon, and nothing else (no HTTP routes, no Docker)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..meta import EtcdStore
from ..state import LocalState
from ..watcher import InotifyHub


@dataclass
class EngineContext:
    """What the engine needs from the daemon, and nothing else (no HTTP routes, no Docker)."""

    node_id: str
    data_root: str
    state: LocalState
    conflict_default: str
    keep_copies_default: bool
    interval: float
    debounce: float
    get_store: Callable[[], EtcdStore | None]
    etcd_ready: asyncio.Event
    fetch: Callable[[str, list[str], list[str]], Awaitable[dict[str, bytes]]]
    peers: Callable[[str, str, bool], Awaitable[list[str]]]  # (volume, origin, spread load)
    emit: Callable[[str, dict[str, Any]], None] = lambda kind, data: None
    mass_delete_threshold: float = 0.5
    mass_delete_min_files: int = 20
    mass_delete_window: float = 10.0
    max_manifest_bytes: int = 512 * 1024
    inotify: InotifyHub = field(default_factory=InotifyHub)  # one inotify instance for all the volumes
