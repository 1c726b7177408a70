"""Delayed delivery (issue 16, point 2): POST /topics/{id}/messages?delay_seconds=N or
?deliver_at=<RFC 3339 time>. The messages are stored at once and become claimable at their due
time, by the database's clock; until then they count as `delayed` and wake no long poll.

Delays here are 1-2 s, and every wait is bounded.
"""

import datetime as dt
import threading
import time

import psycopg
import pytest

from pubsub import messages
from tests.auth_support import bearer, new_client, token_request
from tests.test_backlog_metrics import backlog_of
from tests.test_grouping import Locks, join, libpq, queued, stored, wait_until
from tests.test_long_poll import (  # noqa: F401 (fixtures)
    CHANNEL,
    SLACK,
    listener_pids,
    new_app,
    new_listener,
    pg,
    start_waiter,
)

PUBLISH = "/topics/orders/messages"


@pytest.fixture(scope="module")
def app(make_app):
    """The backlog gauges counted on every scrape, as in test_backlog_metrics."""
    return make_app(METRICS_BACKLOG_CACHE_SECONDS=0)


@pytest.fixture
def sub(api) -> None:
    api.create_topic("orders")
    api.create_subscription("sub", "orders")


@pytest.fixture
def db_now(database_url):
    """The database's clock, the only one that decides."""

    def now() -> dt.datetime:
        with psycopg.connect(libpq(database_url), autocommit=True) as conn:
            return conn.execute("SELECT clock_timestamp()").fetchone()[0]

    return now


def publish(client, payloads: list, status: int = 204, headers: dict | None = None, **query):
    response = client.post(PUBLISH, json=payloads, query_string=query, headers=headers)
    assert response.status_code == status, response.get_json()
    return response


def due_rows(database_url) -> list[tuple]:
    """(payload n, seconds from now to the row's available_at) of every message, in seq order."""
    with psycopg.connect(libpq(database_url)) as conn:
        return conn.execute(
            "SELECT (payload->>'n')::int, extract(epoch FROM available_at - now())::float"
            " FROM subscription_messages ORDER BY seq"
        ).fetchall()


def consume_until_due(api, db_now, due: dt.datetime, limit: float = 1 + SLACK) -> list:
    """Consume until messages come: none may come from a consume that ended before `due`; some
    must come within `limit` seconds after it."""
    while True:
        got = api.consume("sub", batch_size=100)
        ended = db_now()
        if got:
            assert ended >= due, f"delivered {(due - ended).total_seconds():.3f}s before its time"
            return got
        assert ended < due + dt.timedelta(seconds=limit), f"nothing claimable {limit}s after the due time"
        time.sleep(0.05)


# --- Claimable at the due time, not before ------------------------------------------------------


def test_a_publish_with_delay_seconds_is_claimable_only_once_the_delay_is_over(client, api, sub, db_now):
    before = db_now()
    publish(client, [{"n": 1}, {"n": 2}], delay_seconds=1)
    assert api.consume("sub") == []
    got = consume_until_due(api, db_now, before + dt.timedelta(seconds=1))
    assert [m["payload"]["n"] for m in got] == [1, 2]


def test_a_publish_with_deliver_at_is_claimable_only_from_that_time(client, api, sub, db_now):
    due = db_now() + dt.timedelta(seconds=1.5)
    publish(client, [{"n": 1}], deliver_at=due.isoformat())
    assert api.consume("sub") == []
    assert [m["payload"]["n"] for m in consume_until_due(api, db_now, due)] == [1]


@pytest.mark.parametrize(
    "query",
    [
        {"delay_seconds": 0},
        {"deliver_at": "2000-01-01T00:00:00Z"},
        {"deliver_at": "1999-12-31t23:00:00-01:00"},
    ],
    ids=["no delay", "a time past", "a time past, lower case"],
)
def test_a_delay_of_zero_or_a_time_past_is_claimable_at_once(client, api, sub, query):
    publish(client, [{"n": 1}], **query)
    assert [m["payload"]["n"] for m in api.consume("sub")] == [1]


