"""python -m bench [SCENARIO ...] [options]: load benchmarks of the pubsub API (see bench/README.md).

Without --url it starts the app itself (flask db upgrade, flask pubsub serve) on an embedded
PostgreSQL in a temporary folder, and stops both at the end. Prints one JSON line per run and a
table; exits 1 when any check fails (lost, duplicated or unacked messages, failed requests).
"""

import argparse
import os
import signal
import sys
import time
import traceback

import orjson

from bench.app import AppError, ExternalApp, LocalApp
from bench.scenarios import SCENARIOS, Run, SkipScenario, app_counts_claims, warm_up

# Full run defaults, then what --smoke changes (each still overridable on the command line).
DEFAULTS = {
    "duration": 10.0,
    "prefill": 300_000,
    "backlog_acked": 1_000_000,
    "backlog_available": 100_000,
    "rate": 2000.0,
    "warmup": 2.0,
    "rounds": 5,
    "round_messages": 100_000,
    "cold_messages": 100_000,
    "consumers": 1000,
    "longpoll_duration": 20.0,
    "idle_seconds": None,  # longpoll: one whole wait (--longpoll-wait), so each one runs out once in it
    "settle_seconds": 3.0,
    "longpoll_wait": 20,
}
SMOKE = {
    "duration": 1.5,
    "prefill": 5_000,
    "backlog_acked": 20_000,
    "backlog_available": 3_000,
    "rate": 1000.0,
    "warmup": 0.5,
    "rounds": 3,
    "round_messages": 10_000,
    "cold_messages": 10_000,
    "consumers": 200,
    "longpoll_duration": 5.0,
    "idle_seconds": 2.0,
    "settle_seconds": 1.0,
    "longpoll_wait": 5,
}
BUSY_MACHINE = 0.25  # cores used by processes outside the run that make its figures suspect


