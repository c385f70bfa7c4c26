"""Parsing of upstream connection strings (libpq URI form, or key=value conninfo).

Owns: turning ``postgresql://user:pw@host:port/db?host=/sock&sslmode=require``
into a frozen :class:`DSN`. Must not: connect anywhere.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

DEFAULT_PORT = 5432
# Parameters that the proxy itself interprets; others are kept for the record.
KNOWN_PARAMS = frozenset(
    {
        "host",
        "hostaddr",
        "port",
        "user",
        "password",
        "dbname",
        "sslmode",
        "sslrootcert",
        "connect_timeout",
        "application_name",
    }
)


class DSNError(ValueError):
    """An unusable connection string."""


@dataclass(frozen=True)
class DSN:
    host: str = "localhost"
    port: int = DEFAULT_PORT
    user: str | None = None
    password: str | None = None
    dbname: str | None = None
    params: tuple[tuple[str, str], ...] = field(default=())

    @property
    def is_unix(self) -> bool:
        return self.host.startswith("/")

    @property
    def unix_path(self) -> str:
        """Socket file path, as libpq builds it: ``<dir>/.s.PGSQL.<port>``."""
        return f"{self.host}/.s.PGSQL.{self.port}"

    def param(self, name: str) -> str | None:
        return dict(self.params).get(name)

    def redacted(self) -> str:
        """The DSN for logs: never the password."""
        where = self.host if not self.is_unix else f"?host={self.host}"
        return f"postgresql://{self.user or ''}@{where}:{self.port}/{self.dbname or ''}"


def parse_dsn(text: str) -> DSN:
    """Parse a libpq URI or conninfo string; raises DSNError."""
    text = text.strip()
    if text.startswith(("postgresql://", "postgres://")):
        values = _parse_uri(text)
    elif "=" in text:
        values = _parse_conninfo(text)
    else:
        raise DSNError("expected a postgresql:// URI or key=value pairs")
    return _build(values)


def _parse_uri(text: str) -> dict[str, str]:
    parts = urlsplit(text)
    values: dict[str, str] = {}
    netloc = parts.netloc
    if "@" in netloc:
        auth, _, netloc = netloc.rpartition("@")
        user, sep, password = auth.partition(":")
        if user:
            values["user"] = unquote(user)
        if sep:
            values["password"] = unquote(password)
    first = netloc.split(",")[0]  # libpq tries hosts in order; the proxy uses the first one
    if first.startswith("["):
        host, _, rest = first[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = first.partition(":")
    if host:
        values["host"] = unquote(host)
    if port:
        values["port"] = port
    if parts.path and parts.path != "/":
        values["dbname"] = unquote(parts.path[1:])
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise DSNError(f"invalid URI query: {parts.query!r}") from exc
    values.update(query)
    return values


def _parse_conninfo(text: str) -> dict[str, str]:
    values = {}
    try:
        tokens = shlex.split(text.replace(" = ", "="))
    except ValueError as exc:
        raise DSNError(f"invalid conninfo: {exc}") from exc
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise DSNError(f"invalid conninfo item {token!r}")
        values[key] = value
    return values


def _build(values: dict[str, str]) -> DSN:
    port_text = values.pop("port", str(DEFAULT_PORT)).split(",")[0]
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DSNError(f"invalid port {port_text!r}")
    host = values.pop("host", "") or values.get("hostaddr", "") or "localhost"
    unknown = sorted(k for k in values if k not in KNOWN_PARAMS and k not in ("options",))
    if unknown:
        raise DSNError(f"unsupported connection parameter {unknown[0]!r}")
    return DSN(
        host=host.split(",")[0],
        port=int(port_text),
        user=values.pop("user", None),
        password=values.pop("password", None),
        dbname=values.pop("dbname", None),
        params=tuple(sorted(values.items())),
    )
