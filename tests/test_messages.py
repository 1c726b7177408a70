"""The message lifecycle through the API: consume, ack, nack with backoff, DLQ, reprocess, metrics."""

import time
import uuid
from datetime import datetime

import pytest
import sqlalchemy as sa

from pubsub.messages import BACKOFF_SECONDS


@pytest.fixture
def orders(api):
    api.create_topic("orders")


def seconds_until_available(engine, message_id: str) -> float:
    """How far in the future the database has scheduled a message (negative: already due)."""
    with engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT extract(epoch FROM available_at - now()) FROM subscription_messages WHERE id = :id"
            ),
            {"id": message_id},
        ).scalar()


def test_consume_returns_the_documented_shape(orders, api):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    assert set(message) == {"id", "subscription_id", "payload", "delivery_attempts", "created_at", "ack_id"}
    assert uuid.UUID(message["id"])
    assert message["subscription_id"] == "sub"
    assert message["payload"] == {"n": 1}
    assert message["delivery_attempts"] == 1
    assert datetime.fromisoformat(message["created_at"]).tzinfo is not None


def test_consume_delivers_oldest_first_in_publish_order(orders, api):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": n} for n in range(5)])
    api.publish("orders", [{"n": n} for n in range(5, 8)])
    first = api.consume("sub", batch_size=3)
    rest = api.consume("sub", batch_size=10)
    assert [m["payload"]["n"] for m in first + rest] == list(range(8))


def test_consumed_messages_are_locked_until_acked(orders, api):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}, {"n": 2}])
    assert len(api.consume("sub", "worker-1")) == 2
    assert api.consume("sub", "worker-2") == []
    assert api.metrics()["delivered"] == 2


def test_batch_size_defaults_to_ten_and_caps_the_batch(orders, api):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": n} for n in range(25)])
    response = api.client.get("/subscriptions/sub/messages", query_string={"consumer_id": "c"})
    assert len(response.json["data"]) == 10
    assert len(api.consume("sub", batch_size=100)) == 15


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"consumer_id": ""},
        {"consumer_id": "x" * 129},
        {"consumer_id": "a\x00b"},
        {"consumer_id": "c", "batch_size": 0},
        {"consumer_id": "c", "batch_size": 101},
        {"consumer_id": "c", "batch_size": "ten"},
    ],
)
def test_consume_rejects_bad_parameters(orders, api, query):
    api.create_subscription("sub", "orders")
    response = api.client.get("/subscriptions/sub/messages", query_string=query)
    assert response.status_code == 422
    assert response.json["errors"]


def test_ack_removes_messages_and_counts_them(orders, api):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": n} for n in range(3)])
    ids = [m["id"] for m in api.consume("sub")]
    api.ack("sub", ids[:2])
    assert api.metrics() == {
        "subscription_id": "sub",
        "available": 0,
        "delayed": 0,
        "delivered": 1,
        "acked": 2,
        "dlq": 0,
        "waiting": 0,
    }
    api.ack("sub", ids[:2])  # acking twice changes nothing
    assert api.metrics()["acked"] == 2


def test_ack_ignores_ids_not_delivered_to_this_subscription(orders, api):
    api.create_topic("payments")
    api.create_subscription("a", "orders")
    api.create_subscription("b", "payments")
    api.publish("orders", [{"n": 1}, {"n": 2}])
    api.publish("payments", [{"n": 1}, {"n": 2}])
    [a_message, a_other] = api.consume("a")
    [b_message, _] = api.consume("b")
    api.ack("a", [b_message["id"], str(uuid.uuid4())])  # another subscription's and an unknown id
    api.ack("b", [a_message["id"]])
    assert api.metrics("a")["delivered"] == 2
    assert api.metrics("b")["delivered"] == 2
    assert api.metrics("a")["acked"] == api.metrics("b")["acked"] == 0