def comma_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers, not {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "scenarios", nargs="*", metavar="SCENARIO", help=f"any of {', '.join(SCENARIOS)} (default: all)"
    )
    target = parser.add_argument_group("target")
    target.add_argument("--url", help="a running app to load (default: start one, embedded PostgreSQL)")
    target.add_argument("--database-url", help="its database, for --raw, backlog, rounds and PostgreSQL CPU")
    target.add_argument("--app-pids", type=comma_ints, help="with --url: the app's process tree roots")
    target.add_argument("--pg-pids", type=comma_ints, help="with --url: the postmaster pid(s)")
    target.add_argument("--workers", type=comma_ints, default=[2], help="gunicorn workers, e.g. 2 or 1,2")
    target.add_argument("--threads", type=comma_ints, default=[8], help="threads per worker, e.g. 4,8,16")
    target.add_argument("--keep-instance", action="store_true", help="keep the temporary instance folder")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--raw", action="store_true", help="the app's SQL from Python, without HTTP")
    mode.add_argument("--compare-raw", action="store_true", help="every scenario over HTTP and raw")
    load = parser.add_argument_group("load")
    load.add_argument("--smoke", action="store_true", help="a few seconds per scenario (CI)")
    load.add_argument("--duration", type=float, help="seconds per scenario (default 10; smoke 1.5)")
    load.add_argument("--warmup", type=float, help="seconds of unmeasured load after start (2; smoke 0.5)")
    load.add_argument("-c", "--concurrency", type=int, default=8, help="clients (default 8)")
    load.add_argument("-b", "--batch", type=int, default=100, help="messages per publish/claim (default 100)")
    load.add_argument("--procs", type=int, default=os.cpu_count() or 2, help="load generator processes")
    load.add_argument("--prefill", type=int, help="consume_ack: messages available at start (300k)")
    load.add_argument(
        "--ordering-keys", type=int, default=1000, help="consume_ack_ordered: distinct key values (1000)"
    )
    load.add_argument("--backlog-acked", type=int, help="backlog: messages acked before (1M)")
    load.add_argument("--backlog-available", type=int, help="backlog: messages available (100k)")
    load.add_argument("--backlog-ack-batch", type=int, help="backlog: messages per past ack (--batch)")
    load.add_argument("--rounds", type=int, help="rounds: publish/consume/reset rounds (5; smoke 3)")
    load.add_argument("--round-messages", type=int, help="rounds: messages per round (100k; smoke 10k)")
    load.add_argument("--cold-messages", type=int, help="consume_ack_cold: messages filled (100k; smoke 10k)")
    load.add_argument("--cold-publishers", type=int, default=4, help="consume_ack_cold: publishers (4)")
    load.add_argument("--cold-fill-batch", type=int, default=100, help="consume_ack_cold: fill batch (100)")
    load.add_argument(
        "--cold-settle",
        choices=("none", "analyze", "vacuum", "vacuum-analyze"),
        default="none",
        help="consume_ack_cold: what runs between the fill and the consume, for A/B runs (none)",
    )
    load.add_argument("--rate", type=float, help="mixed: publish rate, messages/s (2000; 0 = unpaced)")
    load.add_argument("--mixed-batch", type=int, default=10, help="mixed: messages per publish (10)")
    load.add_argument(
        "--wait-seconds", type=int, default=10, help="mixed: consumers' long-poll wait_seconds (10; 1-20)"
    )
    load.add_argument(
        "--poll-ms", type=float, default=100.0, help="mixed_poll: consumers' sleep after an empty claim (100)"
    )
    load.add_argument("--drain-timeout", type=float, default=60.0, help="mixed*: bound on the drain")
    load.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        help="wait up to this long for an idle machine before each window",
    )
    lpoll = parser.add_argument_group("longpoll (issue 15)")
    lpoll.add_argument(
        "-n", "--consumers", type=int, help="longpoll: long-polling consumers (1000; smoke 200)"
    )
    lpoll.add_argument(
        "--subscriptions", type=int, default=1, help="longpoll: subscriptions, one topic each (1)"
    )
    lpoll.add_argument(
        "--publish-rate", type=float, default=100.0, help="longpoll: 1-message publishes/s (100)"
    )
    lpoll.add_argument("--longpoll-wait", type=int, help="longpoll: wait_seconds (20; smoke 5; 1-20)")
    lpoll.add_argument("--publishers", type=int, default=4, help="longpoll: threads sharing the schedule (4)")
    lpoll.add_argument("--longpoll-duration", type=float, help="longpoll: publish phase, s (20; smoke 5)")
    lpoll.add_argument(
        "--idle-seconds", type=float, help="longpoll: idle phase, s (--longpoll-wait; smoke 2)"
    )
    lpoll.add_argument(
        "--settle-seconds", type=float, help="longpoll: consumers' start to idle, s (3; smoke 1)"
    )
    lpoll.add_argument("--longpoll-batch", type=int, default=10, help="longpoll: batch_size per consume (10)")
    lpoll.add_argument(
        "--declined-pause", type=float, default=0.5, help="longpoll: pause after a declined poll"
    )
    lpoll.add_argument(
        "--targets",
        choices=("auto", "on", "off"),
        default="auto",
        help="longpoll: check issue 15's targets (auto: in a full run, not with --smoke)",
    )
    load.add_argument("--payload-pad", type=int, default=64, help="filler characters per payload")
    auth = parser.add_argument_group("auth")
    auth.add_argument("--auth", action="store_true", help="bearer tokens (AUTH_ENABLED=true)")
    auth.add_argument("--client-id", default=os.environ.get("PUBSUB_BENCH_CLIENT_ID"))
    auth.add_argument("--client-secret", default=os.environ.get("PUBSUB_BENCH_CLIENT_SECRET"))
    output = parser.add_argument_group("output")
    output.add_argument("--json-out", help="also append the JSON lines to this file")
    args = parser.parse_args(argv)

    for name, default in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, SMOKE[name] if args.smoke else default)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    if args.idle_seconds is None:
        args.idle_seconds = float(args.longpoll_wait)
    args.scenarios = args.scenarios or list(SCENARIOS)
    if min(args.concurrency, args.batch, args.procs, args.mixed_batch) < 1 or args.batch > 1000:
        parser.error("--concurrency, --procs and --mixed-batch must be >= 1; --batch from 1 to 1000")
    if args.cold_messages < 1 or args.cold_publishers < 1 or not 1 <= args.cold_fill_batch <= 1000:
        parser.error("--cold-messages and --cold-publishers must be >= 1; --cold-fill-batch from 1 to 1000")
    if args.rounds < 2 or args.round_messages < 1:
        parser.error("--rounds must be >= 2 and --round-messages >= 1")
    if not 1 <= args.wait_seconds <= 20 or args.poll_ms < 0:
        parser.error("--wait-seconds goes from 1 to 20; --poll-ms must be >= 0")
    if args.consumers < 1 or args.subscriptions < 1 or args.consumers < args.subscriptions:
        parser.error("--consumers and --subscriptions must be >= 1, with at least one consumer each")
    if args.publishers < 1 or not 1 <= args.longpoll_wait <= 20 or not 1 <= args.longpoll_batch <= 100:
        parser.error("--longpoll-wait goes from 1 to 20, --longpoll-batch from 1 to 100; --publishers >= 1")
    if args.publish_rate <= 0:
        parser.error("--publish-rate must be > 0")
    if args.url and (args.raw or args.compare_raw) and not args.database_url:
        parser.error("--raw and --compare-raw with --url need --database-url")
    if args.url and args.auth and not (args.client_id and args.client_secret):
        parser.error("--auth with --url needs --client-id and --client-secret")
    if not args.url and (args.app_pids or args.pg_pids or args.database_url):
        parser.error("--database-url, --app-pids and --pg-pids go with --url")
    args.modes = ["raw"] if args.raw else ["http", "raw"] if args.compare_raw else ["http"]
    return args


