"""Hostile input (issue 5, scenario 8): every refused request is a clear 4xx {"detail"} that leaves
the database exactly as it was, and whatever is accepted is stored and returned verbatim.

"Nothing changed" is checked, not assumed: `snapshot` reads every row of every table, and the
metrics of every subscription through the API, before and after each refused request. Where
test_errors.py, test_topics.py, test_subscriptions.py and test_messages.py already check a case by
its status alone (or by one counter), it is repeated here only with that full check.
"""

import html
import io
import json
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import sqlalchemy as sa

from pubsub import clients, db, messages, subscriptions, topics
from pubsub.tables import AVAILABLE
from tests.test_serve import free_port, serve_env, serving, wait_until_live

TABLES = ("topics", "subscriptions", "subscription_messages", "acked_messages", "clients")
SMALL_LIMIT = 2048  # API_MAX_BODY_BYTES of `small_app`: oversized bodies stay cheap to build
DEFAULT_LIMIT = 10 * 1024 * 1024  # API_MAX_BODY_BYTES's default (config.py)
UNKNOWN_ID = "6f1c1d1e-0000-4000-8000-000000000000"


# --- arrangement and the "nothing changed" check ----------------------------------------------


@dataclass(frozen=True)
class Queues:
    client_id: str
    # subscription -> state (acked, dlq, delivered, available) -> message id
    ids: dict[str, dict[str, str]]


@pytest.fixture
def queues(app, engine) -> Queues:
    """Topics orders and returns with subscriptions sub and other, each holding one message in every state
    (acked, dlq, delivered, available); topic payments with a subscription filtered to one of its
    two messages; and an API client. Arranged through the domain functions, in one transaction."""
    ids: dict[str, dict[str, str]] = {}
    with app.app_context(), db.begin() as conn:
        # sub and other on topics of their own: copies of one message share its id.
        for topic, subscription in (("orders", "sub"), ("returns", "other")):
            topics.create_topic(conn, topic)
            subscriptions.create_subscription(conn, subscription, topic, None, 1, 0, 0, 60)
            messages.publish(conn, topic, json.dumps([{"n": n} for n in range(4)]))
        topics.create_topic(conn, "payments")
        subscriptions.create_subscription(conn, "filtered", "payments", {"country": ["BR"]}, 5, 5, 300, 60)
        messages.publish(conn, "payments", json.dumps([{"country": "BR"}, {"country": "US"}]))
        for subscription in ("sub", "other"):
            acked, dead, delivered = (row[0] for row in messages.consume(conn, subscription, "worker", 3))
            messages.ack(conn, subscription, [(acked, None)])
            messages.nack(conn, subscription, [(dead, None)])
            ids[subscription] = {"acked": acked, "dlq": dead, "delivered": delivered}
        for subscription, message_id in conn.execute(
            sa.text("SELECT subscription_id, id::text FROM subscription_messages WHERE state = :a"),
            {"a": AVAILABLE},
        ):
            ids.setdefault(subscription, {})["available"] = message_id
        client_id, _ = clients.create_client(conn, "svc", "topics:read")
    return Queues(client_id=str(client_id), ids=ids)


def table_rows(engine) -> dict[str, list]:
    """Every row of every table, in a stable order."""
    with engine.connect() as conn:
        return {
            table: conn.execute(sa.text(f"SELECT t.* FROM {table} AS t ORDER BY t::text")).all()
            for table in TABLES
        }


def snapshot(engine, client) -> dict:
    """Every row of every table, their counts, and the metrics of every subscription (by the API)."""
    rows = table_rows(engine)
    return {
        "counts": {table: len(table_rows) for table, table_rows in rows.items()},
        "metrics": {
            row.id: client.get(f"/subscriptions/{row.id}/metrics").json for row in rows["subscriptions"]
        },
        "rows": rows,
    }


@pytest.fixture
def unchanged(engine, client):
    """`with unchanged(): ...` fails unless the block leaves every table and metric as it found them."""

    class Unchanged:
        def __enter__(self):
            self.before = snapshot(engine, client)

        def __exit__(self, *exc_info):
            if exc_info[0] is None:
                assert snapshot(engine, client) == self.before

    return Unchanged


