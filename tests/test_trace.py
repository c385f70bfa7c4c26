"""Protocol tracing for developers (issue 11): each message described, never its data. Sans-IO."""

from __future__ import annotations

from proxy.wire.frames import Backend, Frontend, StartupMessage, pack
from proxy.wire.messages import (
    Bind,
    Close,
    Column,
    CommandComplete,
    DataRow,
    Describe,
    ErrorResponse,
    Execute,
    ParameterStatus,
    Parse,
    Query,
    ReadyForQuery,
    RowDescription,
    Sync,
    Target,
)
from proxy.wire.trace import Tracer, describe_startup

SECRET = "hunter2-секрет"


def traced(frames: list[bytes], *, frontend: bool, chunk: int | None = None) -> list[str]:
    lines: list[str] = []
    tracer = Tracer(lines.append, "C>P" if frontend else "S>P", frontend=frontend)
    data = b"".join(frames)
    step = chunk or len(data) or 1
    for i in range(0, len(data), step):
        tracer.feed(data[i : i + step])
    return lines


def test_client_messages_named_with_their_names_and_counts_never_values() -> None:
    frames = [
        Query(f"SELECT '{SECRET}'").encode(),
        Parse("s1", f"SELECT $1 || '{SECRET}'", (25,)).encode(),
        Bind("p1", "s1", (1,), (SECRET.encode(),), (0,)).encode(),
        Describe(Target.PORTAL, "p1").encode(),
        Execute("p1", 10).encode(),
        Close(Target.STATEMENT, "s1").encode(),
        Sync().encode(),
        pack(Frontend.PASSWORD, SECRET.encode() + b"\0"),
    ]
    lines = traced(frames, frontend=True)
    assert [line.split()[1] for line in lines] == [
        "Query", "Parse", "Bind", "Describe", "Execute", "Close", "Sync", "PasswordMessage",
    ]  # fmt: skip
    assert "statement='s1' param_types=1" in lines[1]
    assert "portal='p1' statement='s1' params=1 formats=b result_formats=1" in lines[2]
    assert "portal='p1'" in lines[3] and "max_rows=10" in lines[4] and "statement='s1'" in lines[5]
    assert all(line.startswith("C>P ") for line in lines)
    assert not any(SECRET in line or "hunter2" in line for line in lines)


def test_server_messages_and_frames_split_across_reads() -> None:
    frames = [
        RowDescription((Column("secret_column", 0, 0, 25, -1, -1, 0),)).encode(),
        DataRow((SECRET.encode(),)).encode(),
        CommandComplete("SELECT 1").encode(),
        ErrorResponse((("S", "ERROR"), ("V", "ERROR"), ("C", "22023"), ("M", SECRET))).encode(),
        ParameterStatus("application_name", SECRET).encode(),
        ReadyForQuery("E").encode(),
    ]
    lines = traced(frames, frontend=False, chunk=3)  # every frame arrives in pieces: described once, complete
    assert [line.split()[1] for line in lines] == [
        "RowDescription", "DataRow", "CommandComplete", "ErrorResponse", "ParameterStatus", "ReadyForQuery",
    ]  # fmt: skip
    assert "columns=1" in lines[0] and "columns=1" in lines[1] and "tag=SELECT" in lines[2]
    assert "severity=ERROR sqlstate=22023" in lines[3] and "name=application_name" in lines[4]
    assert "status=E" in lines[5]
    assert not any(SECRET in line for line in lines)


def test_malformed_frames_are_said_and_tracing_stops_without_raising() -> None:
    lines = traced([pack(Backend.READY_FOR_QUERY, b""), b"Z\0\0\0\1"], frontend=False, chunk=5)
    assert "ReadyForQuery" in lines[0] and "(malformed)" in lines[0]
    assert lines[1].endswith("malformed frame: tracing stops")


def test_startup_lists_parameter_names_only() -> None:
    line = describe_startup(StartupMessage(3, 0, (("user", "alice"), ("options", f"-c secret={SECRET}"))))
    assert line == "StartupMessage version=3.0 params=user,options"


def test_names_are_quoted_so_a_client_cannot_forge_log_lines() -> None:
    (line,) = traced([Parse("x\nsession 1 proxy>server Query len=9", "SELECT 1", ()).encode()], frontend=True)
    assert "\n" not in line and "statement='x\\nsession 1" in line