def percentiles(values, points=(50, 95, 99)) -> dict[str, float | None]:
    ordered = sorted(values)
    if not ordered:
        return {f"p{p}": None for p in points}
    return {f"p{p}": ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] * 1000 for p in points}


def summarize(scenario, mode, app, args, outcome, messages, checks, extra, notes) -> dict:
    t, elapsed = outcome.tally, outcome.elapsed
    # Long-poll claims last as long as they wait: request latency leaves them out (by_op has them).
    all_latencies = [v for op, values in t.latency.items() if op != "long_poll" for v in values]

    return {
        "scenario": scenario,
        "mode": mode,
        **app.describe(),
        "cpus": os.cpu_count(),
        "concurrency": args.concurrency,
        "batch": 1 if scenario == "publish_single" else args.batch,
        "procs": args.procs,
        "elapsed_s": round(elapsed, 3),
        "messages": messages,
        "msgs_per_s": round(messages / elapsed, 1),
        "requests": t.requests,
        "req_per_s": round(t.requests / elapsed, 1),
        "latency_ms": round_all(percentiles(all_latencies)),
        "latency_ms_by_op": {op: round_all(percentiles(v)) | {"n": len(v)} for op, v in t.latency.items()},
        "e2e_ms": round_all(percentiles(t.e2e)) if t.e2e else None,
        "errors": t.errors,
        "error_samples": t.error_samples,
        "cpu_cores": cpu_cores(outcome),
        "extra": round_all(extra),
        "checks": checks,
        "notes": notes,
        "ok": all(c["ok"] for c in checks),
    }


def cpu_cores(outcome) -> dict[str, float | None]:
    """Cores used in the window by each party; "other" is the rest of the machine (a neighbour's
    load skews the figures: it should stay near 0)."""
    cores = {name: None if s is None else s / outcome.elapsed for name, s in outcome.cpu.items()}
    parts = [cores["loadgen"], cores.get("app"), cores.get("postgres")]
    machine = cores.pop("machine", None)
    cores["other"] = None if machine is None or None in parts else max(0.0, machine - sum(parts))
    return {name: None if value is None else round(value, 3) for name, value in cores.items()}


