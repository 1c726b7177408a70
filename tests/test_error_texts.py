"""fastpubsub's error texts (SPEC §8), word for word, on every endpoint where each can occur.

Clients written for fastpubsub may match on `detail`, so each 404, 409 and 403 below must carry
its exact text. The tables are checked against the app's own routes: a new route with an id, or a
new protected route, fails here until it has its rows.
"""

from dataclasses import dataclass
from typing import Any

import pytest

from tests.auth_support import ENDPOINTS, GLOBAL_SCOPES, bearer

MISSING = "missing"
MISSING_CLIENT = "00000000-0000-4000-8000-000000000000"
MESSAGE_ID = "6f1c1d1e-0000-4000-8000-000000000000"
PREFER = {"Prefer": "return=representation"}

TOPIC_NOT_FOUND = {"detail": "Topic not found"}
SUBSCRIPTION_NOT_FOUND = {"detail": "Subscription not found"}
CLIENT_NOT_FOUND = {"detail": "Client not found"}
TOPIC_ALREADY_EXISTS = {"detail": "This topic already exists"}
SUBSCRIPTION_ALREADY_EXISTS = {"detail": "This subscription already exists"}
INSUFFICIENT_SCOPE = {"detail": "Insufficient scope"}


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    status: int
    body: dict
    json: Any = None
    query: dict | None = None
    headers: dict | None = None


def missing_topic(name, method, suffix="", **request):
    return Case(name, method, f"/topics/{MISSING}{suffix}", 404, TOPIC_NOT_FOUND, **request)


def missing_subscription(name, method, suffix="", **request):
    return Case(name, method, f"/subscriptions/{MISSING}{suffix}", 404, SUBSCRIPTION_NOT_FOUND, **request)


def missing_client(name, method, **request):
    return Case(name, method, f"/clients/{MISSING_CLIENT}", 404, CLIENT_NOT_FOUND, **request)


def create(name, resource, json, status, body):
    return Case(name, "POST", f"/{resource}", status, body, json)


IDS = [MESSAGE_ID]
CLIENT_BODY = {"name": "ci", "scopes": "topics:read", "is_active": True}
# Against the `world` fixture: topics orders and payments, subscriptions email-sender (of orders)
# and sms-sender. Where a view has several code paths (the direct publish, Prefer, ack_ids, long
# polls), each one has its row.
CASES = [
    missing_topic("get topic", "GET"),
    missing_topic("delete topic", "DELETE"),
    missing_topic("publish", "POST", "/messages", json=[{"n": 1}]),
    missing_topic("publish nothing", "POST", "/messages", json=[]),
    missing_topic("publish, Prefer", "POST", "/messages", json=[{"n": 1}], headers=PREFER),
    missing_topic("publish nothing, Prefer", "POST", "/messages", json=[], headers=PREFER),
    create(
        "subscribe to a missing topic",
        "subscriptions",
        {"id": "new", "topic_id": MISSING},
        404,
        TOPIC_NOT_FOUND,
    ),
    create(  # README, "How it differs": fastpubsub answers 409 here
        "subscribe with a taken id to a missing topic",
        "subscriptions",
        {"id": "email-sender", "topic_id": MISSING},
        404,
        TOPIC_NOT_FOUND,
    ),
    create("create an existing topic", "topics", {"id": "orders"}, 409, TOPIC_ALREADY_EXISTS),
    create(
        "create an existing subscription",
        "subscriptions",
        {"id": "email-sender", "topic_id": "orders"},
        409,
        SUBSCRIPTION_ALREADY_EXISTS,
    ),
    create(
        "create an existing subscription of another topic",
        "subscriptions",
        {"id": "email-sender", "topic_id": "payments"},
        409,
        SUBSCRIPTION_ALREADY_EXISTS,
    ),
    missing_subscription("get subscription", "GET"),
    missing_subscription("delete subscription", "DELETE"),
    missing_subscription("consume", "GET", "/messages", query={"consumer_id": "w"}),
    missing_subscription("long poll", "GET", "/messages", query={"consumer_id": "w", "wait_seconds": 1}),
    missing_subscription("ack", "POST", "/acks", json=IDS),
    missing_subscription("ack nothing", "POST", "/acks", json=[]),
    missing_subscription("ack an ack_id", "POST", "/acks", json=[f"{MESSAGE_ID}:1"]),
    missing_subscription("ack, Prefer", "POST", "/acks", json=IDS, headers=PREFER),
    missing_subscription("nack", "POST", "/nacks", json=IDS),
    missing_subscription("nack with a delay", "POST", "/nacks", json=IDS, query={"delay_seconds": 5}),
    missing_subscription("extend", "POST", "/extend", json=IDS),
    missing_subscription("list dead letters", "GET", "/dlq"),
    missing_subscription("reprocess", "POST", "/dlq/reprocess", json=IDS),
    missing_subscription("metrics", "GET", "/metrics"),
    missing_subscription("update subscription", "PATCH", json={"max_delivery_attempts": 2}),
    missing_subscription("dead-letter nack", "POST", "/nacks", json=IDS, query={"dead_letter": "true"}),
    missing_subscription("redrive", "POST", "/dlq/redrive"),
    missing_subscription("redrive some", "POST", "/dlq/redrive", query={"limit": 2}),
    missing_subscription("purge the dlq", "DELETE", "/dlq"),
    missing_subscription("purge named dead letters", "DELETE", "/dlq", json=IDS),
    missing_subscription("purge the backlog", "POST", "/purge"),
    missing_subscription("purge before", "POST", "/purge", query={"before": "2026-01-01T00:00:00Z"}),
    missing_client("get client", "GET"),
    missing_client("update client", "PUT", json=CLIENT_BODY),
    missing_client("delete client", "DELETE"),
]