def test_messages_due_at_the_same_time_are_claimed_in_publish_order_within_and_across_batches(
    client, api, sub, db_now
):
    due = db_now() + dt.timedelta(seconds=1.5)
    for batch in range(3):
        publish(client, [{"n": batch * 10 + i} for i in range(4)], deliver_at=due.isoformat())
    publish(client, [{"n": 99}])  # published last, due now: claimed first
    assert [m["payload"]["n"] for m in api.consume("sub", batch_size=100)] == [99]
    got = consume_until_due(api, db_now, due)
    assert [m["payload"]["n"] for m in got] == [batch * 10 + i for batch in range(3) for i in range(4)]


def test_delayed_and_immediate_publishes_to_a_topic_go_to_every_matching_subscription(
    client, api, database_url, db_now
):
    api.create_topic("orders")
    api.create_subscription("sub", "orders", filter={"kind": ["a"]})
    api.create_subscription("other", "orders")
    publish(client, [{"n": 1, "kind": "a"}, {"n": 2, "kind": "b"}], delay_seconds=60)
    rows = due_rows(database_url)
    assert [n for n, _ in rows] == [1, 1, 2]  # sub and other get 1, other only gets 2
    assert all(50 < seconds <= 60 for _, seconds in rows)
    assert api.consume("sub") == [] and api.consume("other") == []


# --- Metrics and gauges ---------------------------------------------------------------------------


def test_delayed_messages_count_as_delayed_not_available_until_due(client, api, sub, db_now):
    api.create_subscription("retrying", "orders", backoff_min_seconds=300, backoff_max_seconds=300)
    publish(client, [{"n": 0}])  # now: available in both, one nacked into a backoff in retrying
    api.nack("retrying", [api.consume("retrying")[0]["id"]])
    due = db_now() + dt.timedelta(seconds=2)
    publish(client, [{"n": 1}, {"n": 2}], deliver_at=due.isoformat())

    assert api.metrics("sub") == {
        "subscription_id": "sub",
        "available": 1,
        "delayed": 2,
        "delivered": 0,
        "acked": 0,
        "dlq": 0,
        "waiting": 0,
    }
    assert api.metrics("retrying") | {"subscription_id": None} == {
        "subscription_id": None,
        "available": 1,  # the retry waiting out its backoff is available, as before
        "delayed": 2,
        "delivered": 0,
        "acked": 0,
        "dlq": 0,
        "waiting": 0,
    }
    gauges = backlog_of(client)
    assert {k: gauges["sub"][k] for k in ("available", "delayed", "backoff")} == {
        "available": 1,
        "delayed": 2,
        "backoff": 0,
    }
    assert {k: gauges["retrying"][k] for k in ("available", "delayed", "backoff")} == {
        "available": 0,
        "delayed": 2,
        "backoff": 1,
    }

    api.ack("sub", [m["id"] for m in api.consume("sub")])  # only the delayed ones are left
    assert backlog_of(client)["sub"]["age"] == 0  # not owed to anyone yet: no age
    wait_until(lambda: db_now() >= due, "the due time")
    assert api.metrics("sub")["available"] == 2 and api.metrics("sub")["delayed"] == 0
    assert backlog_of(client)["sub"]["delayed"] == 0 and backlog_of(client)["sub"]["age"] > 0


