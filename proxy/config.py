"""The one configuration object: ``config.toml`` < ``PGML_PROXY_*`` env < CLI flags.

Owns: the frozen dataclasses (the ``[engine]`` and ``[ray]`` sections are the engine's own types,
``engine.api.EngineConfig`` and ``RayConfig``, embedded here), their defaults, loading, coercion and
validation. Every error names the offending key (``ConfigError``).

Must not: keep a module-level instance (the config is passed explicitly), or read
anything but the files/env/flags handed to :func:`load`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg.conninfo

from engine.api import EngineConfig, RayConfig
from proxy.dsn import DSNError, parse_dsn

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
DEVICES = ("auto", "cpu", "cuda", "mps")
EMBED_BACKENDS = ("torch", "onnx")
ENGINE_BACKENDS = ("local", "ray")
LOG_LEVELS = ("debug", "info", "warning", "error")
ENV_PREFIX = "PGML_PROXY_"
# Short env names kept for the most common settings.
# PGML_PROXY_* variables that are not config keys: the config file path, where sql/ is.
NOT_SETTINGS = frozenset({"CONFIG", "SQL_DIR"})
ENV_ALIASES = {"LISTEN": ("proxy", "listen"), "UPSTREAM": ("upstream", "dsn")}


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


@dataclass(frozen=True)
class ProxySection:
    listen: str = "127.0.0.1:6432"
    max_clients: int = 1000
    # One protocol message may not exceed this; the server's own limit is 1 GiB.
    max_message_bytes: int = 256 * 1024 * 1024
    tls_cert: str = ""
    tls_key: str = ""
    # Seconds that open sessions get to finish after SIGTERM.
    shutdown_grace: float = 30.0
    # Per-row pgml calls that are whole output columns of a SELECT are computed on its result rows as they
    # arrive (only the rows it returns); false: every per-row call goes through a session temp table.
    stream_outputs: bool = True
    # Other replicas (HOST:PORT) that a CancelRequest for a session not held here is forwarded to (proxy.peers).
    peers: tuple[str, ...] = ()
    # Seconds one peer gets to take a forwarded CancelRequest (all peers are asked at once).
    peer_timeout: float = 2.0

    @property
    def host(self) -> str:
        return split_address(self.listen)[0]

    @property
    def port(self) -> int:
        return split_address(self.listen)[1]

    @property
    def peer_addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple(split_address(peer) for peer in self.peers)

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert and self.tls_key)


@dataclass(frozen=True)
class UpstreamSection:
    # libpq URI; empty = start an embedded PostgreSQL in ``embedded_data_dir``.
    dsn: str = ""
    sslmode: str = "prefer"
    sslrootcert: str = ""
    connect_timeout: float = 10.0
    embedded_data_dir: str = ".pgdata"
    embedded_version: int = 18


@dataclass(frozen=True)
class CallbackSection:
    """Callback mode (README: Callback mode): how the database reaches this proxy through dblink."""

    # libpq connection string (key=value or URI, no user or password) the database connects to the proxy
    # with; empty: callbacks are not set up by init, embedded start or CREATE EXTENSION pgml.
    target: str = ""
    # The role of the user mapping FOR PUBLIC (callers without a mapping of their own act as it).
    user: str = ""
    # A file holding its password (one line), else ``password`` (PGML_PROXY_CALLBACK_PASSWORD).
    password_file: str = ""
    password: str = field(default="", repr=False)


@dataclass(frozen=True)
class MetricsSection:
    """Prometheus metrics and the health check (README: Metrics and health)."""

    # HOST:PORT serving /metrics and /healthz over HTTP; empty: no endpoint.
    listen: str = ""


@dataclass(frozen=True)
class LogSection:
    level: str = "info"
    trace_protocol: bool = False  # each protocol message in the log (names and counts, never data)


@dataclass(frozen=True)
class Config:
    proxy: ProxySection = field(default_factory=ProxySection)
    upstream: UpstreamSection = field(default_factory=UpstreamSection)
    engine: EngineConfig = field(default_factory=EngineConfig)  # the engine's own type (engine.api)
    callback: CallbackSection = field(default_factory=CallbackSection)
    ray: RayConfig = field(default_factory=RayConfig)  # the engine's own type (engine.api)
    log: LogSection = field(default_factory=LogSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)


SECTIONS: dict[str, type[Any]] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def load(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config: defaults, then the TOML file, then env, then flags.

    ``flags`` maps ``"section.key"`` to a value (None = not given).
    Raises ConfigError naming the key for an unknown key or a bad value.
    """
    env = os.environ if env is None else env
    raw: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if path is not None:
        _merge_file(raw, Path(path))
    _merge_env(raw, env)
    for dotted, value in (flags or {}).items():
        if value is not None:
            section, _, key = dotted.partition(".")
            raw[section][key] = value
    return _build(raw)


def _merge_file(raw: dict[str, dict[str, Any]], path: Path) -> None:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        raw[section].update(values)


