"""Measure how long this machine's dockerd waits for a volume plugin's Mount (issue 15).

A volume plugin that answers every call but never answers VolumeDriver.Mount, in private dockerds (own
network and mount namespaces, as in the e2e tests), and `docker run -v VOL:/data` against it: how long
until `docker run` fails, with which error text, and when dockerd closed the Mount connection.

- legacy: the stall server on the host, its socket in the dockerd's /run/docker/plugins.
- managed: the same server as a managed plugin (rootfs: plugin/dist's, which has python3; build it
  first with `make plugin` or the e2e suite), enabled with `docker plugin enable` at the CLI's default
  --timeout (30 s), and once more with --timeout 0 (what `docker plugin install` and a dockerd restart use).

Run as root: `.venv/bin/python tests/e2e/mount_timeout.py [legacy] [managed30] [managed0]` (all by
default, in parallel, about two and a half minutes). Prints one line per case and a JSON summary.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_harness import IMAGE, ROOT, Dockerd, busybox_rootfs_tar, log, make_tempdir, unmount_under

# A volume plugin in stdlib Python: every call answers at once, except Mount, which never does. Each
# Mount's arrival and the moment dockerd closed that connection are printed (to dockerd's log for a
# managed plugin).
STALL = r'''
import json, os, socketserver, sys, time
from http.server import BaseHTTPRequestHandler

SOCK = sys.argv[1]
ROOTDIR = sys.argv[2]


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def address_string(self):
        return "unix"

    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.docker.plugins.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        req = json.loads(self.rfile.read(n) or b"{}") if n else {}
        name = req.get("Name", "")
        path = os.path.join(ROOTDIR, name)
        if self.path == "/Plugin.Activate":
            return self.reply({"Implements": ["VolumeDriver"]})
        if self.path == "/VolumeDriver.Capabilities":
            return self.reply({"Capabilities": {"Scope": "local"}})
        if self.path == "/VolumeDriver.Create":
            os.makedirs(path, exist_ok=True)
            return self.reply({"Err": ""})
        if self.path == "/VolumeDriver.Get":
            if os.path.isdir(path):
                return self.reply({"Volume": {"Name": name, "Mountpoint": path}, "Err": ""})
            return self.reply({"Err": "no such volume"})
        if self.path == "/VolumeDriver.List":
            return self.reply({"Volumes": [{"Name": v} for v in os.listdir(ROOTDIR)], "Err": ""})
        if self.path == "/VolumeDriver.Path":
            return self.reply({"Mountpoint": path, "Err": ""})
        if self.path == "/VolumeDriver.Mount":
            t0 = time.time()
            print(f"STALL mount-received {t0:.3f}", flush=True)
            self.connection.settimeout(None)
            while self.connection.recv(4096):  # until dockerd gives up and closes the connection
                pass
            print(f"STALL mount-closed-by-dockerd {time.time():.3f} after {time.time() - t0:.1f}s", flush=True)
            self.close_connection = True
            return
        if self.path in ("/VolumeDriver.Unmount", "/VolumeDriver.Remove"):
            if self.path.endswith("Remove"):
                os.rmdir(path)
            return self.reply({"Err": ""})
        self.reply({"Err": "unsupported"})


class S(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


os.makedirs(ROOTDIR, exist_ok=True)
if os.path.exists(SOCK):
    os.unlink(SOCK)
S(SOCK, H).serve_forever()
'''

STALL_CONFIG: dict[str, Any] = {
    "description": "never answers VolumeDriver.Mount (dockerd timeout measurement)",
    "documentation": "https://example.invalid/",
    "entrypoint": ["/usr/bin/python3", "/stall.py", "/run/docker/plugins/stall.sock", "/var/lib/stall"],
    "workdir": "/",
    "interface": {"types": ["docker.volumedriver/1.0"], "socket": "stall.sock"},
    "network": {"type": "none"},
    "propagatedMount": "/var/lib/stall",
    "linux": {"capabilities": []},
}


def measure_run(d: Dockerd, driver: str, case: str, results: dict[str, Any]) -> None:
    vol = f"stall-{case}"
    d.cli("volume", "create", "-d", driver, vol)
    t0 = time.monotonic()
    res = d.cli("run", "--rm", "-v", f"{vol}:/data", IMAGE, "true", check=False, timeout=600)
    took = time.monotonic() - t0
    results[case] = {"docker_run_seconds": round(took, 1), "docker_run_rc": res.returncode,
                     "docker_run_stderr": res.stderr.strip()}
    log(f"{case}: docker run failed after {took:.1f}s (rc {res.returncode}): {res.stderr.strip()}")


def legacy(work: Path, tar: Path, results: dict[str, Any]) -> None:
    d = Dockerd(work / "legacy").start()
    srv = None
    try:
        d.import_busybox(tar)
        with open(work / "legacy-stall.log", "wb") as logf:
            srv = subprocess.Popen([sys.executable, "-c", STALL, str(d.plugins_dir / "stall.sock"),
                                    str(work / "legacy-vols")], stdout=logf, stderr=logf, start_new_session=True)
        deadline = time.monotonic() + 10
        while not (d.plugins_dir / "stall.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        measure_run(d, "stall", "legacy", results)
        time.sleep(1)
        results["legacy"]["plugin_side"] = [ln for ln in (work / "legacy-stall.log").read_text().splitlines()
                                            if ln.startswith("STALL")]
    finally:
        if srv is not None:
            srv.terminate()
            srv.wait(10)
        d.stop()


def managed(work: Path, tar: Path, enable_timeout: int, results: dict[str, Any]) -> None:
    case = f"managed-enable-timeout-{enable_timeout}"
    dist = ROOT / "plugin" / "dist" / "rootfs"
    if not (dist / "usr" / "bin" / "python3").exists():
        raise RuntimeError("plugin/dist/rootfs is missing: run `make plugin` (or plugin/build.sh with NO_CREATE=1)")
    pdir = work / f"stall-plugin-{enable_timeout}"
    (pdir / "rootfs").mkdir(parents=True)
    subprocess.run(["cp", "-al", f"{dist}/.", str(pdir / "rootfs")], check=True)
    (pdir / "rootfs" / "stall.py").write_text(STALL)
    (pdir / "rootfs" / "var" / "lib" / "stall").mkdir(parents=True, exist_ok=True)
    (pdir / "config.json").write_text(json.dumps(STALL_CONFIG))
    d = Dockerd(work / f"managed{enable_timeout}").start()
    ref = "stall/stall:1"
    try:
        d.import_busybox(tar)
        d.cli("plugin", "create", ref, str(pdir), timeout=300)
        shutil.rmtree(pdir, ignore_errors=True)
        d.cli("plugin", "enable", "--timeout", str(enable_timeout), ref)
        measure_run(d, ref, case, results)
        time.sleep(1)
        results[case]["plugin_side"] = [ln.split("STALL ", 1)[1].split('"', 1)[0] for ln in
                                        (d.base / "dockerd.log").read_text(errors="replace").splitlines()
                                        if "STALL" in ln]
        d.cli("volume", "rm", "-f", f"stall-{case}", check=False)
    finally:
        d.stop()


def main(argv: list[str]) -> int:
    cases = argv or ["legacy", "managed30", "managed0"]
    work = make_tempdir("smtimeout-")
    results: dict[str, Any] = {"dockerd": subprocess.run(["dockerd", "--version"], capture_output=True,
                                                         text=True).stdout.strip()}
    errors: list[str] = []
    try:
        tar = busybox_rootfs_tar(work)
        jobs = {"legacy": lambda: legacy(work, tar, results),
                "managed30": lambda: managed(work, tar, 30, results),
                "managed0": lambda: managed(work, tar, 0, results)}

        def guarded(name: str) -> None:
            try:
                jobs[name]()
            except Exception as exc:  # reported below
                errors.append(f"{name}: {exc}")

        threads = [threading.Thread(target=guarded, args=(c,)) for c in cases]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        unmount_under(str(work))
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    for e in errors:
        print("ERROR", e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
