"""Command line: ``pgml-proxy [--config PATH] [--listen HOST:PORT] [--upstream DSN] [--log-level L] [COMMAND]``.

Owns: argument parsing, logging setup, building the engine (the composition root: no other proxy module
imports ``engine.runtime``), choosing the upstream (configured DSN or an embedded cluster), the artifact
signing key file (resolved and created at start-up, its path handed to the engine), building the metrics
(:mod:`proxy.metrics`) around the engine and the server, running the server (and the ``[metrics]`` endpoint)
until SIGTERM/SIGINT, setting callback mode up (``init``, embedded start: :mod:`proxy.callback`) or off
(``init --no-callback``), and ``resign``: re-signing the registry's artifacts with a new key (rotation) or
signing unsigned ones an administrator has checked, directly on the upstream database;
``import-postgresml`` (:mod:`proxy.import_postgresml`) is dispatched with its flags.
Must not: hold state beyond one ``main()`` call, or print or log a key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg

from engine.api import Engine, EngineError, Observer
from engine.ml import signing
from engine.runtime.executor import LocalEngine
from proxy import PGML_API_LEVEL, __version__, admin_files, callback, import_postgresml, schema
from proxy.config import Config, ConfigError, load, split_address
from proxy.dsn import parse_dsn
from proxy.embedded import Cluster, ClusterError, command_dsn, find_bin_dir
from proxy.endpoint import Endpoint
from proxy.metrics import MeasuredEngine, Metrics
from proxy.rewrite.decide import Rewriter
from proxy.server import Server, UpstreamTarget
from proxy.wire import trace

log = logging.getLogger("pgml-proxy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgml-proxy",
        description="PostgreSQL wire-protocol proxy that serves the PostgresML pgml.* SQL API on any Postgres.",
    )
    parser.add_argument("--version", action="version", version=f"pgml-proxy {__version__} (pgml API {PGML_API_LEVEL})")
    parser.add_argument(
        "--config", help="TOML config file (default: $PGML_PROXY_CONFIG, else ./config.toml if present)"
    )
    parser.add_argument("--listen", help="HOST:PORT to accept clients on (proxy.listen)")
    parser.add_argument("--upstream", help="libpq URI of the real PostgreSQL (upstream.dsn); empty = embedded")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log.level")
    parser.add_argument(
        "--trace-protocol",
        action="store_true",
        help="log each protocol message: direction, type, length, statement and portal names, never values "
        "(log.trace_protocol; on at log.level = debug)",
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=["run", "init", "resign", IMPORT],
        help="run (default): start the proxy; init: install or upgrade the pgml schema in the upstream database "
        "named by the DSN (none: the embedded server, on its stored port), then exit; resign: re-sign the model "
        "artifacts in pgml.files of that database (key "
        "rotation, or signing unsigned artifacts after checking them), then exit. Run init and resign as an "
        "administrator: the owner of the pgml registry tables or a superuser, who see every project's rows "
        "(row-level security hides other roles' rows from anyone else); import-postgresml: convert the models "
        "PostgresML trained (pgml.files estimator.rmp) in place into signed pgml-proxy artifacts, then exit",
    )
    calls = parser.add_argument_group("callback mode: the database calls pgml-proxy through dblink (init, run)")
    calls.add_argument(
        "--callback",
        metavar="CONNINFO",
        help="libpq connection string by which the database reaches this proxy, e.g. 'host=10.0.0.5 port=6432' "
        "(callback.target; dbname defaults to the database's own)",
    )
    calls.add_argument("--callback-user", metavar="ROLE", help="role of the user mapping FOR PUBLIC (callback.user)")
    calls.add_argument(
        "--callback-password-file",
        metavar="PATH",
        help="file holding that role's password (callback.password_file; or PGML_PROXY_CALLBACK_PASSWORD)",
    )
    calls.add_argument(
        "--no-callback", action="store_true", help="init: turn callback mode off (the stubs answer 0A000 again)"
    )
    resign = parser.add_argument_group("resign options")
    resign.add_argument(
        "--old-key-file",
        help="key the artifacts are signed with now (default: [engine] artifact_key_file, else the default file)",
    )
    resign.add_argument(
        "--new-key-file", help="key to sign them with (default: the configured key); created if missing"
    )
    resign.add_argument(
        "--trust-unsigned",
        action="store_true",
        help="also sign the artifacts stored before signing existed (listed in pgml.unsigned_artifacts by the "
        "migration): only after checking them; unsigned rows written since are never signed",
    )
    resign.add_argument(
        "--old-database",
        metavar="NAME",
        help="database name the old signatures were made for (a renamed or restored database; default: the current)",
    )
    imports = parser.add_argument_group("import-postgresml options (also --trust-unsigned)")
    imports.add_argument(
        "--trust-pickle",
        action="store_true",
        help="also convert PostgresML's Python-runtime models, which are pickles: unpickling runs code from the "
        "database, so only for a database whose contents you trust",
    )
    imports.add_argument("--dry-run", action="store_true", help="report what would be converted; change nothing")
    return parser


IMPORT = "import-postgresml"
RESIGN_FLAGS = ("old_key_file", "new_key_file", "trust_unsigned", "old_database")
IMPORT_FLAGS = ("trust_pickle", "dry_run")


def config_path(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    env = os.environ.get("PGML_PROXY_CONFIG")
    if env:
        return Path(env)
    default = Path("config.toml")
    return default if default.is_file() else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "resign" and any(
        getattr(args, f) for f in RESIGN_FLAGS if args.command != IMPORT or f != "trust_unsigned"
    ):
        parser.error("--old-key-file, --new-key-file, --trust-unsigned and --old-database are options of resign")
    if args.command != IMPORT and any(getattr(args, flag) for flag in IMPORT_FLAGS):
        parser.error("--trust-pickle and --dry-run are options of import-postgresml")
    if args.no_callback and (args.command != "init" or args.callback):
        parser.error("--no-callback is an option of init, without --callback")
    try:
        config = load(
            config_path(args.config),
            os.environ,
            {
                "proxy.listen": args.listen,
                "upstream.dsn": args.upstream,
                "log.level": args.log_level,
                "log.trace_protocol": True if args.trace_protocol else None,
                "callback.target": args.callback,
                "callback.user": args.callback_user,
                "callback.password_file": args.callback_password_file,
            },
        )
        setup = None if args.no_callback else callback.Setup.of(config.callback)
    except ConfigError as exc:
        print(f"pgml-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pgml-proxy: cannot read callback.password_file: {exc.strerror or exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log.level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if config.log.trace_protocol:
        logging.getLogger(trace.LOGGER).setLevel(logging.DEBUG)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        log.warning("uvloop not available; using the default asyncio loop")
    if args.command == "init":
        return _init(config, setup, args.no_callback)
    if args.command == "resign" and args.old_key_file and args.new_key_file:
        return _resign(config, args)  # both keys given: the configured one is not needed (nor created)
    try:
        config, key_file, created = with_key_file(config)
    except EngineError as exc:
        print(f"pgml-proxy: {exc.message}", file=sys.stderr)
        return 2
    if args.command == "resign":
        return _resign(config, args)
    if args.command == IMPORT:
        options = import_postgresml.Options(args.trust_pickle, args.trust_unsigned, args.dry_run)
        return import_postgresml.run(config, options)
    log.info("artifact signing key: %s%s", key_file, " (created)" if created else "")
    try:
        connect_backend(config)
        return asyncio.run(_run(config, setup))
    except ClusterError as exc:
        print(f"pgml-proxy: embedded PostgreSQL failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pgml-proxy: cannot listen on {config.proxy.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except EngineError as exc:  # the engine could not be built (the Ray backend: no ray, no cluster)
        print(f"pgml-proxy: {exc.message}", file=sys.stderr)
        return 2


def _database(config: Config) -> contextlib.AbstractContextManager[str]:
    u = config.upstream
    return command_dsn(u.dsn, u.embedded_version, u.embedded_data_dir)


def _init(config: Config, setup: callback.Setup | None, no_callback: bool) -> int:
    try:
        with _database(config) as dsn:
            return _init_on(dsn, setup, no_callback)
    except ClusterError as exc:
        print(f"pgml-proxy init: embedded PostgreSQL failed: {exc}", file=sys.stderr)
        return 1


def _init_on(dsn: str, setup: callback.Setup | None, no_callback: bool) -> int:
    try:
        applied = schema.init(dsn)
        print(f"pgml schema is at version {schema.latest()} ({applied} migration(s) applied)")
        if no_callback:
            callback.disable(dsn)
            print("callback mode is off: pgml.* called outside pgml-proxy answers 0A000")
        elif setup is not None:
            callback.enable(dsn, setup)
            print(f"callback mode is on: the database calls pgml-proxy at {setup.describe()}")
    except psycopg.Error as exc:
        print(f"pgml-proxy init: {callback.error_text(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"pgml-proxy init: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def with_key_file(config: Config) -> tuple[Config, Path, bool]:
    """The config with ``[engine] artifact_key_file`` resolved to an absolute path, the path, whether it was created.

    Default: next to the embedded data directory when no upstream is configured, else the user's
    config directory. The file is created (0600) when missing and loaded once, so a bad key fails here.
    """
    configured = config.engine.artifact_key_file
    embedded = None if config.upstream.dsn else config.upstream.embedded_data_dir
    path = Path(configured).expanduser().absolute() if configured else signing.default_key_file(embedded)
    try:
        created = signing.ensure_key(path)
    except OSError as exc:
        raise EngineError(f"cannot create the artifact signing key file {path}: {exc.strerror or exc}") from None
    signing.load_key(path)
    engine = dataclasses.replace(config.engine, artifact_key_file=str(path))
    return dataclasses.replace(config, engine=engine), path, created



def _ray_backend() -> ModuleType:
    try:  # lazy: ray is an optional extra (pip install 'pgml-proxy[ray]') and takes seconds to import
        return importlib.import_module("engine.runtime.ray_backend")
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
        raise EngineError('[engine] backend = "ray" needs the ray package: pip install \'pgml-proxy[ray]\'') from None


def connect_backend(config: Config) -> None:
    """Connect to the ``[ray]`` cluster (``backend = "ray"``), before the event loop starts: it blocks for seconds."""
    if config.engine.backend == "ray":
        _ray_backend().connect(config.ray)


def build_engine(config: Config, observer: Observer | None = None) -> LocalEngine:
    """The engine of ``[engine] backend``: model work in this process, or on the ``[ray]`` cluster."""
    if config.engine.backend != "ray":
        return LocalEngine(config.engine, observer)
    engine: LocalEngine = _ray_backend().ray_engine(config.engine, config.ray, observer)
    return engine


async def _run(config: Config, setup: callback.Setup | None) -> int:
    cluster = None
    if config.upstream.dsn:
        target = UpstreamTarget(
            parse_dsn(config.upstream.dsn),
            parse_dsn(config.upstream.dsn).param("sslmode") or config.upstream.sslmode,
            config.upstream.sslrootcert,
            config.upstream.connect_timeout,
        )
    else:
        cluster = Cluster(find_bin_dir(config.upstream.embedded_version), Path(config.upstream.embedded_data_dir))
        log.info("starting embedded PostgreSQL %d in %s", config.upstream.embedded_version, cluster.data_dir)
        await asyncio.to_thread(cluster.start)
        await asyncio.to_thread(schema.init, cluster.dsn())
        if setup is not None:
            try:
                await asyncio.to_thread(callback.enable, cluster.dsn(), setup)
            except psycopg.Error as exc:
                await asyncio.to_thread(cluster.stop)
                print(f"pgml-proxy: callback mode: {callback.error_text(exc)}", file=sys.stderr)
                return 1
        target = UpstreamTarget(parse_dsn(cluster.dsn()), "disable", "", config.upstream.connect_timeout)
    metrics = Metrics()
    engine = build_engine(config, metrics)  # the composition root: the one place that builds the engine
    endpoint = None
    try:
        rewriter = Rewriter(MeasuredEngine(engine, metrics), stream=config.proxy.stream_outputs, callback=setup)
        server = Server(config, target, rewriter, metrics.counts)
        await server.start()
        metrics.watch(server.open_sessions, engine.stats)
        endpoint = await _metrics_endpoint(config, metrics, target, engine)
        server.install_signal_handlers()
        user = target.dsn.user or "postgres"
        host = config.proxy.host if config.proxy.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        if cluster is not None:
            print(f"embedded PostgreSQL {cluster.version} on 127.0.0.1:{cluster.port} (data in {cluster.data_dir})")
        print(
            f'pgml-proxy {__version__} ready. Connect with:\n  psql "postgresql://{user}@{host}:{server.port}/'
            f'{target.dsn.dbname or "postgres"}"',
            flush=True,
        )
        await server.wait_stopped()
    finally:
        if endpoint is not None:
            await endpoint.close()
        await engine.close()
        if cluster is not None:
            log.info("stopping embedded PostgreSQL")
            await asyncio.to_thread(cluster.stop)
    return 0


async def _metrics_endpoint(
    config: Config, metrics: Metrics, target: UpstreamTarget, engine: Engine
) -> Endpoint | None:
    """The ``[metrics] listen`` endpoint, serving (None when not configured)."""
    if not config.metrics.listen:
        return None
    endpoint = Endpoint(metrics, target, engine)
    await endpoint.start(*split_address(config.metrics.listen))
    return endpoint


# --------------------------------------------------------------------------- #
# resign
# --------------------------------------------------------------------------- #

_ARTIFACTS = """
SELECT f.model_id, m.project_id, p.name, f.path FROM pgml.files f
JOIN pgml.models m ON m.id = f.model_id JOIN pgml.projects p ON p.id = m.project_id
GROUP BY 1, 2, 3, 4 ORDER BY 1, 4"""
_EXEMPT = """
SELECT r.rolsuper OR r.rolbypassrls OR c.relowner = r.oid FROM pg_class c, pg_roles r
WHERE c.oid = 'pgml.files'::regclass AND r.rolname = current_user"""


def _resign(config: Config, args: argparse.Namespace) -> int:
    """Verify every artifact with the old key; re-sign the valid ones (and, if asked, the unsigned) with the new."""
    configured = config.engine.artifact_key_file
    try:
        if args.new_key_file and signing.ensure_key(args.new_key_file):
            print(f"created the new key file {args.new_key_file}")
        old_file, new_file = args.old_key_file or configured, args.new_key_file or configured
        old_key, new_key = signing.load_key(old_file), signing.load_key(new_file)
    except (EngineError, OSError) as exc:
        print(f"pgml-proxy resign: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        return 2
    print(f"old key: {Path(old_file).absolute()}\nnew key: {Path(new_file).absolute()}")

    try:
        with admin_files.connect(config) as conn:
            counts, problems, database = _resign_all(conn, old_key, new_key, args)
    except (psycopg.Error, ClusterError) as exc:
        print(f"pgml-proxy resign: {type(exc).__name__}: {str(exc).strip()}", file=sys.stderr)
        return 1
    for line in problems:
        print(line)
    print(
        f"database {database}: {sum(counts.values())} artifact(s): {counts['resigned']} re-signed, "
        f"{counts['unchanged']} already signed with the new key, {counts['trusted']} signed that were unsigned, "
        f"{counts['refused']} unsigned and refused, {counts['invalid']} with an invalid signature (left as they are)"
    )
    if counts["refused"]:
        print("unsigned artifacts stay refused by the proxy: check them, then rerun with --trust-unsigned")
    return 1 if counts["refused"] or counts["invalid"] else 0


def _resign_all(
    conn: Any, old_key: bytes, new_key: bytes, args: argparse.Namespace
) -> tuple[dict[str, int], list[str], str]:
    """All artifacts in one transaction (writers of pgml.files wait for it): counts, problem lines, database."""
    counts = dict.fromkeys(("resigned", "unchanged", "trusted", "refused", "invalid"), 0)
    problems: list[str] = []
    with admin_files.locked(conn) as (cur, database):
        old_database = args.old_database or database
        cur.execute(_EXEMPT)
        exempt = cur.fetchone()
        if not (exempt and exempt[0]):
            problems.append("note: row-level security applies to this role: only its own projects' artifacts are seen")
        # only what was stored before signing existed, never rows written since
        legacy = admin_files.legacy(cur) if args.trust_unsigned else set()
        cur.execute(_ARTIFACTS)
        for model_id, project_id, project, path in cur.fetchall():
            artifact = admin_files.read(cur, model_id, path)
            data, tag = artifact.data, artifact.signature
            where = f"model {model_id} (project {project}) {path}"
            if tag is None and (model_id, path) not in legacy:
                counts["refused"] += 1
                written = " (written after signing existed, around the proxy)" if args.trust_unsigned else ""
                problems.append(f"{where}: unsigned{written}, refused")
                continue
            if tag is not None and not signing.verify(old_key, old_database, project_id, model_id, path, data, tag):
                counts["invalid"] += 1
                problems.append(f"{where}: the signature does not verify with the old key, not signed")
                continue
            new = signing.sign(new_key, database, project_id, model_id, path, data)
            if new == tag:
                counts["unchanged"] += 1
                continue
            cur.execute(
                "UPDATE pgml.files SET signature = $1 WHERE model_id = $2 AND path = $3 AND part = 0",
                (new, model_id, path),
            )
            if cur.rowcount != 1:  # no part 0: the proxy could not read it either
                counts["invalid"] += 1
                problems.append(f"{where}: has no part 0, not signed")
                continue
            if tag is None:
                cur.execute("DELETE FROM pgml.unsigned_artifacts WHERE model_id = $1 AND path = $2", (model_id, path))
            counts["trusted" if tag is None else "resigned"] += 1
    return counts, problems, database
