"""python -m bench.soak [options]: a long steady run that must end with nothing lost.

Publishers post at a fixed rate, consumers claim and ack (and nack a few, so retries run too),
and the cleanup jobs run every minute through the real command line, for --minutes. Every 30 s
it prints throughput, p99 latencies, the size of each table and its indexes, and their dead
tuples. Then publishing stops, the consumers drain the queue, and it checks through the API and
its own records that every message that was answered 2xx was acked (lost = 0) and that nothing is
left (pending = 0). Exits 1 otherwise. Starts the app on an embedded PostgreSQL of its own (as
`python -m bench` does) unless given --url and --database-url.
"""

import argparse
import random
import sys
import threading
import time
from dataclasses import dataclass, field

import orjson
import sqlalchemy as sa

from bench.__main__ import percentiles
from bench.app import AppError, ExternalApp, LocalApp, request_json, sqlalchemy_url
from bench.load import HttpClient, RequestFailed

REPORT_EVERY = 30.0
CLEANUP_EVERY = 60.0
ACKED_RETENTION = 120  # seconds: cleanup-acked really deletes during the run
LOCK_TIMEOUT = 30  # seconds: cleanup-stuck releases what a consumer held this long
EMPTY_WAIT = 0.02  # a consumer's pause after an empty claim

SIZES = sa.text("""
SELECT c.relname AS table_name,
       pg_relation_size(c.oid) AS table_bytes,
       pg_indexes_size(c.oid) AS index_bytes,
       s.n_live_tup AS live, s.n_dead_tup AS dead
FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.relname IN ('subscription_messages', 'acked_messages')
ORDER BY c.relname
""")


@dataclass
class Records:
    """What the clients saw, shared by their threads (list.append and set.add are atomic)."""

    published: set = field(default_factory=set)  # values whose publish got 204
    unknown: set = field(default_factory=set)  # values whose publish failed without an answer
    acked: set = field(default_factory=set)  # values whose ack got 204
    deliveries: int = 0
    redeliveries: int = 0
    nacked: int = 0
    errors: list = field(default_factory=list)
    latency: dict = field(default_factory=lambda: {"publish": [], "consume+ack": []})
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_latencies(self) -> dict:
        with self.lock:
            taken, self.latency = self.latency, {"publish": [], "consume+ack": []}
        return taken


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="length of the steady phase (20)")
    parser.add_argument("--rate", type=float, default=1000.0, help="messages published per second (1000)")
    parser.add_argument("--batch", type=int, default=10, help="messages per publish (10)")
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--consumers", type=int, default=4)
    parser.add_argument("--consume-batch", type=int, default=100)
    parser.add_argument("--nack-rate", type=float, default=0.01, help="share of deliveries nacked (0.01)")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--url", help="a running app (default: start one on an embedded PostgreSQL)")
    parser.add_argument("--database-url", help="with --url: its database, for sizes and dead tuples")
    args = parser.parse_args(argv)
    if args.url and not args.database_url:
        parser.error("--url needs --database-url (the report reads table sizes)")
    return args


def publisher(app, topic: str, index: int, args, records: Records, stop: threading.Event) -> None:
    client = HttpClient(app.url, app.token())
    interval = args.batch * args.publishers / args.rate
    next_at, sequence = time.monotonic(), 0
    while not stop.is_set():
        values = [index << 32 | (sequence + n) for n in range(args.batch)]
        sequence += args.batch
        body = orjson.dumps(
            [{"value": v, "country": "BR" if v % 2 else "US", "at": time.time()} for v in values]
        )
        started = time.perf_counter()
        try:
            client.publish(topic, body)
        except RequestFailed as error:
            records.errors.append(str(error))  # answered, not 2xx: not published
        except OSError as error:
            records.unknown.update(values)  # no answer: may or may not be stored
            records.errors.append(repr(error))
        else:
            records.published.update(values)
            records.latency["publish"].append(time.perf_counter() - started)
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    client.close()


def consumer(app, subscription: str, index: int, args, records: Records, stop: threading.Event) -> None:
    client, rng = HttpClient(app.url, app.token()), random.Random(index)
    seen: set = set()
    while not stop.is_set():
        started = time.perf_counter()
        try:
            messages = client.claim(subscription, f"soak-{index}", args.consume_batch)
            if not messages:
                time.sleep(EMPTY_WAIT)
                continue
            nacks = [m for m in messages if rng.random() < args.nack_rate]
            acks = [m for m in messages if m not in nacks]
            if acks:
                client.ack(subscription, [m[0] for m in acks])
            if nacks:
                status, data = client.request(
                    "POST", f"/subscriptions/{subscription}/nacks", orjson.dumps([m[0] for m in nacks])
                )
                client.expect(status, 204, data, "nack")
        except (RequestFailed, OSError) as error:
            records.errors.append(repr(error))
            continue
        records.latency["consume+ack"].append(time.perf_counter() - started)
        for message_id, _ in messages:
            records.deliveries += 1
            if message_id in seen:
                records.redeliveries += 1
            seen.add(message_id)
        records.acked.update(payload["value"] for _, payload in acks)
        records.nacked += len(nacks)
    client.close()