def test_ack_of_a_message_not_yet_delivered_is_ignored(orders, api, engine):
    api.create_subscription("sub", "orders", backoff_min_seconds=60, backoff_max_seconds=60)
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    api.nack("sub", [message["id"]])
    api.ack("sub", [message["id"]])
    assert api.metrics()["available"] == 1
    assert api.metrics()["acked"] == 0


@pytest.mark.parametrize("body", [{"ids": []}, "x", ["not-a-uuid"], [1], [None], [str(uuid.uuid4())] * 1001])
@pytest.mark.parametrize("action", ["acks", "nacks", "dlq/reprocess"])
def test_id_lists_are_validated(orders, api, action, body):
    api.create_subscription("sub", "orders")
    response = api.client.post(f"/subscriptions/sub/{action}", json=body)
    assert response.status_code == 422
    assert response.json["detail"] == "Validation error"


@pytest.mark.parametrize(
    "spell",
    [str.upper, lambda id: id.replace("-", ""), lambda id: "{" + id + "}", lambda id: "urn:uuid:" + id],
    ids=["upper", "no-hyphens", "braces", "urn"],
)
def test_ack_accepts_every_uuid_spelling(orders, api, spell):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}, {"n": 2}])
    ids = [m["id"] for m in api.consume("sub")]
    api.ack("sub", [spell(id) for id in ids])
    assert api.metrics()["acked"] == 2


def test_a_batch_with_one_bad_id_names_it_and_changes_nothing(orders, api):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    response = api.client.post("/subscriptions/sub/acks", json=[message["id"], "nope", message["id"][:-1]])
    assert response.status_code == 422
    assert set(response.json["errors"]) == {"json.1", "json.2"}
    assert api.metrics()["delivered"] == 1


@pytest.mark.parametrize("action", ["acks", "nacks", "dlq/reprocess"])
def test_id_lists_accept_1000_ids(orders, api, action):
    api.create_subscription("sub", "orders")
    api.post_ids("sub", action, [str(uuid.uuid4()) for _ in range(1000)])


@pytest.mark.parametrize(
    ("attempts", "minimum", "maximum", "expected"),
    [
        (1, 5, 300, 5),
        (2, 5, 300, 10),
        (3, 5, 300, 20),
        (7, 5, 300, 300),
        (1, 1, 1, 1),
        (4, 1, 10, 8),
        (5, 1, 10, 10),
        (1, 0, 10, 0),
        (1000, 5, 300, 300),
    ],
)
def test_backoff_is_min_times_two_to_the_attempts_minus_one_capped_at_max(
    engine, attempts, minimum, maximum, expected
):
    query = sa.text(
        f"SELECT {BACKOFF_SECONDS} FROM"
        " (SELECT CAST(:min AS int) AS backoff_min_seconds, CAST(:max AS int) AS backoff_max_seconds) AS s,"
        " (SELECT CAST(:attempts AS int) AS delivery_attempts) AS sm"
    )
    with engine.connect() as conn:
        assert (
            conn.execute(query, {"min": minimum, "max": maximum, "attempts": attempts}).scalar() == expected
        )


def test_nack_retries_after_an_exponential_backoff(orders, api, engine):
    api.create_subscription("sub", "orders", backoff_min_seconds=1, backoff_max_seconds=2)
    api.publish("orders", [{"n": 1}])

    [message] = api.consume("sub")
    api.nack("sub", [message["id"]])
    assert seconds_until_available(engine, message["id"]) == pytest.approx(1, abs=0.3)
    assert api.consume("sub") == []  # still backing off
    assert api.metrics()["available"] == 1  # counted while it waits
    time.sleep(1.1)
    [again] = api.consume("sub")
    assert again["id"] == message["id"]
    assert again["delivery_attempts"] == 2

    api.nack("sub", [again["id"]])
    assert seconds_until_available(engine, message["id"]) == pytest.approx(2, abs=0.3)
    time.sleep(1.1)
    assert api.consume("sub") == []
    time.sleep(1.0)
    assert [m["delivery_attempts"] for m in api.consume("sub")] == [3]