# --- Validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("delay_seconds=-1", "delay_seconds"),
        (f"delay_seconds={messages.MAX_DELAY_SECONDS + 1}", "delay_seconds"),
        ("delay_seconds=1.5", "delay_seconds"),
        ("delay_seconds=soon", "delay_seconds"),
        ("delay_seconds=", "delay_seconds"),
        ("deliver_at=2030-01-01T00:00:00", "deliver_at"),  # no timezone
        ("deliver_at=2030-01-01T00:00:00+01:00", "deliver_at"),  # a + not encoded: a space
        ("deliver_at=tomorrow", "deliver_at"),
        ("deliver_at=", "deliver_at"),
        ("delay_seconds=1&deliver_at=2030-01-01T00:00:00Z", "deliver_at"),  # both
        ("deliver_at=2999-01-01T00:00:00Z", "deliver_at"),  # more than 7 days ahead
    ],
)
@pytest.mark.parametrize("prefer", [False, True], ids=["204", "receipts"])
def test_a_bad_delay_is_a_422_naming_it_and_stores_nothing(
    client, api, sub, database_url, query, field, prefer
):
    headers = {"Prefer": "return=representation"} if prefer else None
    response = client.post(f"{PUBLISH}?{query}", json=[{"n": 1}], headers=headers)
    assert response.status_code == 422, response.get_json()
    body = response.get_json()
    assert body["detail"] and f"query.{field}" in body["errors"], body
    assert due_rows(database_url) == []


def test_a_deliver_at_just_within_7_days_is_accepted_and_just_beyond_is_not(client, api, sub, db_now):
    week = dt.timedelta(seconds=messages.MAX_DELAY_SECONDS)
    publish(client, [{"n": 1}], deliver_at=(db_now() + week - dt.timedelta(seconds=30)).isoformat())
    response = publish(
        client, [{"n": 2}], 422, deliver_at=(db_now() + week + dt.timedelta(seconds=30)).isoformat()
    )
    assert response.get_json()["errors"] == {"query.deliver_at": [messages.DELAY_TOO_LONG]}
    assert api.metrics("sub")["delayed"] == 1


def test_a_delay_to_a_missing_topic_is_a_404(client):
    response = client.post("/topics/nowhere/messages?delay_seconds=5", json=[{"n": 1}])
    assert response.status_code == 404 and response.get_json() == {"detail": "Topic not found"}


# --- Receipts, group commit, auth -----------------------------------------------------------------


def test_receipts_of_a_delayed_publish_name_the_messages_delivered_at_the_due_time(client, api, sub, db_now):
    before = db_now()
    response = publish(
        client, [{"n": 1}, {"n": 2}], 201, headers={"Prefer": "return=representation"}, delay_seconds=2
    )
    receipts = response.get_json()["data"]
    assert [r["subscriptions"] for r in receipts] == [1, 1]
    assert api.consume("sub") == []
    got = consume_until_due(api, db_now, before + dt.timedelta(seconds=2))
    assert [m["id"] for m in got] == [r["id"] for r in receipts]


def test_publishes_with_and_without_delays_share_one_statement_each_with_its_own_due_time(
    app, api, database_url
):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    locks = Locks(database_url)
    statuses: dict[int, int] = {}

    def publish_in_thread(index: int, query: dict) -> threading.Thread:
        def run() -> None:
            response = app.test_client().post(PUBLISH, json=[{"n": index}], query_string=query)
            statuses[index] = response.status_code

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    try:
        locks.hold_message_table()
        threads = [publish_in_thread(0, {})]
        wait_until(lambda: locks.publishes_waiting() == 1, "the first publish to wait for the lock")
        group = app.extensions["pubsub_publish_group"]
        others = [{"delay_seconds": 60}, {}, {"deliver_at": "2000-01-01T00:00:00Z"}, {"delay_seconds": 120}]
        threads += [publish_in_thread(index, query) for index, query in enumerate(others, 1)]
        wait_until(lambda: queued(group) == len(others), "the other publishes to queue")
        locks.release()
        join(threads)
    finally:
        locks.conn.close()
    assert statuses == dict.fromkeys(range(5), 204)
    transactions = {n: xmin for _, n, xmin in stored(database_url)}
    assert len({transactions[n] for n in range(1, 5)}) == 1 != transactions[0]  # shared by 1-4
    due = dict(due_rows(database_url))
    assert due[0] <= 0 and due[2] <= 0 and due[3] <= 0
    assert 50 < due[1] <= 60 and 110 < due[4] <= 120
    assert sorted(m["payload"]["n"] for m in api.consume("sub")) == [0, 2, 3]


