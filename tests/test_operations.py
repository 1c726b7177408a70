"""Operators' bulk operations (pubsub.operations): redrive, purge of the DLQ and of the backlog; the
dead-lettering nack; and PATCH of a subscription. The scopes are in the auth matrix
(tests/auth_support.py), the plans in tests/test_query_plans.py."""

import datetime as dt
import time
import uuid

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from pubsub import db, operations, subscriptions
from tests.conftest import ApiHelper

PREFER = {"Prefer": "return=representation"}


@pytest.fixture
def sub(api):
    api.create_topic("orders")
    return api.create_subscription("sub", "orders", max_delivery_attempts=5)


def dead_letters(api: ApiHelper, client, n: int) -> list[str]:
    """Publish n messages and dead-letter them, in publish order; their ids."""
    api.publish("orders", [{"n": i} for i in range(n)])
    ids = [message["id"] for message in api.consume("sub", batch_size=100)]
    for id in ids:  # one by one: the DLQ's order is the order they died in
        response = client.post("/subscriptions/sub/nacks?dead_letter=true", json=[id])
        assert response.status_code == 204, response.json
    return ids


# --- nack ?dead_letter=true --------------------------------------------------------------------


def test_a_dead_letter_nack_sends_the_message_to_the_dlq_at_once_with_its_attempts(sub, api, client):
    api.publish("orders", [{"n": 1}, {"n": 2}])
    first, second = api.consume("sub")
    response = client.post("/subscriptions/sub/nacks?dead_letter=true", json=[first["id"]])
    assert response.status_code == 204
    assert [m["id"] for m in api.dlq("sub")] == [first["id"]]
    assert api.dlq("sub")[0]["delivery_attempts"] == 1  # four attempts were left: not retried
    assert api.metrics("sub") | {"acked": 0} == {
        "subscription_id": "sub",
        "available": 0,
        "delivered": 1,
        "acked": 0,
        "delayed": 0,
        "dlq": 1,
        "waiting": 0,
    }
    api.nack("sub", [second["id"]])  # a plain nack still retries
    assert len(api.dlq("sub")) == 1


def test_a_dead_letter_nack_answers_outcomes_as_a_nack(sub, api, client):
    api.publish("orders", [{"n": 1}, {"n": 2}])
    first, second = api.consume("sub")
    missing = str(uuid.uuid4())
    stale = f"{second['id']}:{second['ack_id'].split(':')[1] + '9'}"
    body = [first["ack_id"], missing, stale]
    response = client.post("/subscriptions/sub/nacks?dead_letter=true", json=body, headers=PREFER)
    assert response.status_code == 200, response.json
    assert response.json["data"] == [
        {"id": first["ack_id"], "status": "nacked"},
        {"id": missing, "status": "not_found"},
        {"id": stale, "status": "stale"},
    ]
    assert [m["id"] for m in api.dlq("sub")] == [first["id"]]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("dead_letter=1", "query.dead_letter"),
        ("dead_letter=yes", "query.dead_letter"),
        ("dead_letter=true&delay_seconds=5", "query.dead_letter"),
    ],
)
def test_a_bad_dead_letter_query_is_422(sub, api, client, query, field):
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    response = client.post(f"/subscriptions/sub/nacks?{query}", json=[message["id"]])
    assert response.status_code == 422
    assert field in response.json["errors"], response.json
    assert api.metrics("sub")["delivered"] == 1


def test_a_dead_letter_nack_of_a_missing_subscription_is_404(client):
    response = client.post("/subscriptions/nope/nacks?dead_letter=true", json=[str(uuid.uuid4())])
    assert response.status_code == 404
    assert response.json == {"detail": "Subscription not found"}


# --- redrive -----------------------------------------------------------------------------------


def test_redrive_moves_every_dead_letter_back_with_attempts_reset(sub, api, client):
    ids = dead_letters(api, client, 5)
    response = client.post("/subscriptions/sub/dlq/redrive")
    assert response.status_code == 200
    assert response.json == {"count": 5}
    assert api.dlq("sub") == []
    again = api.consume("sub")
    assert sorted(m["id"] for m in again) == sorted(ids)
    assert {m["delivery_attempts"] for m in again} == {1}  # reset to 0, then this delivery


def test_redrive_with_a_limit_moves_the_oldest_dead_letters_first(sub, api, client):
    ids = dead_letters(api, client, 5)
    response = client.post("/subscriptions/sub/dlq/redrive?limit=2")
    assert response.json == {"count": 2}
    assert [m["id"] for m in api.dlq("sub")] == ids[2:]
    assert [m["id"] for m in api.consume("sub")] == ids[:2]