def test_nack_after_the_last_attempt_dead_letters(orders, api):
    api.create_subscription(
        "sub", "orders", max_delivery_attempts=2, backoff_min_seconds=1, backoff_max_seconds=1
    )
    api.publish("orders", [{"n": 1}, {"n": 2}])
    for attempt in range(2):
        if attempt:
            time.sleep(1.1)  # the shortest backoff there is
        ids = [m["id"] for m in api.consume("sub")]
        assert len(ids) == 2
        api.nack("sub", ids)
    assert api.consume("sub") == []
    assert api.metrics() == {
        "subscription_id": "sub",
        "available": 0,
        "delayed": 0,
        "delivered": 0,
        "acked": 0,
        "dlq": 2,
        "waiting": 0,
    }
    dead = api.dlq("sub")
    assert [(m["payload"], m["delivery_attempts"]) for m in dead] == [({"n": 1}, 2), ({"n": 2}, 2)]


def test_reprocess_makes_dead_letters_available_with_attempts_reset(orders, api):
    api.create_subscription("sub", "orders", max_delivery_attempts=1)
    api.publish("orders", [{"n": 1}, {"n": 2}])
    ids = [m["id"] for m in api.consume("sub")]
    api.nack("sub", ids)
    assert api.metrics()["dlq"] == 2

    api.reprocess("sub", [ids[0]])
    assert api.metrics()["dlq"] == 1
    [message] = api.consume("sub")
    assert message["id"] == ids[0]
    assert message["delivery_attempts"] == 1


def test_reprocess_ignores_messages_not_in_the_dlq(orders, api):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    api.reprocess("sub", [message["id"]])
    assert api.metrics()["delivered"] == 1


def test_dlq_paging_never_skips_or_repeats(orders, api):
    api.create_subscription("sub", "orders", max_delivery_attempts=1)
    api.publish("orders", [{"n": n} for n in range(7)])
    # Dead-letter in two statements, in an order unlike publish order.
    ids = [m["id"] for m in api.consume("sub")]
    api.nack("sub", ids[4:])
    api.nack("sub", ids[:4])
    pages = [api.dlq("sub", offset=offset, limit=2) for offset in range(0, 8, 2)]
    seen = [m["id"] for page in pages for m in page]
    assert sorted(seen) == sorted(ids)
    assert seen == [m["id"] for m in api.dlq("sub", limit=100)]
    assert api.dlq("sub", limit=100) == api.dlq("sub", limit=100)


def test_dlq_rejects_bad_paging(orders, api):
    api.create_subscription("sub", "orders")
    assert api.client.get("/subscriptions/sub/dlq", query_string={"limit": 0}).status_code == 422


def test_metrics_count_every_state(orders, api):
    api.create_subscription(
        "sub", "orders", max_delivery_attempts=1, backoff_min_seconds=60, backoff_max_seconds=60
    )
    api.publish("orders", [{"n": n} for n in range(6)])
    m = api.consume("sub", batch_size=4)
    api.ack("sub", [m[0]["id"]])
    api.nack("sub", [m[1]["id"]])  # attempts used up: dead letter
    assert api.metrics() == {
        "subscription_id": "sub",
        "available": 2,
        "delayed": 0,
        "delivered": 2,
        "acked": 1,
        "dlq": 1,
        "waiting": 0,
    }


