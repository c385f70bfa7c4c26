"""The connection core without sockets: client messages and recorded server replies in, exact bytes out.

Cases come from ``tests/session_cases/*.case``. A file holds cases, each begun by ``=== name``; a case is
a list of steps, one a line (indented lines continue the one above, ``#`` starts a comment):

    client: <messages>        the client sends these, as one chunk
    server: <messages>        the server sends these, as one chunk
    to server: <messages>     what the core wrote upstream since the last check, exactly ("nothing": none);
                              "to server in one write:" also checks it went out in one write
    to client: <messages>     the same for the client
    decide: <script>          what the (scripted) rewriter does at its next decisions, in order
    release                   a decision waiting at ``Hold`` goes on
    cancel                    a CancelRequest for the connection arrives
    phase: <phase>            the connection's phase now (proxy.session.state.Phase values)
    closed / fatal: <code>    the shell was asked to close (after a FATAL error with this SQLSTATE)
    key: <pid>                the shell was given the server's cancel key (BackendKeyData(pid, "key!"))
    paused: yes / no          whether reading from the client is paused
    startup                   (first step) begin before authentication instead of after it

Messages are builder calls separated by commas (``Parse("s", "SELECT 1"), Sync``; see ``MESSAGES``);
decision scripts are ``DECISIONS`` calls. Every case must account for all the bytes written: output
left unchecked at its end fails it, as does a decision left unused. No sockets, no PostgreSQL.
"""

from __future__ import annotations

import ast
import asyncio
import itertools
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from engine.api import Canceled
from proxy.errors import error_fields, from_fields
from proxy.rewrite import decide
from proxy.session.core import Connection
from proxy.session.exchange import Statement
from proxy.session.router import ROUTES, Route
from proxy.session.state import ACTIVE, CLIENT_EVENTS, TRANSITIONS, Phase, State
from proxy.wire import messages as pq
from proxy.wire.frames import Backend, Frontend, StartupMessage, pack, split_frames

CASES = Path(__file__).parent / "session_cases"


# --------------------------------------------------------------------------- #
# Message builders (the case files' vocabulary)
# --------------------------------------------------------------------------- #


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def _fields(severity: str, code: str, message: str, extra: dict[str, str]) -> bytes:
    fields = [("S", severity), ("V", severity), ("C", code), ("M", message), *extra.items()]
    return pq.ErrorResponse(tuple(fields)).encode()


def _bind(portal: str, statement: str, *values: str | None) -> bytes:
    encoded = tuple(None if v is None else v.encode() for v in values)
    return pq.Bind(portal, statement, (), encoded, ()).encode()


def _sasl_initial(mechanism: str, data: str) -> bytes:
    return pack(Frontend.PASSWORD, _s(mechanism) + struct.pack("!i", len(data)) + data.encode())


def _row_description(*columns: str, oid: int = 25) -> bytes:
    return pq.RowDescription(tuple(pq.Column(c, oid) for c in columns)).encode()


def _data_row(*values: str | None) -> bytes:
    return pq.DataRow(tuple(None if v is None else v.encode() for v in values)).encode()


