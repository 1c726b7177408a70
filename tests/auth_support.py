"""Shared by the test_auth*.py modules (no tests here): an auth-on app, tokens, and the table of
every protected endpoint with the scopes that allow it."""

import json
from dataclasses import dataclass
from typing import Any

import pytest

from pubsub import clients, db, messages, subscriptions, topics

SECRET_KEY = "0123456789abcdef" * 4  # 64 bytes: enough for HS512 too
OTHER_KEY = "fedcba9876543210" * 4
EXPIRE_MINUTES = 5

# The topic and subscription the matrix acts on, and others that object-specific scopes may name.
OBJECTS = {"topics": "orders", "subscriptions": "email-sender"}
OTHER_OBJECTS = {"topics": "payments", "subscriptions": "sms-sender"}
SOME_MESSAGE_ID = "6f1c1d1e-0000-4000-8000-000000000000"
# Every global scope of SPEC §4.
GLOBAL_SCOPES = (
    "topics:create",
    "topics:read",
    "topics:delete",
    "topics:publish",
    "subscriptions:create",
    "subscriptions:read",
    "subscriptions:update",
    "subscriptions:delete",
    "subscriptions:consume",
    "clients:create",
    "clients:update",
    "clients:read",
    "clients:delete",
)


@pytest.fixture(scope="session")
def auth_app(make_app):
    return make_app(
        AUTH_ENABLED=True, AUTH_SECRET_KEY=SECRET_KEY, AUTH_ACCESS_TOKEN_EXPIRE_MINUTES=EXPIRE_MINUTES
    )


@pytest.fixture
def auth_client(auth_app):
    return auth_app.test_client()


@pytest.fixture
def world(app) -> str:
    """Topics orders and payments, subscriptions email-sender and sms-sender with a message each,
    and a client to read, update or delete; returns that client's id."""
    with app.app_context(), db.begin() as conn:
        for topic, subscription in (("orders", "email-sender"), ("payments", "sms-sender")):
            topics.create_topic(conn, topic)
            subscriptions.create_subscription(conn, subscription, topic, None, 5, 5, 300, 60)
            messages.publish(conn, topic, json.dumps([{"topic": topic}]))
        client_id, _ = clients.create_client(conn, "target", "topics:read")
    return str(client_id)


def new_client(app, scopes: str, name: str = "test", is_active: bool = True) -> tuple[str, str]:
    """A client made by the domain function: its id and secret."""
    with app.app_context(), db.begin() as conn:
        client_id, secret = clients.create_client(conn, name, scopes, is_active)
    return str(client_id), secret


def token_request(test_client, client_id: str, secret: str):
    return test_client.post("/oauth/token", json={"client_id": client_id, "client_secret": secret})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def token_for(auth_app, auth_client):
    """A token of a new client with these scopes."""

    def issue(scopes: str) -> str:
        client_id, secret = new_client(auth_app, scopes)
        response = token_request(auth_client, client_id, secret)
        assert response.status_code == 201, response.json
        return response.json["access_token"]

    return issue


def assert_unauthorized(response) -> None:
    assert response.status_code == 401, (response.status_code, response.get_data(as_text=True))
    assert list(response.json) == ["detail"] and response.json["detail"], response.json
    assert response.headers["WWW-Authenticate"] == "Bearer"


def assert_forbidden(response) -> None:
    assert response.status_code == 403, (response.status_code, response.get_data(as_text=True))
    assert response.json == {"detail": "Insufficient scope"}  # fastpubsub's text


@dataclass(frozen=True, eq=False)
class Endpoint:
    method: str
    path: str  # as in the OpenAPI document
    scopes: tuple[str, ...]  # global scopes, any one of which allows it
    status: int  # its answer when allowed, with the objects of the `world` fixture
    body: Any = None
    query: dict | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def resource(self) -> str:
        return self.path.split("/")[1]

    @property
    def object_id(self) -> str | None:
        """The topic or subscription in the path: object-specific scopes name it."""
        return OBJECTS.get(self.resource) if "{id}" in self.path else None

    def call(self, test_client, client_id: str, token: str | None = None, object_id: str | None = None):
        """Request it; {id} is the object (or the given one), or client_id under /clients."""
        value = client_id if self.resource == "clients" else object_id or self.object_id
        path = self.path.replace("{id}", value or "")
        headers = bearer(token) if token else {}
        return test_client.open(
            path, method=self.method, json=self.body, query_string=self.query, headers=headers
        )


CONSUME = ("subscriptions:consume",)
MONITOR = ("subscriptions:consume", "subscriptions:read")
ENDPOINTS = [
    Endpoint("POST", "/topics", ("topics:create",), 201, {"id": "invoices"}),
    Endpoint("GET", "/topics", ("topics:read",), 200),
    Endpoint("GET", "/topics/{id}", ("topics:read",), 200),
    Endpoint("DELETE", "/topics/{id}", ("topics:delete",), 204),
    Endpoint("POST", "/topics/{id}/messages", ("topics:publish",), 204, [{"n": 1}]),
    Endpoint("POST", "/subscriptions", ("subscriptions:create",), 201, {"id": "audit", "topic_id": "orders"}),
    Endpoint("GET", "/subscriptions", ("subscriptions:read",), 200),
    Endpoint("GET", "/subscriptions/{id}", ("subscriptions:read",), 200),
    Endpoint("DELETE", "/subscriptions/{id}", ("subscriptions:delete",), 204),
    Endpoint("GET", "/subscriptions/{id}/messages", CONSUME, 200, query={"consumer_id": "worker-1"}),
    Endpoint("POST", "/subscriptions/{id}/acks", CONSUME, 204, [SOME_MESSAGE_ID]),
    Endpoint("POST", "/subscriptions/{id}/nacks", CONSUME, 204, [SOME_MESSAGE_ID]),
    Endpoint("POST", "/subscriptions/{id}/extend", CONSUME, 204, [SOME_MESSAGE_ID]),
    Endpoint("GET", "/subscriptions/{id}/dlq", CONSUME, 200),
    Endpoint("POST", "/subscriptions/{id}/dlq/reprocess", CONSUME, 204, [SOME_MESSAGE_ID]),
    Endpoint("GET", "/subscriptions/{id}/metrics", MONITOR, 200),
    Endpoint("PATCH", "/subscriptions/{id}", ("subscriptions:update",), 200, {"max_delivery_attempts": 3}),
    Endpoint("POST", "/subscriptions/{id}/dlq/redrive", CONSUME, 200),
    Endpoint("DELETE", "/subscriptions/{id}/dlq", ("subscriptions:delete",), 200),
    Endpoint("POST", "/subscriptions/{id}/purge", ("subscriptions:delete",), 200),
    Endpoint("POST", "/clients", ("clients:create",), 201, {"name": "ci", "scopes": "topics:read"}),
    Endpoint("GET", "/clients", ("clients:read",), 200),
    Endpoint("GET", "/clients/{id}", ("clients:read",), 200),
    Endpoint(
        "PUT", "/clients/{id}", ("clients:update",), 200, {"name": "ci", "scopes": "*", "is_active": True}
    ),
    Endpoint("DELETE", "/clients/{id}", ("clients:delete",), 204),
]
