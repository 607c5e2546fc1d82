"""Tests for syncmesh_plugin.config (load_config, as_dict, advertise_url) and the `config show` CLI."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from syncmesh_plugin import config as config_mod
from syncmesh_plugin.cli import main
from syncmesh_plugin.config import Config, ConfigError, Duration, Secret, as_dict, env_name, key_paths, load_config


def write(tmp_path: Path, text: str, name: str = "syncmesh.yaml") -> str:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


@pytest.fixture
def hostname(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A stable host name, so the defaulted node_id does not depend on the machine running the tests."""
    monkeypatch.setattr(config_mod.socket, "gethostname", lambda: "testhost.example.com")
    yield


@pytest.fixture
def certs(tmp_path: Path) -> tuple[str, str]:
    cert = tmp_path / "node.crt"
    key = tmp_path / "node.key"
    cert.write_text("cert")
    key.write_text("key")
    return str(cert), str(key)


# ---- defaults


def test_defaults_without_file_or_env(hostname: None) -> None:
    cfg = load_config(None, {})
    assert cfg.node_id == "testhost"
    assert cfg.log_level == "info"
    assert cfg.log_format == "json"
    assert cfg.data_root == "/var/lib/syncmesh"
    assert cfg.plugin.socket == "/run/docker/plugins/syncmesh.sock"
    assert (cfg.server.host, cfg.server.port, cfg.server.advertise) == ("0.0.0.0", 7734, "")
    assert cfg.etcd.endpoints == []
    assert cfg.embedded_etcd is True
    assert cfg.etcd.prefix == "/syncmesh/v1"
    assert cfg.etcd.timeout == 5.0
    assert cfg.etcd.lease_ttl == 10
    assert cfg.sync.interval == 30.0
    assert cfg.sync.conflict_resolution == "timestamp"
    assert cfg.sync.compression_enabled is True
    assert cfg.sync.keep_conflict_copies is True
    assert cfg.sync.mount_timeout == 25.0
    assert cfg.security.tls_enabled is True and cfg.tls_mode == "auto"  # the cluster's own CA (issue 19)
    assert cfg.security.cert_lifetime == 30 * 86400.0
    assert cfg.security.client_cert_required is False and cfg.security.trust_etcd is False
    assert cfg.join_token == ""
    assert cfg.security.auth_enabled is False
    assert cfg.monitoring.enabled is True
    assert cfg.state_dir == "/var/lib/syncmesh/state"
    assert cfg.volumes_dir == "/var/lib/syncmesh/volumes"


def test_empty_yaml_file_means_defaults(tmp_path: Path, hostname: None) -> None:
    assert load_config(write(tmp_path, ""), {}) == load_config(None, {})


def test_env_name_and_key_paths_cover_every_leaf() -> None:
    paths = key_paths()
    assert paths["etcd.endpoints"] == list[str]
    assert paths["sync.interval"] is Duration
    assert paths["etcd.password"] is Secret
    assert "etcd" not in paths  # sections are not leaves
    assert env_name("etcd.endpoints") == "SYNCMESH_ETCD_ENDPOINTS"
    assert env_name("node_id") == "SYNCMESH_NODE_ID"


# ---- YAML file values