def test_redrive_of_an_empty_dlq_counts_nothing(sub, client):
    assert client.post("/subscriptions/sub/dlq/redrive").json == {"count": 0}


@pytest.mark.parametrize("query", ["limit=0", "limit=-1", "limit=x", "limit=99999999999"])
def test_a_bad_redrive_limit_is_422(sub, client, query):
    response = client.post(f"/subscriptions/sub/dlq/redrive?{query}")
    assert response.status_code == 422
    assert "query.limit" in response.json["errors"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/subscriptions/nope/dlq/redrive"),
        ("DELETE", "/subscriptions/nope/dlq"),
        ("POST", "/subscriptions/nope/purge"),
    ],
)
def test_operations_on_a_missing_subscription_are_404(client, method, path):
    response = client.open(path, method=method)
    assert response.status_code == 404
    assert response.json == {"detail": "Subscription not found"}


def statements_run(app, action) -> int:
    """How many statements action() runs through SQLAlchemy on the app's engine."""
    executed = []
    engine = db.get_engine(app)
    listener = lambda *args: executed.append(1)  # noqa: E731
    sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        action()
    finally:
        sa.event.remove(engine, "before_cursor_execute", listener)
    return len(executed)


def test_redrive_works_in_chunks_of_the_chunk_size(sub, api, client, app):
    dead_letters(api, client, 10)
    with app.app_context(), db.connect() as conn:
        count = [0]
        runs = statements_run(app, lambda: count.__setitem__(0, operations.redrive_dlq(conn, "sub", 3)))
    assert count[0] == 10
    assert runs == 4  # 3 + 3 + 3 + 1: the short chunk ends it
    assert api.metrics("sub")["available"] == 10


def test_a_limited_redrive_stops_at_its_limit_across_chunks(sub, api, client, app):
    dead_letters(api, client, 10)
    with app.app_context(), db.connect() as conn:
        assert operations.redrive_dlq(conn, "sub", 3, limit=7) == 7
    assert api.metrics("sub")["dlq"] == 3


def test_the_chunk_size_setting_is_used_by_the_endpoints(sub, api, make_app):
    client = make_app(OPERATIONS_CHUNK_ROWS=2).test_client()
    dead_letters(ApiHelper(client), client, 5)
    app = client.application
    runs = statements_run(app, lambda: client.post("/subscriptions/sub/dlq/redrive"))
    assert runs == 3  # 2 + 2 + 1
    assert ApiHelper(client).metrics("sub")["available"] == 5


def listen(database_url: str) -> psycopg.Connection:
    conn = psycopg.connect(make_url(database_url).set(drivername="postgresql").render_as_string(False))
    conn.autocommit = True
    conn.execute("LISTEN pubsub")
    return conn


def test_redrive_notifies_long_poll_waiters_as_a_publish_does(sub, api, client, app, database_url):
    dead_letters(api, client, 3)
    with listen(database_url) as conn:
        client.post("/subscriptions/sub/dlq/redrive?limit=1")  # nobody waits: no NOTIFY
        assert list(conn.notifies(timeout=0.3)) == []
        with app.app_context(), db.connect() as mark:
            subscriptions.mark_waiting(mark, "sub", 60)
        client.post("/subscriptions/sub/dlq/redrive")
        [notify] = list(conn.notifies(timeout=2, stop_after=1))
    name, count, _xid = notify.payload.split(" ")
    assert (name, count) == ("sub", "2")


# --- DLQ purge ---------------------------------------------------------------------------------


def test_purging_the_dlq_deletes_every_dead_letter_and_nothing_else(sub, api, client):
    dead_letters(api, client, 4)
    api.publish("orders", [{"n": "live"}])
    response = client.delete("/subscriptions/sub/dlq")
    assert response.status_code == 200
    assert response.json == {"count": 4}
    assert api.metrics("sub") | {"acked": 0} == {
        "subscription_id": "sub",
        "available": 1,
        "delivered": 0,
        "acked": 0,
        "delayed": 0,
        "dlq": 0,
        "waiting": 0,
    }


def test_purging_named_dead_letters_deletes_only_those(sub, api, client):
    ids = dead_letters(api, client, 4)
    api.publish("orders", [{"n": "live"}])
    [live] = api.consume("sub")
    response = client.delete("/subscriptions/sub/dlq", json=[ids[0], ids[2], live["id"], str(uuid.uuid4())])
    assert response.json == {"count": 2}  # a delivered message named is no dead letter
    assert [m["id"] for m in api.dlq("sub")] == [ids[1], ids[3]]
    assert client.delete("/subscriptions/sub/dlq", json=[]).json == {"count": 0}  # none named
    assert len(api.dlq("sub")) == 2


