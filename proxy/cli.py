"""Command line: ``pgml-proxy [--config PATH] [--listen HOST:PORT] [--upstream DSN] [--log-level L] [run|init]``.

Owns: argument parsing, logging setup, choosing the upstream (configured DSN or an
embedded cluster), and running the server until SIGTERM/SIGINT.
Must not: hold state beyond one ``main()`` call.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.api import create_engine
from proxy import PGML_API_LEVEL, __version__, schema
from proxy.config import Config, ConfigError, load
from proxy.dsn import parse_dsn
from proxy.embedded import Cluster, ClusterError, find_bin_dir
from proxy.rewrite import Rewriter
from proxy.server import Server, UpstreamTarget

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
        "command",
        nargs="?",
        default="run",
        choices=["run", "init"],
        help="run (default): start the proxy; init: install or upgrade the pgml schema in the upstream database "
        "named by the DSN, then exit",
    )
    return parser


def config_path(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    env = os.environ.get("PGML_PROXY_CONFIG")
    if env:
        return Path(env)
    default = Path("config.toml")
    return default if default.is_file() else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load(
            config_path(args.config),
            os.environ,
            {"proxy.listen": args.listen, "upstream.dsn": args.upstream, "log.level": args.log_level},
        )
    except ConfigError as exc:
        print(f"pgml-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log.level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        log.warning("uvloop not available; using the default asyncio loop")
    if args.command == "init":
        return _init(config)
    try:
        return asyncio.run(_run(config))
    except ClusterError as exc:
        print(f"pgml-proxy: embedded PostgreSQL failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pgml-proxy: cannot listen on {config.proxy.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _init(config: Config) -> int:
    if not config.upstream.dsn:
        print("pgml-proxy init: set the upstream DSN (--upstream or PGML_PROXY_UPSTREAM)", file=sys.stderr)
        return 2
    try:
        applied = schema.init(config.upstream.dsn)
    except Exception as exc:
        print(f"pgml-proxy init: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"pgml schema is at version {schema.latest()} ({applied} migration(s) applied)")
    return 0


async def _run(config: Config) -> int:
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
        target = UpstreamTarget(parse_dsn(cluster.dsn()), "disable", "", config.upstream.connect_timeout)
    engine = create_engine(config.engine)
    try:
        server = Server(config, target, Rewriter(engine))
        await server.start()
        server.install_signal_handlers()
        user = target.dsn.user or "postgres"
        host = config.proxy.host if config.proxy.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        print(
            f'pgml-proxy {__version__} ready. Connect with:\n  psql "postgresql://{user}@{host}:{server.port}/'
            f'{target.dsn.dbname or "postgres"}"',
            flush=True,
        )
        await server.wait_stopped()
    finally:
        await engine.close()
        if cluster is not None:
            log.info("stopping embedded PostgreSQL")
            await asyncio.to_thread(cluster.stop)
    return 0
