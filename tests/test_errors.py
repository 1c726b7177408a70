"""Every error is JSON {"detail": ...}; bad input is a 4xx that changes nothing, never a 500."""

import pytest


@pytest.fixture
def orders(api):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")


def test_unknown_route_is_404_json(client):
    response = client.get("/no/such/thing")
    assert response.status_code == 404
    assert response.is_json
    assert set(response.json) == {"detail"}


def test_wrong_method_is_405_json_with_allow(client):
    response = client.put("/topics")
    assert response.status_code == 405
    assert set(response.json) == {"detail"}
    assert "POST" in response.headers["Allow"]


MALFORMED = [
    b"{not json",
    b'[{"a": 1},]',
    b'[{"a": NaN}]',
    b'[{"a": Infinity}]',
    b'[{"a": 1e400}]',
    b'[{"a": "\xff\xfe"}]',
    b"[" * 5000 + b"]" * 5000,
    b"",
]


@pytest.mark.parametrize("body", MALFORMED)
@pytest.mark.parametrize(
    "path", ["/topics/orders/messages", "/subscriptions/sub/acks", "/topics", "/subscriptions"]
)
def test_malformed_json_is_a_4xx_that_changes_nothing(orders, api, client, body, path):
    response = client.post(path, data=body, content_type="application/json")
    assert response.status_code in (400, 422), response.get_data(as_text=True)
    assert "detail" in response.json
    assert api.metrics()["available"] == 0
    assert [t["id"] for t in client.get("/topics").json["data"]] == ["orders"]


def test_deeply_nested_payload_within_limits_is_accepted(orders, api, client):
    deep = b'[{"a": ' + b"[" * 500 + b"]" * 500 + b"}]"
    assert (
        client.post("/topics/orders/messages", data=deep, content_type="application/json").status_code == 204
    )
    assert api.metrics()["available"] == 1


@pytest.mark.parametrize(
    "payload",
    [b'[{"a": "x\\u0000y"}]', b'[{"k\\u0000": 1}]', b'[{"ok": 1}, {"a": "\\u0000"}]'],
)
def test_nul_characters_in_payloads_are_422_and_nothing_is_stored(orders, api, client, payload):
    response = client.post("/topics/orders/messages", data=payload, content_type="application/json")
    assert response.status_code == 422
    assert "detail" in response.json
    assert api.metrics()["available"] == 0


def test_nul_characters_in_filters_are_422(api, client):
    api.create_topic("t")
    response = client.post("/subscriptions", json={"id": "s", "topic_id": "t", "filter": {"k": ["a\x00b"]}})
    assert response.status_code == 422
    assert client.get("/subscriptions/s").status_code == 404


def test_a_body_that_is_not_json_is_415(orders, client):
    response = client.post("/topics/orders/messages", data="[{}]", content_type="text/plain")
    assert response.status_code == 415
    assert "detail" in response.json


@pytest.mark.parametrize("path", ["/topics/" + "x" * 10000, "/subscriptions/" + "x" * 10000 + "/metrics"])
def test_huge_ids_in_paths_are_404(client, path):
    assert client.get(path).status_code == 404


def test_huge_consumer_id_is_422(orders, client):
    response = client.get("/subscriptions/sub/messages", query_string={"consumer_id": "c" * 100_000})
    assert response.status_code == 422


def test_unexpected_errors_are_json_500_without_internals(make_app, monkeypatch):
    from pubsub import topics

    def explode(conn, topic_id):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(topics, "get_topic", explode)
    client = make_app().test_client()
    response = client.get("/topics/anything")
    assert response.status_code == 500
    assert response.json == {"detail": "internal server error"}