def test_a_dlq_purge_in_chunks_counts_them_all(sub, api, client, app):
    dead_letters(api, client, 7)
    with app.app_context(), db.connect() as conn:
        count = [0]
        runs = statements_run(app, lambda: count.__setitem__(0, operations.purge_dlq(conn, "sub", 2)))
    assert (count[0], runs) == (7, 4)
    assert api.metrics("sub")["dlq"] == 0


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b'{"id": 1}', "application/json", 422),
        (b'["not-a-uuid"]', "application/json", 422),
        (b"[", "application/json", 400),
        (b'["6f1c1d1e-0000-4000-8000-000000000000"]', "text/plain", 415),
    ],
)
def test_a_bad_dlq_purge_body_is_a_4xx_and_deletes_nothing(sub, api, client, body, content_type, status):
    dead_letters(api, client, 1)
    response = client.delete("/subscriptions/sub/dlq", data=body, content_type=content_type)
    assert response.status_code == status
    assert response.json["detail"]
    assert len(api.dlq("sub")) == 1


# --- backlog purge -----------------------------------------------------------------------------


def test_purging_the_backlog_deletes_available_and_delivered_but_not_the_dlq(sub, api, client):
    dead_letters(api, client, 2)
    api.publish("orders", [{"n": i} for i in range(5)])
    api.consume("sub", batch_size=2)
    api.nack("sub", [m["id"] for m in api.consume("sub", batch_size=1)])  # in backoff
    response = client.post("/subscriptions/sub/purge")
    assert response.status_code == 200
    assert response.json == {"count": 5}
    assert api.metrics("sub") == {
        "subscription_id": "sub",
        "available": 0,
        "delivered": 0,
        "acked": 0,
        "delayed": 0,
        "dlq": 2,
        "waiting": 0,
    }


def test_a_purged_leased_message_is_not_found_by_its_ack_and_not_counted_acked(sub, api, client):
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    assert client.post("/subscriptions/sub/purge").json == {"count": 1}
    response = client.post("/subscriptions/sub/acks", json=[message["ack_id"]], headers=PREFER)
    assert response.json["data"] == [{"id": message["ack_id"], "status": "not_found"}]
    assert api.metrics("sub")["acked"] == 0


def test_purging_before_a_time_keeps_what_was_published_after(sub, api, client, engine):
    api.publish("orders", [{"n": "old-1"}, {"n": "old-2"}])
    with engine.connect() as conn:
        cut = conn.execute(sa.text("SELECT now()")).scalar()
    api.publish("orders", [{"n": "new"}])
    response = client.post("/subscriptions/sub/purge", query_string={"before": cut.isoformat()})
    assert response.json == {"count": 2}
    assert [m["payload"] for m in api.consume("sub")] == [{"n": "new"}]
    earlier = (cut - dt.timedelta(days=1)).astimezone(dt.timezone(dt.timedelta(hours=-3))).isoformat()
    assert client.post("/subscriptions/sub/purge", query_string={"before": earlier}).json == {"count": 0}


@pytest.mark.parametrize("before", ["2026-01-01T00:00:00", "yesterday", "2026-13-01T00:00:00Z", ""])
def test_a_bad_purge_time_is_422(sub, api, client, before):
    api.publish("orders", [{"n": 1}])
    response = client.post("/subscriptions/sub/purge", query_string={"before": before})
    assert response.status_code == 422
    assert "query.before" in response.json["errors"]
    assert api.metrics("sub")["available"] == 1


def test_a_backlog_purge_in_chunks_counts_them_all(sub, api, client, app):
    api.publish("orders", [{"n": i} for i in range(8)])
    api.consume("sub", batch_size=3)
    with app.app_context(), db.connect() as conn:
        count = [0]
        runs = statements_run(app, lambda: count.__setitem__(0, operations.purge_backlog(conn, "sub", 2)))
    # waiting (behind an ordering key): 0 (short); available: 2 + 2 + 1 (short); delivered: 2 + 1
    assert (count[0], runs) == (8, 6)
    assert api.metrics("sub")["available"] == 0


def test_a_purge_skips_a_message_locked_right_now_instead_of_waiting(sub, api, client, database_url):
    api.publish("orders", [{"n": i} for i in range(3)])
    with psycopg.connect(
        make_url(database_url).set(drivername="postgresql").render_as_string(False)
    ) as other:
        other.execute(
            "SELECT 1 FROM subscription_messages ORDER BY seq LIMIT 1 FOR UPDATE"
        )  # as a claim would
        started = time.monotonic()
        assert client.post("/subscriptions/sub/purge").json == {"count": 2}
        assert time.monotonic() - started < 2
        other.rollback()
    assert api.metrics("sub")["available"] == 1


