"""PostgresML's session settings, read from the caller's own session for the calls they govern.

Owns: which functions the settings govern (:data:`GOVERNED`: those that load Hugging Face models or train; not
predict, chunk, version or the rest), reading ``pgml.huggingface_whitelist``,
``pgml.huggingface_trust_remote_code``, ``pgml.huggingface_trust_remote_code_whitelist`` and
``pgml.omp_num_threads`` with ``current_setting(name, true)`` in one query on the caller's session (with
``client_min_messages``: the engine's notices of those calls follow a later ``SET`` of it, as the server's do), so that
``SET``, ``SET LOCAL``, ``set_config()``, ``ALTER ROLE … SET`` and ``ALTER DATABASE … SET`` all count (the server
reports no custom setting in ParameterStatus; on a callback session, the values its stub read in the caller's
session and SET ahead of its call, sql/010_callback_settings.sql), parsing them as PostgresML's GUCs would (a comma
list, a boolean, an integer ≥ 1; a bad value is 22023 with the server's own message), :func:`reading`, which gives
them to every governed :class:`~proxy.rewrite.steps.Evaluate` of one statement (read once, at its first governed
call; a statement without one sends nothing more; :class:`Portal`: a streamed portal's Executes share its
statement's read). No cacheable call depends on them (the whitelist and the trust settings govern transform and
transform_stream, which are never cacheable, as in PostgresML), so the rewriter's memory of rewritten statements
may answer for any session.

Must not: run anything itself (it yields :mod:`proxy.rewrite.steps` requests), or decide what the settings
allow (the engine does: they only ever narrow ``[engine]``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.api import SessionSettings
from proxy.errors import InvalidParameterValue
from proxy.rewrite.steps import Evaluate, Steps, run
from proxy.wire.messages import NoticeResponse

# The functions whose work the settings govern: model loading (whitelist, remote code) or compute (threads).
GOVERNED = frozenset({"transform", "transform_stream", "embed", "rank", "tune", "generate", "train", "train_joint"})
WHITELIST = "pgml.huggingface_whitelist"
TRUST = "pgml.huggingface_trust_remote_code"
TRUST_WHITELIST = "pgml.huggingface_trust_remote_code_whitelist"
THREADS = "pgml.omp_num_threads"
# ... and, in the same query, which of the engine's messages the session wants now (a SET after the startup
# packet counts): the level the server itself filters its notices by.
READ = "SELECT " + ", ".join(
    [f"pg_catalog.current_setting('{name}', true)" for name in (WHITELIST, TRUST, TRUST_WHITELIST, THREADS)]
    + ["pg_catalog.current_setting('client_min_messages')"]
)
INT_MAX = 2147483647
# PostgreSQL's parse_bool: a unique prefix of true/false/yes/no, on/off (at least "of"), 1/0, any case.
_TRUE = re.compile(r"(?i)t(?:r(?:ue?)?)?|y(?:es?)?|on|1")
_FALSE = re.compile(r"(?i)f(?:a(?:l(?:se?)?)?)?|n(?:o)?|off?|0")
T = TypeVar("T")


def read() -> Steps[SessionSettings]:
    """The settings as the caller's session has them now (one query)."""
    settings, _ = yield from read_all()
    return settings


def read_all() -> Steps[tuple[SessionSettings, frozenset[str]]]:
    """The settings and the engine severities the session's ``client_min_messages`` silences now (one query)."""
    (result,) = yield run(READ)
    *values, level = result.rows[0]
    return parse(*values), NoticeResponse.silenced(level or "")


def parse(whitelist: str | None, trust: str | None, trusted: str | None, threads: str | None) -> SessionSettings:
    """The four values ``current_setting`` gave (None or "": unset, PostgresML's defaults) as SessionSettings."""
    return SessionSettings(_list(whitelist), _bool(TRUST, trust), _list(trusted), _threads(threads))


def _list(value: str | None) -> tuple[str, ...]:
    """PostgresML's comma list: surrounding double quotes dropped, split at commas, empty items left out (and, as
    PostgreSQL's own list settings, spaces around an item: a model name has none)."""
    items = (value or "").strip().strip('"').split(",")
    return tuple(item.strip() for item in items if item.strip())


def _bool(name: str, value: str | None) -> bool:
    text = (value or "").strip()
    if not text:
        return False
    if _TRUE.fullmatch(text):
        return True
    if _FALSE.fullmatch(text):
        return False
    raise InvalidParameterValue(
        f'invalid value for parameter "{name}": "{value}"', hint=f'"{name}" requires a Boolean value.'
    )


def _threads(value: str | None) -> int | None:
    text = (value or "").strip()
    if not text:
        return None
    if not re.fullmatch(r"[+-]?\d+", text):
        raise InvalidParameterValue(
            f'invalid value for parameter "{THREADS}": "{value}"', hint=f'"{THREADS}" requires an integer value.'
        )
    count = int(text)
    if not 1 <= count <= INT_MAX:
        raise InvalidParameterValue(f'{count} is outside the valid range for parameter "{THREADS}" (1 .. {INT_MAX})')
    return count


@dataclass
class Once:
    """The settings of one statement, once read (shared by the steps of a streamed portal's Executes)."""

    settings: SessionSettings | None = None
    silenced: frozenset[str] | None = None  # what its client_min_messages silences, read with them


class Portal:
    """A streamed portal's driver (``proxy.rewrite.steps.drive`` bound to its session): every Execute's steps run
    :func:`reading` with the settings its statement read at the first governed call of any of them."""

    def __init__(self, drive: Callable[[Steps[None]], Awaitable[None]]) -> None:
        self._drive = drive
        self._once = Once()

    def __call__(self, steps: Steps[None]) -> Awaitable[None]:
        return self._drive(reading(steps, self._once))


def reading(steps: Steps[T], once: Once | None = None) -> Steps[T]:
    """``steps``, with the session's settings given to each governed Evaluate it yields: read once, before the
    first (none read when it yields none; ``once`` keeps them for later steps of the same statement); every
    other request passes through unchanged, answers and errors too."""
    once = once or Once()
    reply: Any = None
    failure: Exception | None = None
    try:
        while True:
            try:
                request = steps.send(reply) if failure is None else steps.throw(failure)
            except StopIteration as done:
                outcome: T = done.value
                return outcome
            reply, failure = None, None
            try:
                if isinstance(request, Evaluate) and request.signature.function in GOVERNED:
                    if once.settings is None:
                        once.settings, once.silenced = yield from read_all()
                    request = dataclasses.replace(request, settings=once.settings, silenced=once.silenced)
                reply = yield request
            except Exception as exc:  # the wrapped steps' to handle, where they yielded
                failure = exc
    finally:
        steps.close()