def test_with_auth_on_a_delayed_publish_is_checked_and_delayed_on_both_paths(
    auth_app, api, sub, database_url
):
    client_id, secret = new_client(auth_app, "topics:publish:orders")
    token = token_request(auth_app.test_client(), client_id, secret).get_json()["access_token"]
    test_client = auth_app.test_client()
    for n, headers in enumerate(({}, {"Prefer": "return=representation"})):
        response = test_client.post(
            f"{PUBLISH}?delay_seconds=60", json=[{"n": n}], headers={**bearer(token), **headers}
        )
        assert response.status_code in (201, 204), response.get_json()
    response = test_client.post(f"{PUBLISH}?delay_seconds=60", json=[{"n": 9}])
    assert response.status_code == 401
    rows = due_rows(database_url)
    assert [n for n, _ in rows] == [0, 1] and all(50 < seconds <= 60 for _, seconds in rows)


# --- Long polls -----------------------------------------------------------------------------------


def test_a_delayed_publish_sends_no_notification_and_an_immediate_one_does(client, api, sub, database_url):
    with psycopg.connect(libpq(database_url), autocommit=True) as conn:
        # As a long-poll waiter's mark does: publishes to `sub` NOTIFY for the next minute.
        conn.execute("UPDATE subscriptions SET notify_until = now() + interval '1 minute'")
        conn.execute(f"LISTEN {CHANNEL}")
        publish(client, [{"n": 1}, {"n": 2}], delay_seconds=60)
        assert list(conn.notifies(timeout=0.5)) == []
        publish(client, [{"n": 3}], deliver_at="2000-01-01T00:00:00Z")
        [notification] = conn.notifies(timeout=2, stop_after=1)
    assert notification.payload.split(" ")[:2] == ["sub", "1"]


def test_a_waiting_consumer_is_not_woken_by_a_delayed_publish_and_gets_it_within_a_second_of_its_time(
    new_app,  # noqa: F811
    pg,  # noqa: F811
    start_waiter,  # noqa: F811
    db_now,
):
    known = listener_pids(pg)
    app = new_app()  # LONG_POLL_RECHECK_SECONDS = 1
    client = app.test_client()
    assert client.post("/topics", json={"id": "orders"}).status_code == 201
    assert client.post("/subscriptions", json={"id": "sub", "topic_id": "orders"}).status_code == 201
    waiter = start_waiter(app, wait=10)
    new_listener(pg, known)
    time.sleep(0.3)
    due = db_now() + dt.timedelta(seconds=2)
    published = time.monotonic()
    publish(client, [{"n": 1}], deliver_at=due.isoformat())
    [message] = waiter.result()
    answered = db_now()
    assert message["payload"] == {"n": 1}
    assert waiter.finished - published >= 1.5, "answered long before the due time"
    assert due <= answered < due + dt.timedelta(seconds=1 + SLACK), answered - due


# --- The OpenAPI document -----------------------------------------------------------------------


def test_the_openapi_document_marks_the_delay_parameters_and_the_delayed_count_as_extensions(client):
    spec = client.get("/openapi.json").get_json()
    parameters = {p["name"]: p for p in spec["paths"]["/topics/{id}/messages"]["post"]["parameters"]}
    for name in ("delay_seconds", "deliver_at"):
        assert parameters[name]["in"] == "query" and not parameters[name].get("required")
        assert parameters[name]["schema"]["x-pubsub-extension"] is True, parameters[name]
        assert "Extension to the fastpubsub API" in parameters[name]["description"]
    assert parameters["delay_seconds"]["schema"]["maximum"] == messages.MAX_DELAY_SECONDS
    assert parameters["deliver_at"]["schema"]["format"] == "date-time"
    metrics = spec["components"]["schemas"]["SubscriptionMetrics"]["properties"]
    assert metrics["delayed"]["x-pubsub-extension"] is True
    assert "x-pubsub-extension" not in metrics["available"]
