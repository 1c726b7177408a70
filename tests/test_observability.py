"""Request ids, logs and the Prometheus endpoint of one process (several workers: test_serve.py)."""

import json
import logging
import re

import pytest

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


# --- METRICS_BEARER_TOKEN -------------------------------------------------------------------------

METRICS_TOKEN = "scrape-Token_0123456789.~+/=="
REFUSED = {"detail": "missing or invalid bearer token"}


@pytest.fixture(scope="module")
def closed_client(make_app):
    """A client of an app whose /metrics needs METRICS_TOKEN."""
    return make_app(METRICS_BEARER_TOKEN=METRICS_TOKEN).test_client()


def test_metrics_are_open_without_a_token_setting(client):
    assert client.get("/metrics").status_code == 200
    assert client.get("/metrics", headers={"Authorization": "Bearer anything"}).status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong",
        f"Bearer {METRICS_TOKEN[:-1]}",  # a prefix
        f"Bearer {METRICS_TOKEN}x",
        f"Bearer {METRICS_TOKEN.upper()}",
        METRICS_TOKEN,  # no scheme
        f"Basic {METRICS_TOKEN}",
        f"Token {METRICS_TOKEN}",
        "Bearer \u00e9",  # not ASCII
    ],
)
def test_metrics_with_a_token_setting_refuse_a_missing_or_wrong_token(closed_client, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = closed_client.get("/metrics", headers=headers)
    assert (response.status_code, response.json) == (401, REFUSED)
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "http_requests_total" not in response.get_data(as_text=True)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])  # RFC 9110: schemes are case-insensitive
def test_metrics_with_a_token_setting_answer_the_right_token(closed_client, scheme):
    response = closed_client.get("/metrics", headers={"Authorization": f"{scheme} {METRICS_TOKEN}"})
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")


def test_refused_scrapes_are_counted_like_any_request(closed_client):
    right = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    before = closed_client.get("/metrics", headers=right).get_data(as_text=True)
    closed_client.get("/metrics")
    closed_client.get("/metrics", headers={"Authorization": "Bearer wrong"})
    after = closed_client.get("/metrics", headers=right).get_data(as_text=True)

    def delta(status: str) -> float:
        labels = {"method": "GET", "path": "/metrics", "status": status}
        return sample(after, "http_requests_total", **labels) - sample(
            before, "http_requests_total", **labels
        )

    assert delta("401") == 2
    assert delta("200") == 1  # the first scrape: each is counted once it has answered


@pytest.mark.parametrize(
    ("auth_enabled", "token", "warns"),
    [
        (False, None, False),
        (False, METRICS_TOKEN, False),
        (True, METRICS_TOKEN, False),
        (True, None, True),  # tokens for the API, yet every subscription id open to anyone
    ],
)
def test_open_metrics_with_auth_on_are_warned_of(caplog, auth_enabled, token, warns):
    with caplog.at_level(logging.WARNING, logger="pubsub.observability"):
        observability.warn_if_metrics_open({"AUTH_ENABLED": auth_enabled, "METRICS_BEARER_TOKEN": token})
    warnings = [r.getMessage() for r in caplog.records if r.name == "pubsub.observability"]
    assert len(warnings) == warns
    assert all("PUBSUB_METRICS_BEARER_TOKEN" in w for w in warnings)
