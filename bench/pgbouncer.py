"""publish_batch and consume_ack through PgBouncer (transaction mode) against direct, in one run,
interleaved: `python -m bench.pgbouncer [--rounds 3] [bench arguments...]`.

One throwaway PostgreSQL (tests/pgcluster.py) with one migrated database, one PgBouncer in front of
it (tests/pgbouncer.py: Debian's pgbouncer, transaction mode), and two `flask pubsub serve`
servers on that database, both with the default workers and threads: "direct" with DATABASE_URL at
PostgreSQL, "pgbouncer" with DATABASE_URL at PgBouncer, DATABASE_LISTEN_URL at PostgreSQL and
DATABASE_PREPARED_STATEMENTS=false (README "Behind PgBouncer"). Each round runs `python -m bench
--url` on one server, then on the other (the order alternates from round to round), with the
postmaster as --pg-pids; the idle server meanwhile costs a wake-up twice a second. The JSON lines
of every run go to --json-out (default bench-pgbouncer.jsonl), and a table of medians is printed.
Run it under `flock /work/scratch/bench.lock` on a shared machine.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from tests.pgbouncer import PgBouncer
from tests.pgcluster import TempCluster
from tests.test_serve import FLASK, PROJECT_ROOT, free_port, serve_env, serving, wait_until_live

SCENARIOS = ["publish_batch", "consume_ack"]


def median(runs: list[dict], get) -> float:
    values = [v for v in map(get, runs) if v is not None]
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pgbouncer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each server, interleaved (3)")
    parser.add_argument("--json-out", default="bench-pgbouncer.jsonl")
    args, bench_args = parser.parse_known_args(argv)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="pubsub-bench-pgbouncer-") as tmp:
        cluster = stack.enter_context(TempCluster())
        database = cluster.create_database("pubsub_bench")
        subprocess.run(
            [FLASK, "db", "upgrade"], cwd=PROJECT_ROOT, env=serve_env(DATABASE_URL=database), check=True
        )
        bouncer = stack.enter_context(PgBouncer(cluster.url))
        postmaster = (cluster.pgdata / "postmaster.pid").read_text().split()[0]
        settings = {
            "direct": {"DATABASE_URL": database},
            "pgbouncer": {
                "DATABASE_URL": bouncer.url(database),
                "DATABASE_LISTEN_URL": database,
                "DATABASE_PREPARED_STATEMENTS": "false",
            },
        }
        ports = {}
        for name, values in settings.items():
            port, log = free_port(), Path(tmp) / f"{name}.log"
            process = stack.enter_context(serving(serve_env(API_PORT=str(port), **values), log))
            wait_until_live(process, port, log)
            ports[name] = port
        results: dict[tuple[str, str], list[dict]] = {}
        failed = 0
        for round in range(args.rounds):
            order = list(ports) if round % 2 == 0 else list(reversed(ports))
            for name in order:
                out = Path(tmp) / f"{name}-{round}.jsonl"
                command = [sys.executable, "-m", "bench", "--url", f"http://127.0.0.1:{ports[name]}"]
                command += ["--pg-pids", postmaster, "--json-out", str(out), *SCENARIOS, *bench_args]
                print(f"=== round {round + 1}: {name}", flush=True)
                failed |= subprocess.run(command, cwd=PROJECT_ROOT).returncode
                with open(args.json_out, "a") as json_out:
                    for line in out.read_text().splitlines():
                        result = json.loads(line) | {"through": name, "round": round + 1}
                        json_out.write(json.dumps(result) + "\n")
                        results.setdefault((result["scenario"], name), []).append(result)
    print(f"\nmedians of {args.rounds} interleaved runs each")
    print(f"{'scenario':>14} {'through':>10} {'msgs/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'app':>5} {'pg':>5}")
    for (scenario, name), runs in sorted(results.items()):
        figures = [
            median(runs, lambda r: r["msgs_per_s"]),
            median(runs, lambda r: r["latency_ms"]["p50"]),
            median(runs, lambda r: r["latency_ms"]["p99"]),
            median(runs, lambda r: r["cpu_cores"].get("app")),
            median(runs, lambda r: r["cpu_cores"].get("postgres")),
        ]
        print(f"{scenario:>14} {name:>10} {figures[0]:>8.0f} {figures[1]:>7.1f} {figures[2]:>7.1f}", end="")
        print(f" {figures[3]:>5.2f} {figures[4]:>5.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
