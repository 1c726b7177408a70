import pytest

from pubsub import blueprints


@pytest.fixture
def orders(api):
    return api.create_topic("orders")


def test_create_subscription_applies_configured_defaults(orders, client):
    response = client.post("/subscriptions", json={"id": "sub", "topic_id": "orders"})
    assert response.status_code == 201
    body = response.json
    assert body.pop("created_at")
    assert body == {
        "id": "sub",
        "topic_id": "orders",
        "filter": None,
        "max_delivery_attempts": 5,
        "backoff_min_seconds": 5,
        "backoff_max_seconds": 300,
        "ack_deadline_seconds": 60,
        "ordering_key": None,
    }


def test_defaults_follow_settings(make_app):
    client = make_app(
        SUBSCRIPTION_MAX_ATTEMPTS=2, SUBSCRIPTION_BACKOFF_MIN_SECONDS=1, SUBSCRIPTION_BACKOFF_MAX_SECONDS=9
    ).test_client()
    client.post("/topics", json={"id": "orders"})
    body = client.post("/subscriptions", json={"id": "sub", "topic_id": "orders"}).json
    assert (body["max_delivery_attempts"], body["backoff_min_seconds"], body["backoff_max_seconds"]) == (
        2,
        1,
        9,
    )


def test_create_subscription_with_everything(orders, client):
    fields = {
        "id": "sub",
        "topic_id": "orders",
        "filter": {"country": ["BR", "US"], "premium": [True], "tier": [1, 2.5]},
        "max_delivery_attempts": 3,
        "backoff_min_seconds": 1,
        "backoff_max_seconds": 10,
    }
    response = client.post("/subscriptions", json=fields)
    assert response.status_code == 201
    assert {k: response.json[k] for k in fields} == fields
    assert client.get("/subscriptions/sub").json == response.json


@pytest.mark.parametrize("given", [{}, None])
def test_empty_filter_is_echoed_as_given(orders, client, given):
    response = client.post("/subscriptions", json={"id": "sub", "topic_id": "orders", "filter": given})
    assert response.status_code == 201
    assert response.json["filter"] == given
    assert client.get("/subscriptions/sub").json["filter"] == given


def test_filter_keys_and_values_are_stored_verbatim(orders, client):
    odd = {"k'\"%\\_<b>": ["v'--; DROP TABLE topics; --", "100%", "a\\b", "&amp;"]}
    response = client.post("/subscriptions", json={"id": "sub", "topic_id": "orders", "filter": odd})
    assert response.status_code == 201
    assert response.json["filter"] == odd
    assert client.get("/subscriptions/sub").json["filter"] == odd


@pytest.mark.parametrize(
    "bad_filter",
    [
        "country",
        ["BR"],
        {"country": "BR"},
        {"country": []},
        {"country": [None]},
        {"country": [["BR"]]},
        {"country": [{"a": 1}]},
        {f"k{n}": [1] for n in range(33)},
        {"country": list(range(101))},
    ],
)
def test_invalid_filters_are_rejected(orders, client, bad_filter):
    response = client.post("/subscriptions", json={"id": "sub", "topic_id": "orders", "filter": bad_filter})
    assert response.status_code == 422
    assert "json.filter" in response.json["errors"]
    assert client.get("/subscriptions/sub").status_code == 404


def test_filter_limits_are_inclusive(orders, client):
    widest = {f"k{n}": list(range(100)) for n in range(32)}
    assert (
        client.post("/subscriptions", json={"id": "sub", "topic_id": "orders", "filter": widest}).status_code
        == 201
    )


@pytest.mark.parametrize(
    ("fields", "error_key"),
    [
        ({"backoff_min_seconds": 10, "backoff_max_seconds": 5}, "json.backoff_min_seconds"),
        ({"backoff_min_seconds": 301}, "json.backoff_min_seconds"),
        ({"max_delivery_attempts": 0}, "json.max_delivery_attempts"),
        ({"backoff_min_seconds": -1}, "json.backoff_min_seconds"),
        ({"max_delivery_attempts": "many"}, "json.max_delivery_attempts"),
        ({"id": "bad id"}, "json.id"),
        ({"topic_id": ""}, "json.topic_id"),
    ],
)
def test_invalid_subscription_fields_are_422(orders, client, fields, error_key):
    response = client.post("/subscriptions", json={"id": "sub", "topic_id": "orders", **fields})
    assert response.status_code == 422
    assert error_key in response.json["errors"]


