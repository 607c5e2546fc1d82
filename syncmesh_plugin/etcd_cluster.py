"""An embedded etcd cluster that grows with the hosts, as k3s grows its embedded etcd.

The first node runs its embedded member alone, on loopback (`make run`, as before). A node started with
`join` (SYNCMESH_JOIN=http://host1:7734, the API of any node of the cluster) and no etcd endpoints of
its own asks that node for a place in the cluster (POST /api/v1/cluster/etcd/members):

- while the cluster has fewer than `etcd.embedded_members` members (3 by default), the node asked adds
  the newcomer's member as a learner through etcd's member API (a learner does not count for quorum, so
  the cluster keeps answering while it catches up), and answers with the initial cluster; the newcomer
  starts its member with `--initial-cluster-state existing` and, once it has caught up, has itself
  promoted to a voting member;
- otherwise the newcomer is a client only: it runs no member and uses the members' client URLs.

A member other hosts must reach listens on the node's own address (its advertise host): the first node
moves its member there (etcd member update, then a restart of its member) when the first member from
another host joins. Every node's endpoints follow the member list, its own member first. A member host
gone for good is removed with `syncmesh-plugin forget NODE` (member names are node ids).

With the cluster's own PKI (security.tls_enabled, the default) the members talk to each other and to
every daemon over mutual TLS with the cluster's certificates, and etcd authentication is on: each node is
an etcd user named by its certificate's common name (its node id). The founder makes the cluster's CA
before its member starts; a newcomer sends a certificate request with the join token's proof
(SYNCMESH_JOIN_TOKEN) along with its join, the node asked has it signed (by the signer, through etcd),
adds the newcomer's etcd user, and answers with the certificate and the cluster's trust bundle, which the
newcomer checks against its token before its member starts. With security.tls_enabled false everything
above runs over plain HTTP with etcd authentication off, as the rest of the cluster does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from .auth import ETCD_JOIN_PATH
from .etcd_embedded import EmbeddedEtcd, is_loopback
from .meta import EtcdStore, EtcdUnavailable

log = logging.getLogger(__name__)


class JoinRefused(RuntimeError):
    """The node asked could not take this node in (yet): the message says why; the join is retried."""


@dataclass(frozen=True)
class JoinPlan:
    """What a joining node does: start a member of `initial_cluster`, or be a client of `endpoints`."""

    member: bool
    initial_cluster: str
    endpoints: list[str]


def cluster_file(data_root: str) -> str:
    return os.path.join(data_root, "etcd", "cluster.json")


def load_role(data_root: str) -> dict[str, Any]:
    """How this node took part last time: {"role": "member"|"client", "endpoints": [...]} ({} if alone)."""
    try:
        with open(cluster_file(data_root)) as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def save_role(data_root: str, role: str, endpoints: list[str]) -> None:
    path = cluster_file(data_root)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"role": role, "endpoints": endpoints}, fh)
    os.replace(tmp, path)


@dataclass(frozen=True)
class JoinAnswer:
    """The plan and the answer's other fields (a certificate and the trust bundle under TLS)."""

    plan: JoinPlan
    body: dict[str, Any]


