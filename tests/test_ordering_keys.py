"""Ordering keys (issue 16, point 3): a subscription created with `"ordering_key": "<field>"`
delivers the messages that have the same value in that top-level payload field one at a time, in
publish order: the next is claimable only once the one before is acked or dead-lettered, and a
nacked or lapsed one is retried before those after it. Messages without the field are unordered;
different keys go to consumers in parallel. Behind a key, messages wait in a state no claim reads
(migration 0008).

The history checker's per-key order check, under concurrent, killed and lapsing consumers, is in
test_history; the claim's reads with a busy key in test_query_plans.
"""

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from pubsub import create_app, db, messages
from tests.conftest import ApiHelper, new_database
from tests.test_grouping import libpq
from tests.test_leases import expire, outcomes

PUBLISH = "/topics/orders/messages"


@pytest.fixture
def ordered(api) -> None:
    api.create_topic("orders")
    api.create_subscription(
        "sub", "orders", ordering_key="customer", backoff_min_seconds=1, backoff_max_seconds=1
    )


def names(delivered: list) -> list[str]:
    return [message["payload"]["name"] for message in delivered]


def ids_of(delivered: list) -> list[str]:
    return [message["id"] for message in delivered]


def publish_names(api, *names: str, key_of=lambda name: name[0]) -> None:
    """Publish one message per name, keyed by its first letter (a1, a2, b1...); `-` has no key."""
    api.publish(
        "orders", [{"name": name} | ({} if name[0] == "-" else {"customer": key_of(name)}) for name in names]
    )


# --- The subscription's field --------------------------------------------------------------------


def test_the_ordering_key_is_stored_and_shown_and_none_by_default(api, client):
    api.create_topic("orders")
    assert api.create_subscription("keyed", "orders", ordering_key="customer")["ordering_key"] == "customer"
    assert api.create_subscription("plain", "orders")["ordering_key"] is None
    assert client.get("/subscriptions/keyed").json["ordering_key"] == "customer"
    listed = {sub["id"]: sub["ordering_key"] for sub in client.get("/subscriptions").json["data"]}
    assert listed == {"keyed": "customer", "plain": None}


@pytest.mark.parametrize("value", ["", "x" * 257, 5, ["customer"], {"field": "customer"}])
def test_a_bad_ordering_key_is_422(api, client, value):
    api.create_topic("orders")
    response = client.post("/subscriptions", json={"id": "sub", "topic_id": "orders", "ordering_key": value})
    assert response.status_code == 422, response.json
    assert "json.ordering_key" in response.json["errors"]
    assert client.get("/subscriptions/sub").status_code == 404


def test_the_ordering_key_cannot_be_changed(ordered, client):
    for value in ("other", None):
        response = client.patch("/subscriptions/sub", json={"ordering_key": value})
        assert response.status_code == 422, response.json
        assert "json.ordering_key" in response.json["errors"]
    assert client.get("/subscriptions/sub").json["ordering_key"] == "customer"


# --- Delivery --------------------------------------------------------------------------------------


def test_one_message_per_key_at_a_time_in_publish_order(ordered, api):
    publish_names(api, "a1", "a2", "b1", "a3", "-1", "b2")
    first = api.consume("sub", batch_size=10)
    assert names(first) == ["a1", "b1", "-1"]
    assert api.metrics()["waiting"] == 3
    assert api.metrics()["available"] == 0
    assert api.consume("sub", batch_size=10) == []  # a2, a3, b2 wait however often one asks
    api.ack("sub", ids_of(first[:1]))  # a1
    assert names(api.consume("sub", batch_size=10)) == ["a2"]
    api.ack("sub", ids_of(first[1:]))  # b1 and the unordered one
    [b2] = api.consume("sub", batch_size=10)
    assert names([b2]) == ["b2"]
    assert api.metrics()["waiting"] == 1  # a3, behind a2


def test_messages_without_the_field_or_with_null_are_unordered(ordered, api):
    api.publish("orders", [{"name": "x"}, {"name": "y", "customer": None}, {"name": "z"}])
    assert names(api.consume("sub", batch_size=10)) == ["x", "y", "z"]


