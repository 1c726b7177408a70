def test_topic_roundtrip(client):
    r = client.post("/topics", json={"id": "orders"})
    assert r.status_code == 201, r.json
    assert r.json["id"] == "orders"
    r = client.post("/subscriptions", json={"id": "s1", "topic_id": "orders"})
    assert r.status_code == 201, r.json
    r = client.post("/topics/orders/messages", json=[{"a": 1}, {"a": 2}])
    assert r.status_code == 204, r.json
    r = client.get("/subscriptions/s1/messages?consumer_id=c1")
    assert r.status_code == 200, r.json
    print(r.json)
    ids = [m["id"] for m in r.json["data"]]
    assert len(ids) == 2
    assert client.post("/subscriptions/s1/acks", json=ids).status_code == 204
    print(client.get("/subscriptions/s1/metrics").json)