def refusal_problem(response, statuses: tuple[int, ...] = ()) -> str | None:
    """Why the response is not a 4xx (one of `statuses` if given) with a JSON {"detail"}."""
    text = response.get_data()[:300]
    if statuses and response.status_code not in statuses:
        return f"{response.status_code} not in {statuses}: {text!r}"
    if not 400 <= response.status_code < 500:
        return f"{response.status_code} is not a 4xx: {text!r}"
    if not (response.is_json and response.json.get("detail")):
        return f"no JSON detail: {text!r}"
    return None


def assert_refused(response, *statuses: int) -> None:
    """A 4xx (one of `statuses` if given) with a JSON {"detail"}: never a 2xx, never a 500."""
    problem = refusal_problem(response, statuses)
    assert problem is None, problem


@pytest.fixture
def refusals(engine, client):
    """For tables of requests that must each be refused and change nothing: `expect` sends one and
    notes every way it falls short (its answer, any row it changed); `check` also compares the
    metrics with those from before the first, and fails with every problem, so none hides another."""

    class Refusals:
        def __init__(self):
            self.problems: list[str] = []
            self.first: dict | None = None

        def expect(self, label: str, send: Callable, *statuses: int):
            if self.first is None:
                self.first = snapshot(engine, client)
            before = table_rows(engine)
            response = send()
            if problem := refusal_problem(response, statuses):
                self.problems.append(f"{label}: {problem}")
            after = table_rows(engine)
            if changed := [table for table in TABLES if before[table] != after[table]]:
                self.problems.append(f"{label}: changed the rows of {changed}")
            return response

        def check(self) -> None:
            assert not self.problems, "\n".join(self.problems)
            assert snapshot(engine, client) == self.first

    return Refusals()


# --- the endpoints that take a body ------------------------------------------------------------


@dataclass(frozen=True)
class BodyEndpoint:
    """An endpoint with a JSON body that holds one JSON value the test chooses; with `valid` there
    the request succeeds (and changes something), so a refusal is down to that value alone."""

    name: str
    method: str
    path: str  # {client} is the queues' API client
    template: Callable[[Queues, bytes], bytes]
    valid: Callable[[Queues], bytes]
    status: int  # with `valid`

    def __str__(self) -> str:
        return self.name

    def body(self, queues: Queues, value: bytes | None = None) -> bytes:
        return self.template(queues, self.valid(queues) if value is None else value)

    def send(self, test_client, queues: Queues, body: bytes, **kwargs):
        path = self.path.replace("{client}", queues.client_id)
        return test_client.open(
            path, method=self.method, data=body, content_type="application/json", **kwargs
        )


def quoted(text: str) -> bytes:
    return json.dumps(text).encode()


BODY_ENDPOINTS = [
    BodyEndpoint(
        "publish",
        "POST",
        "/topics/orders/messages",
        lambda q, v: b'[{"n": 9}, {"n": 10, "v": ' + v + b"}]",
        lambda q: b'"ok"',
        204,
    ),
    BodyEndpoint(
        "create topic", "POST", "/topics", lambda q, v: b'{"id": ' + v + b"}", lambda q: b'"new"', 201
    ),
    BodyEndpoint(
        "create subscription",
        "POST",
        "/subscriptions",
        lambda q, v: b'{"id": "new", "topic_id": "orders", "filter": {"v": [' + v + b"]}}",
        lambda q: b'"ok"',
        201,
    ),
    *[
        BodyEndpoint(
            action,
            "POST",
            f"/subscriptions/sub/{action}",
            lambda q, v, state=state: b"[" + quoted(q.ids["sub"][state]) + b", " + v + b"]",
            lambda q, state=state: quoted(q.ids["sub"][state]),
            204,
        )
        for action, state in (("acks", "delivered"), ("nacks", "delivered"), ("dlq/reprocess", "dlq"))
    ],
    BodyEndpoint(
        "create client",
        "POST",
        "/clients",
        lambda q, v: b'{"name": ' + v + b', "scopes": "topics:read"}',
        lambda q: b'"svc"',
        201,
    ),
    BodyEndpoint(
        "update client",
        "PUT",
        "/clients/{client}",
        lambda q, v: b'{"name": ' + v + b', "scopes": "topics:read", "is_active": true}',
        lambda q: b'"svc"',
        200,
    ),
]


def padded(body: bytes, size: int) -> bytes:
    """The body with trailing whitespace (still the same JSON) up to exactly `size` bytes."""
    assert len(body) <= size
    return body + b" " * (size - len(body))