# --- PATCH /subscriptions/{id} -----------------------------------------------------------------


def test_patch_changes_only_the_fields_sent_and_answers_as_get(api, client):
    api.create_topic("orders")
    custom = {
        "filter": {"country": ["BR"]},
        "max_delivery_attempts": 3,
        "backoff_min_seconds": 2,
        "backoff_max_seconds": 20,
        "ack_deadline_seconds": 45,
        "ordering_key": None,
    }
    created = api.create_subscription("custom", "orders", **custom)
    for change in ({"max_delivery_attempts": 7}, {"ack_deadline_seconds": 30}, {"backoff_min_seconds": 3}):
        response = client.patch("/subscriptions/custom", json=change)
        assert response.status_code == 200
        assert response.json == client.get("/subscriptions/custom").json
        created.update(change)
        assert response.json == created


def test_an_empty_patch_changes_nothing(sub, client):
    response = client.patch("/subscriptions/sub", json={})
    assert (response.status_code, response.json) == (200, sub)


def test_a_new_filter_applies_to_messages_published_afterwards(sub, api, client):
    api.publish("orders", [{"country": "US", "n": 1}])
    response = client.patch("/subscriptions/sub", json={"filter": {"country": ["BR"]}})
    assert response.json["filter"] == {"country": ["BR"]}
    api.publish("orders", [{"country": "US", "n": 2}, {"country": "BR", "n": 3}])
    assert [m["payload"]["n"] for m in api.consume("sub")] == [1, 3]  # 1 was queued before
    assert client.patch("/subscriptions/sub", json={"filter": None}).json["filter"] is None
    api.publish("orders", [{"country": "US", "n": 4}])
    assert [m["payload"]["n"] for m in api.consume("sub")] == [4]


def test_a_new_retry_policy_applies_to_the_next_nack(sub, api, client):
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    client.patch("/subscriptions/sub", json={"max_delivery_attempts": 1})
    api.nack("sub", [message["id"]])
    assert [m["id"] for m in api.dlq("sub")] == [message["id"]]


def test_null_sets_the_default_again_as_at_creation(sub, client):
    client.patch("/subscriptions/sub", json={"max_delivery_attempts": 2, "backoff_max_seconds": 9})
    response = client.patch(
        "/subscriptions/sub", json={"max_delivery_attempts": None, "backoff_max_seconds": None}
    )
    assert (response.json["max_delivery_attempts"], response.json["backoff_max_seconds"]) == (5, 300)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"filter": {"country": "BR"}}, "json.filter"),
        ({"filter": {"country": []}}, "json.filter"),
        ({"max_delivery_attempts": 0}, "json.max_delivery_attempts"),
        ({"max_delivery_attempts": "3"}, "json.max_delivery_attempts"),
        ({"ack_deadline_seconds": 5}, "json.ack_deadline_seconds"),
        ({"backoff_min_seconds": 10, "backoff_max_seconds": 9}, "json.backoff_min_seconds"),
        ({"backoff_min_seconds": 301}, "json.backoff_min_seconds"),  # above the stored max (300)
        ({"backoff_max_seconds": 4}, "json.backoff_max_seconds"),  # below the stored min (5)
        ({"id": "other"}, "json.id"),
        ({"topic_id": "payments"}, "json.topic_id"),
        ({"colour": "red"}, "json.colour"),
    ],
)
def test_a_bad_patch_is_422_and_changes_nothing(sub, client, body, field):
    response = client.patch("/subscriptions/sub", json=body)
    assert response.status_code == 422
    assert response.json["detail"] == "Validation error"
    assert field in response.json["errors"], response.json
    assert client.get("/subscriptions/sub").json == sub


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"[]", "application/json", 422),
        (b"{", "application/json", 400),
        (b"null", "application/json", 422),
        (b"", "application/json", 400),
        (b'{"max_delivery_attempts": 2}', "text/plain", 415),
    ],
)
def test_a_patch_body_that_is_no_json_object_is_a_4xx(sub, client, body, content_type, status):
    response = client.patch("/subscriptions/sub", data=body, content_type=content_type)
    assert response.status_code == status
    assert response.json["detail"]


def test_patch_of_a_missing_subscription_is_404(client):
    response = client.patch("/subscriptions/nope", json={"max_delivery_attempts": 2})
    assert response.status_code == 404
    assert response.json == {"detail": "Subscription not found"}