def test_yaml_values_are_applied(tmp_path: Path, hostname: None, certs: tuple[str, str]) -> None:
    cert, key = certs
    path = write(tmp_path, f"""
node_id: node-a
log_level: debug
log_format: text
data_root: /srv/syncmesh
server:
  host: 10.0.0.5
  port: 8000
etcd:
  endpoints: [http://10.0.0.1:2379, "https://etcd.example:2379"]
  prefix: /custom
  password: s3cret
  timeout: 2s
  lease_ttl: 4
sync:
  interval: 2m
  conflict_resolution: manual
  compression_enabled: false
  keep_conflict_copies: no
  mount_timeout: 100s
  debounce: 10ms
security:
  tls_enabled: true
  tls_cert_file: {cert}
  tls_key_file: {key}
  auth_enabled: true
  auth_tokens: [tok1, tok2]
monitoring:
  enabled: off
""")
    cfg = load_config(path, {})
    assert cfg.node_id == "node-a"
    assert cfg.log_level == "debug"
    assert cfg.log_format == "text"
    assert cfg.data_root == "/srv/syncmesh"
    assert cfg.state_dir == "/srv/syncmesh/state"
    assert cfg.server.host == "10.0.0.5"
    assert cfg.server.port == 8000
    assert cfg.etcd.endpoints == ["http://10.0.0.1:2379", "https://etcd.example:2379"]
    assert cfg.embedded_etcd is False
    assert cfg.etcd.prefix == "/custom"
    assert cfg.etcd.password == "s3cret"
    assert isinstance(cfg.etcd.password, Secret)
    assert cfg.etcd.timeout == 2.0
    assert isinstance(cfg.etcd.timeout, Duration)
    assert cfg.etcd.lease_ttl == 4
    assert cfg.sync.interval == 120.0
    assert cfg.sync.conflict_resolution == "manual"
    assert cfg.sync.compression_enabled is False
    assert cfg.sync.keep_conflict_copies is False
    assert cfg.sync.mount_timeout == 100.0
    assert cfg.sync.debounce == pytest.approx(0.01)
    assert cfg.security.tls_enabled is True
    assert cfg.security.auth_tokens == ["tok1", "tok2"]
    assert all(isinstance(t, Secret) for t in cfg.security.auth_tokens)
    assert cfg.monitoring.enabled is False


def test_yaml_numbers_for_durations_and_strings(tmp_path: Path, hostname: None) -> None:
    cfg = load_config(write(tmp_path, "sync:\n  interval: 90\n  mount_timeout: 2.5\netcd:\n  username: 1234\n"), {})
    assert cfg.sync.interval == 90.0
    assert cfg.sync.mount_timeout == 2.5
    assert cfg.etcd.username == "1234"  # a YAML number where a string is expected is accepted as its text


# ---- environment


def test_env_overrides_file(tmp_path: Path, hostname: None) -> None:
    path = write(tmp_path, "server:\n  port: 1000\netcd:\n  endpoints: [http://file:1]\nsync:\n"
                           "  compression_enabled: true\n")
    cfg = load_config(path, {
        "SYNCMESH_SERVER_PORT": "2000",
        "SYNCMESH_ETCD_ENDPOINTS": "http://a:1,http://b:2",
        "SYNCMESH_SYNC_COMPRESSION_ENABLED": "false",
    })
    assert cfg.server.port == 2000
    assert cfg.etcd.endpoints == ["http://a:1", "http://b:2"]
    assert cfg.sync.compression_enabled is False


def test_env_endpoint_list_trims_and_drops_empty_items(hostname: None) -> None:
    cfg = load_config(None, {"SYNCMESH_ETCD_ENDPOINTS": " http://a:1 , ,http://b:2,"})
    assert cfg.etcd.endpoints == ["http://a:1", "http://b:2"]


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("2s", 2.0), ("2m", 120.0), ("1h", 3600.0), ("1.5", 1.5), (" 3 s ", 3.0),
])
def test_env_durations(hostname: None, text: str, seconds: float) -> None:
    cfg = load_config(None, {"SYNCMESH_ETCD_TIMEOUT": text})
    assert cfg.etcd.timeout == pytest.approx(seconds)
    assert isinstance(cfg.etcd.timeout, Duration)


@pytest.mark.parametrize(("text", "ok"), [("1s", True), ("25s", True), ("110s", True), ("500ms", False),
                                          ("111s", False), ("2m", False)])
def test_mount_timeout_stays_inside_dockerds_deadline(hostname: None, text: str, ok: bool) -> None:
    env = {"SYNCMESH_SYNC_MOUNT_TIMEOUT": text}
    if ok:
        assert load_config(None, env).sync.mount_timeout > 0
    else:
        with pytest.raises(ConfigError, match=r"sync\.mount_timeout.*dockerd gives a volume plugin's Mount 120 s"):
            load_config(None, env)


def test_env_sync_interval_units(hostname: None) -> None:
    assert load_config(None, {"SYNCMESH_SYNC_INTERVAL": "2m"}).sync.interval == 120.0
    assert load_config(None, {"SYNCMESH_SYNC_DEBOUNCE": "500ms"}).sync.debounce == pytest.approx(0.5)