@pytest.fixture(scope="module")
def small_app(make_app):
    return make_app(API_MAX_BODY_BYTES=SMALL_LIMIT)


# --- bodies over the size limit -----------------------------------------------------------------


@pytest.mark.parametrize("endpoint", BODY_ENDPOINTS, ids=str)
def test_a_body_one_byte_over_the_limit_is_413_and_changes_nothing(small_app, queues, unchanged, endpoint):
    # Valid JSON padded with whitespace: its size is the only thing wrong with it.
    with unchanged():
        response = endpoint.send(
            small_app.test_client(), queues, padded(endpoint.body(queues), SMALL_LIMIT + 1)
        )
        assert_refused(response, 413)


@pytest.mark.parametrize("endpoint", BODY_ENDPOINTS, ids=str)
def test_a_body_of_exactly_the_limit_is_accepted(small_app, queues, endpoint):
    # The control for the test above: one byte less and the same request succeeds.
    response = endpoint.send(small_app.test_client(), queues, padded(endpoint.body(queues), SMALL_LIMIT))
    assert response.status_code == endpoint.status, response.get_data()[:300]


def test_the_default_limit_is_10_mib(api, client, unchanged):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    body = b'[{"pad": "' + b"x" * (DEFAULT_LIMIT - 100) + b'"}]'
    with unchanged():
        response = client.post(
            "/topics/orders/messages", data=padded(body, DEFAULT_LIMIT + 1), content_type="application/json"
        )
        assert_refused(response, 413)
    response = client.post(
        "/topics/orders/messages", data=padded(body, DEFAULT_LIMIT), content_type="application/json"
    )
    assert response.status_code == 204
    assert api.metrics()["available"] == 1


STREAMED = {
    # Truncated at the limit, this one is still valid JSON.
    "padded with whitespace": padded(b'[{"n": 9}]', SMALL_LIMIT + 1000),
    "one large message": b'[{"n": 9, "pad": "' + b"x" * SMALL_LIMIT + b'"}]',
}


@pytest.mark.parametrize("body", STREAMED.values(), ids=STREAMED)
def test_a_streamed_body_over_the_limit_is_413_and_changes_nothing(small_app, queues, unchanged, body):
    # Chunked, so no Content-Length to check up front; gunicorn marks such input as terminated.
    with unchanged():
        response = small_app.test_client().post(
            "/topics/orders/messages",
            input_stream=io.BytesIO(body),
            content_type="application/json",
            headers={"Transfer-Encoding": "chunked"},
            environ_overrides={"wsgi.input_terminated": True},
        )
        assert_refused(response, 413)


def test_a_streamed_body_within_the_limit_is_accepted(small_app, api, queues):
    # The control for the test above.
    response = small_app.test_client().post(
        "/topics/orders/messages",
        input_stream=io.BytesIO(padded(b'[{"n": 9}]', SMALL_LIMIT)),
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 204, response.get_data()
    assert api.metrics("sub")["available"] == 2


# --- batches over 1000 ----------------------------------------------------------------------------


def test_a_1001_message_batch_is_422_and_stores_nothing(queues, client, unchanged):
    with unchanged():
        response = client.post("/topics/orders/messages", json=[{"n": n} for n in range(1001)])
        assert_refused(response, 422)
        assert response.json["errors"] == {"json": ["at most 1000 items per request"]}


@pytest.mark.parametrize(
    ("action", "state"), [("acks", "delivered"), ("nacks", "delivered"), ("dlq/reprocess", "dlq")]
)
def test_1001_real_ids_are_422_and_change_nothing(queues, client, unchanged, action, state):
    # Ids that the action would act on, were the batch not too long.
    with unchanged():
        response = client.post(f"/subscriptions/sub/{action}", json=[queues.ids["sub"][state]] * 1001)
        assert_refused(response, 422)


# --- malformed JSON: non-UTF-8, NaN and Infinity, nesting -----------------------------------------

BAD_VALUES = {
    "invalid utf-8": b'"\xff\xfe"',
    "latin-1": b'"caf\xe9"',
    "overlong utf-8": b'"\xc0\xaf"',
    "utf-8 surrogate": b'"\xed\xa0\x80"',
    "lone surrogate escape": b'"\\ud800"',
    "raw NUL byte": b'"a\x00b"',
    "NaN": b"NaN",
    "Infinity": b"Infinity",
    "-Infinity": b"-Infinity",
    "1e400": b"1e400",
    "nesting past 1024 levels": b"[" * 1025 + b"]" * 1025,
}


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES)
def test_malformed_json_is_a_4xx_that_changes_nothing(queues, client, refusals, value):
    # In a body the endpoint would otherwise accept (and act on).
    for endpoint in BODY_ENDPOINTS:
        refusals.expect(endpoint.name, lambda e=endpoint: e.send(client, queues, e.body(queues, value)))
    refusals.check()