@pytest.mark.parametrize(
    ("message_filter", "payload", "delivered"),
    [
        (None, {"any": "thing"}, True),
        ({}, {"any": "thing"}, True),
        ({"country": ["BR", "US"]}, {"country": "BR"}, True),
        ({"country": ["BR", "US"]}, {"country": "JP"}, False),
        ({"country": ["BR"]}, {"other": "BR"}, False),
        ({"country": ["BR"]}, {"country": None}, False),
        ({"country": ["BR"]}, {"country": ["BR"]}, False),
        ({"country": ["BR"]}, {"country": {"code": "BR"}}, False),
        ({"premium": [True]}, {"premium": True}, True),
        ({"premium": [True]}, {"premium": 1}, False),
        ({"premium": [True]}, {"premium": "true"}, False),
        ({"premium": [False]}, {"premium": False}, True),
        ({"tier": [1, 2]}, {"tier": 2}, True),
        ({"tier": [1]}, {"tier": 1.0}, True),
        ({"tier": [1]}, {"tier": "1"}, False),
        ({"tier": [1.5]}, {"tier": 1.5}, True),
        ({"a": ["x"], "b": ["y"]}, {"a": "x", "b": "y"}, True),
        ({"a": ["x"], "b": ["y"]}, {"a": "x", "b": "z"}, False),
        ({"a": ["x"], "b": ["y"]}, {"a": "x"}, False),
        ({"k'\"%\\": ["v'%\\\""]}, {"k'\"%\\": "v'%\\\""}, True),
        ({"k": ["%"]}, {"k": "anything"}, False),
        ({"nested": ["x"]}, {"outer": {"nested": "x"}}, False),
    ],
)
def test_filters_match_top_level_fields_at_publish_time(orders, api, message_filter, payload, delivered):
    api.create_subscription("sub", "orders", filter=message_filter)
    api.publish("orders", [payload])
    assert api.metrics()["available"] == (1 if delivered else 0)


def test_fanout_gives_each_subscription_its_matching_copy(orders, api):
    api.create_subscription("all", "orders")
    api.create_subscription("br", "orders", filter={"country": ["BR"]})
    api.create_subscription("us", "orders", filter={"country": ["US"]})
    api.publish("orders", [{"country": "BR", "n": 1}, {"country": "US", "n": 2}, {"country": "BR", "n": 3}])
    assert [m["payload"]["n"] for m in api.consume("all")] == [1, 2, 3]
    assert [m["payload"]["n"] for m in api.consume("br")] == [1, 3]
    assert [m["payload"]["n"] for m in api.consume("us")] == [2]


def test_copies_share_the_message_id_and_are_settled_independently(orders, api):
    api.create_subscription("a", "orders")
    api.create_subscription("b", "orders")
    api.publish("orders", [{"n": 1}])
    [a] = api.consume("a")
    [b] = api.consume("b")
    assert a["id"] == b["id"]
    api.ack("a", [a["id"]])
    assert api.metrics("b")["delivered"] == 1


def test_an_id_delivered_by_another_subscription_settles_this_ones_own_copy(orders, api):
    # The README's difference from fastpubsub, where each copy has its own id and an id from
    # another subscription is always ignored.
    api.create_subscription("a", "orders")
    api.create_subscription("b", "orders")
    api.create_subscription("c", "orders", filter={"country": ["BR"]})
    api.publish("orders", [{"n": 1}])
    [a] = api.consume("a")
    api.consume("b")
    api.ack("b", [a["id"]])
    api.ack("c", [a["id"]])  # c never got this message: ignored
    assert [api.metrics(s)["acked"] for s in ("a", "b", "c")] == [0, 1, 0]
    assert api.metrics("a")["delivered"] == 1


def test_a_subscription_only_gets_messages_published_after_it(orders, api):
    api.create_subscription("early", "orders")
    api.publish("orders", [{"n": 1}])
    api.create_subscription("late", "orders")
    api.publish("orders", [{"n": 2}])
    assert [m["payload"]["n"] for m in api.consume("late")] == [2]
    assert len(api.consume("early")) == 2


def test_a_204_has_no_body_and_no_content_type(api, client):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    response = client.post("/topics/orders/messages", json=[{"n": 1}])
    assert (response.status_code, response.data, response.content_type) == (204, b"", None)
    message = api.consume("sub")[0]
    response = client.post("/subscriptions/sub/acks", json=[message["id"]])
    assert (response.status_code, response.data, response.content_type) == (204, b"", None)