def call(test_client, case: Case, headers: dict):
    return test_client.open(
        case.path,
        method=case.method,
        json=case.json,
        query_string=case.query,
        headers={**(case.headers or {}), **headers},
    )


@pytest.fixture(params=["auth off", "auth on"])
def caller(request, client, auth_client, token_for):
    """A test client and headers allowed everything: auth off, or on with a `*` token (a
    publish then goes through the view instead of DirectPublish)."""
    if request.param == "auth off":
        return client, {}
    return auth_client, bearer(token_for("*"))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_the_error_text_is_fastpubsubs(caller, world, case):
    test_client, headers = caller
    response = call(test_client, case, headers)
    assert (response.status_code, response.json) == (case.status, case.body)


def every_global_scope_but(endpoint) -> str:
    return " ".join(scope for scope in GLOBAL_SCOPES if scope not in endpoint.scopes)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_a_token_without_the_scope_gets_insufficient_scope(auth_client, token_for, world, endpoint):
    response = endpoint.call(auth_client, world, token_for(every_global_scope_but(endpoint)))
    assert (response.status_code, response.json) == (403, INSUFFICIENT_SCOPE)


# Routes the tables must cover, from the app itself.

PUBLIC_ENDPOINTS = {  # SPEC §4: open with auth on
    "static",
    "prometheus_metrics",
    "api-docs.openapi_json",
    "api-docs.openapi_redoc",
    "api-docs.openapi_swagger_ui",
    "oauth.Token",
    "health.Liveness",
    "health.Readiness",
}


def operations(app) -> set[tuple[str, str]]:
    """Every (method, rule) the app serves, but HEAD and OPTIONS, which Flask adds."""
    return {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        for method in rule.methods - {"HEAD", "OPTIONS"}
        if rule.endpoint not in PUBLIC_ENDPOINTS
        # The console's HTML pages have tables of their own in test_console.py.
        and not rule.endpoint.startswith("console.")
    }


def rule_of(app, method: str, path: str) -> str:
    return app.url_map.bind("localhost").match(path, method=method, return_rule=True)[0].rule


def test_every_route_with_an_id_has_a_not_found_row(app):
    with_id = {(method, rule) for method, rule in operations(app) if "<id>" in rule}
    covered = {(case.method, rule_of(app, case.method, case.path)) for case in CASES if case.status == 404}
    assert with_id - covered == set()


def test_every_protected_route_has_an_insufficient_scope_row(app):
    covered = {(e.method, rule_of(app, e.method, e.path.replace("{id}", "x"))) for e in ENDPOINTS}
    assert operations(app) - covered == set()
