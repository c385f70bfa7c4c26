"""Exceptions that carry a PostgreSQL SQLSTATE, and their one conversion to ErrorResponse fields.

Owns: the ``ProxyError`` hierarchy (each subclass names its SQLSTATE once, through
``__init_subclass__``), :func:`error_fields` (any exception -> the fields of its
ErrorResponse) and :func:`from_fields` (the server's fields -> an error to raise).

Must not: do I/O, encode messages (:mod:`proxy.wire.messages` does, and imports this
module: it must not import the codec), or inspect message text to decide anything
(messages are for people; codes are for programs).
"""

from __future__ import annotations

from typing import ClassVar

from proxy import __version__

_BY_CODE: dict[str, type[ProxyError]] = {}


class ProxyError(Exception):
    """Base of every error the proxy reports to a client.

    ``detail``/``hint`` become the D/H fields, ``position`` (1-based character
    index into the query) the P field.
    """

    sqlstate: ClassVar[str] = "XX000"

    def __init_subclass__(cls, code: str | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if code is None:
            return
        if code in _BY_CODE:
            raise TypeError(f"SQLSTATE {code} already bound to {_BY_CODE[code].__name__}")
        cls.sqlstate = code
        _BY_CODE[code] = cls

    def __init__(
        self,
        message: str,
        *,
        detail: str | None = None,
        hint: str | None = None,
        position: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint
        self.position = position


class InternalError(ProxyError, code="XX000"):
    """A bug or an unexpected fault inside the proxy."""


class ProtocolViolation(ProxyError, code="08P01"):
    """Malformed or out-of-sequence protocol traffic; the connection is closed."""


class ConnectionFailure(ProxyError, code="08006"):
    """The upstream connection broke."""


class UnableToConnect(ProxyError, code="08001"):
    """The upstream could not be reached or refused the connection."""


class TooManyConnections(ProxyError, code="53300"):
    """``proxy.max_clients`` is reached."""


class AdminShutdown(ProxyError, code="57P01"):
    """The proxy is shutting down."""


class FeatureNotSupported(ProxyError, code="0A000"):
    """Something the proxy deliberately does not do (e.g. replication)."""


class InvalidParameterValue(ProxyError, code="22023"):
    """A bad argument value."""


class UndefinedFunction(ProxyError, code="42883"):
    """An unknown ``pgml.*`` function or overload."""


class ProgramLimitExceeded(ProxyError, code="54000"):
    """An input beyond the proxy's documented size limits (statement size: ``proxy.rewrite.analyze``)."""


class StatementTooComplex(ProxyError, code="54001"):
    """Nesting deeper than the proxy evaluates (expression trees), like the server's stack limit."""

    @classmethod
    def nesting(cls) -> StatementTooComplex:
        """A statement whose parse tree nests deeper than Python walks (RecursionError while rewriting)."""
        return cls(
            "statement too complex for pgml-proxy: its expressions nest too deeply",
            hint="Simplify the statement around the pgml call, or compute parts of it in a previous statement.",
        )


class DuplicateCursor(ProxyError, code="42P03"):
    """A proxy-owned cursor of that name exists."""


class InvalidCursorName(ProxyError, code="34000"):
    """FETCH or CLOSE of a cursor that does not exist."""


class NotInPrerequisiteState(ProxyError, code="55000"):
    """E.g. a backward FETCH on a cursor that only scans forward."""


class InFailedTransaction(ProxyError, code="25P02"):
    """A statement inside a transaction that already failed."""


class NoActiveTransaction(ProxyError, code="25P01"):
    """DECLARE CURSOR (without HOLD) outside a transaction block."""


class InsufficientPrivilege(ProxyError, code="42501"):
    """A statement the session may not run through the proxy (a callback session's other statements)."""


class InvalidAuthorization(ProxyError, code="28000"):
    """Authentication could not be relayed."""


def error_class(code: str) -> type[ProxyError]:
    """The registered class for a SQLSTATE (``ProxyError`` when none)."""
    return _BY_CODE.get(code, ProxyError)


def error_fields(exc: BaseException, severity: str = "ERROR") -> tuple[tuple[str, str], ...]:
    """ErrorResponse fields for any exception.

    A ``ProxyError`` keeps its SQLSTATE and extras; anything else is an internal
    fault (XX000) whose message names the exception type, never its repr of
    arbitrary data.
    """
    if isinstance(exc, ProxyError) or isinstance(getattr(exc, "sqlstate", None), str):
        # ProxyError, or an engine error: same attributes (the engine must not import the proxy).
        fields = [("S", severity), ("V", severity), ("C", exc.sqlstate), ("M", exc.message)]  # type: ignore[attr-defined]
        for code, attr in (("D", "detail"), ("H", "hint")):
            if getattr(exc, attr, None):
                fields.append((code, getattr(exc, attr)))
        if getattr(exc, "position", None) is not None:
            fields.append(("P", str(exc.position)))  # type: ignore[attr-defined]
    else:
        fields = [
            ("S", severity),
            ("V", severity),
            ("C", InternalError.sqlstate),
            ("M", f"pgml-proxy internal error: {type(exc).__name__}: {exc}"),
            ("H", f"This is a bug in pgml-proxy {__version__}; the server log has the traceback."),
        ]
    return tuple(fields)


def from_fields(fields: tuple[tuple[str, str], ...]) -> ProxyError:
    """The server's own ErrorResponse (from an internal statement) as an error to raise again, code kept."""
    found = dict(fields)
    code = found.get("C", "XX000")
    error = error_class(code)(found.get("M", "upstream error"), detail=found.get("D"), hint=found.get("H"))
    error.sqlstate = code  # type: ignore[misc]
    return error
