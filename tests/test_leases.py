"""Leases (issue 6): ack deadlines, extending them, lease tokens that refuse stale acks, per-id
outcomes, nack delays and publish receipts.

Deadlines are at least ten seconds, so no test waits one out: a lease is shortened to one second
with `extend?seconds=1` (extend may shorten a deadline), then waited out.
"""

import time
import uuid

import pytest

PREFER = {"Prefer": "return=representation"}


@pytest.fixture
def orders(api):
    api.create_topic("orders")


def post_items(api, subscription_id: str, action: str, items: list, **query):
    return api.client.post(
        f"/subscriptions/{subscription_id}/{action}", json=items, query_string=query, headers=PREFER
    )


def outcomes(api, subscription_id: str, action: str, items: list, **query) -> list[str]:
    """POST items to acks, nacks or extend asking for the outcome of each; their statuses."""
    response = post_items(api, subscription_id, action, items, **query)
    assert response.status_code == 200, response.json
    assert response.headers["Preference-Applied"] == "return=representation"
    assert [result["id"] for result in response.json["data"]] == items  # each item as sent, in order
    return [result["status"] for result in response.json["data"]]


def expire(api, subscription_id: str, *items: str) -> None:
    """Shorten deliveries' leases to one second and wait them out."""
    assert outcomes(api, subscription_id, "extend", list(items), seconds=1) == ["extended"] * len(items)
    time.sleep(1.2)


def publish_for_receipts(api, topic_id: str, payloads: list) -> list[dict]:
    response = api.client.post(f"/topics/{topic_id}/messages", json=payloads, headers=PREFER)
    assert response.status_code == 201, response.json
    assert response.headers["Preference-Applied"] == "return=representation"
    return response.json["data"]


# --- The subscription's ack deadline ------------------------------------------------------------


def test_ack_deadline_defaults_to_the_stuck_lock_timeout_and_is_in_every_representation(orders, api):
    created = api.create_subscription("sub", "orders")
    assert created["ack_deadline_seconds"] == 60
    assert api.client.get("/subscriptions/sub").json == created
    assert api.client.get("/subscriptions").json["data"] == [created]


@pytest.mark.parametrize(("lock_timeout", "deadline"), [(1, 10), (30, 30), (3600, 600)])
def test_ack_deadline_default_is_the_lock_timeout_clamped_to_10_600(make_app, lock_timeout, deadline):
    client = make_app(CLEANUP_STUCK_MESSAGES_LOCK_TIMEOUT_SECONDS=lock_timeout).test_client()
    client.post("/topics", json={"id": "orders"})
    response = client.post("/subscriptions", json={"id": "sub", "topic_id": "orders"})
    assert response.status_code == 201, response.json
    assert response.json["ack_deadline_seconds"] == deadline


@pytest.mark.parametrize("deadline", [10, 600])
def test_ack_deadline_limits_are_inclusive_and_stored(orders, api, deadline):
    created = api.create_subscription("sub", "orders", ack_deadline_seconds=deadline)
    assert created["ack_deadline_seconds"] == deadline
    assert api.client.get("/subscriptions/sub").json["ack_deadline_seconds"] == deadline
    assert api.client.get("/subscriptions").json["data"][0]["ack_deadline_seconds"] == deadline


@pytest.mark.parametrize("deadline", [9, 601, 0, -1, "30", 30.5, True, [30]])
def test_invalid_ack_deadlines_are_422(orders, client, deadline):
    response = client.post(
        "/subscriptions", json={"id": "sub", "topic_id": "orders", "ack_deadline_seconds": deadline}
    )
    assert response.status_code == 422
    assert response.json["detail"]
    assert "json.ack_deadline_seconds" in response.json["errors"]
    assert client.get("/subscriptions/sub").status_code == 404


# --- Expired leases -----------------------------------------------------------------------------


def test_a_delivery_carries_a_lease_token(orders, api):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    assert set(message) == {"id", "subscription_id", "payload", "delivery_attempts", "created_at", "ack_id"}
    assert isinstance(message["ack_id"], str)
    assert message["ack_id"] != message["id"]