BAD_BODIES = {
    "utf-8 byte order mark": lambda body: b"\xef\xbb\xbf" + body,
    "utf-16": lambda body: body.decode().encode("utf-16"),
    "two documents": lambda body: body + b" " + body,
    "a million brackets": lambda body: b"[" * 1_000_000 + b"]" * 1_000_000,
}


@pytest.mark.parametrize("spoil", BAD_BODIES.values(), ids=BAD_BODIES)
def test_malformed_bodies_are_a_4xx_that_changes_nothing(queues, client, refusals, spoil):
    for endpoint in BODY_ENDPOINTS:
        refusals.expect(endpoint.name, lambda e=endpoint: e.send(client, queues, spoil(e.body(queues))))
    refusals.check()


def test_the_deepest_payload_the_parser_takes_is_stored_and_returned_intact(api, client):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    nested = b"[" * 1022 + b"]" * 1022  # 1024 levels with the batch and the message around it
    response = client.post(
        "/topics/orders/messages", data=b'[{"a": ' + nested + b"}]", content_type="application/json"
    )
    assert response.status_code == 204
    consumed = client.get("/subscriptions/sub/messages", query_string={"consumer_id": "c"})
    assert b'"payload":{"a": ' + nested + b"}" in consumed.get_data()


# --- non-UTF-8 bytes in query strings and paths ---------------------------------------------------

QUERY_CASES = [  # (path, query): the first parameter is the hostile one
    ("/subscriptions/sub/messages", {"consumer_id": "c"}),
    ("/subscriptions/sub/messages", {"batch_size": "5", "consumer_id": "c"}),
    ("/subscriptions/sub/dlq", {"limit": "5"}),
    ("/topics", {"limit": "5"}),
    ("/subscriptions", {"offset": "0"}),
    ("/clients", {"limit": "5"}),
]


def hostile_query(query: dict[str, str], value: str) -> str:
    first, *rest = query.items()
    return "&".join([f"{first[0]}={value}", *(f"{key}={item}" for key, item in rest)])


@pytest.mark.parametrize("escape", ["%FF", "c%FFc", "%C0%AF", "%ED%A0%80"])
def test_percent_escaped_non_utf8_in_query_strings_is_422_and_changes_nothing(
    queues, client, refusals, escape
):
    for path, query in QUERY_CASES:
        url = f"{path}?{hostile_query(query, escape)}"
        refusals.expect(url, lambda url=url: client.get(url), 422)
    refusals.check()


def test_raw_non_utf8_bytes_in_query_strings_are_a_4xx_not_a_500(queues, client, refusals):
    # As a WSGI server that lets them through hands them on: the bytes as latin-1 text.
    for path, query in QUERY_CASES:
        query_string = hostile_query(query, "\xff")
        refusals.expect(
            f"{path}?{query_string!r}",
            lambda path=path, qs=query_string: client.get(path, environ_overrides={"QUERY_STRING": qs}),
        )
    refusals.check()


# Every endpoint with an object in its path, with a body it would accept for the real object.
PATH_ENDPOINTS = [
    ("GET", "/topics/{id}", None),
    ("DELETE", "/topics/{id}", None),
    ("POST", "/topics/{id}/messages", [{"n": 9}]),
    ("GET", "/subscriptions/{id}", None),
    ("DELETE", "/subscriptions/{id}", None),
    ("GET", "/subscriptions/{id}/messages?consumer_id=c", None),
    ("POST", "/subscriptions/{id}/acks", "delivered"),
    ("POST", "/subscriptions/{id}/nacks", "delivered"),
    ("GET", "/subscriptions/{id}/dlq", None),
    ("POST", "/subscriptions/{id}/dlq/reprocess", "dlq"),
    ("GET", "/subscriptions/{id}/metrics", None),
    ("GET", "/clients/{id}", None),
    ("PUT", "/clients/{id}", {"name": "svc", "scopes": "*", "is_active": True}),
    ("DELETE", "/clients/{id}", None),
]
HOSTILE_PATH_IDS = {  # {real} is the id of an object that exists
    "invalid utf-8": "%FF%FE",
    "an existing id and invalid utf-8": "{real}%FF",
    "an existing id and overlong utf-8": "{real}%C0%AF",
    "an existing id and a utf-8 surrogate": "{real}%ED%A0%80",
    "an existing id and NUL": "{real}%00",
    "10 kB": "x" * 10_000,
    "an existing id and 100 kB": "{real}" + "x" * 100_000,
    "sql": "{real}'%3B%20DROP%20TABLE%20topics%3B%20--",
    "quotes and wildcards": "{real}%25%27%22%5C_",
    "traversal": "..%2F{real}",
}