MESSAGES: dict[str, Callable[..., bytes]] = {
    # client
    "Query": lambda sql: pq.Query(sql).encode(),
    "Parse": lambda name, sql, *types: pq.Parse(name, sql, tuple(types)).encode(),
    "Bind": _bind,
    "Describe": lambda kind, name: pq.Describe(pq.Target(kind), name).encode(),
    "Execute": lambda portal, limit=0: pq.Execute(portal, limit).encode(),
    "Close": lambda kind, name: pq.Close(pq.Target(kind), name).encode(),
    "Sync": lambda: pq.Sync().encode(),
    "Flush": lambda: pq.Flush().encode(),
    "Terminate": lambda: pq.Terminate().encode(),
    "CopyData": lambda text: pq.CopyData(text.encode()).encode(),
    "CopyDone": lambda: pq.CopyDone().encode(),
    "Password": lambda text: pack(Frontend.PASSWORD, _s(text)),
    "SASLInitial": lambda mechanism, data: _sasl_initial(mechanism, data),
    "Garbage": lambda: b"\x01\x00\x00\x00\x04",  # not a frontend message type
    "Filler": lambda megabytes: pq.CopyData(b"x" * 1_000_000).encode() * megabytes,  # COPY data, a megabyte a frame
    # server
    "AuthenticationOk": lambda: pq.Authentication(pq.AUTH_OK, b"").encode(),
    "AuthenticationCleartext": lambda: pq.Authentication(pq.AUTH_CLEARTEXT, b"").encode(),
    "BackendKeyData": lambda pid, key: pq.BackendKeyData(pid, key.encode()).encode(),
    "ParameterStatus": lambda name, value: pq.ParameterStatus(name, value).encode(),
    "ReadyForQuery": lambda status: pq.ReadyForQuery(status).encode(),
    "ParseComplete": lambda: pq.ParseComplete().encode(),
    "BindComplete": lambda: pq.BindComplete().encode(),
    "CloseComplete": lambda: pq.CloseComplete().encode(),
    "NoData": lambda: pq.NoData().encode(),
    "ParameterDescription": lambda *oids: pq.ParameterDescription(tuple(oids)).encode(),
    "RowDescription": _row_description,
    "DataRow": _data_row,
    "CommandComplete": lambda tag: pq.CommandComplete(tag).encode(),
    "CopyInResponse": lambda: pack(Backend.COPY_IN_RESPONSE, b"\0\0\0"),
    "Error": lambda code, message, **extra: _fields("ERROR", code, message, extra),
    "Fatal": lambda code, message, **extra: _fields("FATAL", code, message, extra),
    "AuthenticationSASL": lambda *mechanisms: pq.Authentication.sasl(list(mechanisms)).encode(),
    "Warning": lambda message: pq.NoticeResponse.warning(message).encode(),
    # what the proxy itself sends
    "Raise": lambda code, message, sql=None: pq.Query(
        decide.raise_statement(from_fields((("C", code), ("M", message))), sql)
    ).encode(),
    "ProxyError": lambda code, message: pq.ErrorResponse.of(from_fields((("C", code), ("M", message)))).encode(),
    "RaiseSQL": lambda code, message: decide.raise_statement(from_fields((("C", code), ("M", message)))),
}


# --------------------------------------------------------------------------- #
# The scripted rewriter
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Run:
    """The decision runs this statement on the client's session (``port.execute``) before it decides."""

    sql: str


@dataclass(frozen=True)
class RunOpen:
    """As :class:`Run`, keeping the implicit transaction open for the statements that follow (``keep_open``)."""

    sql: str


@dataclass(frozen=True)
class Hold:
    """The decision waits here until the case's ``release`` step (or a cancel, which fails it with 57014)."""


@dataclass(frozen=True)
class Note:
    """The decision leaves an engine WARNING for the client."""

    message: str


DECISIONS: dict[str, Callable[..., Any]] = {
    "Forward": lambda: decide.FORWARD,
    "Rewritten": lambda *frames: decide.Rewritten(b"".join(frames)),
    "Respond": lambda *frames: decide.Respond(b"".join(frames)),
    "Fail": lambda code, message: decide.Fail(from_fields((("C", code), ("M", message)))),
    "DeferToBind": lambda *types: decide.DeferToBind(tuple(types)),
    "Rebound": lambda name, sql, portal="": decide.Rebound(
        pq.Parse(name, sql, ()).encode(), _bind(portal, name), MESSAGES["Close"]("S", name), name
    ),
    "Run": Run,
    "RunOpen": RunOpen,
    "Hold": Hold,
    "Note": Note,
}


class ScriptedRewriter:
    """Stands in for :class:`proxy.rewrite.decide.Rewriter`: each decision follows the case's script."""

    engine = None

    def __init__(self) -> None:
        self.script: deque[Any] = deque()
        self.gate: asyncio.Future[None] | None = None

    def sql_prepared(self, port: object) -> bool:
        return False

    def cancel(self, session: int) -> None:
        if self.gate is not None and not self.gate.done():
            self.gate.set_exception(Canceled("canceling statement due to user request"))

    async def decide(self, message: object, port: Any) -> decide.Decision:
        return await self._next(port)

    async def decide_bind(self, bind: object, sql: str, types: object, port: Any, private_id: int) -> decide.Decision:
        return await self._next(port)

    async def _next(self, port: Any) -> decide.Decision:
        while True:
            assert self.script, "the core asked for a decision the case did not script"
            step = self.script.popleft()
            match step:
                case Run(sql=sql):
                    await port.execute([Statement(sql)])
                case RunOpen(sql=sql):
                    await port.execute([Statement(sql)], keep_open=True)
                case Hold():
                    self.gate = asyncio.get_running_loop().create_future()
                    await self.gate
                case Note(message=message):
                    port.notices.append(message)
                case _:
                    return step  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- #