def test_an_expired_lease_is_claimed_again_by_the_next_consume(orders, api):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    [first] = api.consume("sub", "worker-1")
    expire(api, "sub", first["ack_id"])
    [again] = api.consume("sub", "worker-2")  # no cleanup-stuck run in between
    assert again["id"] == first["id"]
    assert again["payload"] == {"n": 1}
    assert again["delivery_attempts"] == 2  # the expired lease counted as a failed attempt
    assert again["ack_id"] != first["ack_id"]
    assert api.consume("sub", "worker-3") == []
    assert api.metrics()["delivered"] == 1


def test_a_lease_is_not_claimed_again_before_its_deadline(orders, api):
    api.create_subscription("sub", "orders", ack_deadline_seconds=10)
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub", "worker-1")
    assert outcomes(api, "sub", "extend", [message["ack_id"]], seconds=2) == ["extended"]
    time.sleep(1.2)
    assert api.consume("sub", "worker-2") == []
    assert outcomes(api, "sub", "acks", [message["ack_id"]]) == ["acked"]


def test_an_expired_lease_out_of_attempts_goes_to_the_dlq_instead(orders, api):
    api.create_subscription("sub", "orders", max_delivery_attempts=2)
    api.publish("orders", [{"poison": True}])
    [first] = api.consume("sub", "crashing-worker")
    expire(api, "sub", first["ack_id"])
    [second] = api.consume("sub", "crashing-worker")
    assert second["delivery_attempts"] == 2
    expire(api, "sub", second["ack_id"])
    assert api.consume("sub", "worker-2") == []
    assert api.metrics() == {
        "subscription_id": "sub",
        "available": 0,
        "delayed": 0,
        "delivered": 0,
        "acked": 0,
        "dlq": 1,
        "waiting": 0,
    }
    [dead] = api.dlq("sub")
    assert (dead["id"], dead["payload"], dead["delivery_attempts"]) == (first["id"], {"poison": True}, 2)


def test_dead_lettered_lapsed_leases_do_not_take_places_in_the_batch(orders, api):
    """A consume that dead-letters lapsed leases claims again for their places: an empty answer
    means nothing was claimable."""
    api.create_subscription("sub", "orders", max_delivery_attempts=1)
    api.publish("orders", [{"n": 1}, {"n": 2}])
    [first] = api.consume("sub", batch_size=1)
    expire(api, "sub", first["ack_id"])
    [second] = api.consume("sub", batch_size=1)
    assert second["payload"] == {"n": 2}
    assert [dead["payload"] for dead in api.dlq("sub")] == [{"n": 1}]


@pytest.mark.parametrize(("action", "status"), [("acks", "acked"), ("nacks", "nacked")])
def test_an_expired_lease_not_yet_claimed_again_can_still_be_settled(orders, api, action, status):
    api.create_subscription("sub", "orders", max_delivery_attempts=1)
    api.publish("orders", [{"n": 1}, {"n": 2}])
    [by_token, by_id] = api.consume("sub")
    expire(api, "sub", by_token["ack_id"], by_id["ack_id"])
    assert outcomes(api, "sub", action, [by_token["ack_id"], by_id["id"]]) == [status, status]
    assert api.metrics()["delivered"] == 0
    assert api.consume("sub") == []


# --- Extending leases ---------------------------------------------------------------------------


def test_extend_keeps_a_message_from_being_claimed_past_its_deadline(orders, api):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub", "worker-1")
    assert outcomes(api, "sub", "extend", [message["ack_id"]], seconds=1) == ["extended"]
    assert outcomes(api, "sub", "extend", [message["ack_id"]], seconds=3) == ["extended"]
    time.sleep(1.2)  # past the one-second deadline, not the extended one
    assert api.consume("sub", "worker-2") == []
    assert outcomes(api, "sub", "acks", [message["ack_id"]]) == ["acked"]


