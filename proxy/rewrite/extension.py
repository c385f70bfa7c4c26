"""``CREATE`` / ``ALTER`` / ``DROP EXTENSION pgml``: what they mean for the schema the proxy installs.

Owns: recognising the extension statements naming ``pgml`` (:func:`extension_command`), the
server's own answer for each case (command tag, NOTICE, ERROR with its SQLSTATE), the ``DO``
statement that carries one out on the server — at the point of the statement string where the
client wrote it, in the client's transaction — and :func:`carry_out`: one such statement alone,
run by the proxy so that it can answer as the server would. ``DROP EXTENSION pgml`` drops nothing
(the extension owns no objects) and says so; ``DROP SCHEMA pgml CASCADE`` removes the schema. With a
``[callback]`` set-up (:class:`proxy.callback.Setup`), installing or upgrading the schema also sets up
callback mode (``pgml.callback_enable``), as does a CREATE by the schema's owner where it is not set up.

Must not: paste client text into SQL (texts travel hex-encoded, :func:`text_expression`), or run
anything itself (:func:`carry_out` yields :mod:`proxy.rewrite.steps` requests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pglast import ast, enums

from proxy import PGML_API_LEVEL, callback, schema
from proxy.errors import from_fields
from proxy.rewrite.steps import Steps, run
from proxy.rewrite.tree import deparse
from proxy.wire import messages

# Where a DO statement run by the proxy itself reports which answer it reached (a transaction-local setting).
OUTCOME_SETTING = "pgml_proxy.extension"
# ... and whether the client gets NOTICEs at all (the server sends none below its client_min_messages).
OUTCOME_QUERY = (
    f"SELECT pg_catalog.current_setting('{OUTCOME_SETTING}', true), pg_catalog.current_setting('client_min_messages')"
)
NOTICE_LEVELS = frozenset({"debug5", "debug4", "debug3", "debug2", "debug1", "debug", "log", "notice"})
_QUIET_LEVELS = ", ".join(f"'{level}'" for level in sorted(NOTICE_LEVELS))


@dataclass(frozen=True)
class Answer:
    """What the server says besides the command tag: a NOTICE, or the ERROR the statement fails with."""

    severity: str  # "NOTICE" or "ERROR"
    code: str
    message: str
    hint: str | None = None

    def fields(self) -> tuple[tuple[str, str], ...]:
        fields = [("S", self.severity), ("V", self.severity), ("C", self.code), ("M", self.message)]
        return tuple(fields + ([("H", self.hint)] if self.hint else []))


ALREADY_EXISTS = Answer("ERROR", "42710", 'extension "pgml" already exists')
SKIPPING = Answer("NOTICE", "42710", 'extension "pgml" already exists, skipping')
DOES_NOT_EXIST = Answer("ERROR", "42704", 'extension "pgml" does not exist')
DOES_NOT_EXIST_SKIPPING = Answer("NOTICE", "00000", 'extension "pgml" does not exist, skipping')
UP_TO_DATE = Answer("NOTICE", "00000", f'version "{PGML_API_LEVEL}" of extension "pgml" is already installed')
KEPT = Answer(
    "NOTICE",
    "00000",
    'extension "pgml" owns no objects under pgml-proxy: its schema "pgml" is left in place',
    hint="DROP SCHEMA pgml CASCADE removes it with every project, model and deployment;"
    " pgml-proxy installs it again at the next pgml call.",
)
NO_SET_SCHEMA = Answer("ERROR", "0A000", 'extension "pgml" does not support SET SCHEMA')
NO_MEMBERS = Answer(
    "ERROR",
    "0A000",
    'extension "pgml" has no members under pgml-proxy: ALTER EXTENSION pgml ADD/DROP is not supported',
    hint="Objects of your own may live in schema pgml without being members of the extension.",
)
WRONG_SCHEMA = Answer(
    "ERROR",
    "0A000",
    'extension "pgml" must be installed in schema "pgml"',
    hint="Leave out WITH SCHEMA: the pgml functions, types and registry always live in schema pgml.",
)


@dataclass(frozen=True)
class ExtensionCommand:
    """One statement about extension ``pgml``: its command tag, and the DO statement carrying it out.

    The DO runs on the server where the statement stood (its checks see what the
    statements before it did) and answers as the server would: with ``report``
    False it raises the NOTICE or ERROR itself; with ``report`` True it only records
    which answer applies in ``OUTCOME_SETTING`` (read by ``OUTCOME_QUERY`` in the
    same transaction) so that the proxy can send that answer with the right tag.
    """

    tag: str
    # (say, the PL/pgSQL installing the schema) -> the PL/pgSQL of the command
    _steps: Callable[[Callable[[Answer], str], str], str]
    _others: str | None = None  # DROP EXTENSION of other extensions in the same statement

    @property
    def alone(self) -> bool:
        """The statement names no other extension (the proxy can answer it by itself)."""
        return self._others is None

    def statement(self, *, report: bool, setup: callback.Setup | None = None) -> ast.DoStmt:
        answers: list[Answer] = []

        def say(answer: Answer) -> str:
            answers.append(answer)
            if report:
                return f"PERFORM pg_catalog.set_config('{OUTCOME_SETTING}', '{len(answers) - 1}', true); RETURN;"
            options = [f"ERRCODE = '{answer.code}'", f"MESSAGE = {text_expression(answer.message)}"]
            if answer.hint:
                options.append(f"HINT = {text_expression(answer.hint)}")
            level = "EXCEPTION" if answer.severity == "ERROR" else "NOTICE"
            return f"RAISE {level} USING {', '.join(options)};"

        steps = self._steps(say, _apply(setup))
        prologue = f"PERFORM pg_catalog.set_config('{OUTCOME_SETTING}', '', true);" if report else ""
        body = (
            "DECLARE present boolean; quiet text; needed boolean := false; BEGIN "
            f"{prologue} present := pg_catalog.to_regclass('{schema.TABLE}') IS NOT NULL; {steps} END"
        )
        return ast.DoStmt(args=(ast.DefElem(defname="as", arg=ast.String(sval=body)),))

    def answer(self, reported: str | None) -> Answer | None:
        """The answer a ``report`` run recorded (None: just the command tag)."""
        if not reported:
            return None
        answers: list[Answer] = []

        def collect(answer: Answer) -> str:
            answers.append(answer)
            return ""

        self._steps(collect, "")
        return answers[int(reported)]


def extension_command(node: ast.Node | None) -> ExtensionCommand | None:
    """The command when ``node`` is CREATE / ALTER / DROP EXTENSION naming ``pgml`` (None otherwise)."""
    match node:
        case ast.CreateExtensionStmt(extname="pgml"):
            return _create(node)
        case ast.AlterExtensionStmt(extname="pgml"):
            return _update(node)
        case ast.DropStmt(removeType=enums.ObjectType.OBJECT_EXTENSION, objects=objects) if any(
            isinstance(o, ast.String) and o.sval == schema.SCHEMA for o in objects or ()
        ):
            return _drop(node)
        case ast.AlterObjectSchemaStmt(objectType=enums.ObjectType.OBJECT_EXTENSION, object=ast.String(sval="pgml")):
            return ExtensionCommand("ALTER EXTENSION", lambda say, _: _exists_or(say, DOES_NOT_EXIST, NO_SET_SCHEMA))
        case ast.AlterExtensionContentsStmt(extname="pgml"):
            return ExtensionCommand("ALTER EXTENSION", lambda say, _: _exists_or(say, DOES_NOT_EXIST, NO_MEMBERS))
    return None


def _exists_or(say: Callable[[Answer], str], missing: Answer, present: Answer) -> str:
    return f"IF NOT present THEN {say(missing)} END IF; {say(present)}"


def _options(node: ast.CreateExtensionStmt | ast.AlterExtensionStmt) -> dict[str, object]:
    found: dict[str, object] = {}
    for option in node.options or ():
        if isinstance(option, ast.DefElem) and option.defname is not None:
            arg = option.arg
            found[option.defname] = arg.sval if isinstance(arg, ast.String) else getattr(arg, "boolval", True)
    return found


def _create(node: ast.CreateExtensionStmt) -> ExtensionCommand:
    """CREATE EXTENSION [IF NOT EXISTS] pgml [WITH] [SCHEMA s] [VERSION v] [CASCADE], checked in the server's order."""
    options = _options(node)
    version, target, cascade = options.get("new_version"), options.get("schema"), bool(options.get("cascade"))

    def steps(say: Callable[[Answer], str], apply: str) -> str:
        checks = []
        if isinstance(version, str) and version != PGML_API_LEVEL:
            checks.append(say(_no_version(version)))
        if isinstance(target, str):
            missing = Answer("ERROR", "3F000", f'schema "{target}" does not exist')
            checks.append(f"IF NOT EXISTS (SELECT FROM pg_namespace WHERE nspname = {text_expression(target)}) THEN")
            checks.append(f"{say(missing)} END IF;")
            if target != schema.SCHEMA and not cascade:
                checks.append(say(WRONG_SCHEMA))
        # The server checks for the extension first: an installed one is all IF NOT EXISTS looks at.
        exists = "" if node.if_not_exists else say(ALREADY_EXISTS)
        parts = [f"IF present THEN {exists} ELSE {' '.join(checks)} END IF;", apply]
        if node.if_not_exists:
            parts.append(f"IF present THEN {say(SKIPPING)} END IF;")  # missing migrations applied all the same
        return " ".join(parts)

    return ExtensionCommand("CREATE EXTENSION", steps)


