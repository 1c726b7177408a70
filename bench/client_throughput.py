"""python -m bench.client_throughput: the Python client's throughput (issue 15, point 5), in rounds
that interleave its scenarios in one sitting, against one app that the bench's own code starts
(bench/app.py: `flask db upgrade`, `flask pubsub serve`, an embedded PostgreSQL), or --url.

- subscriber: a queue prefilled with --messages (batches of 1000, then VACUUM ANALYZE, as
  consume_ack does), drained by one pubsub_client Subscriber with a no-op handler (--batch per
  consume); msg/s from start() until metrics say every message is acked.
- publisher: one pubsub_client Publisher fed --messages, one publish() call each, then flush();
  msg/s from the first publish() until every future has its id.
- consume_ack: the bench's own scenario (`python -m bench consume_ack`) on the same app with the
  same prefill and batch, --concurrency consumers, for the comparison.

Prints one JSON line per run, then the median of each scenario.

First figures (client fd95318, 2 shared cores, 100k messages, batch 100, 3 interleaved rounds,
medians): with the Subscriber's defaults (max_outstanding=100, so one pull in flight) it drained
14,308 msg/s against consume_ack's 27,662 (0.52); with --max-outstanding 400 (four pulls in
flight) 27,139 against 26,852 (0.85-1.01 over two sittings). Publisher: 29,753 msg/s.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

from bench.app import ExternalApp, LocalApp, request_json
from bench.scenarios import Run

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The client is its own distribution (client/); from a checkout it may not be installed.
try:
    import pubsub_client
except ImportError:
    sys.path.insert(0, str(PROJECT_ROOT / "client"))
    import pubsub_client

PREFILL_BATCH = 1000
PREFILL_THREADS = 4
DRAIN_BOUND = 600.0  # seconds any one run may take


def new_queue(app, name: str) -> tuple[str, str]:
    """A topic and one subscription of it (every published message is stored for it)."""
    status, body = request_json(app.url, "POST", "/topics", {"id": name})
    assert status == 201, (status, body)
    status, body = request_json(app.url, "POST", "/subscriptions", {"id": name, "topic_id": name})
    assert status == 201, (status, body)
    return name, name


def drop(app, topic: str) -> None:
    request_json(app.url, "DELETE", f"/topics/{topic}")


def prefill(app, topic: str, count: int) -> None:
    def publish(first: int, last: int) -> None:
        for start in range(first, last, PREFILL_BATCH):
            body = [{"n": n, "pad": "x" * 64} for n in range(start, min(last, start + PREFILL_BATCH))]
            status, data = request_json(app.url, "POST", f"/topics/{topic}/messages", body)
            assert status == 204, (status, data)

    share = -(-count // PREFILL_THREADS)
    threads = [
        threading.Thread(target=publish, args=(i * share, min(count, (i + 1) * share)))
        for i in range(PREFILL_THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def metrics(app, subscription: str) -> dict:
    status, body = request_json(app.url, "GET", f"/subscriptions/{subscription}/metrics")
    assert status == 200, (status, body)
    return body


def run_subscriber(app, args, name: str) -> dict:
    topic, subscription = new_queue(app, name)
    prefill(app, topic, args.messages)
    Run(app, args, "http", None).settle()  # VACUUM ANALYZE, as consume_ack before its window
    client = pubsub_client.Client(app.url)
    handled = 0
    lock = threading.Lock()
    all_handled = threading.Event()

    def handler(message) -> None:
        nonlocal handled
        with lock:
            handled += 1
            if handled >= args.messages:
                all_handled.set()

    options = {"batch_size": args.batch, "max_workers": args.max_workers}
    if args.max_outstanding:
        options["max_outstanding"] = args.max_outstanding
    subscriber = pubsub_client.Subscriber(client, subscription, handler, **options)
    started = time.monotonic()
    subscriber.start()
    try:
        all_handled.wait(DRAIN_BOUND)
        deadline = time.monotonic() + 30
        while metrics(app, subscription)["acked"] < args.messages and time.monotonic() < deadline:
            time.sleep(0.01)
        elapsed = time.monotonic() - started
    finally:
        subscriber.stop()
        client.close()
    final = metrics(app, subscription)
    drop(app, topic)
    ok = final["acked"] == args.messages and final["available"] == 0 and final["delivered"] == 0
    return {"messages": args.messages, "elapsed_s": round(elapsed, 3), "ok": ok, "metrics": final, **options}


def run_publisher(app, args, name: str) -> dict:
    topic, subscription = new_queue(app, name)
    client = pubsub_client.Client(app.url)
    publisher = pubsub_client.Publisher(client, topic)
    started = time.monotonic()
    try:
        futures = [publisher.publish({"n": n, "pad": "x" * 64}) for n in range(args.messages)]
        publisher.flush()
        ids = [future.result(DRAIN_BOUND) for future in futures]
        elapsed = time.monotonic() - started
    finally:
        publisher.close()
        client.close()
    final = metrics(app, subscription)
    drop(app, topic)
    ok = len(set(ids)) == args.messages and final["available"] == args.messages
    return {"messages": args.messages, "elapsed_s": round(elapsed, 3), "ok": ok, "metrics": final}


def run_consume_ack(app, args, name: str) -> dict:
    """The bench's consume_ack, as a subprocess, on this app: same prefill and batch."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
        command = [sys.executable, "-m", "bench", "consume_ack", "--url", app.url]
        command += ["--database-url", app.database_url, "--prefill", str(args.messages)]
        command += ["-b", str(args.batch), "-c", str(args.concurrency), "--duration", str(DRAIN_BOUND)]
        command += ["--warmup", "0", "--json-out", out.name]
        done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=DRAIN_BOUND)
        lines = [json.loads(line) for line in Path(out.name).read_text().splitlines() if line.strip()]
    runs = [line for line in lines if line.get("scenario") == "consume_ack" and "msgs_per_s" in line]
    if done.returncode != 0 or not runs:
        return {"ok": False, "error": (done.stdout + done.stderr)[-2000:]}
    run = runs[-1]
    return {
        "messages": run["messages"],
        "elapsed_s": run["elapsed_s"],
        "ok": run["ok"],
        "concurrency": run["concurrency"],
        "cpu_cores": run["cpu_cores"],
    }


