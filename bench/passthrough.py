"""Pass-through benchmark: pgbench -S through pgml-proxy vs PgBouncer (session mode) vs direct.

Rounds alternate between the targets in one run (the machine is shared and noisy),
and the script prints median TPS per target and mode, the ratios, and the average
latency at one client. Not a test: it asserts nothing about absolute speed.

    .venv/bin/python bench/passthrough.py [--seconds 5] [--rounds 3] [--clients 8]

Needs pgbench (postgresql-client) and pgbouncer (``apt-get install pgbouncer``; the
PgBouncer column is skipped with a note when it is absent). Set PGML_BENCH_DSN to
use an existing server instead of a throwaway PG 18.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import dsn_on_port, pgml_proxy, upstream, wait_port

from proxy.dsn import parse_dsn
from proxy.embedded import free_port


@contextmanager
def pgbouncer(dsn: str, work: Path) -> Iterator[str | None]:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        print("note: pgbouncer not installed (apt-get install pgbouncer); its column is skipped")
        yield None
        return
    target, port = parse_dsn(dsn), free_port()
    (work / "users.txt").write_text(f'"{target.user or "postgres"}" ""\n')
    ini = work / "pgbouncer.ini"
    ini.write_text(
        f"[databases]\n* = host={target.host} port={target.port}\n[pgbouncer]\nlisten_addr = 127.0.0.1\n"
        f"listen_port = {port}\nauth_type = trust\nauth_file = {work / 'users.txt'}\npool_mode = session\n"
        f"max_client_conn = 200\ndefault_pool_size = 50\nunix_socket_dir =\nlogfile = {work / 'pgbouncer.log'}\n"
        "log_connections = 0\nlog_disconnections = 0\nlog_stats = 0\n"
    )
    kwargs: dict[str, object] = {}
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        import pwd

        user = pwd.getpwnam("postgres")
        kwargs = {"user": user.pw_uid, "group": user.pw_gid}
        for path in work.iterdir():
            os.chown(path, user.pw_uid, user.pw_gid)
        os.chown(work, user.pw_uid, user.pw_gid)
    proc = subprocess.Popen([binary, "-q", str(ini)], **kwargs)  # type: ignore[call-overload]
    try:
        wait_port(port, proc, "pgbouncer")
        yield dsn_on_port(dsn, port)
    finally:
        proc.terminate()
        proc.wait(20)


def pgbench(dsn: str, *args: str) -> dict[str, float]:
    proc = subprocess.run(["pgbench", "-n", *args, dsn], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"pgbench failed on {dsn}: {proc.stderr}")
    failed = re.search(r"number of failed transactions: (\d+)", proc.stdout)
    return {
        "tps": float(re.search(r"tps = ([\d.]+)", proc.stdout).group(1)),  # type: ignore[union-attr]
        "latency_ms": float(re.search(r"latency average = ([\d.]+) ms", proc.stdout).group(1)),  # type: ignore[union-attr]
        "failed": float(failed.group(1)) if failed else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--scale", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgml-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        os.chmod(work, 0o755)
        dsn = stack.enter_context(upstream(work))
        bouncer_dir = work / "bouncer"
        bouncer_dir.mkdir()
        targets = {"direct": dsn, "proxy": stack.enter_context(pgml_proxy(dsn, work))[0]}
        bouncer = stack.enter_context(pgbouncer(dsn, bouncer_dir))
        if bouncer:
            targets["pgbouncer"] = bouncer
        subprocess.run(["pgbench", "-i", "-q", "-s", str(args.scale), dsn], check=True, capture_output=True)
        tps: dict[tuple[str, str], list[float]] = defaultdict(list)
        latency: dict[str, list[float]] = defaultdict(list)
        names = list(targets)
        for rnd in range(args.rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for mode in ("simple", "prepared"):
                for name in order:
                    clients = str(args.clients)
                    result = pgbench(targets[name], "-S", "-c", clients, "-j", "2", "-T", str(args.seconds), "-M", mode)
                    assert result["failed"] == 0
                    tps[(name, mode)].append(result["tps"])
            for name in order:
                latency[name].append(pgbench(targets[name], "-S", "-c", "1", "-T", str(args.seconds))["latency_ms"])
        report(tps, latency, names, args)


def report(
    tps: dict[tuple[str, str], list[float]], latency: dict[str, list[float]], names: list[str], args: argparse.Namespace
) -> None:
    med = {key: statistics.median(values) for key, values in tps.items()}
    print(f"\npgbench -S, {args.clients} clients, {args.seconds} s x {args.rounds} alternated rounds, median TPS")
    print(f"{'mode':<10}" + "".join(f"{n:>12}" for n in names) + "  ratios")
    for mode in ("simple", "prepared"):
        ratios = [f"proxy/direct={med[('proxy', mode)] / med[('direct', mode)]:.2f}"]
        if "pgbouncer" in names:
            ratios.insert(0, f"proxy/pgbouncer={med[('proxy', mode)] / med[('pgbouncer', mode)]:.2f}")
            ratios.append(f"pgbouncer/direct={med[('pgbouncer', mode)] / med[('direct', mode)]:.2f}")
        print(f"{mode:<10}" + "".join(f"{med[(n, mode)]:>12.0f}" for n in names) + "  " + "  ".join(ratios))
    print("\naverage latency at 1 client (ms, median of rounds): " + "  ".join(
        f"{n}={statistics.median(latency[n]):.3f}" for n in names))  # fmt: skip
    extra = statistics.median(latency["proxy"]) - statistics.median(latency["direct"])
    print(f"proxy adds {extra * 1000:.0f} us per round trip")


if __name__ == "__main__":
    main()