def test_sync_interval_below_one_second_is_rejected(hostname: None) -> None:
    # 500ms parses to 0.5 s, but the rescan interval has a floor of 1 s.
    with pytest.raises(ConfigError, match=r"^sync\.interval: expected a duration of at least 1s, got '0\.5s'$"):
        load_config(None, {"SYNCMESH_SYNC_INTERVAL": "500ms"})


@pytest.mark.parametrize(("text", "value"), [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True), (" True ", True),
    ("0", False), ("false", False), ("no", False), ("Off", False),
])
def test_env_booleans(hostname: None, text: str, value: bool) -> None:
    assert load_config(None, {"SYNCMESH_MONITORING_ENABLED": text}).monitoring.enabled is value


def test_non_syncmesh_env_and_syncmesh_config_are_ignored(hostname: None) -> None:
    cfg = load_config(None, {"PATH": "/bin", "HOME": "/root", "SYNCMESH_CONFIG": "/etc/whatever.yaml"})
    assert cfg == load_config(None, {})


def test_env_string_values(hostname: None) -> None:
    cfg = load_config(None, {"SYNCMESH_NODE_ID": "n1", "SYNCMESH_ETCD_PASSWORD": "pw"})
    assert cfg.node_id == "n1"
    assert cfg.etcd.password == "pw"
    assert isinstance(cfg.etcd.password, Secret)


# ---- errors


def test_unknown_yaml_key_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, "sync:\n  intervall: 5s\n"), {})
    msg = str(ei.value)
    assert msg.startswith("sync.intervall: unknown key")
    assert "sync.interval" in msg  # lists the valid keys of that section
    assert "etcd.endpoints" not in msg
    assert "\n" not in msg


def test_unknown_top_level_yaml_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^bogus: unknown key \(valid keys: .*node_id"):
        load_config(write(tmp_path, "bogus: 1\n"), {})


def test_section_given_a_scalar(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^etcd: expected a mapping of settings, got 5$"):
        load_config(write(tmp_path, "etcd: 5\n"), {})


def test_unknown_syncmesh_env_var_names_it() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"SYNCMESH_SYNC_INTERVALL": "5s"})
    msg = str(ei.value)
    assert msg.startswith("SYNCMESH_SYNC_INTERVALL: unknown setting")
    assert "SYNCMESH_SYNC_INTERVAL," in msg or "SYNCMESH_SYNC_INTERVAL)" in msg


@pytest.mark.parametrize(("yaml_text", "expected"), [
    ('server:\n  port: "abc"\n', "server.port: expected an integer, got 'abc'"),
    ("server:\n  port: 1.5\n", "server.port: expected an integer, got 1.5"),
    ("server:\n  port: true\n", "server.port: expected an integer, got True"),
    ("sync:\n  compression_enabled: maybe\n",
     "sync.compression_enabled: expected a boolean (true/false), got 'maybe'"),
    ("sync:\n  compression_enabled: 1\n", "sync.compression_enabled: expected a boolean (true/false), got 1"),
    ("sync:\n  interval: soon\n", "sync.interval: expected a duration such as 30s, 500ms, 2m, got 'soon'"),
    ("sync:\n  interval: -5\n", "sync.interval: expected a duration such as 30s, 500ms, 2m, got -5"),
    ("sync:\n  interval: true\n", "sync.interval: expected a duration such as 30s, 500ms, 2m, got True"),
    ("etcd:\n  endpoints: {a: 1}\n",
     "etcd.endpoints: expected a list of strings (comma-separated in the environment), got {'a': 1}"),
    ("node_id: [a]\n", "node_id: expected a string, got ['a']"),
    ("node_id: true\n", "node_id: expected a string, got True"),
])
def test_wrong_type_in_yaml(tmp_path: Path, yaml_text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, yaml_text), {})
    assert str(ei.value) == expected


@pytest.mark.parametrize(("env", "expected"), [
    ({"SYNCMESH_SERVER_PORT": "abc"}, "SYNCMESH_SERVER_PORT: expected an integer, got 'abc'"),
    ({"SYNCMESH_SYNC_COMPRESSION_ENABLED": "maybe"},
     "SYNCMESH_SYNC_COMPRESSION_ENABLED: expected a boolean (true/false), got 'maybe'"),
    ({"SYNCMESH_SYNC_INTERVAL": "5 parsecs"},
     "SYNCMESH_SYNC_INTERVAL: expected a duration such as 30s, 500ms, 2m, got '5 parsecs'"),
])
def test_wrong_type_in_env_names_the_variable(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(None, env)
    assert str(ei.value) == expected


def test_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"^config file not found: .*nope\.yaml$"):
        load_config(missing, {})