def test_extend_defaults_to_the_subscriptions_ack_deadline(orders, api):
    api.create_subscription("sub", "orders", ack_deadline_seconds=10)
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub", "worker-1")
    assert outcomes(api, "sub", "extend", [message["ack_id"]], seconds=1) == ["extended"]
    assert outcomes(api, "sub", "extend", [message["id"]]) == ["extended"]  # now + 10 s
    time.sleep(1.2)
    assert api.consume("sub", "worker-2") == []


def test_extend_revives_an_expired_lease_not_yet_claimed_again(orders, api):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub", "worker-1")
    expire(api, "sub", message["ack_id"])
    assert outcomes(api, "sub", "extend", [message["ack_id"]], seconds=60) == ["extended"]
    assert api.consume("sub", "worker-2") == []
    assert outcomes(api, "sub", "acks", [message["ack_id"]]) == ["acked"]


def test_extend_acts_only_on_delivered_messages(orders, api):
    api.create_subscription("sub", "orders", backoff_min_seconds=60, backoff_max_seconds=60)
    api.publish("orders", [{"n": 1}, {"n": 2}])
    [delivered, nacked] = api.consume("sub")
    api.nack("sub", [nacked["id"]])
    unknown = str(uuid.uuid4())
    items = [delivered["id"], nacked["id"], nacked["ack_id"], unknown, f"{unknown}:1"]
    assert outcomes(api, "sub", "extend", items) == ["extended", "stale", "stale", "not_found", "not_found"]
    assert api.metrics()["available"] == 1  # extend did not deliver the nacked message again
    assert api.consume("sub") == []


def test_extend_without_prefer_is_204(orders, api):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    response = api.client.post("/subscriptions/sub/extend", json=[message["ack_id"], str(uuid.uuid4())])
    assert response.status_code == 204
    assert response.data == b""


# --- Stale acks ---------------------------------------------------------------------------------


def test_an_old_lease_token_is_stale_after_the_message_is_delivered_again(orders, api):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    [first] = api.consume("sub", "slow-worker")
    expire(api, "sub", first["ack_id"])
    [second] = api.consume("sub", "worker-2")

    api.ack("sub", [first["ack_id"]])  # 204, and ignored
    for action in ("acks", "nacks", "extend"):
        assert outcomes(api, "sub", action, [first["ack_id"]]) == ["stale"]
    assert api.metrics()["delivered"] == 1
    assert api.consume("sub", "worker-3") == []  # the stale nack did not release it

    assert outcomes(api, "sub", "acks", [second["ack_id"]]) == ["acked"]
    assert api.metrics()["acked"] == 1


def test_a_message_id_acts_on_the_current_delivery(orders, api):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    [first] = api.consume("sub", "slow-worker")
    expire(api, "sub", first["ack_id"])
    [second] = api.consume("sub", "worker-2")
    assert outcomes(api, "sub", "acks", [first["id"]]) == ["acked"]  # as fastpubsub: whoever has it
    assert outcomes(api, "sub", "acks", [second["ack_id"]]) == ["not_found"]  # already acked
    assert api.metrics()["acked"] == 1


def test_a_nack_makes_the_lease_token_stale_for_the_next_delivery(orders, api):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    [first] = api.consume("sub")
    assert outcomes(api, "sub", "nacks", [first["ack_id"]], delay_seconds=0) == ["nacked"]
    [second] = api.consume("sub")
    assert second["ack_id"] != first["ack_id"]
    assert outcomes(api, "sub", "nacks", [first["ack_id"]]) == ["stale"]
    assert outcomes(api, "sub", "acks", [first["ack_id"], second["ack_id"]]) == ["stale", "acked"]