def test_key_values_are_compared_as_json(ordered, api):
    """1 and "1" are different keys; equal values in any payload are the same one."""
    api.publish(
        "orders",
        [{"name": "n", "customer": 1}, {"name": "s", "customer": "1"}, {"name": "n2", "customer": 1}],
    )
    assert names(api.consume("sub", batch_size=10)) == ["n", "s"]


def test_different_keys_are_delivered_in_parallel(ordered, api):
    publish_names(api, *[f"{key}{n}" for n in range(3) for key in "abcdefghij"])
    delivered = api.consume("sub", batch_size=100)
    assert sorted(names(delivered)) == [f"{key}0" for key in "abcdefghij"]
    assert api.metrics()["waiting"] == 20


def test_unordered_subscriptions_of_the_same_topic_are_not_held_up(ordered, api):
    api.create_subscription("plain", "orders")
    publish_names(api, "a1", "a2", "a3")
    assert names(api.consume("plain", batch_size=10)) == ["a1", "a2", "a3"]
    assert names(api.consume("sub", batch_size=10)) == ["a1"]


def test_a_nacked_message_is_retried_before_the_ones_after_it(ordered, api):
    publish_names(api, "a1", "a2")
    [a1] = api.consume("sub")
    api.nack("sub", [a1["id"]])
    assert api.consume("sub") == []  # a1 waits out its 1 s backoff, and a2 behind it
    time.sleep(1.2)
    [again] = api.consume("sub")
    assert (names([again]), again["delivery_attempts"]) == (["a1"], 2)


def test_a_lapsed_lease_is_retried_before_the_ones_after_it(ordered, api):
    publish_names(api, "a1", "a2")
    [a1] = api.consume("sub")
    expire(api, "sub", a1["ack_id"])
    [again] = api.consume("sub", "worker-2")
    assert (again["id"], again["delivery_attempts"]) == (a1["id"], 2)
    assert outcomes(api, "sub", "acks", [a1["ack_id"]]) == ["stale"]  # the old lease settles nothing
    api.ack("sub", [again["id"]])
    assert names(api.consume("sub")) == ["a2"]


def test_a_dead_letter_nack_makes_the_next_one_claimable(ordered, api, client):
    publish_names(api, "a1", "a2", "a3")
    [a1] = api.consume("sub")
    assert client.post("/subscriptions/sub/nacks?dead_letter=true", json=[a1["id"]]).status_code == 204
    assert names(api.consume("sub")) == ["a2"]
    assert api.metrics()["dlq"] == 1


def test_a_nack_out_of_attempts_makes_the_next_one_claimable(api):
    api.create_topic("orders")
    api.create_subscription("sub", "orders", ordering_key="customer", max_delivery_attempts=1)
    publish_names(api, "a1", "a2")
    [a1] = api.consume("sub")
    api.nack("sub", [a1["id"]])
    assert names(api.consume("sub")) == ["a2"]
    assert ids_of(api.dlq("sub")) == [a1["id"]]


def test_a_lapsed_lease_out_of_attempts_is_dead_lettered_and_the_next_claimed_in_the_same_consume(api):
    api.create_topic("orders")
    api.create_subscription("sub", "orders", ordering_key="customer", max_delivery_attempts=1)
    publish_names(api, "a1", "a2", "b1")
    [a1, b1] = api.consume("sub", batch_size=2)
    expire(api, "sub", a1["ack_id"])
    assert names(api.consume("sub", batch_size=2)) == ["a2"]  # a1 dead, b1 still leased
    assert ids_of(api.dlq("sub")) == [a1["id"]]


def test_cleanup_stuck_dead_letters_a_lapsed_head_and_frees_its_key(api, runner):
    api.create_topic("orders")
    api.create_subscription("sub", "orders", ordering_key="customer", max_delivery_attempts=1)
    api.create_subscription("plain", "orders", max_delivery_attempts=1)
    publish_names(api, "a1", "a2")
    [a1] = api.consume("sub")
    [p1, p2] = api.consume("plain")
    expire(api, "sub", a1["ack_id"])
    expire(api, "plain", p1["ack_id"], p2["ack_id"])
    result = runner.invoke(args=["pubsub", "cleanup-stuck"])
    assert result.exit_code == 0, result.output
    assert "moved 3 to the DLQ" in result.output
    assert api.metrics("sub")["available"] == 1
    assert names(api.consume("sub")) == ["a2"]


