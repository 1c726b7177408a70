import json
from datetime import datetime

import pytest


def test_create_topic_returns_id_and_timestamp(client):
    response = client.post("/topics", json={"id": "orders"})
    assert response.status_code == 201
    assert response.json["id"] == "orders"
    assert datetime.fromisoformat(response.json["created_at"]).tzinfo is not None


def test_create_existing_topic_is_409(api, client):
    api.create_topic("orders")
    response = client.post("/topics", json={"id": "orders"})
    assert response.status_code == 409
    assert response.json == {"detail": "This topic already exists"}


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"id": ""},
        {"id": "has space"},
        {"id": "slash/x"},
        {"id": "x" * 129},
        {"id": 5},
        {"id": None},
        ["orders"],
    ],
)
def test_create_topic_rejects_invalid_ids(client, body):
    response = client.post("/topics", json=body)
    assert response.status_code == 422
    assert response.json["detail"] == "Validation error"
    assert response.json["errors"]


def test_id_of_128_allowed_characters_is_accepted(client):
    topic_id = ("Az09._-" * 19)[:128]
    assert client.post("/topics", json={"id": topic_id}).status_code == 201
    assert client.get(f"/topics/{topic_id}").json["id"] == topic_id


def test_get_topic(api, client):
    created = api.create_topic("orders")
    response = client.get("/topics/orders")
    assert response.status_code == 200
    assert response.json == created


def test_get_missing_topic_is_404(client):
    response = client.get("/topics/nope")
    assert response.status_code == 404
    assert response.json == {"detail": "Topic not found"}


def test_list_topics_is_ordered_by_id_and_paged(api, client):
    for topic_id in ["c", "a", "e", "b", "d"]:
        api.create_topic(topic_id)
    assert [t["id"] for t in client.get("/topics").json["data"]] == ["a", "b", "c", "d", "e"]
    page = client.get("/topics", query_string={"offset": 1, "limit": 2}).json["data"]
    assert [t["id"] for t in page] == ["b", "c"]
    assert client.get("/topics", query_string={"offset": 10}).json == {"data": []}


def test_list_topics_defaults_to_ten(api, client):
    for n in range(12):
        api.create_topic(f"t{n:02d}")
    assert len(client.get("/topics").json["data"]) == 10


@pytest.mark.parametrize("query", [{"limit": 0}, {"limit": 101}, {"offset": -1}, {"limit": "x"}])
def test_list_topics_rejects_bad_paging(client, query):
    response = client.get("/topics", query_string=query)
    assert response.status_code == 422
    assert list(response.json["errors"]) == [f"query.{next(iter(query))}"]


def test_delete_topic_cascades_to_subscriptions_and_messages(api, client):
    api.create_topic("orders")
    api.create_topic("other")
    api.create_subscription("a", "orders")
    api.create_subscription("b", "orders")
    api.create_subscription("keep", "other")
    api.publish("orders", [{"n": 1}, {"n": 2}])
    api.publish("other", [{"n": 3}])
    api.ack("a", [m["id"] for m in api.consume("a")])

    assert client.delete("/topics/orders").status_code == 204

    assert client.get("/topics/orders").status_code == 404
    assert client.get("/subscriptions/a").status_code == 404
    assert client.get("/subscriptions/b").status_code == 404
    assert api.metrics("keep")["available"] == 1


def test_delete_topic_leaves_no_rows_behind(api, client, engine):
    import sqlalchemy as sa

    api.create_topic("orders")
    api.create_subscription("a", "orders")
    api.publish("orders", [{"n": 1}, {"n": 2}])
    api.ack("a", [api.consume("a", batch_size=1)[0]["id"]])
    client.delete("/topics/orders")
    with engine.connect() as conn:
        for table in ("subscriptions", "subscription_messages", "acked_messages"):
            assert conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar() == 0


def test_delete_missing_topic_is_404(client):
    response = client.delete("/topics/nope")
    assert response.status_code == 404
    assert response.json == {"detail": "Topic not found"}


def test_publish_to_missing_topic_is_404(client):
    response = client.post("/topics/nope/messages", json=[{"a": 1}])
    assert response.status_code == 404
    assert response.json == {"detail": "Topic not found"}


def test_publish_empty_batch_is_a_no_op(api, client):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    assert client.post("/topics/orders/messages", json=[]).status_code == 204
    assert api.metrics()["available"] == 0


def test_publish_without_subscriptions_succeeds(api, client):
    api.create_topic("orders")
    assert client.post("/topics/orders/messages", json=[{"a": 1}]).status_code == 204


@pytest.mark.parametrize(
    ("body", "error_key"),
    [
        ({"a": 1}, "json"),
        ("text", "json"),
        ([1], "json.0"),
        ([{"ok": 1}, "x"], "json.1"),
        ([{"ok": 1}, [{"nested": 1}]], "json.1"),
        ([None], "json.0"),
    ],
)
def test_publish_rejects_anything_but_an_array_of_objects(api, client, body, error_key):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    response = client.post("/topics/orders/messages", json=body)
    assert response.status_code == 422
    assert error_key in response.json["errors"]
    assert api.metrics()["available"] == 0


def test_publish_accepts_1000_and_rejects_1001(api, client):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    assert client.post("/topics/orders/messages", json=[{"n": n} for n in range(1001)]).status_code == 422
    assert api.metrics()["available"] == 0
    assert client.post("/topics/orders/messages", json=[{"n": n} for n in range(1000)]).status_code == 204
    assert api.metrics()["available"] == 1000


def test_publish_body_over_the_limit_is_413(make_app):
    client = make_app(API_MAX_BODY_BYTES=2048).test_client()
    client.post("/topics", json={"id": "orders"})
    response = client.post("/topics/orders/messages", json=[{"pad": "x" * 4096}])
    assert response.status_code == 413
    assert "detail" in response.json


def test_publish_stores_payloads_verbatim(api, client):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    payload = {
        "quote'": 'it\'s "quoted" \\ back%slash <b>&amp;</b>',
        "big": 123456789012345678901234567890,
        "exact": 0.1,
        "nested": {"list": [1, "two", None, True]},
        "unicode": "ação ✓ 🚀",
        "sql": "'); DROP TABLE topics; --",
    }
    raw = (
        '[{"quote\'": "it\'s \\"quoted\\" \\\\ back%slash <b>&amp;</b>",'
        ' "big": 123456789012345678901234567890,'
        ' "exact": 0.1, "nested": {"list": [1, "two", null, true]}, "unicode": "ação ✓ 🚀",'
        ' "sql": "\'); DROP TABLE topics; --"}]'
    )
    response = client.post("/topics/orders/messages", data=raw.encode(), content_type="application/json")
    assert response.status_code == 204
    consumed = client.get("/subscriptions/sub/messages", query_string={"consumer_id": "c"})
    # Past 64 bits: a float on the way through would print 1.2345678901234568e+29.
    assert "123456789012345678901234567890" in consumed.get_data(as_text=True)
    [message] = json.loads(consumed.get_data(as_text=True))["data"]
    assert message["payload"] == payload
