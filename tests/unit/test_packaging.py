"""config.json against the daemon's configuration: every declared variable is one the daemon accepts."""

from __future__ import annotations

import json
from pathlib import Path

from syncmesh_plugin.config import env_name, key_paths, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_config_json_env_matches_daemon_settings() -> None:
    cfg = json.loads((ROOT / "config.json").read_text())
    env = {e["name"]: e for e in cfg["env"]}
    known = {env_name(p) for p in key_paths()}
    declared = {n for n in env if n.startswith("SYNCMESH_")} - {"SYNCMESH_CONFIG"}
    assert declared <= known, declared - known
    # every user-facing setting is declared (data root and socket are fixed by the plugin layout)
    assert known - declared == set(), known - declared
    # the defaults exported into the plugin load cleanly, exactly as the plugin process sees them
    loaded = load_config(None, {n: e["value"] for n, e in env.items() if n.startswith("SYNCMESH_")})
    assert loaded.data_root == cfg["propagatedMount"] == "/var/lib/syncmesh"
    assert loaded.plugin.socket == "/run/docker/plugins/" + cfg["interface"]["socket"]
    assert loaded.embedded_etcd
    for fixed in ("SYNCMESH_DATA_ROOT", "SYNCMESH_PLUGIN_SOCKET"):
        assert "settable" not in env[fixed]
    assert all(m["options"] and "rbind" in m["options"] for m in cfg["mounts"])
    assert cfg["interface"]["types"] == ["docker.volumedriver/1.0"]
    assert cfg["network"]["type"] == "host" and "CAP_SYS_ADMIN" in cfg["linux"]["capabilities"]