@pytest.mark.parametrize("hostile", HOSTILE_PATH_IDS.values(), ids=HOSTILE_PATH_IDS)
def test_hostile_ids_in_paths_are_a_4xx_that_changes_nothing(queues, client, refusals, hostile):
    for method, path, body in PATH_ENDPOINTS:
        resource = path.split("/")[1]
        real = {"topics": "orders", "subscriptions": "sub", "clients": queues.client_id}[resource]
        url = path.replace("{id}", hostile.replace("{real}", real))
        json_body = [queues.ids["sub"][body]] if isinstance(body, str) else body
        refusals.expect(
            f"{method} {path}",
            lambda m=method, u=url, b=json_body: client.open(u, method=m, json=b),
            404,
            422,
        )
    refusals.check()


def test_raw_non_utf8_bytes_in_paths_are_a_4xx_that_changes_nothing(queues, client, refusals):
    # As a WSGI server that lets them through hands them on: the bytes as latin-1 text.
    for method, path, body in PATH_ENDPOINTS:
        resource = path.split("/")[1]
        real = {"topics": "orders", "subscriptions": "sub", "clients": queues.client_id}[resource]
        path_info = path.split("?")[0].replace("{id}", real + "\xff\xfe")
        json_body = [queues.ids["sub"][body]] if isinstance(body, str) else body
        refusals.expect(
            f"{method} {path}",
            lambda m=method, p=path_info, b=json_body: client.open(
                "/", method=m, json=b, query_string={"consumer_id": "c"}, environ_overrides={"PATH_INFO": p}
            ),
            404,
            422,
        )
    refusals.check()


# --- huge and odd strings in ids and consumer_id --------------------------------------------------

BAD_IDS = {
    "129 characters": "x" * 129,
    "10 kB": "x" * 10_000,
    "1 MB": "x" * 1_000_000,
    "NUL": "new\x00",
    "sql": "'; DROP TABLE topics; --",
    "html": "<script>",
    "unicode letters": "pedidos-ação",
    "trailing newline": "new\n",
    "128 characters and a newline": "x" * 128 + "\n",
    "leading newline": "\nnew",
    "space": "new ",
}


@pytest.mark.parametrize("bad_id", BAD_IDS.values(), ids=BAD_IDS)
def test_ids_outside_the_documented_alphabet_and_length_are_422_and_change_nothing(
    queues, client, refusals, bad_id
):
    for label, path, body in [
        ("topic id", "/topics", {"id": bad_id}),
        ("subscription id", "/subscriptions", {"id": bad_id, "topic_id": "orders"}),
        ("subscription topic_id", "/subscriptions", {"id": "new", "topic_id": bad_id}),
    ]:
        refusals.expect(label, lambda p=path, b=body: client.post(p, json=b), 422)
    refusals.check()


CONSUMER_IDS = {
    "129 characters": "c" * 129,
    "1 MB": "c" * 1024 * 1024,
    "NUL": "worker\x00",
    "only NUL": "\x00",
}


@pytest.mark.parametrize("consumer_id", CONSUMER_IDS.values(), ids=CONSUMER_IDS)
def test_bad_consumer_ids_are_422_and_lock_nothing(queues, client, unchanged, consumer_id):
    with unchanged():
        response = client.get("/subscriptions/sub/messages", query_string={"consumer_id": consumer_id})
        assert_refused(response, 422)
        assert "query.consumer_id" in response.json["errors"]


@pytest.mark.parametrize("key", ["k" * 257, "k" * 1_000_000], ids=["257 characters", "1 MB"])
def test_huge_filter_keys_are_422_and_change_nothing(queues, client, unchanged, key):
    with unchanged():
        response = client.post(
            "/subscriptions", json={"id": "new", "topic_id": "orders", "filter": {key: ["v"]}}
        )
        assert_refused(response, 422)


