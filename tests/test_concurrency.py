"""Several consumers and producers on threads, each with its own connection from the pool."""

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

CONSUMERS = 8


@pytest.fixture
def busy_app(make_app):
    # Enough connections that every thread holds its own: contention is in PostgreSQL, not the pool.
    return make_app(DATABASE_POOL_SIZE=CONSUMERS + 4, DATABASE_MAX_OVERFLOW=0)


def consume(client, consumer_id: str, batch_size: int = 7) -> list:
    response = client.get(
        "/subscriptions/sub/messages", query_string={"consumer_id": consumer_id, "batch_size": batch_size}
    )
    assert response.status_code == 200, response.json
    return response.json["data"]


def test_two_consumers_never_get_the_same_locked_message(busy_app, api):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    for start in range(0, 600, 100):
        api.publish("orders", [{"n": n} for n in range(start, start + 100)])
    start_together = threading.Barrier(CONSUMERS)

    def drain(worker: int) -> list[str]:
        client = busy_app.test_client()
        start_together.wait()
        got = []
        while batch := consume(client, f"worker-{worker}"):
            got.extend(m["id"] for m in batch)  # never acked: every message stays locked
        return got

    with ThreadPoolExecutor(CONSUMERS) as pool:
        per_worker = list(pool.map(drain, range(CONSUMERS)))

    delivered = [message_id for got in per_worker for message_id in got]
    assert len(delivered) == 600
    assert len(set(delivered)) == 600
    assert sum(1 for got in per_worker if got) > 1  # the work was really shared
    assert api.metrics()["delivered"] == 600


def test_every_published_message_is_consumed_exactly_once_when_all_ack(busy_app, api):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    producers, batches, batch_size = 4, 10, 25
    total = producers * batches * batch_size
    publishing_done = threading.Event()

    def produce(producer: int) -> None:
        client = busy_app.test_client()
        for batch in range(batches):
            first = (producer * batches + batch) * batch_size
            response = client.post(
                "/topics/orders/messages", json=[{"n": n} for n in range(first, first + batch_size)]
            )
            assert response.status_code == 204

    def consume_and_ack(worker: int) -> list[int]:
        client = busy_app.test_client()
        seen = []
        empty_polls = 0
        while empty_polls < 3:
            batch = consume(client, f"worker-{worker}", batch_size=10)
            if not batch:
                empty_polls += 1 if publishing_done.is_set() else 0
                continue
            empty_polls = 0
            seen.extend(m["payload"]["n"] for m in batch)
            response = client.post("/subscriptions/sub/acks", json=[m["id"] for m in batch])
            assert response.status_code == 204
        return seen

    with ThreadPoolExecutor(producers + CONSUMERS) as pool:
        consumers = [pool.submit(consume_and_ack, w) for w in range(CONSUMERS)]
        for future in [pool.submit(produce, p) for p in range(producers)]:
            future.result()
        publishing_done.set()
        seen = [n for future in consumers for n in future.result()]

    counts = Counter(seen)
    assert sorted(counts) == list(range(total))
    assert set(counts.values()) == {1}
    assert api.metrics() == {
        "subscription_id": "sub",
        "available": 0,
        "delayed": 0,
        "delivered": 0,
        "acked": total,
        "dlq": 0,
        "waiting": 0,
    }


def test_deleting_a_subscription_while_publishing_leaves_no_orphans(busy_app, api, engine):
    import sqlalchemy as sa

    api.create_topic("orders")
    for n in range(5):
        api.create_subscription(f"sub{n}", "orders")
    stop = threading.Event()

    def produce() -> None:
        client = busy_app.test_client()
        while not stop.is_set():
            assert (
                client.post("/topics/orders/messages", json=[{"n": n} for n in range(20)]).status_code == 204
            )

    with ThreadPoolExecutor(4) as pool:
        producers = [pool.submit(produce) for _ in range(3)]
        client = busy_app.test_client()
        for n in range(5):
            assert client.delete(f"/subscriptions/sub{n}").status_code == 204
        stop.set()
        for future in producers:
            future.result()

    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM subscription_messages")).scalar() == 0
