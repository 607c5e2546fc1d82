"""The operations API, events, metrics, logs and admin CLI on a real two-node cluster."""

from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import time

from conftest import converged, wait_for, write

from syncmesh_plugin import openapi
from syncmesh_plugin.devcluster import BIN

DOC = openapi.load()


def checked(node, path, status=200, doc_path=None, method="GET"):
    code, body = node.http(method, path)
    assert code == status, (path, code, body)
    schema = openapi.response_schema(DOC, doc_path or path.split("?")[0], method, status)
    problems = openapi.check(DOC, schema, body)
    assert not problems, (path, problems[:5])
    return body


def cli(node, *args):
    r = subprocess.run([str(BIN), *args], env=node.env, capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr


def test_ops_api_events_cli_and_logs(cluster, volume, etcd):
    a = cluster("n1", SYNCMESH_LOG_FORMAT="json")
    b = cluster("n2")
    a.ok("VolumeDriver.Create", {"Name": volume})
    b.mount(volume)
    # b listens to its event stream before anything is written on a
    conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=20)
    conn.request("GET", "/api/v1/events?backlog=0")
    stream = conn.getresponse()
    assert stream.status == 200 and stream.getheader("Content-Type").startswith("text/event-stream")
    write(a.vol(volume) / "docs/hello.txt", "hello")
    converged([a, b], volume, expect=lambda t: "docs/hello.txt" in t)
    for i in range(300):  # a burst: progress summaries, never a log line per file
        write(a.vol(volume) / f"bulk/f{i:03d}.bin", os.urandom(64) * (i % 7 + 1))
    write(a.vol(volume) / "big.bin", os.urandom(300_000))
    converged([a, b], volume, expect=lambda t: "big.bin" in t and len(t) >= 304)

    # the event stream delivered "applied" for the new file on b
    deadline, seen = time.monotonic() + 15, []
    while time.monotonic() < deadline:
        line = stream.readline().decode()
        if line.startswith("data: "):
            ev = json.loads(line[6:])
            seen.append(ev["kind"])
            if ev["kind"] == "applied" and "docs/hello.txt" in ev["data"]["paths"]:
                assert ev["node"] == "n2" and ev["data"]["volume"] == volume
                break
    else:
        raise AssertionError(f"no applied event for docs/hello.txt on n2 (saw {seen})")
    conn.close()

    # every node's applied revision reaches the latest change (published at most once a second)
    def all_converged():
        body = checked(a, f"/api/v1/volumes/{volume}", doc_path="/api/v1/volumes/{name}")
        conv = body["convergence"]
        done = all(n["converged"] and n["live"] for n in conv["nodes"])
        return conv if done and {n["node"] for n in conv["nodes"]} == {"n1", "n2"} else None

    conv = wait_for(all_converged, 15, what="convergence reported for both nodes")
    # the latest change is read from the volume's head key, rewritten by every publish transaction
    # (one get instead of etcd sorting the volume's keys), and it is the newest manifest's revision
    files = base64.b64encode(f"{cluster.prefix}/files/{volume}/".encode()).decode()
    files_end = base64.b64encode(f"{cluster.prefix}/files/{volume}0".encode()).decode()
    newest = etcd.etcd_api("/v3/kv/range", {"key": files, "range_end": files_end, "keys_only": True,
                                            "sort_order": "DESCEND", "sort_target": "MOD", "limit": 1})
    head = etcd.etcd_api("/v3/kv/range", {"key": base64.b64encode(f"{cluster.prefix}/head/{volume}".encode()).decode()})
    assert conv["latest_revision"] == int(head["kvs"][0]["mod_revision"]) == int(newest["kvs"][0]["mod_revision"])

    health = checked(b, "/api/v1/health")
    assert set(health["components"]) >= {"plugin_socket", "etcd", "watchers", "peers"}
    assert health["components"]["peers"]["peers"]["n1"]["circuit"] == "closed"
    checked(a, "/api/v1/info")
    status = checked(a, "/api/v1/cluster/status")
    assert status["leader"] == "n1" and [n["node_id"] for n in status["nodes"]] == ["n1", "n2"]
    assert all(n["lag_revisions"] == 0 for n in status["nodes"]) and status["etcd"]["members"]
    nodes = checked(b, "/api/v1/cluster/nodes")
    assert {n["node_id"]: n["volumes"] for n in nodes["nodes"]} == {"n1": [volume], "n2": [volume]}
    sync = checked(b, "/api/v1/sync/status")["volumes"][0]
    assert sync["volume"] == volume and sync["files"] == 304 and sync["pending"] == 0 and sync["ready"]
    checked(a, "/api/v1/volumes")

    # paging: every page within the limit, together exactly the index
    paths, cursor = [], ""
    while True:
        page = checked(b, f"/api/v1/volumes/{volume}/files?prefix=bulk/&limit=64" + (f"&cursor={cursor}" if cursor
                                                                                      else ""),
                       doc_path="/api/v1/volumes/{name}/files")
        assert len(page["files"]) <= 64
        paths += [f["path"] for f in page["files"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert paths == [f"bulk/f{i:03d}.bin" for i in range(300)]

    f = checked(a, f"/api/v1/volumes/{volume}/files/docs/hello.txt", doc_path="/api/v1/volumes/{name}/files/{path}")
    assert f["manifest"]["kind"] == "file" and f["local"]["state"] == "in_sync"
    assert sorted(f["nodes_with_version"]) == ["n1", "n2"], (f["nodes"], f["manifest"])
    checked(a, f"/api/v1/volumes/{volume}/conflicts", doc_path="/api/v1/volumes/{name}/conflicts")
    dig = checked(b, f"/api/v1/volumes/{volume}/digests", doc_path="/api/v1/volumes/{name}/digests")
    assert len(dig["entries"]) == 304  # 302 files + 2 directories
    checked(a, "/api/v1/events/recent?limit=5")

    # errors: JSON, right status
    for path, status in [(f"/api/v1/volumes/nope{volume}", 404), (f"/api/v1/volumes/{volume}/files?limit=0", 400),
                         (f"/api/v1/volumes/{volume}/files?limit=x", 400),
                         (f"/api/v1/volumes/{volume}/files?cursor=%%%", 400),
                         (f"/api/v1/volumes/{volume}/files/nothing/here", 404),
                         (f"/api/v1/volumes/nope{volume}/conflicts", 404)]:
        code, body = a.http("GET", path)
        assert code == status and isinstance(body, dict) and body["error"], (path, code, body)

    # POST .../sync: a file damaged on disk without a visible stat change is fetched again
    p = b.vol(volume) / "big.bin"
    good, st = p.read_bytes(), p.stat()
    with open(p, "r+b") as fh:
        fh.seek(1000)
        fh.write(bytes([good[1000] ^ 0xFF]))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    res = checked(b, f"/api/v1/volumes/{volume}/files/big.bin/sync", method="POST",
                  doc_path="/api/v1/volumes/{name}/files/{path}/sync")
    assert res["action"] == "refetch" and p.read_bytes() == good
    res = checked(b, f"/api/v1/volumes/{volume}/files/big.bin/sync", method="POST",
                  doc_path="/api/v1/volumes/{name}/files/{path}/sync")
    assert res["action"] == "none"

    # metrics that only the ops loop keeps current
    code, prom = b.http("GET", "/metrics")
    text = prom.decode()
    assert "syncmesh_cluster_nodes 2.0" in text and "syncmesh_cluster_leader 0.0" in text
    assert 'syncmesh_operations_applied_total{kind="file"}' in text
    assert 'syncmesh_peer_circuit_open{peer="n1"} 0.0' in text
    assert f'syncmesh_pending_items{{volume="{volume}"}} 0.0' in text

    # admin CLI, configured by the same environment as the daemon
    code, out = cli(a, "status")
    assert code == 0 and "cluster   2 node(s), leader n1" in out and volume in out
    code, out = cli(b, "verify", volume)
    assert code == 0 and f"{volume}: identical on 2 node(s)" in out and "304 path(s)" in out
    code, out = cli(b, "inspect", volume, "--json")
    assert code == 0 and json.loads(out)["convergence"]["converged"]
    code, out = cli(b, "watch", "--until-converged", "--count", "5", "--interval", "0.2")
    assert code == 0 and "all converged" in out and "100.0%" in out
    code, out = cli(b, "inspect", "nope" + volume)
    assert code == 1 and "no such volume" in out

    # logs: JSON lines with the node's id, and no line per file at info level
    lines = [json.loads(x) for x in a.log().splitlines() if x.startswith("{")]
    assert lines and all(x["node"] == "n1" for x in lines)
    assert not [x for x in a.log().splitlines() + b.log().splitlines() if "bulk/f" in x]

    # a peer going away is an event
    b.stop()
    wait_for(lambda: any(e["kind"] == "peer_down" and e["data"]["node"] == "n2"
                         for e in a.http("GET", "/api/v1/events/recent")[1]["events"]), 15, what="peer_down event")
