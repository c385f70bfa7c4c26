"""The session settings the rewriter relies on, checked before it rewrites a statement.

Owns: refusing (0A000, with a hint) a session whose settings would make a rewrite read texts or
write literals differently from the server: ``standard_conforming_strings`` off (literals the
rewriter deparses treat backslashes as ordinary characters), or a ``client_encoding`` other than
UTF-8 (texts, parameters and rows are read as UTF-8).

Must not: look anywhere but at the :class:`proxy.rewrite.steps.Facts` it is given.
"""

from __future__ import annotations

from proxy.errors import FeatureNotSupported
from proxy.rewrite.steps import Facts


def require_rewritable(facts: Facts) -> None:
    """Both settings: a statement that mentions ``pgml`` is rewritten only under them."""
    if not facts.standard_strings:
        raise FeatureNotSupported(
            "pgml-proxy rewrites statements only with standard_conforming_strings = on",
            hint="SET standard_conforming_strings = on (the default since PostgreSQL 9.1).",
        )
    require_utf8(facts)


def require_utf8(facts: Facts) -> None:
    """Texts, parameters and rows are read as UTF-8: another client_encoding is refused (0A000).

    The session reports ``client_encoding`` from the server's ParameterStatus (UTF8 when it does not).
    SQL_ASCII (psql's choice in the C locale) converts nothing, so the bytes are the database's UTF-8.
    """
    encoding = facts.client_encoding.upper().replace("-", "").replace("_", "")
    if encoding not in ("UTF8", "UNICODE", "SQLASCII"):
        raise FeatureNotSupported(
            "pgml-proxy rewrites statements only with client_encoding UTF8",
            hint="SET client_encoding = 'UTF8' (the default of psql, psycopg, asyncpg and JDBC).",
        )
