"""What a root test suite may not leave changed on the machine it runs on (issue 20).

`snapshot()` records the host's network links, IPv4/IPv6 routes, iptables/ip6tables rules, mount
points, the legacy plugin directory /run/docker/plugins, a few files dockerd writes (its trust key),
and, when a Docker engine answers on the default socket, that engine's networks, containers, volumes,
images and plugins. `compare()` names every difference between two snapshots. The e2e suite
(tests/e2e/conftest.py) and the chaos suite (tests/chaos/conftest.py) take one snapshot before their
first test and fail at the end of the session if the second one differs.

Normalisation (what is not a difference):
- iptables: packet/byte counters and comment lines; a built-in chain with policy ACCEPT and no rules
  (an empty table appears after the first `iptables -I`/`-D` pair on a host that had no rules; it
  filters nothing).
- links: operational state (carrier, LOWER_UP); admin state, index, mtu and master are compared.
- routes: `expires` counters of routes learned from router advertisements, the linkdown/dead flags.

`release_netns_dir()` undoes what `ip netns add` does on its first use on a host (it bind-mounts
/run/netns onto itself) when the directory is empty again and was not a mount point before.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

PLUGIN_DIR = "/run/docker/plugins"
HOST_ENGINE = "unix:///var/run/docker.sock"
NETNS_DIR = "/run/netns"
# Files and directories whose mere existence is host state that a private dockerd or `ip netns` could create.
WATCHED_PATHS = ("/etc/docker/key.json", "/run/docker", NETNS_DIR, "/run/containerd")
BUILTIN_CHAINS = {"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"}
PRIVILEGED_TOOLS = ("ip", "iptables-save", "ip6tables-save")


class GuardError(RuntimeError):
    """The snapshot could not be taken (a tool is missing or failed)."""


@dataclass
class Snapshot:
    """category -> multiset of normalised lines; `order` holds the per-chain rule order of iptables."""

    parts: dict[str, collections.Counter[str]] = field(default_factory=dict)
    order: dict[str, list[str]] = field(default_factory=dict)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise GuardError(f"{name} not found: the host guard needs it (apt-get install iproute2 iptables docker.io)")
    return path


def _run(cmd: list[str], timeout: float = 30) -> str:
    res = subprocess.run([_tool(cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise GuardError(f"{' '.join(cmd)} -> rc {res.returncode}: {res.stderr.strip()}")
    return res.stdout


def links(text: str) -> list[str]:
    """`ip -o link show` -> 'name #index UP|DOWN mtu N master M' (operational state left out)."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^(\d+):\s+([^:@]+)(?:@[^:]+)?:\s+<([^>]*)>(.*)$", line)
        if not m:
            continue
        idx, name, flags, rest = m.groups()
        admin = "UP" if "UP" in flags.split(",") else "DOWN"
        mtu = re.search(r"\bmtu (\d+)", rest)
        master = re.search(r"\bmaster (\S+)", rest)
        out.append(f"{name} #{idx} {admin} mtu {mtu.group(1) if mtu else '?'} "
                   f"master {master.group(1) if master else '-'}")
    return out


def routes(text: str) -> list[str]:
    """`ip route show table all` lines without the operational flags (linkdown, dead) and `expires` counters."""
    out = []
    for ln in text.splitlines():
        ln = re.sub(r"\s+expires \S+", "", ln)
        ln = re.sub(r"\s+(linkdown|dead)\b", "", ln).strip()
        if ln:
            out.append(ln)
    return out


def iptables(text: str, family: str) -> tuple[list[str], dict[str, list[str]]]:
    """iptables-save output -> ('<family> <table> <line>' without counters, {table/chain: [rules in order]})."""
    table = ""
    policies: dict[tuple[str, str], str] = {}
    rules: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            name, policy = [*line[1:].split(), "-"][:2]
            policies[(table, name)] = policy
        else:
            line = re.sub(r"^\[\d+:\d+\]\s+", "", line)  # iptables-save -c style counters
            parts = line.split()
            chain = parts[1] if len(parts) > 1 and parts[0] in ("-A", "-I") else "?"
            rules[(table, chain)].append(line)
    out = []
    for (tbl, chain), policy in sorted(policies.items()):
        if chain in BUILTIN_CHAINS and policy == "ACCEPT" and not rules.get((tbl, chain)):
            continue
        out.append(f"{family} {tbl} :{chain} {policy}")
    order = {}
    for (tbl, chain), rs in sorted(rules.items()):
        out.extend(f"{family} {tbl} {r}" for r in rs)
        order[f"{family} {tbl} {chain}"] = rs
    return out, order


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(text: str) -> list[str]:
    """/proc/self/mountinfo -> 'mount point (fstype source)'."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or " - " not in line:
            continue
        fstype, source = ([*line.split(" - ", 1)[1].split(), "-", "-"])[:2]
        out.append(f"{_unescape(fields[4])} ({fstype} {_unescape(source)})")
    return out


def mount_point(line: str) -> str:
    return line.rsplit(" (", 1)[0]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISLNK, "symlink"), (stat.S_ISREG, "file")):
        if test(mode):
            return name
    return "other"


def tree(root: str) -> list[str]:
    """Every entry at or below root as 'path (kind)'; ['root (absent)'] when it does not exist."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return [f"{root} (absent)"]
    out = [f"{root} ({_kind(st.st_mode)})"]
    if stat.S_ISDIR(st.st_mode):
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                try:
                    out.append(f"{p} ({_kind(os.lstat(p).st_mode)})")
                except FileNotFoundError:
                    continue
    return out


