"""blueprints.topics.DirectPublish: a plain publish answered without Flask's request machinery,
and every other publish left to the view, with the same answers either way, auth off and on.

Each request below goes to two apps on the same database: the app as built, and one whose
DirectPublish is taken out, so that Flask and the view answer everything. Their answers must be
the same: status, headers (but the request id) and body.
"""

import http.client
import json
import re
import socket
import time
import uuid
from collections.abc import Callable

import pytest

from pubsub import clients, db
from pubsub.schemas import UUID_PATTERN
from tests.auth_support import EXPIRE_MINUTES, OTHER_KEY, SECRET_KEY, bearer, new_client, token_request
from tests.conftest import ApiHelper
from tests.test_auth import resign
from tests.test_observability import sample
from tests.test_serve import free_port, request, serve_env, serving, wait_until_live

UUID = re.compile(UUID_PATTERN.encode())
LIMIT = 8192  # API_MAX_BODY_BYTES of both apps
JSON = "application/json"


class Routed:
    """An app's test client, counting the requests that reached Flask: as built, or with its
    direct paths (DirectConsume, DirectPublish) taken out, so that Flask answers everything."""

    def __init__(self, app, direct: bool):
        observer = app.wsgi_app  # RequestObserver(DirectConsume(DirectPublish(Flask.wsgi_app)))
        innermost = observer
        while hasattr(innermost.wsgi_app, "wsgi_app"):
            innermost = innermost.wsgi_app
        flask_app = innermost.wsgi_app
        self.reached_flask = 0

        def counted(environ, start_response):
            self.reached_flask += 1
            return flask_app(environ, start_response)

        if direct:
            innermost.wsgi_app = counted
        else:
            observer.wsgi_app = counted
        self.client = app.test_client()

    def answer(self, path: str, method: str = "POST", **request) -> tuple[int, dict, bytes]:
        response = self.client.open(path, method=method, **request)
        headers = {name: value for name, value in response.headers.items() if name != "X-Request-ID"}
        # Message ids are new on every publish.
        return response.status, headers, UUID.sub(b"<uuid>", response.get_data())


def routed_pair(make_app, **settings) -> tuple[Routed, Routed]:
    """Two apps with these settings: the app as built, and one whose DirectPublish is bypassed."""
    settings = {"API_MAX_BODY_BYTES": LIMIT, **settings}
    return Routed(make_app(**settings), True), Routed(make_app(**settings), False)


def counting_anew(routed: Routed) -> Routed:
    routed.reached_flask = 0
    return routed


@pytest.fixture(scope="module")
def apps(make_app) -> tuple[Routed, Routed]:
    return routed_pair(make_app)


@pytest.fixture
def direct(apps) -> Routed:
    return counting_anew(apps[0])


@pytest.fixture
def flask_only(apps) -> Routed:
    return counting_anew(apps[1])


@pytest.fixture
def orders(direct) -> ApiHelper:
    api = ApiHelper(direct.client)
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    direct.reached_flask = 0
    return api


PUBLISH = "/topics/orders/messages"