# The I/O stand-ins
# --------------------------------------------------------------------------- #


class Recorder:
    """A sink: every write kept, in order."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.is_closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        if not self.is_closed:
            self.writes.append(bytes(data))

    def writelines(self, chunks: list[bytes]) -> None:
        if not self.is_closed:
            self.writes.append(b"".join(chunks))

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def take(self) -> list[bytes]:
        writes, self.writes = self.writes, []
        return writes


@dataclass
class Shell:
    """What :class:`proxy.session.shell.Session` does for the core, on recorders."""

    client: Recorder
    upstream: Recorder
    core: Connection | None = None
    closed: bool = False
    fatal_code: str | None = None
    keys: list[tuple[int, bytes]] = field(default_factory=list)

    def fatal(self, exc: BaseException) -> None:
        self.fatal_code = dict(error_fields(exc)).get("C")
        self.client.write(pq.ErrorResponse.of(exc, "FATAL").encode())
        self.close()

    def close(self) -> None:
        assert self.core is not None
        if self.core.close() and not self.upstream.is_closed:
            self.upstream.write(pq.Terminate().encode())
        self.closed = self.upstream.is_closed = self.client.is_closed = True

    def remember_key(self, key: tuple[int, bytes]) -> None:
        self.keys.append(key)


# --------------------------------------------------------------------------- #
# Reading case files
# --------------------------------------------------------------------------- #


@dataclass
class Case:
    name: str
    where: str
    steps: list[tuple[str, str, int]]  # (directive, argument, line)


def _read_cases() -> list[Case]:
    cases: list[Case] = []
    for path in sorted(CASES.glob("*.case")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            text = line.split("#", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
            if not text:
                continue
            if text.startswith("==="):
                cases.append(Case(text[3:].strip(), f"{path.name}:{number}", []))
            elif text[0].isspace():  # continues the step above
                directive, argument, first = cases[-1].steps[-1]
                cases[-1].steps[-1] = (directive, f"{argument} {text.strip()}", first)
            else:
                directive, _, argument = text.partition(":")
                cases[-1].steps.append((directive.strip(), argument.strip(), number))
    return cases


def _evaluate(node: ast.expr, names: dict[str, Callable[..., Any]]) -> Any:
    """A builder call, a literal, or a list of them: nothing else in a case file is evaluated."""
    match node:
        case ast.Constant(value=value):
            return value
        case ast.Name(id=name):
            return names[name]()
        case ast.Call(func=ast.Name(id=name), args=args, keywords=keywords):
            kwargs = {k.arg: _evaluate(k.value, names) for k in keywords if k.arg is not None}
            return names[name](*[_evaluate(a, names) for a in args], **kwargs)
        case ast.UnaryOp(op=ast.USub(), operand=ast.Constant(value=int(value))):
            return -value
    raise ValueError(f"not a builder call or literal: {ast.dump(node)}")


def _items(argument: str, names: dict[str, Callable[..., Any]]) -> list[Any]:
    if argument == "nothing":
        return []
    tree = ast.parse(argument, mode="eval").body
    nodes = tree.elts if isinstance(tree, ast.Tuple) else [tree]
    return [_evaluate(node, names) for node in nodes]


def _describe(data: bytes) -> list[str]:
    """Frames as ``type + body`` for readable failures."""
    try:
        return [f"{chr(f.type)} {f.raw[5:]!r}" for f in split_frames(data)]
    except struct.error:
        return [repr(data)]


# --------------------------------------------------------------------------- #
# Running a case
# --------------------------------------------------------------------------- #


async def _settle() -> None:
    """Let every task the core started run as far as it can (no I/O here: a few loop turns suffice)."""
    for _ in range(20):
        await asyncio.sleep(0)


STARTUP = StartupMessage(3, 0, (("user", "alice"), ("database", "shop")))
SESSION_ID = 7


class CaseRun:
    """One case's core, recorders and rewriter."""

    def __init__(self) -> None:
        self.client, self.upstream = Recorder(), Recorder()
        self.shell = Shell(self.client, self.upstream)
        self.rewriter = ScriptedRewriter()
        self.core = Connection(
            self.rewriter,  # type: ignore[arg-type]
            self.shell,
            self.client,
            self.upstream,
            session_id=SESSION_ID,
            database="shop",
            max_message_bytes=1 << 20,
        )
        self.shell.core = self.core
        self.core.start(STARTUP)

    def authenticate(self) -> None:
        self.core.upstream_data(
            MESSAGES["AuthenticationOk"]() + MESSAGES["BackendKeyData"](42, "key!") + MESSAGES["ReadyForQuery"]("I")
        )
        self.client.take()
        self.upstream.take()

    def expect(self, sink: Recorder, argument: str, one_write: bool, where: str) -> None:
        writes = sink.take()
        want = b"".join(_items(argument, MESSAGES))
        got = b"".join(writes)
        assert _describe(got) == _describe(want), where
        assert got == want, where
        if one_write:
            assert len(writes) == 1, f"{where}: {len(writes)} writes"

    async def step(self, directive: str, argument: str, where: str) -> None:
        match directive:
            case "client":
                self.core.client_data(b"".join(_items(argument, MESSAGES)))
            case "server":
                self.core.upstream_data(b"".join(_items(argument, MESSAGES)))
            case "to server" | "to server in one write":
                self.expect(self.upstream, argument, directive.endswith("write"), where)
            case "to client" | "to client in one write":
                self.expect(self.client, argument, directive.endswith("write"), where)
            case "decide":
                self.rewriter.script.extend(_items(argument, {**MESSAGES, **DECISIONS}))
            case "release":
                assert self.rewriter.gate is not None, where
                self.rewriter.gate.set_result(None)
            case "cancel":
                self.core.cancel()
            case "phase":
                assert self.core.state.phase is Phase(argument), f"{where}: {self.core.state.phase}"
            case "closed":
                assert self.shell.closed, where
            case "fatal":
                assert self.shell.closed and self.shell.fatal_code == argument, where
            case "key":
                assert self.shell.keys == [(int(argument), b"key!")], where
            case "paused":
                assert self.client.paused == (argument == "yes"), where
            case _:
                raise ValueError(f"{where}: unknown step {directive!r}")
        await _settle()