def round_all(values: dict) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in values.items()}


def failure(scenario, mode, app, error: str, skipped=False) -> dict:
    return {
        "scenario": scenario,
        "mode": mode,
        **app.describe(),
        "skipped": skipped,
        "ok": skipped,
        "error": error,
    }


def run_all(args) -> list[dict]:
    results = []
    configs = [(None, None)] if args.url else [(w, t) for w in args.workers for t in args.threads]
    for workers, threads in configs:
        if args.url:
            client = (args.client_id, args.client_secret) if args.auth else None
            app = ExternalApp(args.url, args.database_url, args.app_pids, args.pg_pids, client)
        else:
            app = LocalApp(workers, threads, auth=args.auth, keep=args.keep_instance, preload=preload(args))
        try:
            say(f"starting the app ({app.describe()})")
            started = time.monotonic()
            app.start()
            say(f"app ready in {time.monotonic() - started:.1f}s at {app.url}")
            for note in app.notes:
                say(note)
            warm_up(Run(app, args, "http", app.token()), args.warmup)
            for scenario in args.scenarios:
                for mode in args.modes:
                    results.append(run_one(app, args, scenario, mode))
        except Exception as error:  # the app did not start, or its warm-up failed
            results.append(failure("(start)", "-", app, f"{type(error).__name__}: {error}"))
            say(f"FAILED: {error}")
        finally:
            app.stop()
    return results


def preload(args) -> tuple[str, ...]:
    """PostgreSQL libraries the started app's database needs: pg_stat_statements counts longpoll's
    claim statements while the app has no counter of its own."""
    if "longpoll" in args.scenarios and not app_counts_claims():
        return ("pg_stat_statements",)
    return ()


def run_one(app, args, scenario: str, mode: str) -> dict:
    try:
        run = Run(app, args, mode, app.token())
        outcome, messages, checks, extra = SCENARIOS[scenario](run)
        result = summarize(scenario, mode, app, args, outcome, messages, checks, extra, app.notes + run.notes)
    except SkipScenario as skip:
        result = failure(scenario, mode, app, str(skip), skipped=True)
    except Exception:
        exited = app.exited()
        result = failure(scenario, mode, app, traceback.format_exc() + (f"\n{exited}" if exited else ""))
    say(progress_line(result))
    for c in result.get("checks", []):
        if not c["ok"]:
            say(f"  CHECK FAILED: {c['check']}: {c['detail']}")
    if "error" in result and not result.get("skipped"):
        say(result["error"])
    other = (result.get("cpu_cores") or {}).get("other")
    if other is not None and other > BUSY_MACHINE:
        say(f"  WARNING: other processes used {other:.2f} cores during the window: figures are skewed")
    return result


def say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def progress_line(r: dict) -> str:
    if "error" in r:
        what = "skipped" if r.get("skipped") else "ERROR"
        return f"{r['scenario']} {r['mode']}: {what}: {r['error'].splitlines()[-1]}"
    return (
        f"{r['scenario']} {r['mode']}: {r['msgs_per_s']:.0f} msgs/s, {r['req_per_s']:.0f} req/s, "
        f"p99 {fmt(r['latency_ms']['p99'])} ms, {'ok' if r['ok'] else 'CHECKS FAILED'}"
    )


