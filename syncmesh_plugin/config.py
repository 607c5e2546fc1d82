"""Configuration: one YAML file plus `SYNCMESH_*` environment variables, validated once at start.

Every key has an environment form: `SYNCMESH_` + the upper-cased key path joined with `_`
(`etcd.endpoints` -> `SYNCMESH_ETCD_ENDPOINTS`). The environment wins over the file. Any error is
one line naming the key and what was expected, so a bad config never gets as far as starting.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import yaml

ENV_PREFIX = "SYNCMESH_"
CONFLICT_MODES = ("timestamp", "size", "manual")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")


class ConfigError(ValueError):
    """A configuration problem, worded for the operator (one line, names the key)."""


class Duration(float):
    """Seconds, written in the config as `30s`, `500ms`, `2m`, `1h` or a plain number of seconds."""


class Secret(str):
    """A string that is masked wherever the config is shown."""


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


@dataclass(frozen=True)
class PluginConfig:
    socket: str = "/run/docker/plugins/syncmesh.sock"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 7734
    advertise: str = ""


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: list[str] = field(default_factory=list)
    prefix: str = "/syncmesh/v1"
    username: str = ""
    password: Secret = Secret("")
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_server_name: str = ""
    timeout: Duration = Duration(5.0)
    lease_ttl: int = 10
    embedded_client_port: int = 0
    embedded_peer_port: int = 0
    embedded_members: int = 3  # voting members of an embedded cluster grown with `join`; later nodes are clients


MOUNT_TIMEOUT_MAX = 110.0  # dockerd cuts a volume plugin's Mount at 120 s; answer before it does


@dataclass(frozen=True)
class SyncConfig:
    interval: Duration = Duration(30.0)
    conflict_resolution: str = "timestamp"
    compression_enabled: bool = True
    keep_conflict_copies: bool = True
    mount_timeout: Duration = Duration(25.0)  # under the 30 s a manual `docker plugin enable` gives every call
    debounce: Duration = Duration(0.005)
    mass_delete_threshold: float = 0.5
    mass_delete_min_files: int = 20
    mass_delete_window: Duration = Duration(10.0)
    max_manifest_bytes: int = 512 * 1024


@dataclass(frozen=True)
class SecurityConfig:
    # On by default: without certificate files the cluster's own CA issues them (autotls.py); false is plain
    # HTTP, an explicit choice that is warned about at start and in /api/v1/health.
    tls_enabled: bool = True
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    cert_lifetime: Duration = Duration(30 * 86400.0)  # automatic node certificates; renewed at half of it
    client_cert_required: bool = False  # refuse clients without a certificate in the handshake (no tokens)
    trust_etcd: bool = False  # join without a token: trust the CA found in etcd (etcd with TLS and auth only)
    auth_enabled: bool = False
    auth_tokens: list[Secret] = field(default_factory=list)  # admin: every endpoint; the first is sent to peers
    auth_readonly_tokens: list[Secret] = field(default_factory=list)  # GET of the API and metrics only
    health_open: bool = True  # /api/v1/health answers without a token


@dataclass(frozen=True)
class HousekeepingConfig:
    interval: Duration = Duration(60.0)
    tombstone_retention: Duration = Duration(24 * 3600.0)
    conflict_retention: Duration = Duration(30 * 24 * 3600.0)
    compact_keep_revisions: int = 100_000


@dataclass(frozen=True)
class MonitoringConfig:
    enabled: bool = True


@dataclass(frozen=True)
class Config:
    node_id: str = ""
    join_token: Secret = Secret("")  # printed by `syncmesh-plugin token` on the cluster's first node
    join: str = ""  # http://host1:7734: another node's API; this node's embedded etcd joins that node's cluster
    log_level: str = "info"
    log_format: str = "json"
    data_root: str = "/var/lib/syncmesh"
    plugin: PluginConfig = field(default_factory=PluginConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    housekeeping: HousekeepingConfig = field(default_factory=HousekeepingConfig)

    @property
    def embedded_etcd(self) -> bool:
        return not self.etcd.endpoints

    @property
    def state_dir(self) -> str:
        return os.path.join(self.data_root, "state")

    @property
    def volumes_dir(self) -> str:
        return os.path.join(self.data_root, "volumes")

    @property
    def tls_mode(self) -> str:
        """"auto" (the cluster's own CA), "files" (security.tls_cert_file/key_file) or "off" (plain HTTP)."""
        if not self.security.tls_enabled:
            return "off"
        return "files" if self.security.tls_cert_file else "auto"

    def advertise_url(self) -> str:
        """The base URL peers use to reach this node's HTTP server."""
        scheme = "https" if self.security.tls_enabled else "http"
        addr = self.server.advertise
        if not addr:
            host = self.server.host
            if host in ("0.0.0.0", "::", ""):
                host = _primary_address()
            addr = f"{host}:{self.server.port}"
        if "://" in addr:
            return addr.rstrip("/")
        return f"{scheme}://{addr}"


def _primary_address() -> str:
    """The address other hosts most likely reach us on (no packet is sent: UDP connect only routes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def key_paths(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every leaf key path (`etcd.endpoints`) with its type."""
    out: dict[str, Any] = {}
    for name, tp in _field_types(cls).items():
        path = f"{prefix}{name}"
        if _is_section(tp):
            out.update(key_paths(tp, path + "."))
        else:
            out[path] = tp
    return out


def env_name(path: str) -> str:
    return ENV_PREFIX + path.replace(".", "_").upper()


def _type_label(tp: Any) -> str:
    if tp is bool:
        return "a boolean (true/false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is Duration:
        return "a duration such as 30s, 500ms, 2m"
    if tp in (list[str], list[Secret]):
        return "a list of strings (comma-separated in the environment)"
    return "a string"


def _coerce(path: str, tp: Any, value: Any, from_env: bool) -> Any:
    """Turn a YAML or environment value into the declared type, or raise a one-line ConfigError."""
    label = _type_label(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
            return False
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
            return float(value)
    elif tp is Duration:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            return Duration(float(value))
        if isinstance(value, str):
            m = _DURATION_RE.match(value)
            if m:
                return Duration(float(m.group(1)) * _DURATION_UNITS[m.group(2)])
    elif tp in (list[str], list[Secret]):
        item = Secret if tp == list[Secret] else str
        if isinstance(value, str):
            return [item(v.strip()) for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            return [item(str(v)) for v in value]
    elif tp in (str, Secret):
        if isinstance(value, str):
            return tp(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not from_env:
            return tp(str(value))
    else:  # pragma: no cover - schema error, caught by tests
        raise ConfigError(f"{path}: unsupported type {tp!r}")
    where = env_name(path) if from_env else path
    raise ConfigError(f"{where}: expected {label}, got {value!r}")


def _flatten(data: Mapping[str, Any], prefix: str, known: dict[str, Any], out: dict[str, Any]) -> None:
    sections = {p.split(".")[0] for p in known if "." in p}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{prefix}{key!r}: keys must be strings")
        path = f"{prefix}{key}"
        if path in known:
            out[path] = value
        elif (prefix == "" and key in sections) or any(p.startswith(path + ".") for p in known):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path}: expected a mapping of settings, got {value!r}")
            _flatten(value, path + ".", known, out)
        else:
            valid = sorted(p for p in known if p.startswith(prefix)) if prefix else sorted(known)
            raise ConfigError(f"{path}: unknown key (valid keys: {', '.join(valid)})")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    kwargs: dict[str, Any] = {}
    for name, tp in _field_types(cls).items():
        path = f"{prefix}{name}"
        if _is_section(tp):
            kwargs[name] = _build(tp, values, path + ".")
        elif path in values:
            kwargs[name] = values[path]
    return cls(**kwargs)


def _validate(cfg: Config) -> Config:
    def bad(key: str, expected: str, got: Any) -> ConfigError:
        return ConfigError(f"{key}: expected {expected}, got {got!r}")

    if cfg.log_level not in LOG_LEVELS:
        raise bad("log_level", "one of " + ", ".join(LOG_LEVELS), cfg.log_level)
    if cfg.log_format not in LOG_FORMATS:
        raise bad("log_format", "one of " + ", ".join(LOG_FORMATS), cfg.log_format)
    if cfg.sync.conflict_resolution not in CONFLICT_MODES:
        raise bad("sync.conflict_resolution", "one of " + ", ".join(CONFLICT_MODES), cfg.sync.conflict_resolution)
    if not 0 <= cfg.server.port <= 65535:
        raise bad("server.port", "a port number 0-65535", cfg.server.port)
    if not cfg.data_root or not os.path.isabs(cfg.data_root):
        raise bad("data_root", "an absolute path", cfg.data_root)
    if not os.path.isabs(cfg.plugin.socket):
        raise bad("plugin.socket", "an absolute path", cfg.plugin.socket)
    if not cfg.etcd.prefix.startswith("/") or cfg.etcd.prefix.endswith("/"):
        raise bad("etcd.prefix", "a path like /syncmesh/v1 (leading slash, no trailing slash)", cfg.etcd.prefix)
    for ep in cfg.etcd.endpoints:
        if not re.fullmatch(r"(https?://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5}", ep):
            raise bad("etcd.endpoints", "URLs like http://10.0.0.5:2379", ep)
    if not 0 < cfg.sync.mass_delete_threshold <= 1:
        raise bad("sync.mass_delete_threshold", "a share of the volume in (0, 1], e.g. 0.5",
                  cfg.sync.mass_delete_threshold)
    if not 0.5 <= cfg.sync.mass_delete_window <= 3600:
        raise bad("sync.mass_delete_window", "a duration between 0.5s and 1h, e.g. 10s",
                  f"{cfg.sync.mass_delete_window}s")
    if not 1024 <= cfg.sync.max_manifest_bytes <= 1024 * 1024:
        raise bad("sync.max_manifest_bytes", "bytes between 1024 and 1048576 (etcd's value limit is 1.5 MiB)",
                  cfg.sync.max_manifest_bytes)
    if cfg.housekeeping.interval < 1:
        raise bad("housekeeping.interval", "a duration of at least 1s", f"{cfg.housekeeping.interval}s")
    if cfg.join and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(:\d{1,5})?/?", cfg.join):
        raise bad("join", "the URL of another node's API, like http://10.0.0.5:7734", cfg.join)
    if cfg.join and cfg.tls_mode == "auto":
        if not cfg.join.startswith("https://"):
            raise bad("join", "the https:// URL of another node's API (TLS is on: security.tls_enabled)", cfg.join)
        if not str(cfg.join_token):
            raise ConfigError("join: under TLS a joining host proves itself with the cluster's join token: run "
                              "`syncmesh-plugin token` on a node of the cluster and set join_token "
                              "(SYNCMESH_JOIN_TOKEN) as well")
    if cfg.join and cfg.etcd.endpoints:
        raise ConfigError("join: grows an embedded etcd cluster; with etcd.endpoints set this node uses that etcd "
                          "(set one or the other)")
    if not 1 <= cfg.etcd.embedded_members <= 7:
        raise bad("etcd.embedded_members", "an integer from 1 to 7 (3 or 5: an odd number keeps a majority)",
                  cfg.etcd.embedded_members)
    if cfg.etcd.lease_ttl < 2:
        raise bad("etcd.lease_ttl", "an integer >= 2 (seconds)", cfg.etcd.lease_ttl)
    if not 1 <= cfg.sync.mount_timeout <= MOUNT_TIMEOUT_MAX:
        raise bad("sync.mount_timeout", f"a duration between 1s and {MOUNT_TIMEOUT_MAX:.0f}s (dockerd gives a volume "
                  "plugin's Mount 120 s, and only 30 s after a `docker plugin enable` without --timeout)",
                  f"{cfg.sync.mount_timeout}s")
    if cfg.sync.interval < 1:
        raise bad("sync.interval", "a duration of at least 1s", f"{cfg.sync.interval}s")
    if cfg.node_id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", cfg.node_id):
        raise bad("node_id", "letters, digits, '_', '.', '-' (at most 63, starting with a letter or digit)",
                  cfg.node_id)
    if bool(cfg.security.tls_cert_file) != bool(cfg.security.tls_key_file):
        raise ConfigError("security.tls_cert_file and security.tls_key_file: give both (your own certificates) or "
                          "neither (the cluster's own CA issues them)")
    if cfg.security.tls_ca_file and not cfg.security.tls_cert_file:
        raise ConfigError("security.tls_ca_file: goes with security.tls_cert_file and security.tls_key_file "
                          "(without them the cluster's own CA is used)")
    if not 10 <= cfg.security.cert_lifetime <= 825 * 86400:
        raise bad("security.cert_lifetime", "a duration between 10s and 825d, e.g. 30d",
                  f"{cfg.security.cert_lifetime}s")
    if cfg.join_token:
        from .pki import PkiError, parse_token

        try:
            parse_token(cfg.join_token)
        except PkiError as exc:
            raise ConfigError(str(exc)) from None  # never repeats the token
    if cfg.security.auth_enabled and not cfg.security.auth_tokens:
        raise ConfigError("security.auth_enabled: needs at least one token in security.auth_tokens")
    for key in ("auth_tokens", "auth_readonly_tokens"):
        for tok in getattr(cfg.security, key):
            if not re.fullmatch(r"[\x21-\x2b\x2d-\x7e]+", tok):
                # the token itself is never echoed: this message may end up in a log
                raise ConfigError(f"security.{key}: tokens must be printable ASCII without spaces or commas")
    if set(cfg.security.auth_tokens) & set(cfg.security.auth_readonly_tokens):
        raise ConfigError("security.auth_readonly_tokens: a token cannot be both admin and read-only")
    if cfg.security.tls_ca_file and not cfg.security.tls_enabled:
        raise ConfigError("security.tls_ca_file: set security.tls_enabled: true as well (mutual TLS needs TLS)")
    if bool(cfg.etcd.tls_cert_file) != bool(cfg.etcd.tls_key_file):
        raise ConfigError("etcd.tls_cert_file and etcd.tls_key_file: give both or neither")
    for key in ("tls_cert_file", "tls_key_file", "tls_ca_file"):
        for section, sec in (("security", cfg.security), ("etcd", cfg.etcd)):
            path = getattr(sec, key, "")
            if path and not os.path.isfile(path):
                raise ConfigError(f"{section}.{key}: file not found: {path}")
    if not cfg.node_id:
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0]).lstrip("_.-")[:63]
        cfg = dataclasses.replace(cfg, node_id=host or "node")
    return cfg


def load_config(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (optional) and the environment; raise ConfigError on any problem."""
    environ = os.environ if environ is None else environ
    known = key_paths()
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                raw = yaml.safe_load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, yaml.YAMLError) as exc:
            msg = str(exc).replace("\n", " ")
            raise ConfigError(f"config file {path}: cannot read it as YAML: {msg}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config file {path}: expected a mapping of settings at the top level")
        flat: dict[str, Any] = {}
        _flatten(raw, "", known, flat)
        for p, v in flat.items():
            values[p] = _coerce(p, known[p], v, from_env=False)
    env_keys = {env_name(p): p for p in known}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "SYNCMESH_CONFIG":
            continue
        if name not in env_keys:
            raise ConfigError(f"{name}: unknown setting (valid: {', '.join(sorted(env_keys))})")
        p = env_keys[name]
        values[p] = _coerce(p, known[p], value, from_env=True)
    return _validate(_build(Config, values))


def _mask(value: Any, masked: bool = True) -> Any:
    if isinstance(value, Secret):
        return ("********" if value else "") if masked else str(value)
    if isinstance(value, list):
        return [_mask(v, masked) for v in value]
    return value


def as_dict(cfg: Config, masked: bool = True) -> dict[str, Any]:
    """The effective config as nested plain data; secrets masked unless asked otherwise."""

    def conv(obj: Any) -> Any:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                out[f.name] = conv(v)
            else:
                v = _mask(v, masked)
                out[f.name] = float(v) if isinstance(v, Duration) else v
        return out

    return conv(cfg)