# (what, path, request, whether DirectPublish answers it, the status)
CASES = [
    ("one object", PUBLISH, {"json": [{"n": 1}]}, True, 204),
    ("a batch", PUBLISH, {"json": [{"n": 1}, {"tags": ["a", "b"]}, {}]}, True, 204),
    ("an empty array", PUBLISH, {"json": []}, True, 204),
    ("a charset", PUBLISH, {"data": b'[{"n": 1}]', "content_type": f"{JSON}; charset=utf-8"}, True, 204),
    ("upper case", PUBLISH, {"data": b'[{"n": 1}]', "content_type": "Application/JSON"}, True, 204),
    (
        "the largest body",
        PUBLISH,
        {"data": b'[{"s": "' + b"x" * (LIMIT - 11) + b'"}]', "content_type": JSON},
        True,
        204,
    ),
    ("a missing topic", "/topics/missing/messages", {"json": [{"n": 1}]}, True, 404),
    ("a NUL character", PUBLISH, {"data": b'[{"s": "\\u0000"}]', "content_type": JSON}, True, 422),
    ("malformed JSON", PUBLISH, {"data": b'[{"n": ', "content_type": JSON}, False, 400),
    ("not UTF-8", PUBLISH, {"data": b'[{"s": "\xff"}]', "content_type": JSON}, False, 400),
    ("an object", PUBLISH, {"json": {"n": 1}}, False, 422),
    ("an item that is no object", PUBLISH, {"json": [{"n": 1}, 2]}, False, 422),
    ("too many items", PUBLISH, {"json": [{}] * 1001}, False, 422),
    (
        "a body over the limit",
        PUBLISH,
        {"data": b'[{"s": "' + b"x" * LIMIT + b'"}]', "content_type": JSON},
        False,
        413,
    ),
    ("not JSON", PUBLISH, {"data": b'[{"n": 1}]', "content_type": "text/plain"}, False, 415),
    ("no content type", PUBLISH, {"data": b'[{"n": 1}]'}, False, 415),
    ("Prefer", PUBLISH, {"json": [{"n": 1}], "headers": {"Prefer": "return=representation"}}, False, 201),
    ("Prefer, ignored", PUBLISH, {"json": [{"n": 1}], "headers": {"Prefer": "respond-async"}}, False, 204),
    ("an id that needs decoding", "/topics/%C3%A9t%C3%A9/messages", {"json": [{"n": 1}]}, False, 404),
    ("a trailing slash", PUBLISH + "/", {"json": [{"n": 1}]}, False, 404),
    # Delayed delivery: a valid delay is a plain publish; anything the view would read is not.
    ("a delay", PUBLISH + "?delay_seconds=60", {"json": [{"n": 1}]}, True, 204),
    ("a due time", PUBLISH + "?deliver_at=2020-01-01T00:00:00%2B01:00", {"json": [{"n": 1}]}, True, 204),
    ("a due time too far", PUBLISH + "?deliver_at=2999-01-01T00:00:00Z", {"json": [{"n": 1}]}, True, 422),
    ("a delay to a missing topic", "/topics/missing/messages?delay_seconds=1", {"json": [{}]}, True, 404),
    ("a bad delay", PUBLISH + "?delay_seconds=-1", {"json": [{"n": 1}]}, False, 422),
    ("two delays", PUBLISH + "?delay_seconds=1&deliver_at=2030-01-01T00:00:00Z", {"json": [{}]}, False, 422),
    ("a delay twice", PUBLISH + "?delay_seconds=1&delay_seconds=2", {"json": [{"n": 1}]}, False, 204),
    ("another parameter", PUBLISH + "?trace=1", {"json": [{"n": 1}]}, False, 204),
    ("a delay and a bad body", PUBLISH + "?delay_seconds=1", {"json": [1]}, False, 422),
]