def test_outcomes_come_per_item_in_request_order_for_mixed_ids_and_tokens(orders, api):
    api.create_subscription("sub", "orders", backoff_min_seconds=60, backoff_max_seconds=60)
    api.publish("orders", [{"n": n} for n in range(4)])
    by_token, by_id, nacked, forged = api.consume("sub")
    api.nack("sub", [nacked["id"]])
    unknown = str(uuid.uuid4())
    items = [
        unknown,
        by_token["ack_id"],
        by_id["id"].upper(),  # echoed as sent
        nacked["id"],  # in the subscription, not delivered now
        f"{forged['id']}:99",  # a lease never handed out
        f"{unknown}:1",
    ]
    expected = ["not_found", "acked", "acked", "stale", "stale", "not_found"]
    assert outcomes(api, "sub", "acks", items) == expected
    assert api.metrics() == {
        "subscription_id": "sub",
        "available": 1,
        "delayed": 0,
        "delivered": 1,
        "acked": 2,
        "dlq": 0,
        "waiting": 0,
    }


SPELLINGS = {
    "upper": lambda message: message["id"].upper(),
    "no-hyphens": lambda message: message["id"].replace("-", ""),
    "braces": lambda message: "{" + message["id"] + "}",
    "urn": lambda message: "urn:uuid:" + message["id"],
    "upper-ack_id": lambda message: message["ack_id"].upper(),
    "zero-padded-lease": lambda message: message["ack_id"].replace(":", ":0"),
}


@pytest.mark.parametrize("spell", SPELLINGS.values(), ids=SPELLINGS.keys())
def test_outcomes_name_each_item_as_it_was_sent(orders, api, spell):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    item = spell(message)
    response = post_items(api, "sub", "extend", [item])
    assert response.status_code == 200, response.json
    assert response.json["data"] == [{"id": item, "status": "extended"}]


def test_acked_and_dead_messages_are_no_longer_current(orders, api):
    api.create_subscription("sub", "orders", max_delivery_attempts=1)
    api.publish("orders", [{"n": 1}, {"n": 2}])
    acked, dead = api.consume("sub")
    api.ack("sub", [acked["id"]])
    api.nack("sub", [dead["id"]])
    statuses = outcomes(api, "sub", "acks", [acked["id"], acked["ack_id"], dead["id"], dead["ack_id"]])
    assert statuses == ["not_found", "not_found", "stale", "stale"]
    assert api.metrics()["dlq"] == 1


def test_another_subscriptions_message_is_not_found(orders, api):
    api.create_subscription("br", "orders", filter={"country": ["BR"]})
    api.create_subscription("us", "orders", filter={"country": ["US"]})
    api.publish("orders", [{"country": "BR"}])
    [message] = api.consume("br")
    for action in ("acks", "nacks", "extend"):
        assert outcomes(api, "us", action, [message["id"], message["ack_id"]]) == ["not_found", "not_found"]
    assert api.metrics("br")["delivered"] == 1


@pytest.mark.parametrize(
    ("action", "status"), [("acks", "acked"), ("nacks", "nacked"), ("extend", "extended")]
)
def test_duplicate_items_each_get_an_outcome_and_act_once(orders, api, action, status):
    api.create_subscription("sub", "orders", backoff_min_seconds=60, backoff_max_seconds=60)
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    items = [message["ack_id"], message["id"], message["ack_id"]]
    assert outcomes(api, "sub", action, items) == [status] * 3
    metrics = api.metrics()
    assert metrics["acked"] == (1 if action == "acks" else 0)
    assert metrics["available"] == (1 if action == "nacks" else 0)
    assert metrics["delivered"] == (1 if action == "extend" else 0)


@pytest.mark.parametrize("action", ["acks", "nacks", "extend"])
@pytest.mark.parametrize("prefer", [None, "return=minimal"])
def test_without_prefer_representation_settling_is_204(orders, api, action, prefer):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    headers = {"Prefer": prefer} if prefer else {}
    response = api.client.post(f"/subscriptions/sub/{action}", json=[message["ack_id"]], headers=headers)
    assert response.status_code == 204
    assert response.data == b""
    assert "Preference-Applied" not in response.headers


