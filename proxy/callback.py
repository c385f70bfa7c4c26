"""Callback mode's set-up: the database calls pgml-proxy back through dblink (``sql/008_callback.sql``).

Owns: the set-up a ``[callback]`` section asks for (:class:`Setup`: the foreign server's libpq options,
the role of the user mapping FOR PUBLIC and its password, read once from its file), carrying it out or
undoing it over a direct connection (:func:`enable`, :func:`disable`: ``pgml-proxy init``, embedded
start), and the one-line account of a server error for the command line (:func:`error_text`).
The SQL side (dblink, the foreign server, the mapping, the stubs' bodies) is ``pgml.callback_enable``'s.

Must not: print, log or put into SQL text the password (it travels as a bound parameter here; the
rewriter's ``CREATE EXTENSION pgml`` hex-encodes it), or decide when to run (the CLI and
:mod:`proxy.rewrite.extension` do).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import psycopg.conninfo

from proxy.config import CallbackSection

SERVER = "pgml_callback"  # the foreign server's name (sql/008_callback.sql)
ENABLE = "SELECT pgml.callback_enable(%s::jsonb, %s, %s)"
DISABLE = "SELECT pgml.callback_disable()"


@dataclass(frozen=True)
class Setup:
    """What ``pgml.callback_enable`` is called with."""

    options: tuple[tuple[str, str], ...]  # libpq keywords of the proxy as the database reaches it
    user: str | None  # the user mapping FOR PUBLIC's role (None: the mapping is left as it is)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def of(cls, section: CallbackSection) -> Setup | None:
        """The set-up of a validated ``[callback]`` section (None: no target); reads the password file."""
        if not section.target:
            return None
        password = section.password or None
        if section.password_file:
            password = Path(section.password_file).read_text().rstrip("\r\n") or None
        options = tuple(sorted(psycopg.conninfo.conninfo_to_dict(section.target).items()))
        return cls(tuple((k, str(v)) for k, v in options), section.user or None, password)

    @property
    def target(self) -> str:
        """The options as JSON (``pgml.callback_enable``'s first argument)."""
        return json.dumps(dict(self.options), sort_keys=True)

    def describe(self) -> str:
        """The target and role for messages: never the password."""
        where = psycopg.conninfo.make_conninfo(**dict(self.options))
        role = f" (user mapping FOR PUBLIC as {self.user})" if self.user else ""
        return f"{where}{role}"


def enable(dsn: str, setup: Setup) -> None:
    """``pgml.callback_enable`` over a direct connection (the schema must be installed)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET client_min_messages = warning")
        conn.execute(ENABLE, (setup.target, setup.user, setup.password))


def disable(dsn: str) -> None:
    """``pgml.callback_disable`` over a direct connection: the stubs answer 0A000 again."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET client_min_messages = warning")
        conn.execute(DISABLE)


def error_text(exc: psycopg.Error) -> str:
    """SQLSTATE, message, detail and hint of a server error; never its context (which may quote SQL)."""
    diag = exc.diag
    if diag.message_primary is None:
        return f"{type(exc).__name__}: {str(exc).strip()}"
    parts = [f"{diag.sqlstate}: {diag.message_primary}"]
    parts += [f"DETAIL: {diag.message_detail}"] if diag.message_detail else []
    parts += [f"HINT: {diag.message_hint}"] if diag.message_hint else []
    return "\n".join(parts)