def _merge_env(raw: dict[str, dict[str, Any]], env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name[len(ENV_PREFIX) :] in NOT_SETTINGS:
            continue
        rest = name[len(ENV_PREFIX) :]
        target = ENV_ALIASES.get(rest) or _split_env_name(rest)
        if target is None:
            raise ConfigError(f"unknown environment variable {name}")
        raw[target[0]][target[1]] = _from_env_text(target, value, name)


def _split_env_name(rest: str) -> tuple[str, str] | None:
    for section, cls in SECTIONS.items():
        prefix = section.upper() + "_"
        if rest.startswith(prefix):
            key = rest[len(prefix) :].lower()
            if key in {f.name for f in dataclasses.fields(cls)}:
                return section, key
    return None


def _from_env_text(target: tuple[str, str], text: str, name: str) -> Any:
    kind = typing.get_type_hints(SECTIONS[target[0]])[target[1]]
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected a boolean, got {text!r}")
    if kind == tuple[str, ...]:
        return [part for part in text.split(",") if part]
    return text


def _build(raw: dict[str, dict[str, Any]]) -> Config:
    sections = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in raw[section].items():
            if key not in hints:
                raise ConfigError(f"unknown key {section}.{key}")
            values[key] = _coerce(f"{section}.{key}", hints[key], value)
        sections[section] = cls(**values)
    config = Config(**sections)
    validate(config)
    return config


def _coerce(key: str, kind: Any, value: Any) -> Any:
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind is int:
            if isinstance(value, bool):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                raise TypeError
            return value
        if kind == tuple[str, ...]:
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"no coercion for {kind}")
    raise ConfigError(f"{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as host and port; ValueError when it is not one."""
    host, sep, port = address.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(address)
    return host.strip("[]"), int(port)


def _is_address(address: str) -> bool:
    try:
        split_address(address)
    except ValueError:
        return False
    return True


def validate(config: Config) -> None:
    """Cross-field and range checks; raises ConfigError naming the key."""
    p, u, e = config.proxy, config.upstream, config.engine
    _check(_is_address(p.listen), "proxy.listen", f"expected HOST:PORT, got {p.listen!r}")
    m = config.metrics.listen
    _check(not m or _is_address(m), "metrics.listen", f"expected HOST:PORT or empty, got {m!r}")
    for peer in p.peers:
        _check(_is_address(peer), "proxy.peers", f"expected HOST:PORT, got {peer!r}")
    _check(p.peer_timeout > 0, "proxy.peer_timeout", "must be positive")
    _check(p.max_clients > 0, "proxy.max_clients", "must be positive")
    _check(1024 <= p.max_message_bytes <= 1 << 30, "proxy.max_message_bytes", "must be between 1024 and 1 GiB")
    _check(bool(p.tls_cert) == bool(p.tls_key), "proxy.tls_cert", "tls_cert and tls_key must be set together")
    for key in ("tls_cert", "tls_key"):
        value = getattr(p, key)
        _check(not value or Path(value).is_file(), f"proxy.{key}", f"no such file {value!r}")
    _check(p.shutdown_grace >= 0, "proxy.shutdown_grace", "must be >= 0")
    _check(u.sslmode in SSLMODES, "upstream.sslmode", f"must be one of {', '.join(SSLMODES)}")
    _check(u.connect_timeout > 0, "upstream.connect_timeout", "must be positive")
    _check(u.embedded_version in (16, 18), "upstream.embedded_version", "must be 16 or 18")
    if u.dsn:
        try:
            parse_dsn(u.dsn)
        except DSNError as exc:
            raise ConfigError(f"upstream.dsn: {exc}") from exc
    _check(e.device in DEVICES, "engine.device", f"must be one of {', '.join(DEVICES)}")
    _check(e.workers > 0, "engine.workers", "must be positive")
    _check(e.max_queue > 0, "engine.max_queue", "must be positive")
    _check(e.call_timeout > 0, "engine.call_timeout", "must be positive")
    _check(e.batch_size > 0, "engine.batch_size", "must be positive")
    _check(e.embed_backend in EMBED_BACKENDS, "engine.embed_backend", f"must be one of {', '.join(EMBED_BACKENDS)}")
    _check(e.cache_bytes > 0, "engine.cache_bytes", "must be positive")
    _check(e.backend in ENGINE_BACKENDS, "engine.backend", f"must be one of {', '.join(ENGINE_BACKENDS)}")
    _validate_ray(config.ray)
    _validate_callback(config.callback)
    _check(config.log.level in LOG_LEVELS, "log.level", f"must be one of {', '.join(LOG_LEVELS)}")


def _validate_ray(r: RayConfig) -> None:
    _check(r.num_cpus >= 0, "ray.num_cpus", "must be >= 0")
    _check(r.num_gpus >= 0, "ray.num_gpus", "must be >= 0")
    _check(r.replicas > 0, "ray.replicas", "must be positive")
    _check(bool(r.namespace), "ray.namespace", "must not be empty")


def _validate_callback(c: CallbackSection) -> None:
    if c.target:
        try:
            keys = psycopg.conninfo.conninfo_to_dict(c.target)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"callback.target: not a libpq connection string: {exc}") from None
        _check(
            "user" not in keys and "password" not in keys,
            "callback.target",
            "names no user or password (callback.user, callback.password_file)",
        )
    _check(not c.password_file or Path(c.password_file).is_file(), "callback.password_file", "no such file")
    _check(not (c.password_file and c.password), "callback.password", "set password_file or password, not both")