def test_a_redriven_dead_letter_waits_behind_its_keys_head_and_goes_before_later_ones(ordered, api, client):
    publish_names(api, "a1", "a2", "a3")
    [a1] = api.consume("sub")
    client.post("/subscriptions/sub/nacks?dead_letter=true", json=[a1["id"]])
    [a2] = api.consume("sub")
    assert client.post("/subscriptions/sub/dlq/redrive").json == {"count": 1}
    assert api.metrics()["waiting"] == 2  # a1 (back from the DLQ) and a3, behind a2
    api.ack("sub", [a2["id"]])
    assert names(api.consume("sub")) == ["a1"]  # its publish order comes first


def test_reprocessing_a_dead_letter_of_an_idle_key_makes_it_claimable_at_once(ordered, api, client):
    publish_names(api, "a1")
    [a1] = api.consume("sub")
    client.post("/subscriptions/sub/nacks?dead_letter=true", json=[a1["id"]])
    api.reprocess("sub", [a1["id"]])
    assert names(api.consume("sub")) == ["a1"]


def test_purging_the_backlog_removes_waiting_messages_and_frees_the_keys(ordered, api, client):
    publish_names(api, "a1", "a2", "a3", "b1", "b2")
    api.consume("sub")
    assert client.post("/subscriptions/sub/purge").json == {"count": 5}
    metrics = api.metrics()
    assert (metrics["available"], metrics["delivered"], metrics["waiting"]) == (0, 0, 0)
    publish_names(api, "a4")
    assert names(api.consume("sub")) == ["a4"]


def test_purging_what_came_before_a_time_makes_the_first_later_message_of_the_key_claimable(
    ordered, api, client, database_url
):
    publish_names(api, "a1", "a2")
    with psycopg.connect(libpq(database_url), autocommit=True) as conn:
        cut = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    publish_names(api, "a3", "a4")
    assert client.post("/subscriptions/sub/purge", query_string={"before": cut.isoformat()}).json == {
        "count": 2
    }
    assert names(api.consume("sub", batch_size=10)) == ["a3"]


def test_deleting_an_ordered_subscription_or_its_topic_removes_every_message(ordered, api, client):
    api.create_subscription("sub2", "orders", ordering_key="customer")
    publish_names(api, "a1", "a2", "b1")
    api.consume("sub")
    assert client.delete("/subscriptions/sub").status_code == 204
    assert client.delete("/topics/orders").status_code == 204
    with client.application.app_context(), db.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM subscription_messages").scalar() == 0


# --- Concurrency -----------------------------------------------------------------------------------