@pytest.mark.parametrize("action", ["acks", "nacks", "extend"])
def test_outcomes_of_an_empty_list_and_of_1000_items(orders, api, action):
    api.create_subscription("sub", "orders")
    assert outcomes(api, "sub", action, []) == []
    items = [f"{uuid.uuid4()}:{n}" for n in range(1000)]
    assert outcomes(api, "sub", action, items) == ["not_found"] * 1000


def test_prefer_is_read_as_a_list_of_preferences(orders, api):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    headers = {"Prefer": "handling=lenient, RETURN=representation"}
    response = api.client.post("/subscriptions/sub/acks", json=[message["ack_id"]], headers=headers)
    assert response.status_code == 200
    assert response.json["data"] == [{"id": message["ack_id"], "status": "acked"}]


# --- Nack delays --------------------------------------------------------------------------------


def test_nack_with_delay_zero_retries_at_once_despite_the_backoff(orders, api):
    api.create_subscription("sub", "orders", backoff_min_seconds=60, backoff_max_seconds=60)
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    assert outcomes(api, "sub", "nacks", [message["ack_id"]], delay_seconds=0) == ["nacked"]
    [again] = api.consume("sub")
    assert (again["id"], again["delivery_attempts"]) == (message["id"], 2)


def test_nack_delay_overrides_a_longer_backoff(orders, api):
    api.create_subscription("sub", "orders", backoff_min_seconds=60, backoff_max_seconds=60)
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    assert outcomes(api, "sub", "nacks", [message["id"]], delay_seconds=1) == ["nacked"]
    assert api.consume("sub") == []
    assert api.metrics()["available"] == 1
    time.sleep(1.2)
    assert [m["id"] for m in api.consume("sub")] == [message["id"]]


def test_nack_delay_overrides_a_shorter_backoff(orders, api):
    api.create_subscription("sub", "orders", backoff_min_seconds=1, backoff_max_seconds=1)
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    response = api.client.post("/subscriptions/sub/nacks?delay_seconds=60", json=[message["id"]])
    assert response.status_code == 204
    assert api.consume("sub") == []
    assert api.metrics()["available"] == 1


def test_nack_with_a_delay_still_dead_letters_exhausted_attempts(orders, api):
    api.create_subscription("sub", "orders", max_delivery_attempts=1)
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    assert outcomes(api, "sub", "nacks", [message["ack_id"]], delay_seconds=3600) == ["nacked"]
    assert api.metrics() == {
        "subscription_id": "sub",
        "available": 0,
        "delayed": 0,
        "delivered": 0,
        "acked": 0,
        "dlq": 1,
        "waiting": 0,
    }
    assert [m["id"] for m in api.dlq("sub")] == [message["id"]]


def test_nack_and_extend_limits_are_inclusive(orders, api):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}, {"n": 2}])
    [one, two] = api.consume("sub")
    assert outcomes(api, "sub", "extend", [one["ack_id"]], seconds=600) == ["extended"]
    assert outcomes(api, "sub", "extend", [one["ack_id"]], seconds=1) == ["extended"]
    assert outcomes(api, "sub", "nacks", [one["ack_id"]], delay_seconds=604800) == ["nacked"]
    assert outcomes(api, "sub", "nacks", [two["ack_id"]], delay_seconds=0) == ["nacked"]
    assert [m["id"] for m in api.consume("sub")] == [two["id"]]


# --- Validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "query", "field"),
    [
        ("nacks", {"delay_seconds": -1}, "query.delay_seconds"),
        ("nacks", {"delay_seconds": 604801}, "query.delay_seconds"),
        ("nacks", {"delay_seconds": "soon"}, "query.delay_seconds"),
        ("nacks", {"delay_seconds": "1.5"}, "query.delay_seconds"),
        ("extend", {"seconds": 0}, "query.seconds"),
        ("extend", {"seconds": 601}, "query.seconds"),
        ("extend", {"seconds": -5}, "query.seconds"),
        ("extend", {"seconds": "later"}, "query.seconds"),
    ],
)
def test_out_of_range_delays_are_422_and_change_nothing(orders, api, action, query, field):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    response = post_items(api, "sub", action, [message["ack_id"]], **query)
    assert response.status_code == 422
    assert response.json["detail"]
    assert field in response.json["errors"]
    assert outcomes(api, "sub", "acks", [message["ack_id"]]) == ["acked"]  # lease untouched