def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: [1,\n  host: x\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path, {})
    msg = str(ei.value)
    assert msg.startswith(f"config file {path}: cannot read it as YAML")
    assert "\n" not in msg


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping of settings at the top level"):
        load_config(write(tmp_path, "- a\n- b\n"), {})


def test_bad_conflict_mode() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"SYNCMESH_SYNC_CONFLICT_RESOLUTION": "newest"})
    assert str(ei.value) == "sync.conflict_resolution: expected one of timestamp, size, manual, got 'newest'"


@pytest.mark.parametrize("root", ["var/lib/syncmesh", "./x", ""])
def test_relative_or_empty_data_root(root: str) -> None:
    with pytest.raises(ConfigError, match=r"^data_root: expected an absolute path"):
        load_config(None, {"SYNCMESH_DATA_ROOT": root})


@pytest.mark.parametrize("endpoint", ["ftp://a:1", "http://a", "a b:1", "http://a:1/path", "http://a:123456"])
def test_bad_etcd_endpoint(endpoint: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"SYNCMESH_ETCD_ENDPOINTS": endpoint})
    assert str(ei.value).startswith("etcd.endpoints: expected URLs like http://10.0.0.5:2379")
    assert repr(endpoint) in str(ei.value)


@pytest.mark.parametrize("endpoint", ["10.0.0.1:2379", "http://[::1]:2379", "https://etcd-1.example.com:2379"])
def test_good_etcd_endpoints(hostname: None, endpoint: str) -> None:
    assert load_config(None, {"SYNCMESH_ETCD_ENDPOINTS": endpoint}).etcd.endpoints == [endpoint]


@pytest.mark.parametrize(("env", "prefix"), [
    ({"SYNCMESH_LOG_LEVEL": "verbose"}, "log_level: expected one of debug, info, warning, error"),
    ({"SYNCMESH_LOG_FORMAT": "xml"}, "log_format: expected one of json, text"),
    ({"SYNCMESH_SERVER_PORT": "70000"}, "server.port: expected a port number 0-65535"),
    ({"SYNCMESH_SERVER_PORT": "-1"}, "server.port: expected a port number 0-65535"),
    ({"SYNCMESH_PLUGIN_SOCKET": "rel.sock"}, "plugin.socket: expected an absolute path"),
    ({"SYNCMESH_ETCD_PREFIX": "syncmesh"}, "etcd.prefix: expected a path like /syncmesh/v1"),
    ({"SYNCMESH_ETCD_PREFIX": "/syncmesh/"}, "etcd.prefix: expected a path like /syncmesh/v1"),
    ({"SYNCMESH_ETCD_LEASE_TTL": "1"}, "etcd.lease_ttl: expected an integer >= 2"),
    ({"SYNCMESH_NODE_ID": "-bad"}, "node_id: expected letters, digits"),
    ({"SYNCMESH_NODE_ID": "a" * 64}, "node_id: expected letters, digits"),
    ({"SYNCMESH_NODE_ID": "has space"}, "node_id: expected letters, digits"),
])
def test_semantic_validation(env: dict[str, str], prefix: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(None, env)
    assert str(ei.value).startswith(prefix)


def test_tls_enabled_without_cert_files_means_the_clusters_own_ca() -> None:
    # Before issue 19 this was an error; now it is the default: the cluster's CA issues the certificates.
    assert load_config(None, {"SYNCMESH_SECURITY_TLS_ENABLED": "true"}).tls_mode == "auto"
    assert load_config(None, {"SYNCMESH_SECURITY_TLS_ENABLED": "false"}).tls_mode == "off"


def test_tls_cert_without_key_and_ca_without_cert(certs: tuple[str, str]) -> None:
    cert, _ = certs
    with pytest.raises(ConfigError, match=r"^security.tls_cert_file and security.tls_key_file: give both"):
        load_config(None, {"SYNCMESH_SECURITY_TLS_CERT_FILE": cert})
    with pytest.raises(ConfigError, match=r"^security.tls_ca_file: goes with security.tls_cert_file"):
        load_config(None, {"SYNCMESH_SECURITY_TLS_CA_FILE": cert})


def test_join_token_is_checked_and_never_echoed() -> None:
    good = "SM1" + "ab" * 32 + "::" + "s" * 43
    cfg = load_config(None, {"SYNCMESH_JOIN_TOKEN": good})
    assert cfg.join_token == good and as_dict(cfg)["join_token"] == "********"
    bad = "SM1" + "ab" * 31 + "::secret-that-must-not-leak-xxxxxxxxxxxxxxxxxxx"
    with pytest.raises(ConfigError, match=r"^join_token: expected the token") as ei:
        load_config(None, {"SYNCMESH_JOIN_TOKEN": bad})
    assert "must-not-leak" not in str(ei.value)


@pytest.mark.parametrize(("text", "ok"), [("10s", True), ("30d", True), ("825d", True), ("9s", False),
                                          ("826d", False)])
def test_cert_lifetime_bounds(text: str, ok: bool) -> None:
    env = {"SYNCMESH_SECURITY_CERT_LIFETIME": text}
    if ok:
        assert load_config(None, env).security.cert_lifetime > 0
    else:
        with pytest.raises(ConfigError, match=r"^security.cert_lifetime: expected a duration between 10s and 825d"):
            load_config(None, env)


def test_tls_cert_file_that_does_not_exist(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.crt")
    key = tmp_path / "k"
    key.write_text("k")
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"SYNCMESH_SECURITY_TLS_ENABLED": "true", "SYNCMESH_SECURITY_TLS_CERT_FILE": missing,
                           "SYNCMESH_SECURITY_TLS_KEY_FILE": str(key)})
    assert str(ei.value) == f"security.tls_cert_file: file not found: {missing}"