def test_publishes_wait_for_an_ordering_lock_instead_of_failing(ordered, api, client, database_url):
    """A publish to an ordered subscription whose ordering lock another transaction holds (an ack
    committing) waits for it: grouped publishes that find it taken run alone (LockNotAvailable),
    as for a subscription locked against publishes."""
    results = []
    with psycopg.connect(libpq(database_url)) as holder:
        holder.execute("SELECT pubsub_lock_ordering('sub')")
        threads = [
            threading.Thread(
                target=lambda n=n: results.append(
                    client.post(PUBLISH, json=[{"customer": "a", "n": n}]).status_code
                )
            )
            for n in range(4)
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        assert results == []  # all waiting
        holder.rollback()
    for thread in threads:
        thread.join(10)
    assert results == [204] * 4
    assert len(api.consume("sub", batch_size=10)) == 1
    assert api.metrics()["waiting"] == 3


def test_concurrent_publishers_and_consumers_keep_each_keys_order(api, app):
    """Publishers each own some keys and publish their messages one request at a time; consumers
    claim and ack concurrently. A message is claimed only once every earlier one of its key was
    acked (an ack is noted before it is sent), and every message is delivered."""
    api.create_topic("orders")
    api.create_subscription("sub", "orders", ordering_key="customer")
    keys, per_key, publishers, consumers = 4, 60, 4, 4
    acked: set[tuple[str, int]] = set()
    problems: list[str] = []
    published = threading.Event()
    lock = threading.Lock()

    def publish(worker: int) -> None:
        client = app.test_client()
        for n in range(per_key):
            for key in range(worker, keys, publishers):
                response = client.post(PUBLISH, json=[{"customer": f"k{key}", "n": n}])
                if response.status_code != 204:
                    problems.append(f"publish {response.status_code}")

    def consume(worker: int) -> None:
        client = app.test_client()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (len(acked) < keys * per_key):
            response = client.get(
                "/subscriptions/sub/messages", query_string={"consumer_id": f"c{worker}", "batch_size": 5}
            )
            batch = response.json["data"]
            with lock:
                for message in batch:
                    key, n = message["payload"]["customer"], message["payload"]["n"]
                    missing = [m for m in range(n) if (key, m) not in acked]
                    if missing or (key, n) in acked:
                        problems.append(f"{key}/{n} claimed with {missing} not acked")
                    acked.add((key, n))
            if batch:
                client.post("/subscriptions/sub/acks", json=ids_of(batch))
            elif published.is_set():
                time.sleep(0.01)

    pubs = [threading.Thread(target=publish, args=(w,)) for w in range(publishers)]
    cons = [threading.Thread(target=consume, args=(w,)) for w in range(consumers)]
    for thread in pubs + cons:
        thread.start()
    for thread in pubs:
        thread.join(60)
    published.set()
    for thread in cons:
        thread.join(70)
    assert problems == []
    assert len(acked) == keys * per_key
    metrics = api.metrics()
    assert (metrics["available"], metrics["delivered"], metrics["waiting"]) == (0, 0, 0)


# --- Reads: a busy key costs nothing to the claim, the ack or the publish -------------------------

BUSY_KEYS, PER_KEY = 100, 100  # 10,000 messages: 100 heads, 9,900 waiting behind them


def reads_in(conn) -> dict[str, int]:
    """subscription_messages' reads so far in this transaction: rows read sequentially, and index
    entries read per index (the triggers' queries included)."""
    table = conn.exec_driver_sql(
        "SELECT seq_scan, seq_tup_read FROM pg_stat_xact_user_tables WHERE relname = 'subscription_messages'"
    ).one()
    indexes = conn.exec_driver_sql(
        "SELECT indexrelid::regclass::text, pg_stat_get_xact_tuples_returned(indexrelid) FROM pg_index"
        " WHERE indrelid = 'subscription_messages'::regclass"
    )
    return {"seq_scan": table.seq_scan, "seq_tup_read": table.seq_tup_read, **dict(indexes.all())}


def reads_of(action):
    """What `action(conn)` returns, and what it read, in a transaction of its own. The counters
    are the backend's not yet reported, which include earlier transactions': the difference."""
    with db.begin() as conn:
        before = reads_in(conn)
        result = action(conn)
        after = reads_in(conn)
    return result, {name: after[name] - before[name] for name in after}


@pytest.fixture
def fresh_app(server_url) -> Iterator:
    """An app on a database of its own, whose statistics only this test makes: the suite's shared
    database keeps column statistics of earlier tests' subscriptions across TRUNCATE and across an
    ANALYZE of an empty table, and this test is about its own two states."""
    with new_database(server_url) as url:
        app = create_app({"DATABASE_URL": url, "TESTING": True})
        try:
            yield app, url
        finally:
            db.dispose(app)


@pytest.mark.parametrize("statistics", ["analyzed-empty-then-filled", "analyzed-full"])
def test_claim_ack_and_publish_read_only_their_rows_behind_busy_keys(fresh_app, statistics):
    """Whatever the statistics say (a table analyzed empty before the burst, or analyzed full),
    claiming the heads reads the claim index's entries of those heads, acking them reads a few
    entries of the ordering index per key, and publishing behind a busy key one or two: never the
    messages waiting behind the keys, never the table sequentially."""
    app, database_url = fresh_app
    api = ApiHelper(app.test_client())
    api.create_topic("orders")
    api.create_subscription("sub", "orders", ordering_key="customer")
    with psycopg.connect(libpq(database_url), autocommit=True) as conn:
        conn.execute("ALTER TABLE subscription_messages SET (autovacuum_enabled = off)")
        conn.execute("ALTER TABLE subscription_messages DISABLE TRIGGER replan_on_growth")  # migration 0009
        conn.execute("ANALYZE subscription_messages")  # empty
    for n in range(PER_KEY):
        api.publish("orders", [{"customer": key, "n": n} for key in range(BUSY_KEYS)])
    if statistics == "analyzed-full":
        with psycopg.connect(libpq(database_url), autocommit=True) as conn:
            conn.execute("ANALYZE subscription_messages")
    with app.app_context():
        claimed, claim_reads = reads_of(lambda conn: messages.consume(conn, "sub", "c", 1000))
        assert len(claimed) == BUSY_KEYS
        ids = [row[0] for row in claimed]
        acked, ack_reads = reads_of(lambda conn: messages.ack_current(conn, "sub", ids))
        assert acked == BUSY_KEYS
        _, publish_reads = reads_of(
            lambda conn: messages.publish(conn, "orders", '[{"customer": 1, "n": -1}]')
        )
    assert api.metrics()["available"] == BUSY_KEYS  # the second message of each key
    assert api.metrics()["waiting"] == BUSY_KEYS * (PER_KEY - 2) + 1
    for reads in (claim_reads, ack_reads, publish_reads):
        assert reads["seq_tup_read"] == 0, reads
    # The claim reads each head's entry (and the empty delivered range): not the waiting ones.
    assert claim_reads["ix_subscription_messages_claim"] <= BUSY_KEYS + 10, claim_reads
    assert claim_reads["ix_subscription_messages_ordering"] == 0, claim_reads
    # Per key acked: its head's entry, and the next one's.
    assert ack_reads["ix_subscription_messages_ordering"] <= 4 * BUSY_KEYS, ack_reads
    assert ack_reads["ix_subscription_messages_claim"] == 0, ack_reads
    assert publish_reads["ix_subscription_messages_ordering"] <= 3, publish_reads
    assert publish_reads["ix_subscription_messages_claim"] == 0, publish_reads


def test_publishes_and_acks_sharing_keys_of_two_ordered_subscriptions_never_deadlock(api, app):
    """Publishes whose batches reach two ordered subscriptions' keys in opposite orders, and acks
    of those keys, all at once: each statement takes its locks subscription by subscription and
    key by key in one order, so none waits on another in a cycle (PostgreSQL would abort one
    with a deadlock error: a 5xx here)."""
    api.create_topic("orders")
    api.create_subscription("s1", "orders", ordering_key="customer", filter={"to": ["s1", "both"]})
    api.create_subscription("s2", "orders", ordering_key="customer", filter={"to": ["s2", "both"]})
    statuses: list[int] = []
    keys = [f"k{n}" for n in range(6)]

    def publish(worker: int) -> None:
        client = app.test_client()
        for n in range(40):
            order = keys if (worker + n) % 2 else keys[::-1]
            batch = [
                {"customer": key, "to": ("s1", "s2", "both")[(i + worker) % 3]} for i, key in enumerate(order)
            ]
            statuses.append(client.post(PUBLISH, json=batch).status_code)

    def consume(subscription: str) -> None:
        client = app.test_client()
        for _ in range(80):
            batch = client.get(f"/subscriptions/{subscription}/messages?consumer_id=c&batch_size=10").json[
                "data"
            ]
            if batch:
                statuses.append(
                    client.post(f"/subscriptions/{subscription}/acks", json=ids_of(batch)).status_code
                )

    threads = [threading.Thread(target=publish, args=(w,)) for w in range(4)]
    threads += [threading.Thread(target=consume, args=(s,)) for s in ("s1", "s2", "s1", "s2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not any(thread.is_alive() for thread in threads)
    assert set(statuses) == {204}, sorted(set(statuses))
    assert statuses.count(204) >= 4 * 40