def fmt(value, digits=1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


COLUMNS = (
    ("scenario", 16), ("mode", 4), ("w×t", 5), ("msgs/s", 9), ("req/s", 8), ("p50 ms", 7), ("p95 ms", 7),
    ("p99 ms", 7), ("err", 4), ("cpu gen", 7), ("cpu app", 7), ("cpu pg", 7), ("other", 6), ("checks", 6),
)  # fmt: skip


def aligned(cells: list[str], columns) -> str:
    return "  ".join(cell.rjust(width) for cell, (_, width) in zip(cells, columns, strict=True))


def table(results: list[dict]) -> str:
    lines = [aligned([name for name, _ in COLUMNS], COLUMNS)]
    for r in results:
        config = f"{r.get('workers', '-')}×{r.get('threads', '-')}" if not r.get("external") else "ext"
        if "error" in r:
            cells = (
                [r["scenario"], r["mode"], config] + ["-"] * 10 + ["skip" if r.get("skipped") else "ERROR"]
            )
        else:
            lat, cpu = r["latency_ms"], r["cpu_cores"]
            cells = [
                r["scenario"], r["mode"], config, fmt(r["msgs_per_s"], 0), fmt(r["req_per_s"], 0),
                fmt(lat["p50"]), fmt(lat["p95"]), fmt(lat["p99"]), str(r["errors"]),
                fmt(cpu["loadgen"], 2), fmt(cpu["app"], 2), fmt(cpu["postgres"], 2), fmt(cpu["other"], 2),
                "ok" if r["ok"] else "FAIL",
            ]  # fmt: skip
        lines.append(aligned(cells, COLUMNS))
    notes = []
    for r in results:
        extra = r.get("extra") or {}
        parts = [f"{k} {fmt(v, 0) if isinstance(v, float) else v}" for k, v in extra.items()]
        if r.get("e2e_ms"):
            e2e = r["e2e_ms"]
            parts.append(
                f"end-to-end p50 {fmt(e2e['p50'])} ms, p95 {fmt(e2e['p95'])} ms, p99 {fmt(e2e['p99'])} ms"
            )
        if parts:
            notes.append(f"  {r['scenario']} {r['mode']}: " + "; ".join(parts))
    lines.append(
        f"cpu columns: cores used in the window (CPU-seconds per second) by the load generator, the app "
        f"(gunicorn master + workers), PostgreSQL and everything else; this machine has {os.cpu_count()}."
    )
    return "\n".join(lines + notes)


MIXED_COLUMNS = (
    ("scenario", 10), ("mode", 4), ("w×t", 5), ("consumers", 14), ("pub/s", 6), ("msgs/s", 6),
    ("req/s", 5), ("claims/s", 8), ("empty/s", 7), ("pub p99", 7), ("e2e p50", 7), ("e2e p95", 7),
    ("e2e p99", 7), ("cpu app", 7), ("cpu pg", 6),
)  # fmt: skip


def mixed_table(results: list[dict]) -> str:
    """The mixed runs side by side: long-poll against polling, end-to-end latency and requests
    (and the publish latency: a publish to a subscription with waiting consumers sends a NOTIFY)."""
    rows = [r for r in results if r["scenario"] in ("mixed", "mixed_poll") and "error" not in r]
    if not rows:
        return ""
    lines = [
        "mixed by consumer style: end-to-end latency (ms, publish to claim), requests, publish p99 (ms):",
        aligned([name for name, _ in MIXED_COLUMNS], MIXED_COLUMNS),
    ]
    for r in rows:
        config = f"{r.get('workers', '-')}×{r.get('threads', '-')}" if not r.get("external") else "ext"
        extra, e2e, cpu = r["extra"], r["e2e_ms"] or {}, r["cpu_cores"]
        publish = r["latency_ms_by_op"].get("publish", {})
        cells = [
            r["scenario"], r["mode"], config, extra["consumers"], fmt(extra["published_per_s"], 0),
            fmt(r["msgs_per_s"], 0), fmt(r["req_per_s"], 0), fmt(extra["claims_per_s"], 0),
            fmt(extra["empty_claims_per_s"], 0), fmt(publish.get("p99")), fmt(e2e.get("p50")),
            fmt(e2e.get("p95")), fmt(e2e.get("p99")), fmt(cpu["app"], 2), fmt(cpu["postgres"], 2),
        ]  # fmt: skip
        lines.append(aligned(cells, MIXED_COLUMNS))
    return "\n".join(lines)


LONGPOLL_COLUMNS = (
    ("n", 5), ("subs", 4), ("pub", 5), ("recv", 5), ("e2e p50", 7), ("p99", 7), ("max", 7),
    ("decl/s", 6), ("cons/s", 6), ("claims/msg", 10), ("cpu% pub", 8), ("cpu% idle", 9),
    ("pg% idle", 8), ("gen% pub", 8), ("rss idle", 8), ("waiting", 8), ("KiB/waiter", 10),
)  # fmt: skip


def longpoll_table(results: list[dict]) -> str:
    """longpoll's figures (issue 15): e2e in ms, declined and consume requests per second in the
    publish phase, claim statements per published message, the server's CPU (% of one core) while
    publishing and idle with every consumer waiting, its RSS (MiB) idle and with the waiters."""
    rows = [r for r in results if r["scenario"] == "longpoll" and "error" not in r]
    if not rows:
        return ""
    lines = [
        "longpoll: e2e ms; declined and consume requests per second while publishing; claim statements"
        " per message; server CPU % of one core publishing and idle (waiting); RSS MiB idle, waiting:"
    ]
    lines.append(aligned([name for name, _ in LONGPOLL_COLUMNS], LONGPOLL_COLUMNS))
    for r in rows:
        x, e2e = r["extra"], r["extra"]["e2e_ms"]
        cells = [
            str(x["consumers"]), str(x["subscriptions"]), str(x["published"]), str(x["received"]),
            fmt(e2e["p50"]), fmt(e2e["p99"]), fmt(e2e["max"]), fmt(x["declined_per_s"]),
            fmt(x["consume_requests_per_s"]), fmt(x["claims_per_msg"], 2), fmt(x["server_cpu_pct_publish"]),
            fmt(x["server_cpu_pct_idle"]), fmt(x["pg_cpu_pct_idle"]), fmt(x["loadgen_cpu_pct_publish"]),
            fmt(x["server_rss_mib_idle"]), fmt(x["server_rss_mib_waiting"]),
            fmt(x["server_rss_kib_per_waiter"]),
        ]  # fmt: skip
        lines.append(aligned(cells, LONGPOLL_COLUMNS))
    return "\n".join(lines)


def ratios(results: list[dict]) -> str:
    """HTTP against raw for each scenario run both ways in this invocation."""
    rows = {}
    for r in results:
        if "error" not in r:
            rows[(r["scenario"], r.get("workers"), r.get("threads"), r["mode"])] = r
    lines = []
    for (scenario, workers, threads, mode), http in rows.items():
        raw = rows.get((scenario, workers, threads, "raw"))
        if mode != "http" or raw is None or not raw["msgs_per_s"]:
            continue
        config = f"{workers}×{threads}" if workers else "ext"
        p99 = (http["latency_ms"]["p99"] or 0) / (raw["latency_ms"]["p99"] or float("inf"))
        lines.append(
            f"  {scenario:>14} {config:>5}: msgs/s {http['msgs_per_s']:,.0f} / {raw['msgs_per_s']:,.0f} = "
            f"{http['msgs_per_s'] / raw['msgs_per_s']:.2f}   p99 {p99:.1f}x"
        )
    return "HTTP / raw:\n" + "\n".join(lines) if lines else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A TERM (timeout, CI) unwinds like Ctrl-C, so the app and PostgreSQL are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        results = run_all(args)
    except AppError as error:  # --url: a process given by --app-pids/--pg-pids does not exist
        print(f"bench: {error}", file=sys.stderr)
        return 2
    lines = [orjson.dumps(r).decode() for r in results]
    print("\n".join(lines))
    if args.json_out:
        with open(args.json_out, "a") as out:
            out.write("\n".join(lines) + "\n")
    print(table(results))
    for section in (mixed_table(results), longpoll_table(results), ratios(results)):
        if section:
            print(section)
    failed = [f"{r['scenario']} {r['mode']}" for r in results if not r["ok"]]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