# --- NUL characters: jsonb and text cannot hold them ----------------------------------------------

NUL_REQUESTS = {
    "payload value": ("POST", "/topics/orders/messages", b'[{"a": "x\\u0000y"}]'),
    "payload key": ("POST", "/topics/orders/messages", b'[{"k\\u0000": 1}]'),
    "nested payload value": ("POST", "/topics/orders/messages", b'[{"a": {"b": ["\\u0000"]}}]'),
    "last message of a batch": (
        "POST",
        "/topics/orders/messages",
        b'[{"ok": 1}, {"ok": 2}, {"a": "\\u0000"}]',
    ),
    "filter value": (
        "POST",
        "/subscriptions",
        b'{"id": "new", "topic_id": "orders", "filter": {"k": ["a\\u0000"]}}',
    ),
    "filter key": (
        "POST",
        "/subscriptions",
        b'{"id": "new", "topic_id": "orders", "filter": {"k\\u0000": ["a"]}}',
    ),
    "only NUL filter key": (
        "POST",
        "/subscriptions",
        b'{"id": "new", "topic_id": "orders", "filter": {"\\u0000": [1]}}',
    ),
    "subscription id": ("POST", "/subscriptions", b'{"id": "new\\u0000", "topic_id": "orders"}'),
    "topic id": ("POST", "/topics", b'{"id": "new\\u0000"}'),
    "client name": ("POST", "/clients", b'{"name": "svc\\u0000", "scopes": "topics:read"}'),
    "client scopes": ("POST", "/clients", b'{"name": "svc", "scopes": "topics:read\\u0000"}'),
    "client name on update": (
        "PUT",
        "/clients/{client}",
        b'{"name": "\\u0000", "scopes": "*", "is_active": true}',
    ),
    "message id": ("POST", "/subscriptions/sub/acks", b'["{delivered}\\u0000"]'),
}


@pytest.mark.parametrize(("method", "path", "body"), NUL_REQUESTS.values(), ids=NUL_REQUESTS)
def test_nul_characters_are_422_and_change_nothing(queues, client, unchanged, method, path, body):
    path = path.replace("{client}", queues.client_id)
    body = body.replace(b"{delivered}", queues.ids["sub"]["delivered"].encode())
    with unchanged():
        response = client.open(path, method=method, data=body, content_type="application/json")
        assert_refused(response, 422)


# --- stored and returned verbatim -----------------------------------------------------------------

# Each is a JSON string that some layer might be tempted to escape, quote, unescape or interpret.
HOSTILE_STRINGS = [
    "it's",
    "''",
    'say "hi"',
    "100%",
    "%",
    "_",
    "a_c",
    "\\",
    "a\\b",
    "\\\\",
    "\\u0000",  # a backslash, a u and four digits: text, not a NUL
    "\\x00",
    "'; DROP TABLE topics; --",
    '" OR "1"="1',
    "1' OR '1'='1",
    "$1",
    "%s %d %%",
    "{{x}} ${x}",
    "<script>alert(1)</script>",
    "&amp; &lt; &#39;",
    "ação ✓ 🚀 𝄞",
    "\u200b\ufeff",
    "\u2028\u2029",
    "line\nbreak\ttab\r",
    "\x01\x1f",
    " padded ",
    "null",
    "true",
    "[]",
    "{}",
    "*",
    "?",
    ":name",
]


def raw_body(response) -> str:
    return response.get_data().decode("utf-8")


def assert_sent_verbatim(text: str) -> None:
    """Only JSON's own escapes on the wire: no HTML entities, no doubled quotes, no \\u escapes of
    what UTF-8 carries as it is."""
    for literal in (
        "<script>alert(1)</script>",
        "'; DROP TABLE topics; --",
        "ação ✓ 🚀 𝄞",
        "&amp; &lt; &#39;",
    ):
        assert literal in text
    for escaped in (
        html.escape("<script>"),
        "it&#x27;s",
        "it&#39;s",
        "it''s",
        "&amp;amp;",
        "\\u00e7",
        "\\u003c",
    ):
        assert escaped not in text