def test_etcd_ca_file_that_does_not_exist(tmp_path: Path) -> None:
    missing = str(tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match=r"^etcd\.tls_ca_file: file not found: "):
        load_config(None, {"SYNCMESH_ETCD_TLS_CA_FILE": missing})


def test_auth_enabled_without_tokens() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"SYNCMESH_SECURITY_AUTH_ENABLED": "yes"})
    assert str(ei.value) == "security.auth_enabled: needs at least one token in security.auth_tokens"
    with pytest.raises(ConfigError, match="auth_tokens"):
        load_config(None, {"SYNCMESH_SECURITY_AUTH_ENABLED": "yes", "SYNCMESH_SECURITY_AUTH_TOKENS": " , "})


def test_auth_enabled_with_tokens(hostname: None) -> None:
    cfg = load_config(None, {"SYNCMESH_SECURITY_AUTH_ENABLED": "yes", "SYNCMESH_SECURITY_AUTH_TOKENS": "t1,t2"})
    assert cfg.security.auth_tokens == ["t1", "t2"]


# ---- node_id from the host name


@pytest.mark.parametrize(("host", "node_id"), [
    ("web01.example.com", "web01"),
    ("My Host!", "My-Host-"),
    ("h\u00f4te", "h-te"),
    ("x" * 80, "x" * 63),
    ("", "node"),
    (".local", "node"),
])
def test_node_id_defaults_to_sanitized_hostname(monkeypatch: pytest.MonkeyPatch, host: str, node_id: str) -> None:
    monkeypatch.setattr(config_mod.socket, "gethostname", lambda: host)
    assert load_config(None, {}).node_id == node_id


def test_explicit_node_id_wins_over_hostname(hostname: None) -> None:
    assert load_config(None, {"SYNCMESH_NODE_ID": "explicit"}).node_id == "explicit"




def test_defaulted_node_id_obeys_the_node_id_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_mod.socket, "gethostname", lambda: "_build-host")
    node_id = load_config(None, {}).node_id
    # The same value given explicitly must be accepted, i.e. the default must satisfy the documented rule.
    assert load_config(None, {"SYNCMESH_NODE_ID": node_id}).node_id == node_id


# ---- as_dict