def report(app, engine, subscription: str, records: Records, since: dict, elapsed: float) -> None:
    now = time.monotonic()
    window = now - since["at"]
    published, acked = len(records.published), len(records.acked)
    latency = records.take_latencies()
    _, metrics = request_json(app.url, "GET", f"/subscriptions/{subscription}/metrics", token=app.token())
    with engine.connect() as conn:
        sizes = conn.execute(SIZES).all()
    p99 = {op: percentiles(values, (99,))["p99"] for op, values in latency.items()}
    table = "  ".join(
        f"{row.table_name}: {row.table_bytes / 2**20:.1f}+{row.index_bytes / 2**20:.1f} MiB"
        f" ({row.live} live, {row.dead} dead)"
        for row in sizes
    )
    print(
        f"[{elapsed / 60:5.1f} min] published {(published - since['published']) / window:7.0f}/s"
        f"  acked {(acked - since['acked']) / window:7.0f}/s"
        f"  p99 publish {p99['publish'] or 0:.1f} ms, consume+ack {p99['consume+ack'] or 0:.1f} ms"
        f"  available {metrics['available']} delivered {metrics['delivered']} dlq {metrics['dlq']}"
        f"  errors {len(records.errors)}\n           {table}",
        flush=True,
    )
    since.update(at=now, published=published, acked=acked)


def run_cleanup(app, database_url: str) -> None:
    """Both jobs through the real command line, as cron would run them."""
    if isinstance(app, LocalApp):
        app.flask("pubsub", "cleanup-acked", "--older-than", str(ACKED_RETENTION), timeout=60)
        app.flask("pubsub", "cleanup-stuck", "--lock-timeout", str(LOCK_TIMEOUT), timeout=60)
    else:  # a running app elsewhere: the same domain functions, on its database
        from pubsub import messages

        engine = sa.create_engine(sqlalchemy_url(database_url))
        with engine.begin() as conn:
            messages.delete_acked(conn, ACKED_RETENTION)
            messages.release_stuck(conn, LOCK_TIMEOUT)
        engine.dispose()


def soak(app, args) -> bool:
    token = app.token()
    topic = subscription = f"soak{int(time.time())}"
    # Short backoffs and many attempts: nacked messages come back within the run, never dead-lettered.
    retries = {"backoff_min_seconds": 1, "backoff_max_seconds": 5, "max_delivery_attempts": 20}
    setup = [
        ("/topics", {"id": topic}),
        ("/subscriptions", {"id": subscription, "topic_id": topic, **retries}),
    ]
    for path, body in setup:
        status, data = request_json(app.url, "POST", path, body, token)
        if status != 201:
            raise AppError(f"POST {path} answered {status}: {data}")
    engine = sa.create_engine(sqlalchemy_url(app.database_url))
    records, stop_publishing, stop_consuming = Records(), threading.Event(), threading.Event()
    threads = [
        threading.Thread(target=publisher, args=(app, topic, i, args, records, stop_publishing), daemon=True)
        for i in range(args.publishers)
    ] + [
        threading.Thread(
            target=consumer, args=(app, subscription, i, args, records, stop_consuming), daemon=True
        )
        for i in range(args.consumers)
    ]
    started = time.monotonic()
    since = {"at": started, "published": 0, "acked": 0}
    for thread in threads:
        thread.start()
    next_report, next_cleanup = started + REPORT_EVERY, started + CLEANUP_EVERY
    end = started + args.minutes * 60
    while (now := time.monotonic()) < end:
        if now >= next_cleanup:
            run_cleanup(app, app.database_url)
            next_cleanup += CLEANUP_EVERY
        if now >= next_report:
            report(app, engine, subscription, records, since, now - started)
            next_report += REPORT_EVERY
        time.sleep(0.5)
    stop_publishing.set()
    drain_end = time.monotonic() + args.drain_timeout
    metrics = {}
    while time.monotonic() < drain_end:
        _, metrics = request_json(app.url, "GET", f"/subscriptions/{subscription}/metrics", token=token)
        if metrics["available"] + metrics["delivered"] == 0 and records.published <= records.acked:
            break
        time.sleep(1)
    stop_consuming.set()
    for thread in threads:
        thread.join(timeout=30)
    report(app, engine, subscription, records, since, time.monotonic() - started)
    lost = records.published - records.acked
    unexpected = records.acked - records.published - records.unknown
    pending = metrics["available"] + metrics["delivered"] + metrics["dlq"]
    print(
        f"\nsoak: {args.minutes:g} min at {args.rate:g} msg/s: published {len(records.published)} (2xx),"
        f" outcome unknown {len(records.unknown)}, acked {len(records.acked)},"
        f" deliveries {records.deliveries}, redeliveries {records.redeliveries},"
        f" nacked {records.nacked}, request errors {len(records.errors)}\n"
        f"lost = {len(lost)}, unexpected = {len(unexpected)}, pending = {pending} "
        f"(available {metrics['available']}, delivered {metrics['delivered']}, dlq {metrics['dlq']})",
        flush=True,
    )
    for error in records.errors[:5]:
        print(f"  error: {error}", file=sys.stderr)
    engine.dispose()
    return not lost and not unexpected and pending == 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.url:
        app = ExternalApp(args.url, args.database_url)
    else:
        app = LocalApp(args.workers, args.threads)
    try:
        app.start()
        print(f"soak: app at {app.url}; {args.minutes:g} min at {args.rate:g} msg/s", flush=True)
        return 0 if soak(app, args) else 1
    except AppError as error:
        print(f"soak: {error}", file=sys.stderr)
        return 1
    finally:
        app.stop()


if __name__ == "__main__":
    sys.exit(main())