BAD_ITEMS = {
    "letters-lease": lambda id: f"{id}:abc",
    "empty-lease": lambda id: f"{id}:",
    "fractional-lease": lambda id: f"{id}:1.5",
    "huge-lease": lambda id: f"{id}:{2**64}",
    "two-leases": lambda id: f"{id}:1:1",
    "not-a-uuid": lambda id: "not-a-uuid:1",
    "empty-uuid": lambda id: ":1",
    "number": lambda id: 1,
    "null": lambda id: None,
    "boolean": lambda id: True,
    "list": lambda id: [id],
    "object": lambda id: {"id": id},
}


@pytest.mark.parametrize("bad", BAD_ITEMS.values(), ids=BAD_ITEMS.keys())
@pytest.mark.parametrize("action", ["acks", "nacks", "extend"])
def test_malformed_items_are_422_and_change_nothing(orders, api, action, bad):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    response = post_items(api, "sub", action, [message["ack_id"], bad(message["id"])])
    assert response.status_code == 422, response.json
    assert response.json["detail"]
    assert api.metrics()["delivered"] == 1
    assert outcomes(api, "sub", "acks", [message["ack_id"]]) == ["acked"]


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/subscriptions/nope/acks", PREFER),
        ("/subscriptions/nope/nacks", PREFER),
        ("/subscriptions/nope/nacks?delay_seconds=0", {}),
        ("/subscriptions/nope/nacks?delay_seconds=30", PREFER),
        ("/subscriptions/nope/extend", {}),
        ("/subscriptions/nope/extend", PREFER),
        ("/subscriptions/nope/extend?seconds=30", {}),
    ],
)
@pytest.mark.parametrize("form", ["id", "ack_id", "none"])
def test_settling_on_a_missing_subscription_is_404(client, path, headers, form):
    message_id = "5f0c7a57-9c4b-4f7e-9a0e-2f1d2b3c4d5e"
    items = {"id": [message_id], "ack_id": [f"{message_id}:1"], "none": []}[form]
    response = client.post(path, json=items, headers=headers)
    assert response.status_code == 404
    assert response.json == {"detail": "Subscription not found"}


# --- cleanup-stuck ------------------------------------------------------------------------------


def test_cleanup_stuck_without_options_releases_only_expired_leases(orders, api, make_app):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}, {"n": 2}])
    expired, locked = api.consume("sub", "worker-1")
    expire(api, "sub", expired["ack_id"])
    # `locked` has been locked for longer than this setting, but its lease runs for a minute.
    runner = make_app(CLEANUP_STUCK_MESSAGES_LOCK_TIMEOUT_SECONDS=1).test_cli_runner()
    result = runner.invoke(args=["pubsub", "cleanup-stuck"])
    assert result.exit_code == 0, result.output
    assert "released 1 stuck messages, moved 0 to the DLQ" in result.output
    assert api.metrics()["delivered"] == 1
    [again] = api.consume("sub", "worker-2")
    assert (again["id"], again["delivery_attempts"]) == (expired["id"], 2)
    assert outcomes(api, "sub", "acks", [locked["ack_id"]]) == ["acked"]


def test_cleanup_stuck_with_a_lock_timeout_also_releases_old_locks(orders, api, runner):
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": 1}, {"n": 2}])
    expired, locked = api.consume("sub", "worker-1")
    expire(api, "sub", expired["ack_id"])

    result = runner.invoke(args=["pubsub", "cleanup-stuck", "--lock-timeout", "60"])
    assert result.exit_code == 0, result.output
    assert "released 1 stuck messages, moved 0 to the DLQ" in result.output  # the expired lease

    result = runner.invoke(args=["pubsub", "cleanup-stuck", "--lock-timeout", "1"])
    assert result.exit_code == 0, result.output
    assert "released 1 stuck messages, moved 0 to the DLQ" in result.output  # locked 1.2 s ago
    assert {m["id"] for m in api.consume("sub", "worker-2")} == {expired["id"], locked["id"]}
    assert outcomes(api, "sub", "acks", [locked["ack_id"]]) == ["stale"]


