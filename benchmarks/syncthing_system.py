"""Syncthing as a benchmark system: N real `syncthing serve` processes on loopback, full mesh, one folder.

Setup per node i (everything under `self.base/node<i>`):
  home/    `syncthing generate --home` output (cert, key, config.xml) plus the index database
  folder-<id>/  the shared folder copy (a fresh one per `reset()`)
  syncthing.log

Configuration (written into config.xml before the first start, folders added over the REST API):
  * GUI/REST on 127.0.0.1:<free port> with a known API key, sync protocol on tcp://127.0.0.1:<free port>;
    every peer is configured with its explicit address, so nothing listens on or dials anything but 127.0.0.1.
  * global and local discovery, relays, NAT traversal (UPnP/NAT-PMP), usage and crash reporting and
    auto-upgrade all off; `--no-browser --no-restart --no-upgrade`, STNODEFAULTFOLDER=1, STNOUPGRADE=1,
    and proxy variables removed from the environment.
  * setLowPriority=false: by default syncthing renices itself (and lowers its I/O priority); the other
    systems run at normal priority, so this one does too.
  * The folder: sendreceive, shared with every device, rescanIntervalS=3600, the filesystem watcher on
    with the shortest delay this version accepts (1 s; see WATCHER_DELAY_S). Everything else (fsync,
    hashers, copiers, compression=metadata, ...) stays at syncthing's defaults.

peer_bytes() sums `total.outBytesTotal` of /rest/system/connections over the nodes: the bytes each
syncthing wrote to its peer connections, i.e. file data plus BEP protocol overhead (index updates,
cluster configs, pings, request headers), counted above TLS. Counters of a restarted node are carried
over so the sum stays monotonic.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from systems import System, proc_stats

from syncmesh_plugin.etcd_embedded import free_port

# fsWatcherDelayS is an integer number of seconds in syncthing 1.19 (config version 36): 0.5 is rejected
# ("cannot unmarshal number 0.5 ... of type int") and 0 turns the watcher off (fsWatcherEnabled=false,
# delay back to 10 s). 1 s is the minimum; changes are then picked up ~1 s after they happen.
WATCHER_DELAY_S = 1
START_TIMEOUT = 60.0
IDLE_TIMEOUT = 120.0


def _wait(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `cond` until truthy; errors from a not-yet-ready daemon count as "not yet"."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = cond()
            if last:
                return last
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"syncthing: timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


class _Node:
    def __init__(self, root: Path, binary: str, env: dict[str, str]) -> None:
        self.root = root
        self.home = root / "home"
        self.binary = binary
        self.env = env
        self.gui_port = free_port()
        self.listen_port = free_port()
        self.api_key = uuid.uuid4().hex
        self.device_id = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._worker: tuple[int, int] | None = None  # (monitor pid, worker pid)
        self._ev_since = 0
        self._scanned: set[str] = set()  # folders with a scanning -> idle transition in this process
        self.log_path = root / "syncthing.log"
        # no proxy handler at all: REST calls go straight to 127.0.0.1 whatever the environment says
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # ------------------------------------------------------------ process
    def generate(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        out = subprocess.run([self.binary, "generate", "--home", str(self.home), "--no-default-folder",
                              "--skip-port-probing"], env=self.env, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"syncthing generate failed ({out.returncode}): {out.stdout}{out.stderr}")
        root = ET.parse(self.home / "config.xml").getroot()
        dev = root.find("device")
        if dev is None or not dev.get("id"):
            raise RuntimeError(f"syncthing generate: no device id in {self.home / 'config.xml'}")
        self.device_id = dev.get("id", "")

    def start(self) -> None:
        self._ev_since = 0
        self._scanned.clear()
        self._worker = None
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [self.binary, "serve", "--home", str(self.home), "--no-browser", "--no-restart", "--no-upgrade",
                 "--logflags=3"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                start_new_session=True)
        finally:
            log.close()

    def scanned(self, folder: str) -> bool:
        """Has this process finished a scan of `folder`? (StateChanged events, buffered from startup)"""
        if folder not in self._scanned:
            for ev in self.api("GET", f"/rest/events?since={self._ev_since}&timeout=0", timeout=5) or []:
                self._ev_since = max(self._ev_since, int(ev["id"]))
                d = ev.get("data") or {}
                if ev.get("type") == "StateChanged" and d.get("from") == "scanning" and d.get("to") == "idle":
                    self._scanned.add(str(d.get("folder")))
        return folder in self._scanned

    def stop(self, timeout: float = 20.0) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.api("POST", "/rest/system/shutdown", timeout=2)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)
        # the worker normally exits with the monitor; anything left in the node's session goes now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        self.proc = None

    def worker_pid(self) -> int:
        """The monitor's child if it has one (the process doing the work), else the process itself."""
        assert self.proc is not None
        pid = self.proc.pid
        if self._worker and self._worker[0] == pid and Path(f"/proc/{self._worker[1]}").exists():
            return self._worker[1]
        children: list[str] = []
        for task in Path(f"/proc/{pid}/task").glob("*"):  # Go forks from whichever thread it is on
            with contextlib.suppress(OSError):
                children += (task / "children").read_text().split()
        if len(children) == 1:
            self._worker = (pid, int(children[0]))
            return self._worker[1]
        return pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # ------------------------------------------------------------ REST
    def api(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.gui_port}{path}", data=data, method=method,
                                     headers={"X-API-Key": self.api_key, "Content-Type": "application/json"})
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            raise ValueError(f"{method} {path}: HTTP {exc.code} {detail}") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw.decode(errors="replace")