async def ask_to_join(session: aiohttp.ClientSession, join: str, request: dict[str, Any], timeout: float = 60.0,
                      ssl: Any = True) -> JoinAnswer:
    """Ask the node at `join` for a place in its embedded etcd cluster (the joining side): `request` holds
    node, peer_urls, client_urls and, under TLS without a certificate yet, csr and hmac (`ssl` then pins
    the certificate the node serves)."""
    url = join.rstrip("/") + ETCD_JOIN_PATH
    try:
        async with session.post(url, json=request, ssl=ssl, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                err = body.get("error") if isinstance(body, dict) else body
                raise JoinRefused(f"{join} refused to add this node to its etcd cluster ({resp.status}): {err}")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise JoinRefused(f"cannot ask {join} to join its etcd cluster: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("endpoints"), list):
        raise JoinRefused(f"{join} answered the join with {str(body)[:200]!r}")
    plan = JoinPlan(bool(body.get("member")), str(body.get("initial_cluster", "")),
                    [str(e) for e in body["endpoints"]])
    return JoinAnswer(plan, body)


def _client_urls(members: list[dict[str, Any]], but: str = "") -> list[str]:
    out: list[str] = []
    for m in members:
        if m["name"] and m["name"] != but and not m["learner"]:
            out.extend(u for u in m["client_urls"] if u not in out)
    return out


class EmbeddedCluster:
    """This node's side of the embedded cluster: admit newcomers, forget members, be promoted."""

    def __init__(self, node: str, *, store: Callable[[], EtcdStore | None], embedded: Callable[[], EmbeddedEtcd | None],
                 max_members: int, host: str, auth: bool = False) -> None:
        self.node = node
        self.auth = auth  # etcd authentication by certificate: every node is an etcd user
        self._store = store
        self._embedded = embedded
        self.max_members = max_members
        self.host = host  # where this node's member listens once other hosts must reach it
        self._lock = asyncio.Lock()

    def store(self) -> EtcdStore:
        store = self._store()
        if store is None:
            raise EtcdUnavailable("etcd is not connected")
        return store

    async def admit(self, node: Any, peer_urls: Any, client_urls: Any) -> dict[str, Any]:
        """A newcomer asks for a place: a learner member while the cluster has fewer than max_members members,
        else the client URLs only. Asking again (a retry, a restart before its member started) is harmless."""
        if not isinstance(node, str) or not node or not isinstance(peer_urls, list) or not peer_urls or not all(
                isinstance(u, str) and u.startswith("http") for u in peer_urls):
            raise ValueError("expected {node, peer_urls: [http://host:port], client_urls: [...]}")
        async with self._lock:
            store = self.store()
            if self.auth:
                await store.add_cert_user(node)
            members = await store.member_list()
            mine = [m for m in members if m["name"] == node or set(m["peer_urls"]) & set(peer_urls)]
            endpoints = _client_urls(members, but=node)
            if not mine and len(members) >= self.max_members:
                log.info("etcd: %s joins as a client (the cluster has its %d members)", node, len(members))
                return {"member": False, "initial_cluster": "", "endpoints": endpoints}
            if not mine:
                await self._expose_for(peer_urls)
                _, members = await store.member_add(list(peer_urls), learner=True)
                log.warning("etcd: member %s (%s) added as a learner; it becomes a voting member once it has caught up",
                            node, ", ".join(peer_urls))
                endpoints = _client_urls(members, but=node)
            else:
                members = await store.member_list()
            # every member, by peer URL (etcd checks the list against its own; one not started yet has no name)
            parts = [f"{m['name'] or 'm' + m['id']}={u}" for m in members
                     if m["name"] != node and not set(m["peer_urls"]) & set(peer_urls) for u in m["peer_urls"]]
            parts += [f"{node}={u}" for u in peer_urls]
            return {"member": True, "initial_cluster": ",".join(parts), "endpoints": endpoints}

    async def _expose_for(self, peer_urls: list[str]) -> None:
        """A member on another host is coming: our own member must listen where that host reaches it."""
        emb = self._embedded()
        if emb is None or not is_loopback(emb.host):
            return
        from urllib.parse import urlsplit

        if all(is_loopback(urlsplit(u).hostname or "") for u in peer_urls) or is_loopback(self.host):
            return
        store = self.store()
        me = [m for m in await store.member_list() if m["name"] == self.node]
        if not me:
            raise EtcdUnavailable(f"this node's own etcd member ({self.node}) is not in the member list")
        new_peer = emb.peer_url_on(self.host)
        await store.member_update(int(me[0]["id"], 16), [new_peer])
        log.warning("etcd: this node's member now listens on %s for the other hosts (was loopback only)", self.host)
        await emb.stop()
        await emb.start(host=self.host, existing=True)
        await store.ping()

    async def forget(self, node: str) -> dict[str, Any]:
        """Remove the member named `node` (a host gone for good); never the last one."""
        store = self.store()
        members = await store.member_list()
        gone = [m for m in members if m["name"] == node]
        if self.auth and node != self.node:
            await store.delete_cert_user(node)  # member or client: its certificate no longer opens etcd
        if not gone:
            return {"removed": False}
        if len(members) <= 1:
            raise ValueError(f"{node} runs the cluster's only etcd member: it cannot be removed")
        await store.member_remove(int(gone[0]["id"], 16))
        log.warning("etcd: member %s (%s) removed from the cluster", node, gone[0]["id"])
        return {"removed": True, "id": gone[0]["id"], "members_left": len(members) - 1}

    async def promote_self(self) -> None:
        """Once our learner has caught up, make it a voting member (etcd refuses until it has)."""
        delay = 0.5
        while True:
            with contextlib.suppress(EtcdUnavailable):
                store = self.store()
                me = [m for m in await store.member_list() if m["name"] == self.node]
                if me and not me[0]["learner"]:
                    return
                if me:
                    try:
                        await store.member_promote(int(me[0]["id"], 16))
                        log.warning("etcd: this node's member is now a voting member")
                        return
                    except EtcdUnavailable as exc:
                        if "not in sync" not in str(exc) and "not a learner" not in str(exc):
                            log.info("etcd: promotion of this node's member not done yet: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 3.0)