ALL_CASES = _read_cases()


@pytest.mark.parametrize("case", ALL_CASES, ids=[f"{c.where} {c.name}" for c in ALL_CASES])
async def test_case(case: Case) -> None:
    run = CaseRun()
    steps = case.steps
    if steps and steps[0][0] == "startup":
        run.upstream.take()
        steps = steps[1:]
    else:
        run.authenticate()
    for directive, argument, line in steps:
        await run.step(directive, argument, f"{case.where.split(':')[0]}:{line}")
    assert not run.upstream.writes, f"unchecked bytes to the server: {_describe(b''.join(run.upstream.writes))}"
    assert not run.client.writes, f"unchecked bytes to the client: {_describe(b''.join(run.client.writes))}"
    assert not run.rewriter.script, f"decisions left unused: {list(run.rewriter.script)}"
    run.shell.close()  # whatever the case left running (a held decision) ends with it
    await _settle()


def test_cases_are_there() -> None:
    assert len(ALL_CASES) >= 20


# --------------------------------------------------------------------------- #
# The state machine's hot-path fold agrees with its table
# --------------------------------------------------------------------------- #


def test_a_chunk_moves_the_phase_as_its_messages_do_one_by_one() -> None:
    """:meth:`State.sent` (a few C-level passes per chunk) equals firing each message's event in turn."""
    alphabet = b"QSFPBDECHdcfp"  # every event, and messages of none
    for phase in Phase:
        for length in range(1, 5):
            for combo in itertools.product(alphabet, repeat=length):
                kinds = bytearray(combo)
                # Terminate can only end a chunk (nothing after it is read).
                for chunk in (kinds, kinds + b"X"):
                    stepwise = State()
                    stepwise.phase = phase
                    for kind in chunk:
                        if kind in CLIENT_EVENTS:
                            stepwise.fire(CLIENT_EVENTS[kind])
                    folded = State()
                    folded.phase = phase
                    ends = folded.sent(chunk)
                    assert folded.phase is stepwise.phase, (phase, bytes(chunk))
                    assert ends == folded.owed == sum(chunk.count(k) for k in b"QSF")


def test_the_table_routes_every_phase_and_decides_nothing_outside_the_active_ones() -> None:
    assert set(ROUTES) == set(Phase)
    for phase, routes in ROUTES.items():
        deciding = {Route.DECIDE, Route.ANSWER} & set(routes.values())
        assert not deciding or (phase in ACTIVE and phase is not Phase.SKIP_TO_SYNC), phase
    assert all(isinstance(t, Phase) for t in TRANSITIONS.values())