class Syncthing(System):
    name = "syncthing"

    def __init__(self, base: Path, nodes: int) -> None:
        super().__init__(base, nodes)
        binary = shutil.which("syncthing")
        if binary is None:
            raise RuntimeError("syncthing binary not found on PATH: install it with `apt-get install -y syncthing` "
                               "(the Debian package, tested with 1.19.2)")
        self.binary = binary
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(STNODEFAULTFOLDER="1", STNOUPGRADE="1", STNORESTART="1")
        self.env = env
        self.nodes: list[_Node] = []
        self.folder = ""
        self._bytes_carried = 0  # outBytesTotal of nodes' earlier incarnations (restart_node)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.nodes = [_Node(self.base / f"node{i}", self.binary, self.env) for i in range(self.n)]
        for nd in self.nodes:
            nd.generate()
        for nd in self.nodes:
            self._write_config(nd)
        try:
            for nd in self.nodes:
                nd.start()
            for nd in self.nodes:
                self._wait_up(nd)
            self._wait_connected()
            self.reset()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for nd in self.nodes:
            with contextlib.suppress(OSError, ValueError):
                if nd.alive():
                    nd.api("POST", "/rest/system/shutdown", timeout=2)
        for nd in self.nodes:
            nd.stop()

    def reset(self) -> None:
        old = self.folder
        self.folder = f"bench-{uuid.uuid4().hex[:8]}"
        dirs = [nd.root / f"folder-{self.folder}" for nd in self.nodes]
        devices = [{"deviceID": nd.device_id} for nd in self.nodes]
        for nd, d in zip(self.nodes, dirs, strict=True):
            if old:
                nd.api("DELETE", f"/rest/config/folders/{old}")
            nd.api("POST", "/rest/config/folders", {
                "id": self.folder, "label": self.folder, "path": str(d), "type": "sendreceive",
                "devices": devices, "rescanIntervalS": 3600, "fsWatcherEnabled": True,
                "fsWatcherDelayS": WATCHER_DELAY_S, "paused": False})
        self.dirs = dirs
        for nd in self.nodes:
            self._wait_folder_ready(nd, IDLE_TIMEOUT, "the new folder")
        # 1.19's REST API does not say whether a peer shares the folder with us yet (no "remoteState" in
        # /rest/db/completion), so the cluster-config handshake is confirmed from the log line each node
        # prints when a peer announces the new folder. Only a readiness gate: convergence is never
        # judged from logs.
        for nd in self.nodes:
            _wait(lambda nd=nd: self._peers_announced(nd), IDLE_TIMEOUT,
                  f"peers announcing folder {self.folder} to {nd.root.name}")
        if old:
            for nd in self.nodes:
                shutil.rmtree(nd.root / f"folder-{old}", ignore_errors=True)

    # Workload 6: Syncthing's latency is its watcher delay (1 s minimum), ~1 s per probe; 50 probes say
    # as much as 200 and keep `make bench` under 15 minutes.
    latency_probes = 50

    def setup_mode(self, on: bool) -> None:
        """Workload 10 only measures a restart: while its 100,000 files are being carried (setup, not
        measured) the folder skips fsync, which otherwise dominates Syncthing's small-file rate here."""
        for nd in self.nodes:
            nd.api("PATCH", f"/rest/config/folders/{self.folder}", {"disableFsync": on})
        for nd in self.nodes:
            self._wait_folder_ready(nd, IDLE_TIMEOUT, "the folder after a config change")

    def pids(self) -> list[int]:
        """The worker process of each node.

        syncthing 1.19 always runs as a monitor process plus one child that does all the work, even with
        --no-restart (the monitor then just doesn't restart it). The child is the one measured; the monitor
        is idle (~15 MB RSS, no CPU), see extra()["monitor_rss_mb"].
        """
        return [nd.worker_pid() for nd in self.nodes if nd.alive()]

    def peer_bytes(self) -> int:
        total = self._bytes_carried
        for nd in self.nodes:
            if nd.alive():
                total += int(nd.api("GET", "/rest/system/connections")["total"]["outBytesTotal"])
        return total

    def restart_node(self, i: int) -> float:
        nd = self.nodes[i]
        with contextlib.suppress(OSError, ValueError, KeyError):
            self._bytes_carried += int(nd.api("GET", "/rest/system/connections")["total"]["outBytesTotal"])
        nd.stop()
        t0 = time.monotonic()
        nd.start()
        self._wait_up(nd, timeout=300)
        self._wait_folder_ready(nd, 300, "the restarted node", interval=0.05)
        return time.monotonic() - t0

    def extra(self) -> dict[str, Any]:
        mon = [proc_stats(nd.proc.pid)[0] for nd in self.nodes if nd.proc is not None and nd.alive()]
        return {"syncthing_version": self._version(),
                "monitor_rss_mb": round(max(mon) / 2**20, 1) if mon else 0.0}

    def remove_base(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    # ------------------------------------------------------------ helpers
    def _version(self) -> str:
        for nd in self.nodes:
            if nd.alive():
                with contextlib.suppress(OSError, ValueError, KeyError):
                    return str(nd.api("GET", "/rest/system/version")["version"])
        return ""

    def _write_config(self, nd: _Node) -> None:
        path = nd.home / "config.xml"
        tree = ET.parse(path)
        root = tree.getroot()

        gui = root.find("gui")
        assert gui is not None
        gui.set("enabled", "true")
        gui.set("tls", "false")
        _set(gui, "address", f"127.0.0.1:{nd.gui_port}")
        _set(gui, "apikey", nd.api_key)

        opts = root.find("options")
        assert opts is not None
        for tag in ("listenAddress", "globalAnnounceServer"):
            for el in opts.findall(tag):
                opts.remove(el)
        ET.SubElement(opts, "listenAddress").text = f"tcp://127.0.0.1:{nd.listen_port}"
        for tag, value in {
            "globalAnnounceEnabled": "false", "localAnnounceEnabled": "false", "relaysEnabled": "false",
            "natEnabled": "false", "startBrowser": "false", "urAccepted": "-1", "urSeen": "3",
            "autoUpgradeIntervalH": "0", "crashReportingEnabled": "false", "announceLANAddresses": "false",
            "setLowPriority": "false", "restartOnWakeup": "false", "reconnectionIntervalS": "5",
        }.items():
            _set(opts, tag, value)

        # every device knows every other one, by explicit loopback address
        template = root.find("defaults/device")
        for dev in root.findall("device"):
            root.remove(dev)
        for k, other in enumerate(self.nodes):
            dev = copy.deepcopy(template) if template is not None else ET.Element("device")
            dev.tag = "device"
            dev.set("id", other.device_id)
            dev.set("name", f"node{k}")
            for el in dev.findall("address"):
                dev.remove(el)
            ET.SubElement(dev, "address").text = f"tcp://127.0.0.1:{other.listen_port}"
            root.insert(k, dev)
        tree.write(path)

    def _wait_up(self, nd: _Node, timeout: float = START_TIMEOUT) -> None:
        def up() -> bool:
            if not nd.alive():
                raise RuntimeError(f"syncthing {nd.root.name} exited early:\n{nd.log_tail()}")
            return bool(nd.api("GET", "/rest/system/status", timeout=2).get("myID"))

        try:
            _wait(up, timeout, f"{nd.root.name} REST API on 127.0.0.1:{nd.gui_port}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{nd.log_tail()}") from None

    def _peers_announced(self, nd: _Node) -> bool:
        text = nd.log_path.read_text(errors="replace")
        return all(f'Device {o.device_id[:7]} folder "{self.folder}"' in text for o in self.nodes if o is not nd)

    def _connected(self, nd: _Node) -> bool:
        conns = nd.api("GET", "/rest/system/connections", timeout=2)["connections"]
        return all(conns.get(o.device_id, {}).get("connected") for o in self.nodes if o is not nd)

    def _wait_connected(self) -> None:
        for nd in self.nodes:
            _wait(lambda nd=nd: self._connected(nd), START_TIMEOUT, f"{nd.root.name} connected to all peers")

    def _folder_ready(self, nd: _Node) -> bool:
        """Scanned by this process, idle with nothing needed and no errors, connected to every peer."""
        if not nd.alive():
            raise RuntimeError(f"syncthing {nd.root.name} exited:\n{nd.log_tail()}")
        st = nd.api("GET", f"/rest/db/status?folder={self.folder}", timeout=2)
        if st.get("state") != "idle" or st.get("needTotalItems", 1) != 0 or st.get("error"):
            return _NotYet(f"state {st.get('state')}, need {st.get('needTotalItems')}, error {st.get('error')!r}")
        if not nd.scanned(self.folder):
            return _NotYet("no completed scan since the folder was added / the process started")
        if not self._connected(nd):
            return _NotYet("not connected to all peers")
        return True

    def _wait_folder_ready(self, nd: _Node, timeout: float, what: str,
                           interval: float = 0.1) -> None:
        try:
            _wait(lambda: self._folder_ready(nd), timeout,
                  f"{what}: folder {self.folder} idle on {nd.root.name}", interval=interval)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{nd.log_tail()}") from None


class _NotYet(str):
    """A falsy reason for "not ready yet", shown in timeout errors."""

    def __bool__(self) -> bool:
        return False


def _set(parent: ET.Element, tag: str, value: str) -> None:
    el = parent.find(tag)
    if el is None:
        el = ET.SubElement(parent, tag)
    el.text = value