def test_as_dict_masks_secrets(hostname: None) -> None:
    cfg = load_config(None, {"SYNCMESH_ETCD_PASSWORD": "hunter2", "SYNCMESH_SECURITY_AUTH_ENABLED": "1",
                             "SYNCMESH_SECURITY_AUTH_TOKENS": "tokA,tokB"})
    d = as_dict(cfg)
    assert d["etcd"]["password"] == "********"
    assert d["security"]["auth_tokens"] == ["********", "********"]
    assert "hunter2" not in repr(d)
    assert "tokA" not in repr(d)
    assert d["node_id"] == "testhost"
    assert d["sync"]["interval"] == 30.0
    assert type(d["sync"]["interval"]) is float


def test_as_dict_empty_secret_stays_empty(hostname: None) -> None:
    d = as_dict(load_config(None, {}))
    assert d["etcd"]["password"] == ""
    assert d["security"]["auth_tokens"] == []


def _walk_types(obj: object) -> set[type]:
    if isinstance(obj, dict):
        return {dict}.union(*(_walk_types(v) for v in obj.values()))
    if isinstance(obj, list):
        return {list}.union(*(_walk_types(v) for v in obj)) if obj else {list}
    return {type(obj)}


def test_as_dict_masked_is_plain_data_and_safe_dumps(hostname: None) -> None:
    cfg = load_config(None, {"SYNCMESH_ETCD_PASSWORD": "hunter2", "SYNCMESH_SECURITY_AUTH_ENABLED": "1",
                             "SYNCMESH_SECURITY_AUTH_TOKENS": "tokA"})
    d = as_dict(cfg)
    assert _walk_types(d) <= {dict, list, str, int, float, bool}  # exact types: no str/float subclasses
    assert type(d["etcd"]["password"]) is str
    assert type(d["security"]["auth_tokens"][0]) is str
    text = yaml.safe_dump(d, sort_keys=False)
    assert "hunter2" not in text
    assert "tokA" not in text
    assert yaml.safe_load(text) == d


def test_as_dict_unmasked_reveals_secrets(hostname: None) -> None:
    d = as_dict(load_config(None, {"SYNCMESH_ETCD_PASSWORD": "hunter2"}), masked=False)
    assert d["etcd"]["password"] == "hunter2"




def test_as_dict_unmasked_is_plain_data(hostname: None) -> None:
    d = as_dict(load_config(None, {"SYNCMESH_ETCD_PASSWORD": "hunter2"}), masked=False)
    assert type(d["etcd"]["password"]) is str
    assert "hunter2" in yaml.safe_dump(d)


# ---- advertise_url


def test_advertise_url_explicit_host_port() -> None:
    cfg = Config(server=config_mod.ServerConfig(advertise="10.0.0.5:7734"))
    assert cfg.advertise_url() == "https://10.0.0.5:7734"  # TLS is the default (issue 19)
    plain = Config(server=config_mod.ServerConfig(advertise="10.0.0.5:7734"),
                   security=config_mod.SecurityConfig(tls_enabled=False))
    assert plain.advertise_url() == "http://10.0.0.5:7734"


def test_advertise_url_with_scheme_is_kept_and_trailing_slash_dropped() -> None:
    cfg = Config(server=config_mod.ServerConfig(advertise="https://node.example:9000/"))
    assert cfg.advertise_url() == "https://node.example:9000"


def test_advertise_url_https_when_tls_enabled(hostname: None, certs: tuple[str, str]) -> None:
    cert, key = certs
    cfg = load_config(None, {"SYNCMESH_SECURITY_TLS_ENABLED": "on", "SYNCMESH_SECURITY_TLS_CERT_FILE": cert,
                             "SYNCMESH_SECURITY_TLS_KEY_FILE": key, "SYNCMESH_SERVER_ADVERTISE": "n1:7000"})
    assert cfg.advertise_url() == "https://n1:7000"


def test_advertise_url_from_specific_bind_host() -> None:
    cfg = Config(server=config_mod.ServerConfig(host="192.168.1.7", port=8123))
    assert cfg.advertise_url() == "https://192.168.1.7:8123"


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", ""])
def test_advertise_url_wildcard_bind_uses_primary_address(monkeypatch: pytest.MonkeyPatch, bind: str) -> None:
    monkeypatch.setattr(config_mod, "_primary_address", lambda: "10.9.8.7")
    cfg = Config(server=config_mod.ServerConfig(host=bind, port=7734))
    assert cfg.advertise_url() == "https://10.9.8.7:7734"