SCENARIOS = {"consume_ack": run_consume_ack, "subscriber": run_subscriber, "publisher": run_publisher}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.client_throughput", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "scenarios", nargs="*", metavar="SCENARIO", help=f"any of {', '.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument("--url", help="a running app (default: start one, embedded PostgreSQL)")
    parser.add_argument("--database-url", help="with --url: its database (VACUUM ANALYZE, consume_ack)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (2)")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker (8)")
    parser.add_argument("-n", "--messages", type=int, default=100_000, help="messages per run (100k)")
    parser.add_argument("-b", "--batch", type=int, default=100, help="consume batch size (100)")
    parser.add_argument("-c", "--concurrency", type=int, default=8, help="consume_ack's consumers (8)")
    parser.add_argument("--max-workers", type=int, default=8, help="the Subscriber's handler threads (8)")
    parser.add_argument("--max-outstanding", type=int, help="the Subscriber's max_outstanding (its default)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every scenario, interleaved (3)")
    parser.add_argument("--warmup-messages", type=int, default=5000, help="one unmeasured round first (5000)")
    parser.add_argument("--json-out", help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    args.scenarios = args.scenarios or list(SCENARIOS)
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    if args.url and not args.database_url:
        parser.error("--url needs --database-url")
    # What Run.settle and the bench's Run expect of its arguments.
    args.wait_quiet = 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        app = ExternalApp(args.url, database_url=args.database_url)
    else:
        app = LocalApp(args.workers, args.threads)
    out = open(args.json_out, "ab") if args.json_out else None
    results: dict[str, list[float]] = {name: [] for name in args.scenarios}
    failed = False
    app.start()
    try:
        if args.warmup_messages:
            # Connection pools opened, PostgreSQL's caches loaded: the first run pays for none of it.
            warm = argparse.Namespace(**{**vars(args), "messages": args.warmup_messages})
            for name in args.scenarios:
                SCENARIOS[name](app, warm, f"client-warmup-{name}-{int(time.time())}")
        for round_ in range(1, args.rounds + 1):
            for name in args.scenarios:
                result = SCENARIOS[name](app, args, f"client-{name}-{round_}-{int(time.time())}")
                if result.get("elapsed_s"):
                    result["msgs_per_s"] = round(result["messages"] / result["elapsed_s"], 1)
                    results[name].append(result["msgs_per_s"])
                line = orjson.dumps({"scenario": name, "round": round_, **result})
                print(line.decode(), flush=True)
                if out:
                    out.write(line + b"\n")
                failed |= not result.get("ok")
    finally:
        app.stop()
        if out:
            out.close()
    print(f"{'scenario':<12} {'runs':>4} {'median msg/s':>14}  all")
    for name, rates in results.items():
        median = statistics.median(rates) if rates else float("nan")
        print(f"{name:<12} {len(rates):>4} {median:>14,.0f}  {', '.join(f'{r:,.0f}' for r in rates)}")
    if (
        "subscriber" in results
        and "consume_ack" in results
        and results["consume_ack"]
        and results["subscriber"]
    ):
        ratio = statistics.median(results["subscriber"]) / statistics.median(results["consume_ack"])
        print(f"subscriber / consume_ack: {ratio:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
