"""A purge of a million messages while consumers work on the same server: they keep getting
messages throughout (progress, not timing: bench/purge_load.py measures their latency), and the
count adds up. Consumers of another subscription share the table; consumers of the purged one
race the purge for the same rows (SKIP LOCKED on both sides)."""

import http.client
import json
import time
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

from pubsub import db
from tests.conftest import threaded_server
from tests.history import Client, Consumer, History, Workers

PURGED = 1_000_000
LIVE = 100_000  # the other subscription's backlog: more than its consumers take meanwhile
SLICES = 4  # the purge's duration is cut in this many slices: every one must see deliveries

FILL = """
INSERT INTO subscription_messages (id, subscription_id, payload, state)
SELECT gen_random_uuid(), %(subscription)s, jsonb_build_object('value', %(subscription)s || n, 'n', n), 0
FROM generate_series(1, %(count)s) AS n
"""


@pytest.fixture(scope="module")
def load_app(make_app):
    # Production error handling, a connection for every client thread, and the default chunk size.
    # Its pool closes with the module, not the session: the suite's connections stay under
    # PostgreSQL's max_connections (100).
    app = make_app(TESTING=False, DATABASE_POOL_SIZE=16, DATABASE_MAX_OVERFLOW=4)
    yield app
    db.dispose(app)


@pytest.fixture
def port(load_app) -> Iterator[int]:
    with threaded_server(load_app) as port:
        yield port


def purge(port: int, subscription: str) -> tuple[int, float, float]:
    """POST .../purge with a timeout to match a million rows: (count, started, ended)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        started = time.monotonic()
        conn.request("POST", f"/subscriptions/{subscription}/purge")
        response = conn.getresponse()
        body = json.loads(response.read())
        ended = time.monotonic()
    finally:
        conn.close()
    assert response.status == 200, body
    return body["count"], started, ended


@pytest.mark.slow
def test_consumers_keep_getting_messages_during_a_1m_row_purge(port, database_url, history: History):
    admin = Client(history, "admin", port)
    admin.create_topic("orders")
    admin.create_subscription("big", "orders")
    admin.create_subscription("live", "orders")
    with psycopg.connect(make_url(database_url).set(drivername="postgresql").render_as_string(False)) as conn:
        conn.execute(FILL, {"subscription": "big", "count": PURGED})
        conn.execute(FILL, {"subscription": "live", "count": LIVE})
        conn.commit()
        conn.autocommit = True
        conn.execute("ANALYZE subscription_messages")

    workers = Workers()
    try:
        for i, subscription in enumerate(["live"] * 4 + ["big"] * 2):
            consumer = Consumer(
                history, port, f"c{i}-{subscription}", subscription, batch_size=10, nack_ratio=0
            )
            workers.start(consumer.name, consumer.run, workers.stopped)
        time.sleep(0.5)  # the consumers are under way
        count, started, ended = purge(port, "big")
        time.sleep(0.3)
    finally:
        workers.join(timeout=15)

    acked_big = sum(
        len(s.message_ids)
        for s in history.settles
        if s.subscription == "big" and s.kind == "ack" and s.outcome == "ok"
    )
    big = admin.metrics("big")
    # Everything is accounted for: purged, acked by its consumers, or still there (a message in a
    # claim at the instant its chunk passed, or delivered after the purge went by).
    assert count + big["acked"] + big["available"] + big["delivered"] == PURGED, (count, big)
    assert count > PURGED * 0.9
    # Purged messages are not counted as acked; an ack of a message purged under its consumer
    # answers 204 and counts nothing.
    assert 0 < big["acked"] <= acked_big
    # Progress: the consumers of both subscriptions got messages in every slice of the purge.
    width = (ended - started) / SLICES
    per_slice = {"live": [0] * SLICES, "big": [0] * SLICES}
    for delivery in history.deliveries:
        if started <= delivery.t0 < ended:
            per_slice[delivery.subscription][min(SLICES - 1, int((delivery.t0 - started) / width))] += 1
    assert all(all(counts) for counts in per_slice.values()), (
        f"deliveries per slice of the {ended - started:.1f} s purge: {per_slice}"
    )
    assert not history.failed_calls()
    print(f"purged {count} in {ended - started:.1f} s; deliveries per slice {per_slice}")