def test_hostile_payloads_come_back_verbatim_from_consume_and_the_dlq(api, client, engine):
    api.create_topic("orders")
    api.create_subscription("sub", "orders", max_delivery_attempts=1)
    payload = {
        "values": {f"k{n}": text for n, text in enumerate(HOSTILE_STRINGS)},
        "keys": {text: n for n, text in enumerate(HOSTILE_STRINGS)},
        "nested": [{text: [text]} for text in HOSTILE_STRINGS],
    }
    api.publish("orders", [payload])

    consumed = client.get("/subscriptions/sub/messages", query_string={"consumer_id": "c"})
    [message] = json.loads(raw_body(consumed))["data"]
    assert message["payload"] == payload
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT payload FROM subscription_messages")).scalar_one() == payload
    assert_sent_verbatim(raw_body(consumed))

    api.nack("sub", [message["id"]])  # one attempt allowed: a dead letter
    [dead] = api.dlq("sub")
    assert dead["payload"] == payload
    assert [t["id"] for t in client.get("/topics").json["data"]] == ["orders"]


def test_hostile_filters_are_stored_and_returned_verbatim(api, client, engine):
    api.create_topic("orders")
    # The 32 most telling (32 keys: the most a filter may have).
    hostile = {text: [text, 1, True] for text in HOSTILE_STRINGS if text not in ("*", "?", ":name")}
    created = client.post("/subscriptions", json={"id": "sub", "topic_id": "orders", "filter": hostile})
    assert created.status_code == 201, created.json
    assert created.json["filter"] == hostile
    assert client.get("/subscriptions/sub").json["filter"] == hostile
    assert client.get("/subscriptions").json["data"][0]["filter"] == hostile
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT filter FROM subscriptions")).scalar_one() == hostile
    assert_sent_verbatim(raw_body(created))
    assert_sent_verbatim(raw_body(client.get("/subscriptions/sub")))


def near_misses(text: str) -> list[str]:
    """Strings a filter for `text` must not match, whatever escaping or pattern matching went wrong."""
    candidates = [
        text + " ",
        " " + text,
        text[:-1],
        text.upper(),
        text.replace("\\", "\\\\"),
        text.replace("\\\\", "\\"),
        text.replace("'", "''"),
        text.replace("''", "'"),
        text.replace('"', '\\"'),
        html.escape(text),
        html.unescape(text),
        text.encode("unicode_escape").decode(),
        "%",
        "_",
        "",
        "x",
        "abc",
    ]
    return [c for c in dict.fromkeys(candidates) if c != text]