def _update(node: ast.AlterExtensionStmt) -> ExtensionCommand:
    """ALTER EXTENSION pgml UPDATE [TO v]: applies missing migrations, or says the version is installed."""
    version = _options(node).get("new_version")

    def steps(say: Callable[[Answer], str], apply: str) -> str:
        parts = [f"IF NOT present THEN {say(DOES_NOT_EXIST)} END IF;"]
        if isinstance(version, str) and version != PGML_API_LEVEL:
            parts.append(
                say(
                    Answer(
                        "ERROR",
                        "22023",
                        f'extension "pgml" has no update path from version "{PGML_API_LEVEL}" to version "{version}"',
                    )
                )
            )
        versions = ", ".join(str(m.version) for m in schema.migrations())
        parts.append(
            f"IF NOT EXISTS (SELECT FROM pg_catalog.unnest(ARRAY[{versions}]) AS v"
            f" WHERE v NOT IN (SELECT version FROM {schema.TABLE})) THEN {say(UP_TO_DATE)} RETURN; END IF;"
        )
        parts.append(apply)
        return " ".join(parts)

    return ExtensionCommand("ALTER EXTENSION", steps)


def _drop(node: ast.DropStmt) -> ExtensionCommand:
    """DROP EXTENSION [IF EXISTS] pgml [, other …] [CASCADE]: the others are dropped, pgml's schema is kept."""
    others = tuple(o for o in node.objects or () if not (isinstance(o, ast.String) and o.sval == schema.SCHEMA))
    other_sql = None
    if others:
        rest = ast.DropStmt(
            objects=others,
            removeType=node.removeType,
            behavior=node.behavior,
            missing_ok=node.missing_ok,
            concurrent=node.concurrent,
        )
        other_sql = deparse(rest)

    def steps(say: Callable[[Answer], str], _: str) -> str:
        missing = say(DOES_NOT_EXIST_SKIPPING if node.missing_ok else DOES_NOT_EXIST)
        parts = [f"IF NOT present THEN {missing} END IF;"]
        if other_sql is not None:
            parts.append(f"EXECUTE {text_expression(other_sql)};")
        parts.append(f"IF present THEN {say(KEPT)} END IF;")
        return " ".join(parts)

    return ExtensionCommand("DROP EXTENSION", steps, other_sql)


