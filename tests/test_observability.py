"""Request ids, logs and the Prometheus endpoint of one process (several workers: test_serve.py)."""

import json
import logging
import re

from pubsub import observability


def test_every_response_carries_a_request_id(client):
    first = client.get("/liveness").headers["X-Request-ID"]
    second = client.get("/nope").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first != second


def test_the_clients_request_id_is_echoed(client):
    response = client.post("/topics", json={"id": "bad id"}, headers={"X-Request-ID": "trace-123"})
    assert response.headers["X-Request-ID"] == "trace-123"


def test_json_logs_carry_the_request_id(app, capsys):
    observability.configure_logging("info", "json")
    try:
        with app.test_request_context(environ_overrides={observability.REQUEST_ID_KEY: "trace-456"}):
            logging.getLogger("pubsub.test").info("published %d messages to %s", 3, "orders")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        event = json.loads(line)
        assert event["message"] == "published 3 messages to orders"
        assert event["request_id"] == "trace-456"
        assert event["level"] == "info"
    finally:
        observability.configure_logging(app.config["LOG_LEVEL"], app.config["LOG_FORMAT"])


def test_text_logs_carry_the_request_id(app, capsys):
    observability.configure_logging("info", "text")
    with app.test_request_context(environ_overrides={observability.REQUEST_ID_KEY: "trace-789"}):
        logging.getLogger("pubsub.test").warning("something happened")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "WARNING" in line and "[trace-789]" in line and "something happened" in line


def sample(text: str, name: str, **labels) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(part in line for part in wanted.split(",")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_by_route_template_and_status(api, client):
    before = client.get("/metrics").get_data(as_text=True)
    api.create_topic("orders")
    client.get("/topics/orders")
    client.get("/topics/orders")
    client.get("/topics/missing")
    client.get("/no/such/route")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    after = response.get_data(as_text=True)

    def delta(**labels):
        return sample(after, "http_requests_total", **labels) - sample(
            before, "http_requests_total", **labels
        )

    assert delta(method="GET", path="/topics/{id}", status="200") == 2
    assert delta(method="GET", path="/topics/{id}", status="404") == 1
    assert delta(method="POST", path="/topics", status="201") == 1
    assert delta(method="GET", path="<unmatched>", status="404") == 1
    assert "http_request_duration_seconds_bucket{" in after
    assert "http_requests_in_progress" in after