LIMITED_FIELDS = ("max_delivery_attempts", "backoff_min_seconds", "backoff_max_seconds")


@pytest.mark.parametrize("field", LIMITED_FIELDS)
@pytest.mark.parametrize(
    ("value", "status"),
    [
        (-1, 422),
        (0, 422),  # as fastpubsub answers
        (1, 201),
        (2, 201),
    ],
)
def test_delivery_limits_are_at_least_one(orders, client, field, value, status):
    # The other backoff bound at 1, so that only the field under test decides.
    fields = {"backoff_min_seconds": 1, "backoff_max_seconds": 2, field: value}
    response = client.post("/subscriptions", json={"id": "sub", "topic_id": "orders", **fields})
    assert response.status_code == status, response.json
    if status == 422:
        assert list(response.json["errors"]) == [f"json.{field}"]
        assert client.get("/subscriptions/sub").status_code == 404
    else:
        assert response.json[field] == value


def test_subscription_to_missing_topic_is_404(client):
    response = client.post("/subscriptions", json={"id": "sub", "topic_id": "nope"})
    assert response.status_code == 404
    assert response.json == {"detail": "Topic not found"}


def test_existing_subscription_is_409(orders, api, client):
    api.create_subscription("sub", "orders")
    response = client.post("/subscriptions", json={"id": "sub", "topic_id": "orders"})
    assert response.status_code == 409
    assert response.json == {"detail": "This subscription already exists"}


def test_get_missing_subscription_is_404(client):
    response = client.get("/subscriptions/nope")
    assert response.status_code == 404
    assert response.json == {"detail": "Subscription not found"}


def test_list_subscriptions_is_ordered_by_id_and_paged(orders, api, client):
    for sub in ["c", "a", "b"]:
        api.create_subscription(sub, "orders")
    assert [s["id"] for s in client.get("/subscriptions").json["data"]] == ["a", "b", "c"]
    page = client.get("/subscriptions", query_string={"offset": 2, "limit": 1}).json["data"]
    assert [s["id"] for s in page] == ["c"]
    assert client.get("/subscriptions", query_string={"limit": 101}).status_code == 422


def test_delete_subscription_removes_its_messages_only(orders, api, client):
    api.create_subscription("a", "orders")
    api.create_subscription("b", "orders")
    api.publish("orders", [{"n": 1}])
    assert client.delete("/subscriptions/a").status_code == 204
    assert client.get("/subscriptions/a").status_code == 404
    assert client.get("/subscriptions/a/metrics").status_code == 404
    assert api.metrics("b")["available"] == 1
    # Re-creating it starts empty: nothing of the old one is left behind.
    api.create_subscription("a", "orders")
    assert api.metrics("a") == {
        "subscription_id": "a",
        "available": 0,
        "delayed": 0,
        "delivered": 0,
        "acked": 0,
        "dlq": 0,
        "waiting": 0,
    }


def test_delete_missing_subscription_is_404(client):
    assert client.delete("/subscriptions/nope").status_code == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/subscriptions/nope/messages?consumer_id=c"),
        ("post", "/subscriptions/nope/acks"),
        ("post", "/subscriptions/nope/nacks"),
        ("get", "/subscriptions/nope/dlq"),
        ("post", "/subscriptions/nope/dlq/reprocess"),
        ("get", "/subscriptions/nope/metrics"),
    ],
)
def test_operations_on_missing_subscription_are_404(client, method, path):
    kwargs = {"json": ["5f0c7a57-9c4b-4f7e-9a0e-2f1d2b3c4d5e"]} if method == "post" else {}
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == 404
    assert response.json == {"detail": "Subscription not found"}


def test_query_strings_load_alike_every_time_and_a_refused_one_is_never_kept(api, client, monkeypatch):
    monkeypatch.setattr(blueprints, "QUERY_CACHE_SIZE", 3)
    blueprints._query_cache.clear()
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    api.publish("orders", [{"n": n} for n in range(10)])
    for batch_size, expected in ((2, 2), (3, 3), (2, 2), (1, 1)):
        response = client.get(f"/subscriptions/sub/messages?consumer_id=c&batch_size={batch_size}")
        assert response.status_code == 200 and len(response.get_json()["data"]) == expected
    for _ in range(2):
        response = client.get("/subscriptions/sub/messages?consumer_id=c&batch_size=500")
        assert response.status_code == 422, response.get_json()
    assert len(blueprints._query_cache) <= 3
