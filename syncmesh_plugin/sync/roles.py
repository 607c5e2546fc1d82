"""Who may write a volume, and what this node's replica does with local and remote changes. Pure.

A volume's `writers` option names the nodes whose changes the cluster takes (unset: every node).
A node not listed holds a receive-only replica: it applies the cluster's changes and never publishes
its own; what is written locally stays local, shown as local changes, until `revert` (Syncthing's
"Revert Local Changes"). An operator may set a node's role for one volume whatever `writers` says:
`receive-only`, or `send-only` (publishes local changes, never applies remote ones; `override`
pushes its whole state over the cluster's, Syncthing's "Override Changes").
"""

from __future__ import annotations

import re
from collections.abc import Collection
from enum import StrEnum

NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")


class Role(StrEnum):
    SEND_RECEIVE = "send-receive"
    RECEIVE_ONLY = "receive-only"
    SEND_ONLY = "send-only"


def parse_writers(value: str) -> tuple[str, ...]:
    """`n1,n2` -> ("n1", "n2"): node ids, each as `node_id` allows; ValueError otherwise."""
    names = tuple(dict.fromkeys(p.strip() for p in value.split(",") if p.strip()))
    if not names or any(not NODE_RE.fullmatch(n) for n in names):
        raise ValueError(value)
    return names


def parse_role(value: str) -> Role | None:
    """An operator's role for this node ("" or "default": whatever `writers` says)."""
    text = value.strip().lower()
    if text in ("", "default"):
        return None
    return Role(text)  # ValueError for anything else


def effective_role(node: str, writers: Collection[str], override: Role | None) -> Role:
    if override is not None:
        return override
    if writers and node not in writers:
        return Role.RECEIVE_ONLY
    return Role.SEND_RECEIVE


def accepted_origin(origin: str, writers: Collection[str]) -> bool:
    """Is a manifest published by `origin` one the cluster takes? (A mistake guard, not security: a
    member with write access to the etcd prefix can forge any origin.)"""
    return not writers or origin in writers
