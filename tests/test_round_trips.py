"""Round trips to PostgreSQL per request, counted on the wire (libpq's protocol trace of the
pool's connections): one for each request a busy consumer makes, the empty answers and the
requests that change nothing included; and as many with auth on, since each of these requests
checks its token's revocation in its own statement (issue 14)."""

import tempfile
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
import sqlalchemy as sa

from pubsub import db
from tests.auth_support import bearer


def trace_round_trips(app) -> Iterator[Callable[[Callable[[], object]], int]]:
    """count(action): how many round trips the app's pooled connections made while it ran."""
    engine = db.get_engine(app)
    # New connections: one that an earlier test left with work for later (psycopg deallocates
    # the statements it prepared in a transaction that rolled back) would count that work here.
    engine.dispose()
    trace = tempfile.TemporaryFile("w+")

    def checkout(dbapi_connection, record, proxy) -> None:
        dbapi_connection.pgconn.trace(trace.fileno())
        dbapi_connection.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)

    def checkin(dbapi_connection, record) -> None:
        dbapi_connection.pgconn.untrace()

    sa.event.listen(engine, "checkout", checkout)
    sa.event.listen(engine, "checkin", checkin)

    def count(action: Callable[[], object]) -> int:
        trace.seek(0)
        trace.truncate()
        action()
        trace.seek(0)
        # Each simple query, and each extended-protocol exchange (ended by Sync), ends with one
        # ReadyForQuery from the server: one per round trip.
        return sum(1 for line in trace if line.startswith("B\t") and "\tReadyForQuery" in line)

    yield count
    sa.event.remove(engine, "checkout", checkout)
    sa.event.remove(engine, "checkin", checkin)
    trace.close()


@pytest.fixture
def round_trips(app) -> Iterator[Callable[[Callable[[], object]], int]]:
    yield from trace_round_trips(app)


@pytest.fixture
def auth_round_trips(auth_app) -> Iterator[Callable[[Callable[[], object]], int]]:
    yield from trace_round_trips(auth_app)


@pytest.fixture
def queue(api) -> None:
    api.create_topic("orders")
    api.create_subscription("sub", "orders")


def expect(status: int, response) -> None:
    assert response.status_code == status, response.get_data(as_text=True)


def test_the_count_sees_every_round_trip(round_trips, engine):
    def three() -> None:
        with engine.connect() as conn:  # BEGIN, the statement, ROLLBACK
            conn.execute(sa.text("SELECT 1"))

    assert round_trips(three) == 3


def test_consume_ack_nack_and_extend_are_one_round_trip_each(round_trips, queue, api, client):
    api.publish("orders", [{"n": n} for n in range(4)])
    messages = []

    def consume() -> None:
        messages.extend(api.consume("sub", batch_size=4))

    assert round_trips(consume) == 1
    ids = [message["id"] for message in messages]
    assert round_trips(lambda: expect(204, client.post("/subscriptions/sub/extend", json=ids[:1]))) == 1
    assert round_trips(lambda: expect(204, client.post("/subscriptions/sub/nacks", json=ids[1:2]))) == 1
    assert round_trips(lambda: expect(204, client.post("/subscriptions/sub/acks", json=ids[2:]))) == 1
    assert round_trips(lambda: api.publish("orders", [{"n": 4}])) == 1


def test_what_a_busy_consumer_meets_when_nothing_happens_is_one_round_trip(round_trips, queue, api, client):
    api.publish("orders", [{"n": 1}])
    [message] = api.consume("sub")
    api.ack("sub", [message["id"]])
    again = [message["id"], message["ack_id"]]
    prefer = {"Prefer": "return=representation"}
    assert round_trips(lambda: expect(200, client.get("/subscriptions/sub/messages?consumer_id=c"))) == 1
    assert round_trips(lambda: expect(204, client.post("/subscriptions/sub/acks", json=again))) == 1
    assert round_trips(lambda: expect(204, client.post("/subscriptions/sub/acks", json=again[:1]))) == 1
    assert (
        round_trips(lambda: expect(200, client.post("/subscriptions/sub/acks", json=again, headers=prefer)))
        == 1
    )
    assert round_trips(lambda: expect(204, client.post("/subscriptions/sub/nacks", json=again))) == 1
    assert round_trips(lambda: expect(204, client.post("/subscriptions/sub/extend", json=again))) == 1


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/subscriptions/nope/messages?consumer_id=c", None),
        ("post", "/subscriptions/nope/acks", [str(uuid.uuid4())]),
        ("post", "/subscriptions/nope/nacks", [str(uuid.uuid4())]),
        ("post", "/subscriptions/nope/extend", [str(uuid.uuid4())]),
    ],
)
def test_a_missing_subscription_is_a_404_in_one_round_trip(round_trips, client, method, path, body):
    assert round_trips(lambda: expect(404, getattr(client, method)(path, json=body))) == 1


def test_with_auth_on_a_publish_checks_its_token_in_its_own_statement(
    auth_round_trips, auth_client, queue, token_for
):
    headers = bearer(token_for("topics:publish"))
    prefer = {**headers, "Prefer": "return=representation"}

    def publish(status: int, headers: dict, topic: str = "orders") -> None:
        expect(status, auth_client.post(f"/topics/{topic}/messages", json=[{"n": 1}], headers=headers))

    assert auth_round_trips(lambda: publish(204, headers)) == 1
    assert auth_round_trips(lambda: publish(201, prefer)) == 1
    assert auth_round_trips(lambda: publish(404, headers, "missing")) == 1


def test_with_auth_on_consume_ack_nack_and_extend_are_still_one_round_trip_each(
    auth_round_trips, auth_client, queue, api, token_for
):
    api.publish("orders", [{"n": n} for n in range(4)])
    token = bearer(token_for("subscriptions:consume:sub"))
    path = "/subscriptions/sub"
    consumed = []

    def consume() -> None:
        response = auth_client.get(f"{path}/messages?consumer_id=c&batch_size=4", headers=token)
        expect(200, response)
        consumed.extend(message["id"] for message in response.json["data"])

    def post(status: int, action: str, ids: list, headers: dict | None = None) -> None:
        expect(status, auth_client.post(f"{path}/{action}", json=ids, headers={**token, **(headers or {})}))

    assert auth_round_trips(consume) == 1
    assert auth_round_trips(lambda: post(204, "extend", consumed[:1])) == 1
    assert auth_round_trips(lambda: post(204, "nacks", consumed[1:2])) == 1
    assert (
        auth_round_trips(lambda: post(200, "acks", consumed[2:3], {"Prefer": "return=representation"})) == 1
    )
    assert auth_round_trips(lambda: post(204, "acks", consumed[3:])) == 1
    assert auth_round_trips(lambda: post(204, "acks", consumed[3:])) == 1  # nothing left to ack
