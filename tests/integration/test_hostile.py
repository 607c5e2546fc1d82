"""Hostile input from etcd or a peer: nothing is written outside the volume, nothing wrong is believed."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import xxhash
from conftest import converged, wait_for, write


def _manifest_file(data: bytes, origin: str = "evil") -> bytes:
    import base64

    return json.dumps({"k": "file", "o": origin, "ts": time.time(), "m": 0o644, "u": 0, "g": 0, "s": len(data),
                       "t": time.time_ns(), "d": xxhash.xxh3_128_hexdigest(data),
                       "i": base64.b64encode(data).decode()}).encode()


def test_hostile_paths_from_etcd_are_rejected(cluster, etcd, volume, tmp_path):
    a, b = cluster("n1"), cluster("n2")
    a.ok("VolumeDriver.Create", {"Name": volume})
    a.mount(volume)
    b.mount(volume)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, a.vol(volume) / "escape")  # a legitimate symlink, synced to n2 as a symlink
    converged([a, b], volume, expect=lambda t: "escape" in t)
    files = f"{cluster.prefix}/files/{volume}/"
    evil = {
        "../../../../evil-dotdot": b"x",
        "/abs/evil": b"x",
        "a/../../evil": b"x",
        "escape/through-symlink.txt": b"must not land in outside/",
        "nul\x00byte": b"x",
        "x" * 300: b"x",
    }
    for rel, data in evil.items():
        etcd.put(files.encode() + rel.encode(), _manifest_file(data))
    etcd.put(f"{files}garbage.json", b"{not json")
    etcd.put(f"{files}huge.bin", json.dumps({"k": "file", "o": "evil", "m": 420, "u": 0, "g": 0, "s": 2**50,
                                             "t": 0, "d": "0" * 32, "c": [["0" * 32, 2**50]]}).encode())
    # a good change after the bad ones still arrives: the node kept serving and syncing
    write(a.vol(volume) / "after.txt", "fine")
    converged([a, b], volume, expect=lambda t: "after.txt" in t)
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "evil-dotdot").exists()
    for n in (a, b):
        names = set(os.listdir(n.vol(volume)))
        assert names == {"escape", "after.txt"}, names
        assert n.http("GET", "/api/v1/health")[0] == 200
        _, metrics = n.http("GET", "/metrics")
        rejected = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.decode().splitlines()
                       if line.startswith("syncmesh_rejected_input_total"))
        assert rejected >= 5


class _LyingPeer(BaseHTTPRequestHandler):
    """Answers every chunk request with bytes that do not match the chunk id."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        out = b""
        for cid in body["ids"]:
            frame = b"\x00" + b"lies" * 1000
            out += struct.pack(">16sBI", bytes.fromhex(cid), 1, len(frame)) + frame
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self) -> None:
        frame = b"\x00" + b"lies" * 1000
        self.send_response(200)
        self.send_header("Content-Length", str(len(frame)))
        self.end_headers()
        self.wfile.write(frame)

    def log_message(self, *args: object) -> None:
        pass


def test_peer_serving_wrong_bytes_is_not_believed(cluster, etcd, volume):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LyingPeer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        a = cluster("n1")
        a.ok("VolumeDriver.Create", {"Name": volume})
        a.mount(volume)
        port = server.server_address[1]
        etcd.put(f"{cluster.prefix}/nodes/liar", json.dumps(
            {"node_id": "liar", "advertise": f"http://127.0.0.1:{port}", "identity": "x"}).encode())
        etcd.put(f"{cluster.prefix}/holders/{volume}/liar", b"{}")
        real = os.urandom(100_000)
        cid = xxhash.xxh3_128_hexdigest(real)
        etcd.put(f"{cluster.prefix}/files/{volume}/wanted.bin", json.dumps(
            {"k": "file", "o": "liar", "ts": time.time(), "m": 420, "u": 0, "g": 0, "s": len(real),
             "t": time.time_ns(), "d": cid, "c": [[cid, len(real)]]}).encode())

        def corrupt_seen() -> bool:
            _, body = a.http("GET", "/metrics")
            return any(line.startswith("syncmesh_corrupt_chunks_total") and float(line.split()[-1]) > 0
                       for line in body.decode().splitlines())

        wait_for(corrupt_seen, 15, what="the corrupt chunk to be counted")
        assert not (a.vol(volume) / "wanted.bin").exists()
        assert not [p for p in Path(a.vol(volume)).iterdir() if p.name.startswith(".syncmesh-tmp-")]
        assert a.http("GET", "/api/v1/health")[0] == 200
    finally:
        server.shutdown()