def _no_version(version: str) -> Answer:
    return Answer(
        "ERROR", "22023", f'extension "pgml" has no installation script nor update path for version "{version}"'
    )


def _apply(setup: callback.Setup | None) -> str:
    """PL/pgSQL applying every missing migration, with the server's "already exists, skipping" notices muted,
    then setting up callback mode when ``setup`` is given (see the module's docstring).

    The advisory lock that serializes installers is taken only when a migration is missing (an installed,
    current schema takes no lock, so ``BEGIN; CREATE EXTENSION IF NOT EXISTS pgml`` holds none for the
    rest of the client's transaction); each migration is checked again under it.
    """
    versions = ", ".join(str(m.version) for m in schema.migrations())
    check = (
        f"IF present THEN IF EXISTS (SELECT FROM pg_catalog.unnest(ARRAY[{versions}]) AS v"
        f" WHERE v NOT IN (SELECT version FROM {schema.TABLE})) THEN needed := true; END IF;"
        " ELSE needed := true; END IF;"
    )
    parts = [
        check,
        "IF needed THEN",
        f"PERFORM pg_catalog.pg_advisory_xact_lock({schema.LOCK_KEY}::pg_catalog.int8);",
        f"IF pg_catalog.current_setting('client_min_messages') IN ({_QUIET_LEVELS}) THEN",
        "quiet := pg_catalog.current_setting('client_min_messages');",
        "PERFORM pg_catalog.set_config('client_min_messages', 'warning', true);",
        "END IF;",
        f"EXECUTE {text_expression('CREATE SCHEMA IF NOT EXISTS pgml')};",
        f"EXECUTE {text_expression(schema.CREATE_TABLE)};",
    ]
    table = schema.TABLE
    for m in schema.migrations():
        parts.append(
            f"IF NOT EXISTS (SELECT FROM {table} WHERE version = {m.version}) THEN EXECUTE {text_expression(m.sql)};"
            f" INSERT INTO {table} (version, name) VALUES ({m.version}, '{m.name}') ON CONFLICT DO NOTHING; END IF;"
        )
    parts.append(
        "IF quiet IS NOT NULL THEN PERFORM pg_catalog.set_config('client_min_messages', quiet, true);"
        " quiet := NULL; END IF;"
    )
    parts.append("END IF;")
    if setup is not None:
        parts.append(_enable(setup))
    return " ".join(parts)