@pytest.mark.parametrize(
    ("path", "request_", "answered_directly", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_publish_gets_the_same_answer_with_or_without_the_direct_path(
    orders, direct, flask_only, path, request_, answered_directly, status
):
    expected = flask_only.answer(path, **request_)
    assert int(expected[0][:3]) == status, expected
    assert direct.answer(path, **request_) == expected
    assert direct.reached_flask == (0 if answered_directly else 1)
    assert flask_only.reached_flask == 1


def test_direct_publishes_are_stored_once_each_in_order(orders, direct):
    for n in range(5):
        orders.publish("orders", [{"n": n, "i": 0}, {"n": n, "i": 1}])
    assert direct.reached_flask == 0
    payloads = [m["payload"] for m in orders.consume("sub", batch_size=20)]
    assert payloads == [{"n": n, "i": i} for n in range(5) for i in range(2)]


# --- auth on: the same answers, the token checked on both paths -----------------------------------

AUTH = {
    "AUTH_ENABLED": True,
    "AUTH_SECRET_KEY": SECRET_KEY,
    "AUTH_ACCESS_TOKEN_EXPIRE_MINUTES": EXPIRE_MINUTES,
}


@pytest.fixture(scope="module")
def auth_apps(make_app) -> tuple[Routed, Routed]:
    return routed_pair(make_app, **AUTH)


@pytest.fixture
def auth_direct(auth_apps, orders) -> Routed:
    return counting_anew(auth_apps[0])


@pytest.fixture
def auth_flask_only(auth_apps) -> Routed:
    return counting_anew(auth_apps[1])


def issue(app, scopes: str) -> tuple[str, str]:
    """A new client's id and a token issued to it."""
    client_id, secret = new_client(app, scopes)
    response = token_request(app.test_client(), client_id, secret)
    assert response.status_code == 201, response.json
    return client_id, response.json["access_token"]


def change_client(app, client_id: str, **changes) -> None:
    with app.app_context(), db.begin() as conn:
        client = clients.get_client(conn, uuid.UUID(client_id))
        fields = {name: client[name] for name in ("name", "scopes", "is_active")}
        clients.update_client(conn, uuid.UUID(client_id), **{**fields, **changes})


def delete_client(app, client_id: str) -> None:
    with app.app_context(), db.begin() as conn:
        clients.delete_client(conn, uuid.UUID(client_id))


# Each revokes a client's tokens as SPEC §4 says: deleted, deactivated, or updated (even with
# nothing changed but token_version).
REVOCATIONS: dict[str, Callable] = {
    "deleted": delete_client,
    "deactivated": lambda app, client_id: change_client(app, client_id, is_active=False),
    "updated": change_client,
}


def token(app, kind: str) -> dict[str, str]:
    """The Authorization header of a kind of token (or none)."""
    if kind == "none":
        return {}
    if kind.startswith("revoked, "):
        client_id, issued = issue(app, "topics:publish")
        REVOCATIONS[kind.removeprefix("revoked, ")](app, client_id)
        return bearer(issued)
    scopes = {"publish": "topics:publish", "admin": "*", "object": "topics:publish:orders"}
    scopes |= {"other object": "topics:publish:payments", "read": "topics:read topics:read:orders"}
    if kind in scopes:
        return bearer(issue(app, scopes[kind])[1])
    _, issued = issue(app, "topics:publish")
    forged = {
        "expired": lambda: resign(issued, exp=int(time.time()) - 60),
        "foreign key": lambda: resign(issued, OTHER_KEY),
        "not a client id": lambda: resign(issued, sub="orders"),
        "a string version": lambda: resign(issued, ver="1"),
    }
    if kind == "basic":
        return {"Authorization": f"Basic {issued}"}
    return bearer(forged[kind]())


ONE = {"json": [{"n": 1}]}

# (what, token, path, request, whether DirectPublish answers it, the status)
AUTH_CASES = [
    ("publish scope", "publish", PUBLISH, ONE, True, 204),
    ("admin scope", "admin", PUBLISH, ONE, True, 204),
    ("the topic's own scope", "object", PUBLISH, ONE, True, 204),
    ("a batch", "object", PUBLISH, {"json": [{"n": 1}, {}]}, True, 204),
    ("an empty array", "publish", PUBLISH, {"json": []}, True, 204),
    ("no token", "none", PUBLISH, ONE, False, 401),
    ("no bearer token", "basic", PUBLISH, ONE, False, 401),
    ("an expired token", "expired", PUBLISH, ONE, False, 401),
    ("a token signed with another key", "foreign key", PUBLISH, ONE, False, 401),
    ("a token naming no client id", "not a client id", PUBLISH, ONE, False, 401),
    ("a token with a version that is no number", "a string version", PUBLISH, ONE, False, 401),
    ("another topic's scope", "other object", PUBLISH, ONE, False, 403),
    ("no publish scope", "read", PUBLISH, ONE, False, 403),
    ("deleted client", "revoked, deleted", PUBLISH, ONE, True, 401),
    ("deactivated client", "revoked, deactivated", PUBLISH, ONE, True, 401),
    ("updated client", "revoked, updated", PUBLISH, ONE, True, 401),
    ("revoked, to a missing topic", "revoked, updated", "/topics/missing/messages", ONE, True, 401),
    (
        "revoked, malformed JSON",
        "revoked, deleted",
        PUBLISH,
        {"data": b"[", "content_type": JSON},
        False,
        401,
    ),
    (
        "revoked, Prefer",
        "revoked, updated",
        PUBLISH,
        {**ONE, "headers": {"Prefer": "return=representation"}},
        False,
        401,
    ),
    ("a missing topic", "publish", "/topics/missing/messages", ONE, True, 404),
    ("a missing topic, its scope", "object", "/topics/missing/messages", ONE, False, 403),
    ("a NUL character", "publish", PUBLISH, {"data": b'[{"s": "\\u0000"}]', "content_type": JSON}, True, 422),
    ("malformed JSON", "publish", PUBLISH, {"data": b'[{"n": ', "content_type": JSON}, False, 400),
    ("not JSON", "publish", PUBLISH, {"data": b"[{}]", "content_type": "text/plain"}, False, 415),
    ("Prefer", "object", PUBLISH, {**ONE, "headers": {"Prefer": "return=representation"}}, False, 201),
]


@pytest.mark.parametrize(
    ("kind", "path", "request_", "answered_directly", "status"),
    [c[1:] for c in AUTH_CASES],
    ids=[c[0] for c in AUTH_CASES],
)
def test_with_auth_on_a_publish_gets_the_same_answer_with_or_without_the_direct_path(
    auth_direct, auth_flask_only, kind, path, request_, answered_directly, status
):
    headers = {**token(auth_direct.client.application, kind), **request_.get("headers", {})}
    request_ = {**request_, "headers": headers}
    auth_direct.reached_flask = 0
    expected = auth_flask_only.answer(path, **request_)
    assert int(expected[0][:3]) == status, expected
    assert auth_direct.answer(path, **request_) == expected
    assert auth_direct.reached_flask == (0 if answered_directly else 1)
    assert auth_flask_only.reached_flask == 1


@pytest.mark.parametrize("revocation", REVOCATIONS.values(), ids=REVOCATIONS)
def test_a_revoked_token_is_refused_at_the_next_publish_on_either_path_and_stores_nothing(
    auth_direct, auth_flask_only, orders, revocation
):
    app = auth_direct.client.application
    client_id, issued = issue(app, "topics:publish")
    headers = bearer(issued)
    auth_direct.reached_flask = 0
    for routed in (auth_direct, auth_flask_only):
        assert routed.client.post(PUBLISH, json=[{"n": 1}], headers=headers).status_code == 204
    assert auth_direct.reached_flask == 0
    revocation(app, client_id)
    for routed in (auth_direct, auth_flask_only):
        response = routed.client.post(PUBLISH, json=[{"n": 2}], headers=headers)
        assert (response.status_code, response.json) == (401, {"detail": "token has been revoked"})
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert auth_direct.reached_flask == 0  # the direct path refused it itself
    assert [m["payload"] for m in orders.consume("sub", batch_size=10)] == [{"n": 1}, {"n": 1}]


def test_a_client_revoked_through_one_server_is_refused_by_the_other_at_once(auth_direct, auth_flask_only):
    # Two apps on one database stand for two servers: nothing is cached between them.
    _, admin = issue(auth_direct.client.application, "*")
    client_id, issued = issue(auth_direct.client.application, "topics:publish:orders")
    auth_direct.reached_flask = 0
    assert auth_direct.client.post(PUBLISH, json=[{"n": 1}], headers=bearer(issued)).status_code == 204
    body = {"name": "test", "scopes": "topics:publish:orders", "is_active": True}
    assert (
        auth_flask_only.client.put(f"/clients/{client_id}", json=body, headers=bearer(admin)).status_code
        == 200
    )
    response = auth_direct.client.post(PUBLISH, json=[{"n": 2}], headers=bearer(issued))
    assert (response.status_code, response.json["detail"]) == (401, "token has been revoked")
    assert auth_direct.reached_flask == 0


def test_direct_publishes_get_a_request_id_and_are_counted_under_their_route(orders, direct):
    before = direct.client.get("/metrics").get_data(as_text=True)
    response = direct.client.post(PUBLISH, json=[{"n": 1}], headers={"X-Request-ID": "trace-9"})
    assert (response.status_code, response.headers["X-Request-ID"]) == (204, "trace-9")
    assert direct.client.post("/topics/missing/messages", json=[{"n": 1}]).status_code == 404
    after = direct.client.get("/metrics").get_data(as_text=True)

    def delta(status: str) -> float:
        labels = {"method": "POST", "path": "/topics/{id}/messages", "status": status}
        return sample(after, "http_requests_total", **labels) - sample(
            before, "http_requests_total", **labels
        )

    assert (delta("204"), delta("404")) == (1, 1)


@pytest.mark.slow
def test_on_gunicorn_a_kept_alive_connection_carries_direct_and_other_publishes(database_url, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(DATABASE_URL=database_url, API_PORT=str(port), API_NUM_WORKERS="1", API_NUM_THREADS="2")
    with serving(env, log) as process:
        wait_until_live(process, port, log)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            headers = {"Content-Type": JSON}
            for method, path, body, status in [
                ("POST", "/topics", '{"id": "orders"}', 201),
                ("POST", "/subscriptions", '{"id": "sub", "topic_id": "orders"}', 201),
                ("POST", PUBLISH, '[{"n": 1}]', 204),
                ("POST", PUBLISH, '[{"n": ', 400),  # read by the direct path, answered by Flask
                ("POST", PUBLISH, '[{"n": 2}]', 204),
                ("GET", "/subscriptions/sub/messages?consumer_id=c&batch_size=10", None, 200),
            ]:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                answer = response.read()
                assert response.status == status, answer
            assert [m["payload"] for m in json.loads(answer)["data"]] == [{"n": 1}, {"n": 2}]
        finally:
            conn.close()
        # A client that sends less than its Content-Length and leaves: nothing of it is stored.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"POST {PUBLISH} HTTP/1.1\r\nHost: x\r\nContent-Type: {JSON}\r\n".encode())
            sock.sendall(b'Content-Length: 100\r\n\r\n[{"n": 3}]')
            sock.shutdown(socket.SHUT_WR)
            sock.recv(65536)
        status, metrics = request(port, "GET", "/subscriptions/sub/metrics")
        assert (status, metrics["available"]) == (200, 0)