def typed_look_alikes(text: str) -> list:
    """The JSON value the text spells, when it spells one that is not a string ("true", "[]")."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return [] if isinstance(value, str) else [value]


@pytest.mark.parametrize("text", HOSTILE_STRINGS)
def test_a_hostile_filter_matches_exactly_the_equal_values(api, text):
    api.create_topic("orders")
    api.create_subscription("sub", "orders", filter={text: [text]})
    misses = near_misses(text)
    batch = [
        {text: text, "n": "exact"},
        {text: text, "n": "exact with more fields", "other": "x"},
        *({text: miss, "n": f"value {miss!r}"} for miss in misses),
        *({miss: text, "n": f"key {miss!r}"} for miss in misses),
        *({text: value, "n": f"typed {value!r}"} for value in typed_look_alikes(text)),
        {text: [text], "n": "in an array"},
        {"nested": {text: text}, "n": "nested"},
    ]
    api.publish("orders", batch)
    delivered = api.consume("sub", batch_size=100)
    assert [m["payload"]["n"] for m in delivered] == ["exact", "exact with more fields"]
    assert delivered[0]["payload"] == {text: text, "n": "exact"}


# --- ids that are not this subscription's ---------------------------------------------------------

# (subscription, state) of an id the action must ignore; None: an id no message has.
FOREIGN_IDS = {
    "unknown": None,
    "other's delivered": ("other", "delivered"),
    "other's dead letter": ("other", "dlq"),
    "other's available": ("other", "available"),
    "other's acked": ("other", "acked"),
    "filtered's": ("filtered", "available"),
    "own acked": ("sub", "acked"),
    "own available": ("sub", "available"),
}
# The states each action acts on; the own messages in them are not foreign.
ACTS_ON = {"acks": "delivered", "nacks": "delivered", "dlq/reprocess": "dlq"}


@pytest.mark.parametrize("owner", FOREIGN_IDS.values(), ids=FOREIGN_IDS)
@pytest.mark.parametrize("action", ACTS_ON)
def test_ids_this_subscription_cannot_act_on_are_ignored_and_change_nothing(
    queues, client, unchanged, action, owner
):
    # SPEC §3: 204; ids not delivered to this subscription are ignored.
    message_id = str(uuid.uuid4()) if owner is None else queues.ids[owner[0]][owner[1]]
    with unchanged():
        assert client.post(f"/subscriptions/sub/{action}", json=[message_id]).status_code == 204


@pytest.mark.parametrize("action", ACTS_ON)
def test_own_messages_in_a_state_the_action_does_not_act_on_are_ignored(queues, client, unchanged, action):
    other_state = {"delivered": "dlq", "dlq": "delivered"}[ACTS_ON[action]]
    with unchanged():
        response = client.post(f"/subscriptions/sub/{action}", json=[queues.ids["sub"][other_state]])
        assert response.status_code == 204


@pytest.mark.parametrize("action", ACTS_ON)
def test_a_batch_of_own_and_foreign_ids_changes_only_the_own_message(queues, client, api, engine, action):
    own = queues.ids["sub"][ACTS_ON[action]]
    others = [queues.ids["other"][state] for state in ("delivered", "dlq", "available", "acked")]
    before = snapshot(engine, client)
    response = client.post(f"/subscriptions/sub/{action}", json=[*others, own, UNKNOWN_ID])
    assert response.status_code == 204
    after = snapshot(engine, client)
    assert after["metrics"]["other"] == before["metrics"]["other"]
    assert after["metrics"]["filtered"] == before["metrics"]["filtered"]
    assert after["metrics"]["sub"] != before["metrics"]["sub"]  # the own message moved

    def rows_of_others(state):
        return [row for row in state["rows"]["subscription_messages"] if row.subscription_id != "sub"]

    assert rows_of_others(after) == rows_of_others(before)


@pytest.mark.parametrize("action", ACTS_ON)
def test_ids_posted_to_a_missing_subscription_are_404_and_change_nothing(queues, client, unchanged, action):
    ids = [queues.ids["sub"]["delivered"], queues.ids["sub"]["dlq"]]
    with unchanged():
        assert_refused(client.post(f"/subscriptions/nope/{action}", json=ids), 404)


# --- behind gunicorn ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(database_url, tmp_path_factory):
    """`flask pubsub serve` (one worker) with SMALL_LIMIT; its port."""
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    env = serve_env(
        DATABASE_URL=database_url,
        API_PORT=str(port),
        API_NUM_WORKERS="1",
        API_NUM_THREADS="2",
        API_MAX_BODY_BYTES=str(SMALL_LIMIT),
    )
    with serving(env, log) as process:
        wait_until_live(process, port, log)
        yield port


def send_raw(port: int, request: bytes) -> tuple[int, bytes]:
    """Bytes on a new connection, as no HTTP client library would send them: the status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def chunked(path: bytes, body: bytes) -> bytes:
    pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + encoded
    )


@pytest.mark.slow
@pytest.mark.parametrize("body", STREAMED.values(), ids=STREAMED)
def test_behind_gunicorn_a_chunked_body_over_the_limit_is_413_and_changes_nothing(
    served, queues, unchanged, body
):
    with unchanged():
        status, text = send_raw(served, chunked(b"/topics/orders/messages", body))
        assert status == 413, text


@pytest.mark.slow
def test_behind_gunicorn_a_chunked_body_within_the_limit_is_accepted(served, queues, api):
    status, text = send_raw(served, chunked(b"/topics/orders/messages", padded(b'[{"n": 9}]', SMALL_LIMIT)))
    assert status == 204, text
    assert api.metrics("sub")["available"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "target",
    [
        b"/subscriptions/sub/messages?consumer_id=\xff",
        b"/subscriptions/sub\xff/messages?consumer_id=c",
        b"/subscriptions/sub/messages?consumer_id=\x00",
        b"/subscriptions/sub/messages?consumer_id=" + b"c" * 100_000,
        b"/topics/" + b"x" * 100_000,
    ],
    ids=["raw byte in query", "raw byte in path", "raw NUL in query", "100 kB query", "100 kB path"],
)
def test_behind_gunicorn_hostile_request_lines_are_a_4xx_that_changes_nothing(
    served, queues, unchanged, target
):
    with unchanged():
        status, text = send_raw(
            served, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        assert 400 <= status < 500, text