def test_cleanup_stuck_dead_letters_expired_leases_out_of_attempts(orders, api, runner):
    api.create_subscription("sub", "orders", max_delivery_attempts=1)
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    expire(api, "sub", message["ack_id"])
    result = runner.invoke(args=["pubsub", "cleanup-stuck"])
    assert result.exit_code == 0, result.output
    assert "released 0 stuck messages, moved 1 to the DLQ" in result.output
    assert api.metrics()["dlq"] == 1


# --- Publish receipts ---------------------------------------------------------------------------


def test_publish_receipts_give_ids_in_request_order_and_fanout_counts(orders, api):
    api.create_subscription("all", "orders")
    api.create_subscription("br", "orders", filter={"country": ["BR"]})
    payloads = [{"country": "BR", "n": 1}, {"country": "US", "n": 2}, {"country": "BR", "n": 3}]
    receipts = publish_for_receipts(api, "orders", payloads)
    assert [set(receipt) for receipt in receipts] == [{"id", "subscriptions"}] * 3
    assert [receipt["subscriptions"] for receipt in receipts] == [2, 1, 2]
    ids = [receipt["id"] for receipt in receipts]
    assert len(set(ids)) == 3
    assert all(uuid.UUID(id) for id in ids)
    consumed = api.consume("all")
    assert [(m["id"], m["payload"]["n"]) for m in consumed] == list(zip(ids, [1, 2, 3], strict=True))
    assert [m["id"] for m in api.consume("br")] == [ids[0], ids[2]]


def test_publish_receipts_to_a_topic_without_subscriptions(orders, api):
    receipts = publish_for_receipts(api, "orders", [{"n": 1}, {"n": 2}])
    assert [receipt["subscriptions"] for receipt in receipts] == [0, 0]
    assert receipts[0]["id"] != receipts[1]["id"]


@pytest.mark.parametrize("headers", [{}, {"Prefer": "return=minimal"}])
def test_publish_without_prefer_representation_is_still_204(orders, api, headers):
    api.create_subscription("sub", "orders")
    response = api.client.post("/topics/orders/messages", json=[{"n": 1}], headers=headers)
    assert response.status_code == 204
    assert response.data == b""
    assert "Preference-Applied" not in response.headers
    assert api.metrics()["available"] == 1


def test_publish_receipts_of_an_empty_batch_are_empty(orders, api):
    api.create_subscription("sub", "orders")
    assert publish_for_receipts(api, "orders", []) == []
    assert api.metrics()["available"] == 0


@pytest.mark.parametrize("payloads", [[{"n": 1}], []])
def test_publish_receipts_to_a_missing_topic_is_404(client, payloads):
    response = client.post("/topics/nope/messages", json=payloads, headers=PREFER)
    assert response.status_code == 404
    assert response.json == {"detail": "Topic not found"}


def test_every_subscription_consumes_the_receipts_message_id(orders, api):
    api.create_subscription("a", "orders")
    api.create_subscription("b", "orders")
    [receipt] = publish_for_receipts(api, "orders", [{"n": 1}])
    [a] = api.consume("a")
    [b] = api.consume("b")
    assert a["id"] == b["id"] == receipt["id"]
    # Still one copy each, settled independently.
    assert outcomes(api, "a", "acks", [a["ack_id"]]) == ["acked"]
    assert api.metrics("b")["delivered"] == 1
    assert outcomes(api, "b", "nacks", [b["id"]], delay_seconds=0) == ["nacked"]
    assert [m["id"] for m in api.consume("b")] == [receipt["id"]]
    assert api.metrics("a")["acked"] == 1
