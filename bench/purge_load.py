"""python -m bench.purge_load: consumers' latency while a subscription of a million messages is
purged (issue 16, point 4), against one app that the bench's own code starts (bench/app.py:
`flask db upgrade`, `flask pubsub serve`, an embedded PostgreSQL), or --url with --database-url.

Two subscriptions of one topic are filled with INSERT ... SELECT generate_series: `big`
(--messages, 1M) and `live` (--live, 300k), then analyzed. Consumers claim batches of --batch and
ack them: --consumers on `live`, --purged-consumers on `big` itself. After --baseline seconds of
that, `POST /subscriptions/big/purge` runs (in chunks of OPERATIONS_CHUNK_ROWS, --chunk-rows for
the app it starts). Prints, for the baseline window and for the purge, each subscription's
consume and ack requests: how many, p50, p99 and the longest, and messages acked per second;
then the purge's count and duration. Exits 1 if a request failed.
"""

import argparse
import statistics
import sys
import threading
import time

import orjson
import psycopg

from bench.app import ExternalApp, LocalApp, conninfo, request_json
from bench.load import HttpClient

FILL = """
INSERT INTO subscription_messages (id, subscription_id, payload, state)
SELECT gen_random_uuid(), %(subscription)s, jsonb_build_object('n', n, 'pad', repeat('x', 64)), 0
FROM generate_series(1, %(count)s) AS n
"""
PURGE_TIMEOUT = 600.0


def fill(database_url: str, counts: dict[str, int]) -> None:
    with psycopg.connect(conninfo(database_url), autocommit=True) as conn:
        for subscription, count in counts.items():
            conn.execute(FILL, {"subscription": subscription, "count": count})
        conn.execute("VACUUM ANALYZE subscription_messages")


class Consumer(threading.Thread):
    """Claims and acks until stopped; records (start, seconds, kind, messages) per request."""

    def __init__(self, url: str, subscription: str, name: str, batch: int, stop: threading.Event):
        super().__init__(name=name, daemon=True)
        self.client = HttpClient(url, None)
        self.path = f"/subscriptions/{subscription}"
        self.query = f"consumer_id={name}&batch_size={batch}"
        self.stop = stop
        self.samples: list[tuple[float, float, str, int]] = []
        self.errors: list[str] = []

    def timed(self, kind: str, method: str, path: str, body: bytes | None = None) -> bytes | None:
        started = time.monotonic()
        status, data = self.client.request(method, path, body)
        elapsed = time.monotonic() - started
        if status >= 300:
            self.errors.append(f"{method} {path}: {status} {data[:200]!r}")
            return None
        self.samples.append((started, elapsed, kind, 0))
        return data

    def run(self) -> None:
        while not self.stop.is_set():
            data = self.timed("consume", "GET", f"{self.path}/messages?{self.query}")
            if data is None:
                time.sleep(0.1)
                continue
            ids = [m["id"] for m in orjson.loads(data)["data"]]
            if not ids:
                time.sleep(0.01)
                continue
            if self.timed("ack", "POST", f"{self.path}/acks", orjson.dumps(ids)) is not None:
                started, elapsed, kind, _ = self.samples[-1]
                self.samples[-1] = (started, elapsed, kind, len(ids))
        self.client.close()


def window(consumers: list[Consumer], start: float, end: float, kind: str) -> dict:
    samples = [s for c in consumers for s in c.samples if start <= s[0] < end and s[2] == kind]
    latencies = sorted(s[1] * 1000 for s in samples)
    if not latencies:
        return {"requests": 0}
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return {
        "requests": len(latencies),
        "p50_ms": round(statistics.median(latencies), 1),
        "p99_ms": round(p99, 1),
        "max_ms": round(latencies[-1], 1),
        "acked_per_s": round(sum(s[3] for s in samples) / (end - start)) if kind == "ack" else None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.purge_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running app (default: start one, embedded PostgreSQL)")
    parser.add_argument("--database-url", help="with --url: its database, to fill")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (2)")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker (8)")
    parser.add_argument("-n", "--messages", type=int, default=1_000_000, help="messages purged (1M)")
    parser.add_argument("--live", type=int, default=300_000, help="backlog of the other subscription (300k)")
    parser.add_argument(
        "-c", "--consumers", type=int, default=4, help="consumers of the other subscription (4)"
    )
    parser.add_argument("--purged-consumers", type=int, default=2, help="consumers of the purged one (2)")
    parser.add_argument("-b", "--batch", type=int, default=10, help="consume batch size (10)")
    parser.add_argument("--baseline", type=float, default=10.0, help="seconds measured before the purge (10)")
    parser.add_argument("--chunk-rows", type=int, help="OPERATIONS_CHUNK_ROWS of the app it starts")
    args = parser.parse_args(argv)
    if args.url and not args.database_url:
        parser.error("--url needs --database-url")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        app = ExternalApp(args.url, database_url=args.database_url)
    else:
        app = LocalApp(args.workers, args.threads)
        if args.chunk_rows:
            app.env["PUBSUB_OPERATIONS_CHUNK_ROWS"] = str(args.chunk_rows)
    stop = threading.Event()
    consumers: list[Consumer] = []
    app.start()
    try:
        for path, body in (
            ("/topics", {"id": "orders"}),
            ("/subscriptions", {"id": "big", "topic_id": "orders"}),
            ("/subscriptions", {"id": "live", "topic_id": "orders"}),
        ):
            status, answer = request_json(app.url, "POST", path, body)
            assert status == 201, (status, answer)
        fill(app.database_url, {"big": args.messages, "live": args.live})
        for i in range(args.consumers):
            consumers.append(Consumer(app.url, "live", f"live-{i}", args.batch, stop))
        for i in range(args.purged_consumers):
            consumers.append(Consumer(app.url, "big", f"big-{i}", args.batch, stop))
        for consumer in consumers:
            consumer.start()
        time.sleep(1.0)  # connections and pools warm
        baseline_start = time.monotonic()
        time.sleep(args.baseline)
        purge_start = time.monotonic()
        status, answer = request_json(app.url, "POST", "/subscriptions/big/purge", timeout=PURGE_TIMEOUT)
        purge_end = time.monotonic()
        assert status == 200, (status, answer)
    finally:
        stop.set()
        for consumer in consumers:
            consumer.join(15)
        app.stop()
    seconds = purge_end - purge_start
    print(f"purge: {answer['count']:,} messages in {seconds:.1f} s ({answer['count'] / seconds:,.0f}/s)")
    print(
        f"{'window':<9} {'subscription':<12} {'request':<8} {'count':>6} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'acked/s':>8}"
    )
    for name, (start, end) in (
        ("baseline", (baseline_start, purge_start)),
        ("purge", (purge_start, purge_end)),
    ):
        for subscription in ("live", "big"):
            group = [c for c in consumers if c.path.endswith(f"/{subscription}")]
            for kind in ("consume", "ack"):
                w = window(group, start, end, kind)
                if not w["requests"]:
                    print(f"{name:<9} {subscription:<12} {kind:<8} {0:>6}")
                    continue
                acked = "" if w["acked_per_s"] is None else f"{w['acked_per_s']:>8,}"
                print(
                    f"{name:<9} {subscription:<12} {kind:<8} {w['requests']:>6} {w['p50_ms']:>7} "
                    f"{w['p99_ms']:>7} {w['max_ms']:>7} {acked}"
                )
    errors = [error for c in consumers for error in c.errors]
    for error in errors[:10]:
        print(f"error: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