def _enable(setup: callback.Setup) -> str:
    """PL/pgSQL calling ``pgml.callback_enable`` when the schema was just installed or upgraded, or callbacks
    are not set up and the caller owns the schema (an ordinary role's CREATE IF NOT EXISTS changes nothing)."""
    values = [text_expression(setup.target) + "::pg_catalog.jsonb"]
    values += [text_expression(v) if v is not None else "NULL" for v in (setup.user, setup.password)]
    return (
        f"IF needed OR (NOT EXISTS (SELECT FROM pg_catalog.pg_foreign_server WHERE srvname = '{callback.SERVER}')"
        " AND pg_catalog.pg_has_role((SELECT nspowner FROM pg_catalog.pg_namespace WHERE nspname = 'pgml'),"
        f" 'USAGE')) THEN PERFORM pgml.callback_enable({', '.join(values)}); END IF;"
    )


def text_expression(value: str) -> str:
    """A PL/pgSQL text expression for ``value``: hex-encoded, so no quoting of any text is ever involved."""
    return f"pg_catalog.convert_from('\\x{value.encode().hex()}'::bytea, 'UTF8')"


def carry_out(command: ExtensionCommand, setup: callback.Setup | None = None) -> Steps[bytes]:
    """Run a query string that is ``command`` alone; the frames the server would answer before ReadyForQuery
    (a NOTICE, the command tag), or raise the server's error for it (nothing done)."""
    results = yield run(deparse(command.statement(report=True, setup=setup)), OUTCOME_QUERY)
    ((reported, level),) = results[1].rows
    answer = command.answer(reported)
    if answer is not None and answer.severity == "ERROR":
        raise from_fields(answer.fields())
    frames = b""
    if answer is not None and level in NOTICE_LEVELS:
        frames = messages.NoticeResponse(answer.fields()).encode()
    return frames + messages.CommandComplete(command.tag).encode()


def in_place(
    stmts: tuple[ast.RawStmt, ...], setup: callback.Setup | None = None
) -> tuple[tuple[ast.RawStmt, ...], tuple[int, ...]]:
    """The statements with each extension command replaced by its DO statement, and those DOs' positions."""
    commands = [extension_command(raw.stmt) for raw in stmts]
    replaced = tuple(
        raw
        if command is None
        else ast.RawStmt(
            stmt=command.statement(report=False, setup=setup), stmt_location=raw.stmt_location, stmt_len=raw.stmt_len
        )
        for raw, command in zip(stmts, commands, strict=True)
    )
    return replaced, tuple(i for i, command in enumerate(commands) if command is not None)