def test_primary_address_is_an_ipv4_string() -> None:
    addr = config_mod._primary_address()
    parts = addr.split(".")
    assert len(parts) == 4 and all(p.isdigit() and 0 <= int(p) <= 255 for p in parts)


# ---- CLI: config show


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, hostname: None) -> None:
    for name in list(os.environ):
        if name.startswith("SYNCMESH_"):
            monkeypatch.delenv(name)


def test_cli_config_show_masks_secrets(clean_env: None) -> None:
    result = CliRunner().invoke(main, ["config", "show"], env={
        "SYNCMESH_ETCD_PASSWORD": "hunter2", "SYNCMESH_SERVER_PORT": "8001"})
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output
    data = yaml.safe_load(result.stdout)
    assert data["etcd"]["password"] == "********"
    assert data["server"]["port"] == 8001
    assert data["node_id"] == "testhost"
    assert next(iter(data)) == "node_id"  # sort_keys=False: the schema order


def test_cli_config_show_json_with_file(clean_env: None, tmp_path: Path) -> None:
    path = write(tmp_path, "etcd:\n  password: filesecret\nlog_level: debug\n")
    result = CliRunner().invoke(main, ["config", "show", "--json", "--config", path])
    assert result.exit_code == 0, result.output
    assert "filesecret" not in result.output
    data = json.loads(result.stdout)
    assert data["log_level"] == "debug"
    assert data["etcd"]["password"] == "********"


def test_cli_config_show_reads_syncmesh_config_env(clean_env: None, tmp_path: Path) -> None:
    path = write(tmp_path, "log_format: text\n")
    result = CliRunner().invoke(main, ["config", "show"], env={"SYNCMESH_CONFIG": path})
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["log_format"] == "text"


def test_cli_bad_config_exits_2_with_one_line_error(clean_env: None) -> None:
    result = CliRunner().invoke(main, ["config", "show"], env={"SYNCMESH_SERVER_PORT": "abc"})
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines == ["syncmesh-plugin: configuration error: SYNCMESH_SERVER_PORT: expected an integer, got 'abc'"]


def test_cli_missing_config_file_exits_2(clean_env: None, tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.yaml")
    result = CliRunner().invoke(main, ["config", "show", "--config", missing])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"syncmesh-plugin: configuration error: config file not found: {missing}"


def test_join_grows_an_embedded_cluster_with_the_join_token_under_tls(hostname: None) -> None:
    plain = {"SYNCMESH_SECURITY_TLS_ENABLED": "false"}
    cfg = load_config(None, {**plain, "SYNCMESH_JOIN": "http://10.0.0.5:7734"})
    assert cfg.join == "http://10.0.0.5:7734" and cfg.embedded_etcd and cfg.etcd.embedded_members == 3
    assert load_config(None, {**plain, "SYNCMESH_ETCD_EMBEDDED_MEMBERS": "5"}).etcd.embedded_members == 5
    token = "SM1" + "ab" * 32 + "::" + "s" * 43
    cfg = load_config(None, {"SYNCMESH_JOIN": "https://10.0.0.5:7734", "SYNCMESH_JOIN_TOKEN": token})
    assert cfg.join == "https://10.0.0.5:7734" and cfg.tls_mode == "auto"
    # under TLS: the API's https URL, and the token that proves the joining host
    with pytest.raises(ConfigError, match=r"^join: expected the https:// URL"):
        load_config(None, {"SYNCMESH_JOIN": "http://10.0.0.5:7734", "SYNCMESH_JOIN_TOKEN": token})
    with pytest.raises(ConfigError, match=r"^join: under TLS a joining host proves itself with the cluster's join"):
        load_config(None, {"SYNCMESH_JOIN": "https://10.0.0.5:7734"})
    with pytest.raises(ConfigError, match="one or the other"):
        load_config(None, {**plain, "SYNCMESH_JOIN": "http://h:7734", "SYNCMESH_ETCD_ENDPOINTS": "http://e:2379"})
    with pytest.raises(ConfigError, match=r"^join: expected"):
        load_config(None, {**plain, "SYNCMESH_JOIN": "host1:7734"})
    for bad in ("0", "8"):
        with pytest.raises(ConfigError, match=r"etcd\.embedded_members"):
            load_config(None, {**plain, "SYNCMESH_ETCD_EMBEDDED_MEMBERS": bad})