def paths(watched: Iterable[str]) -> list[str]:
    return [f"{p} ({'present' if os.path.lexists(p) else 'absent'})" for p in watched]


def engine(host: str = HOST_ENGINE) -> dict[str, list[str]]:
    """The Docker engine on `host`: its objects, or {'docker engine': ['not answering']}."""
    sock = host.removeprefix("unix://")
    if not os.path.exists(sock):
        return {"docker engine": [f"{host}: no socket"]}
    docker = ["docker", "-H", host]
    res = subprocess.run([_tool("docker"), *docker[1:], "version", "--format", "{{.Server.Version}}"],
                         capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        return {"docker engine": [f"{host}: not answering"]}
    queries = {
        "docker networks": ["network", "ls", "--no-trunc", "--format", "{{.ID}} {{.Name}} {{.Driver}} {{.Scope}}"],
        "docker containers": ["ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Names}} {{.Image}}"],
        "docker volumes": ["volume", "ls", "--format", "{{.Driver}} {{.Name}}"],
        "docker images": ["image", "ls", "-a", "--no-trunc", "--format", "{{.ID}} {{.Repository}}:{{.Tag}}"],
        "docker plugins": ["plugin", "ls", "--no-trunc", "--format", "{{.ID}} {{.Name}} {{.Enabled}}"],
    }
    out = {"docker engine": [f"{host}: answering"]}
    for cat, args in queries.items():
        out[cat] = [ln.strip() for ln in _run([*docker, *args]).splitlines() if ln.strip()]
    return out


def snapshot(privileged: bool | None = None, plugin_dir: str = PLUGIN_DIR, host_engine: str = HOST_ENGINE,
             watched: Iterable[str] = WATCHED_PATHS) -> Snapshot:
    """Everything compare() checks. Unprivileged (not root): links, routes, mounts and paths only."""
    if privileged is None:
        privileged = os.geteuid() == 0
    s = Snapshot()

    def put(cat: str, lines: Iterable[str]) -> None:
        s.parts[cat] = collections.Counter(lines)

    put("links", links(_run(["ip", "-o", "link", "show"])))
    put("routes", routes(_run(["ip", "-4", "route", "show", "table", "all"]))
        + routes(_run(["ip", "-6", "route", "show", "table", "all"])))
    with open("/proc/self/mountinfo") as fh:
        put("mounts", mounts(fh.read()))
    put("paths", paths(watched))
    if privileged:
        rules, order = iptables(_run(["iptables-save"]), "ipv4")
        rules6, order6 = iptables(_run(["ip6tables-save"]), "ipv6")
        put("iptables", rules + rules6)
        s.order = {**order, **order6}
        put("plugin sockets", tree(plugin_dir))
        for cat, lines in engine(host_engine).items():
            put(cat, lines)
    return s


def compare(before: Snapshot, after: Snapshot, ignore: Iterable[str] = ()) -> list[str]:
    """One line per difference: '<category>: gone: <line>' / 'new: <line>' / 'rule order changed'.

    Lines containing any of `ignore` are left out (the names another suite gives its own resources,
    so that its concurrent run is not reported as ours).
    """
    skip = tuple(ignore)
    diffs = []
    for cat in sorted(set(before.parts) | set(after.parts)):
        b, a = before.parts.get(cat, collections.Counter()), after.parts.get(cat, collections.Counter())
        for line in sorted((b - a).elements()):
            if not any(x in line for x in skip):
                diffs.append(f"{cat}: gone: {line}")
        for line in sorted((a - b).elements()):
            if not any(x in line for x in skip):
                diffs.append(f"{cat}: new: {line}")
    for chain, rules in sorted(before.order.items()):
        now = after.order.get(chain)
        if (now is not None and now != rules and sorted(now) == sorted(rules)
                and not any(x in r for r in rules for x in skip)):
            diffs.append(f"iptables: rule order changed in {chain}: {rules} -> {now}")
    return diffs


def _is_mountpoint(path: str) -> bool:
    with open("/proc/self/mountinfo") as fh:
        return any(mount_point(m) == path for m in mounts(fh.read()))


def release_netns_dir(before: Snapshot) -> None:
    """Undo `ip netns add`'s one-time setup when the host had no /run/netns mount (or directory) before.

    Only while the directory is empty: a plain `umount` (not lazy) fails while a namespace is still
    mounted in it, so a concurrent user of `ip netns` keeps its namespaces.
    """
    was_mounted = any(mount_point(m) == NETNS_DIR for m in before.parts.get("mounts", {}))
    existed = f"{NETNS_DIR} (present)" in before.parts.get("paths", {})
    if not os.path.isdir(NETNS_DIR) or os.listdir(NETNS_DIR):
        return
    if not was_mounted:
        for _ in range(4):  # `ip netns add` may have stacked more than one bind mount
            if not _is_mountpoint(NETNS_DIR):
                break
            if subprocess.run(["umount", NETNS_DIR], capture_output=True).returncode != 0:
                return
    if not existed and not _is_mountpoint(NETNS_DIR):
        try:
            os.rmdir(NETNS_DIR)
        except OSError:
            pass


def report(suite: str, diffs: list[str]) -> str:
    lines = [f"{suite} left the host changed ({len(diffs)} difference(s) between before and after the suite):"]
    lines += [f"  - {d}" for d in diffs]
    return "\n".join(lines)
