"""Long-poll consume (issue 6, point 4): GET /subscriptions/{id}/messages?wait_seconds=N.

A waiting consume holds no database connection: one LISTEN connection per process (channel
"pubsub", payload the subscription id, application_name "pubsub-listener") wakes it when a
publish gives its subscription messages, and a periodic re-check (LONG_POLL_RECHECK_SECONDS)
covers what no NOTIFY announces (backoff, lease expiry, reprocess, nack) and notifications lost
while the LISTEN connection was down; that connection reconnects by itself.

Waiters run in threads, each with its own Flask test client, or against the real gunicorn server
(tests/test_serve.py). Every wait is bounded; every thread is joined and every server stopped,
also when a test fails.
"""

import http.client
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import psycopg
import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from pubsub import create_app, db, listener, observability
from pubsub.listener import SharedWakes
from tests.conftest import serve_settings
from tests.test_serve import free_port, output_of, request, serve_env, serving, wait_until_live

LISTENER = "pubsub-listener"  # application_name of the LISTEN connection
CHANNEL = "pubsub"
SLACK = 1.5  # seconds allowed on top of what a wake-up should take, for a loaded CI machine
JOIN_TIMEOUT = 30  # seconds; above any wait here (at most 15 s) plus a slow claim


def libpq_url(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(False)


@pytest.fixture
def new_app(database_settings, pg) -> Iterator[Callable[..., Flask]]:
    """Apps of this test only, with some settings changed; their listener and engine are gone at
    the end (the session's make_app keeps its apps, and their listeners, until the session ends)."""
    apps = []
    known = listener_pids(pg)

    def make(**overrides) -> Flask:
        app = create_app({**database_settings, "TESTING": True, **overrides})
        apps.append(app)
        return app

    yield make
    for app in apps:
        db.dispose(app)  # stops the app's listener too
    # Stopped means gone: the listener threads have closed their connections.
    wait_for(lambda: not listener_pids(pg) - known, 5, "the stopped listeners to disconnect")


@pytest.fixture
def app(new_app) -> Flask:
    """Overrides conftest's session app: each test's listener is its own, and stopped with it."""
    return new_app()


@pytest.fixture
def pg(database_url) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test database, for pg_stat_activity and LISTEN."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        yield conn


def listener_pids(pg: psycopg.Connection) -> set[int]:
    rows = pg.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
        [LISTENER],
    ).fetchall()
    return {pid for (pid,) in rows}


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02):
    """Poll until predicate() is truthy and return it; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(interval)


def new_listener(pg: psycopg.Connection, known: set[int], timeout: float = 5.0) -> int:
    """The pid of the one listener backend not in `known` (this app's), once it is there."""
    pids = wait_for(lambda: listener_pids(pg) - known, timeout, "a listener connection")
    assert len(pids) == 1, f"{len(pids)} new listener connections"
    return pids.pop()


class Waiter(threading.Thread):
    """One consume request in a thread of its own, on a test client of its own."""

    def __init__(self, app: Flask, subscription: str, consumer: str, wait: int, batch_size: int = 10):
        super().__init__(name=f"waiter-{consumer}", daemon=True)
        self.app, self.subscription = app, subscription
        self.query = {"consumer_id": consumer, "wait_seconds": wait, "batch_size": batch_size}
        self.status: int | None = None
        self.body: dict | None = None
        self.error: BaseException | None = None
        self.started = self.finished = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        super().start()

    def run(self) -> None:
        try:
            response = self.app.test_client().get(
                f"/subscriptions/{self.subscription}/messages", query_string=self.query
            )
            self.status, self.body = response.status_code, response.get_json()
        except BaseException as error:  # reported by result(), not as an unhandled thread error
            self.error = error
        finally:
            self.finished = time.monotonic()

    def result(self, timeout: float = JOIN_TIMEOUT) -> list:
        """The messages it got (asserting a 200), once it has returned."""
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} still waiting after {timeout}s"
        assert self.error is None, repr(self.error)
        assert self.status == 200, self.body
        return self.body["data"]

    @property
    def elapsed(self) -> float:
        return self.finished - self.started


@pytest.fixture
def start_waiter() -> Iterator[Callable[..., Waiter]]:
    """Start a Waiter; every one is joined at the end, whatever happens."""
    waiters: list[Waiter] = []

    def start(app: Flask, subscription: str = "sub", consumer: str = "waiter", wait: int = 10, **kw):
        waiter = Waiter(app, subscription, consumer, wait, **kw)
        waiters.append(waiter)
        waiter.start()
        return waiter

    yield start
    for waiter in waiters:
        waiter.join(JOIN_TIMEOUT)
    assert not [w.name for w in waiters if w.is_alive()], "waiters left running"


def setup(client, subscriptions: dict[str, dict] | None = None, topic: str = "orders") -> None:
    """A topic and its subscriptions (id → extra fields), through the API."""
    assert client.post("/topics", json={"id": topic}).status_code == 201
    for subscription, fields in (subscriptions or {"sub": {}}).items():
        body = {"id": subscription, "topic_id": topic, **fields}
        response = client.post("/subscriptions", json=body)
        assert response.status_code == 201, response.get_json()


def publish(client, payloads: list, topic: str = "orders") -> float:
    """Publish and return when the publish had committed (its response arrived)."""
    response = client.post(f"/topics/{topic}/messages", json=payloads)
    assert response.status_code == 204, response.get_json()
    return time.monotonic()


def consume(client, subscription: str = "sub", consumer: str = "c1", **query) -> tuple[list, float]:
    """A consume answered 200: its messages and how long it took."""
    started = time.monotonic()
    response = client.get(
        f"/subscriptions/{subscription}/messages", query_string={"consumer_id": consumer, **query}
    )
    assert response.status_code == 200, response.get_json()
    return response.get_json()["data"], time.monotonic() - started


def post_ids(client, path: str, ids: list, **query) -> float:
    response = client.post(path, json=ids, query_string=query)
    assert response.status_code == 204, response.get_json()
    return time.monotonic()


def one(messages: list) -> dict:
    assert len(messages) == 1, messages
    return messages[0]


# --- The parameter ------------------------------------------------------------------------------


@pytest.mark.parametrize("wait", [-1, 21, 100, "ten", "1.5", ""])
def test_wait_seconds_outside_0_to_20_or_not_a_whole_number_is_a_422(client, wait):
    setup(client)
    response = client.get(
        "/subscriptions/sub/messages", query_string={"consumer_id": "c", "wait_seconds": wait}
    )
    assert response.status_code == 422, response.get_json()
    assert response.get_json()["detail"]


def test_wait_seconds_0_answers_at_once_as_before(client):
    setup(client)
    for query in ({}, {"wait_seconds": 0}):
        assert consume(client, **query)[1] < 0.5
        assert consume(client, **query)[0] == []
    publish(client, [{"n": 1}])
    [message], elapsed = consume(client, wait_seconds=0)
    assert message["payload"] == {"n": 1} and elapsed < 0.5


def test_a_waiting_consume_of_a_missing_subscription_is_a_404_at_once(client):
    started = time.monotonic()
    response = client.get(
        "/subscriptions/nowhere/messages", query_string={"consumer_id": "c", "wait_seconds": 5}
    )
    assert response.status_code == 404
    assert time.monotonic() - started < 1


def test_available_messages_are_returned_at_once_without_waiting(client):
    setup(client)
    publish(client, [{"n": 1}, {"n": 2}])
    messages, elapsed = consume(client, wait_seconds=10)
    assert [m["payload"]["n"] for m in messages] == [1, 2]
    assert elapsed < 1


def test_a_waiting_consume_returns_an_empty_list_when_the_wait_ends(client):
    setup(client)
    messages, elapsed = consume(client, wait_seconds=1)
    assert messages == []
    assert 0.9 <= elapsed < 3


# --- Wake-ups -----------------------------------------------------------------------------------


def test_a_publish_wakes_a_waiting_consumer_at_once(new_app, pg, start_waiter):
    # The re-check is 30 s away: only the NOTIFY can wake the waiter within the bound.
    known = listener_pids(pg)  # before the app: its listener may start with it
    app = new_app(LONG_POLL_RECHECK_SECONDS=30)
    client = app.test_client()
    setup(client)
    waiter = start_waiter(app, wait=10)
    new_listener(pg, known)
    time.sleep(max(0.0, waiter.started + 0.3 - time.monotonic()))
    assert waiter.is_alive(), "returned before anything was published"
    published = publish(client, [{"n": 1}])
    assert [m["payload"] for m in waiter.result()] == [{"n": 1}]
    latency = waiter.finished - published
    assert latency < 1.5, f"woken {latency:.2f}s after the publish"


def test_a_publish_to_another_subscription_does_not_end_the_wait(app, client, start_waiter):
    setup(client)
    setup(client, {"other": {}}, topic="other-topic")
    # Nor does a publish to the waiter's own topic that its filter keeps out (no copy, no wake-up).
    setup(client, {"br-only": {"filter": {"country": ["BR"]}}}, topic="countries")
    waiter = start_waiter(app, wait=2)
    waiter_br = start_waiter(app, "br-only", "waiter-br", wait=2)
    time.sleep(0.3)
    publish(client, [{"n": 1}], topic="other-topic")
    publish(client, [{"country": "US"}], topic="countries")
    assert waiter.result() == [] and waiter_br.result() == []
    assert waiter.elapsed >= 1.9 and waiter_br.elapsed >= 1.9
    assert consume(client, "other")[0][0]["payload"] == {"n": 1}


def test_many_waiters_hold_no_database_connection_and_each_gets_one_message(new_app, start_waiter):
    app = new_app(DATABASE_POOL_SIZE=2, DATABASE_MAX_OVERFLOW=0)
    client = app.test_client()
    setup(client)
    engine = db.get_engine(app)
    waiters = [start_waiter(app, consumer=f"w{i}", wait=10, batch_size=1) for i in range(12)]
    # Twelve claims through a pool of two take milliseconds; then every waiter waits, connectionless.
    time.sleep(1.0)
    for _ in range(10):
        assert engine.pool.checkedout() == 0
        time.sleep(0.05)
    assert all(w.is_alive() for w in waiters), "a waiter returned before anything was published"

    published = publish(client, [{"n": n} for n in range(12)])
    got = [w.result() for w in waiters]
    assert all(len(messages) == 1 for messages in got), got
    assert sorted(messages[0]["payload"]["n"] for messages in got) == list(range(12))
    assert len({messages[0]["id"] for messages in got}) == 12
    slowest = max(w.finished for w in waiters) - published
    assert slowest < 3, f"the last waiter returned {slowest:.2f}s after the publish"
    assert engine.pool.checkedout() == 0


def test_waiters_beyond_the_processes_capacity_are_declined_at_once_and_say_so(new_app, start_waiter):
    app = new_app(LONG_POLL_MAX_WAITERS=1)
    client = app.test_client()
    setup(client)
    waiter = start_waiter(app, wait=10)
    time.sleep(0.5)
    started = time.monotonic()
    response = client.get(
        "/subscriptions/sub/messages", query_string={"consumer_id": "second", "wait_seconds": 10}
    )
    assert response.status_code == 200 and response.get_json() == {"data": []}
    assert time.monotonic() - started < 1
    assert response.headers["Pubsub-Long-Poll"] == "declined"
    assert waiter.is_alive()
    published = publish(client, [{"n": 1}])
    assert [m["payload"] for m in waiter.result()] == [{"n": 1}]
    assert waiter.finished - published < SLACK
    # The place is free again: the next long poll waits, and says nothing of declining.
    response = client.get(
        "/subscriptions/sub/messages", query_string={"consumer_id": "third", "wait_seconds": 1}
    )
    assert response.get_json() == {"data": []} and "Pubsub-Long-Poll" not in response.headers
    # A declined long poll still gets what is there, as without wait_seconds.
    setup(client, {"sub2": {}}, topic="other")
    waiter = start_waiter(app, "sub2", consumer="fourth", wait=3)
    time.sleep(0.3)
    publish(client, [{"n": 2}])
    messages, elapsed = consume(client, consumer="fifth", wait_seconds=10)
    assert [m["payload"] for m in messages] == [{"n": 2}] and elapsed < 1
    assert waiter.result() == []


def test_backoff_expiry_wakes_a_waiter_within_two_seconds(app, client, start_waiter):
    setup(client, {"sub": {"backoff_min_seconds": 1}})
    publish(client, [{"n": 1}])
    [message], _ = consume(client)
    nacked = post_ids(client, "/subscriptions/sub/nacks", [message["id"]])  # due again in 1 s
    waiter = start_waiter(app, consumer="c2", wait=10)
    again = one(waiter.result())
    assert again["id"] == message["id"] and again["delivery_attempts"] == 2
    assert 0.8 <= waiter.finished - nacked < 2 + SLACK


def test_a_nack_with_no_delay_wakes_a_waiter(app, client, start_waiter):
    setup(client)
    publish(client, [{"n": 1}])
    [message], _ = consume(client)
    waiter = start_waiter(app, consumer="c2", wait=10)
    time.sleep(0.3)
    assert waiter.is_alive()
    nacked = post_ids(client, "/subscriptions/sub/nacks", [message["id"]], delay_seconds=0)
    again = one(waiter.result())
    assert again["id"] == message["id"]
    assert waiter.finished - nacked < 1 + SLACK


def test_reprocessing_a_dead_letter_wakes_a_waiter(app, client, start_waiter):
    setup(client, {"sub": {"max_delivery_attempts": 1}})
    publish(client, [{"n": 1}])
    [message], _ = consume(client)
    post_ids(client, "/subscriptions/sub/nacks", [message["id"]])  # attempts used up: to the DLQ
    assert client.get("/subscriptions/sub/dlq").get_json()["data"][0]["id"] == message["id"]
    waiter = start_waiter(app, consumer="c2", wait=10)
    time.sleep(0.3)
    assert waiter.is_alive()
    reprocessed = post_ids(client, "/subscriptions/sub/dlq/reprocess", [message["id"]])
    again = one(waiter.result())
    assert again["id"] == message["id"] and again["delivery_attempts"] == 1
    assert waiter.finished - reprocessed < 1 + SLACK


def test_lease_expiry_wakes_a_waiter(app, client, start_waiter):
    setup(client)
    publish(client, [{"n": 1}])
    [message], _ = consume(client)
    # The lease would last the default 60 s: shortened to end 1 s from now.
    extended = post_ids(client, "/subscriptions/sub/extend", [message["id"]], seconds=1)
    waiter = start_waiter(app, consumer="c2", wait=10)
    again = one(waiter.result())
    assert again["id"] == message["id"] and again["delivery_attempts"] == 2
    assert 0.8 <= waiter.finished - extended < 2 + SLACK


# --- Who wakes ------------------------------------------------------------------------------------


def claims() -> float:
    """Claim statements run in this process so far (pubsub_claims_total)."""
    return next(
        s.value for m in observability.CLAIMS.collect() for s in m.samples if s.name.endswith("_total")
    )


def waiting(app: Flask) -> int:
    return listener.get_listener(app).waiting


def test_a_publish_of_k_messages_wakes_k_of_many_waiters_and_the_others_go_on_waiting(
    new_app, pg, start_waiter
):
    known = listener_pids(pg)
    app = new_app(LONG_POLL_RECHECK_SECONDS=30)  # no re-check in the window: only notifications wake
    client = app.test_client()
    setup(client)
    waiters = [start_waiter(app, consumer=f"w{i}", wait=4, batch_size=1) for i in range(20)]
    wait_for(lambda: waiting(app) == 20, 5, "20 waiting consumers")
    new_listener(pg, known)  # connected: it has woken everyone once, to look for themselves
    time.sleep(0.3)
    before = claims()
    for k, served in ((1, 1), (3, 4)):
        publish(client, [{"k": k, "n": n} for n in range(k)])
        wait_for(lambda n=served: sum(not w.is_alive() for w in waiters) == n, 2, f"{served} served")
    time.sleep(0.3)
    assert claims() - before == 4, f"{claims() - before} claims for 4 messages"
    assert waiting(app) == 16
    still = [w for w in waiters if w.is_alive()]
    got = [w.result() for w in waiters if w not in still]
    assert sorted((m["payload"]["k"], m["payload"]["n"]) for ms in got for m in ms) == [
        (1, 0),
        (3, 0),
        (3, 1),
        (3, 2),
    ]
    assert all(w.result() == [] for w in still)


def test_a_long_poll_joining_waiters_of_a_drained_subscription_waits_without_claiming(
    new_app, pg, start_waiter
):
    known = listener_pids(pg)
    app = new_app(LONG_POLL_RECHECK_SECONDS=30)
    client = app.test_client()
    setup(client)
    first = start_waiter(app, consumer="first", wait=4)  # claims, finds nothing: drained
    wait_for(lambda: waiting(app) == 1, 5, "the first waiter")
    new_listener(pg, known)
    time.sleep(0.3)
    before = claims()
    second = start_waiter(app, consumer="second", wait=4)
    wait_for(lambda: waiting(app) == 2, 5, "the second waiter")
    assert claims() == before
    publish(client, [{"n": 1}, {"n": 2}])  # one notification, two messages: the first waiter's batch
    assert len(first.result()) == 2
    time.sleep(0.3)
    assert second.is_alive() and claims() - before == 1
    publish(client, [{"n": 3}])
    assert [m["payload"] for m in second.result()] == [{"n": 3}]


def test_every_long_poll_claims_at_once_while_a_backlog_drains(new_app, start_waiter):
    app = new_app(LONG_POLL_RECHECK_SECONDS=30)
    client = app.test_client()
    setup(client)
    waiter = start_waiter(app, subscription="sub", consumer="idle", wait=4)
    wait_for(lambda: waiting(app) == 1, 5, "an idle waiter")
    publish(client, [{"n": n} for n in range(45)])
    # The idle waiter takes 10; its full batch wakes no one else, so each new long poll claims.
    assert len(waiter.result()) == 10
    for expected in (10, 10, 10, 5):
        messages, elapsed = consume(client, consumer="next", wait_seconds=4)
        assert len(messages) == expected and elapsed < 1


def test_a_full_batch_wakes_another_waiter_for_what_it_left(new_app, start_waiter):
    app = new_app(LONG_POLL_RECHECK_SECONDS=30)
    client = app.test_client()
    setup(client)
    # Waits of 10 s and a bound of 8: without the wake-up, what is left waits for a wait's end
    # (the re-check is 30 s away); the 2 s between leave room for a loaded machine.
    waiters = [start_waiter(app, consumer=f"w{i}", wait=10, batch_size=2) for i in range(3)]
    wait_for(lambda: waiting(app) == 3, 5, "3 waiting consumers")
    time.sleep(0.2)
    # Published in two statements, as two publishers would: the first wakes one waiter for one
    # message; if that one claims both, the full batch wakes the next for what may be left.
    publish(client, [{"n": 1}])
    publish(client, [{"n": 2}, {"n": 3}])
    wait_for(
        lambda: sum(len(w.body["data"]) for w in waiters if not w.is_alive() and w.body) == 3,
        8,
        "all 3 claimed",
    )


def test_a_subscription_deleted_under_its_waiters_answers_them_404(new_app, start_waiter):
    app = new_app(LONG_POLL_RECHECK_SECONDS=1)
    client = app.test_client()
    setup(client)
    waiter = start_waiter(app, consumer="first", wait=10)
    wait_for(lambda: waiting(app) == 1, 5, "a waiter")
    time.sleep(0.2)
    assert client.delete("/subscriptions/sub").status_code == 204
    started = time.monotonic()
    response = client.get(
        "/subscriptions/sub/messages", query_string={"consumer_id": "late", "wait_seconds": 10}
    )
    assert response.status_code == 404, response.get_json()
    assert time.monotonic() - started < 1 + SLACK
    waiter.join(JOIN_TIMEOUT)
    assert waiter.status == 404


def test_a_long_poll_that_joins_waiters_still_checks_its_token_at_once(make_app, start_waiter):
    from tests.auth_support import SECRET_KEY, bearer, new_client, token_request

    app = make_app(AUTH_ENABLED=True, AUTH_SECRET_KEY=SECRET_KEY, LONG_POLL_RECHECK_SECONDS=30)
    client = app.test_client()
    admin = bearer(token_request(client, *new_client(app, "*")).json["access_token"])
    assert client.post("/topics", json={"id": "orders"}, headers=admin).status_code == 201
    assert (
        client.post("/subscriptions", json={"id": "sub", "topic_id": "orders"}, headers=admin).status_code
        == 201
    )
    consumer_id, secret = new_client(app, "subscriptions:consume:sub", name="c")
    token = bearer(token_request(client, consumer_id, secret).json["access_token"])
    query = {"consumer_id": "c", "wait_seconds": 3}
    first = threading.Thread(
        target=lambda: client.get("/subscriptions/sub/messages", query_string=query, headers=admin)
    )
    first.start()
    try:
        wait_for(lambda: waiting(app) == 1, 5, "a waiter")
        time.sleep(0.2)
        body = {"name": "c", "scopes": "subscriptions:consume:sub", "is_active": False}
        assert client.put(f"/clients/{consumer_id}", json=body, headers=admin).status_code == 200
        started = time.monotonic()
        response = client.get("/subscriptions/sub/messages", query_string=query, headers=token)
        assert response.status_code == 401 and response.get_json()["detail"] == "token has been revoked"
        assert time.monotonic() - started < 1
    finally:
        first.join(JOIN_TIMEOUT)
        db.dispose(app)


# --- The LISTEN connection ----------------------------------------------------------------------


def test_one_listener_connection_serves_every_waiter_of_the_process(new_app, pg, start_waiter):
    known = listener_pids(pg)
    app = new_app()
    client = app.test_client()
    setup(client, {"sub": {}, "sub2": {}})
    for round_ in range(2):
        waiters = [
            start_waiter(app, subscription, f"{subscription}-{round_}-{i}", wait=10, batch_size=1)
            for subscription in ("sub", "sub2")
            for i in range(4)
        ]
        new_listener(pg, known)
        for _ in range(10):  # while all eight wait
            assert len(listener_pids(pg) - known) == 1
            time.sleep(0.05)
        assert all(w.is_alive() for w in waiters)
        publish(client, [{"n": n} for n in range(4)])  # one message for each waiter
        assert all(len(w.result()) == 1 for w in waiters)
        assert len(listener_pids(pg) - known) <= 1


def terminate(pg: psycopg.Connection, pid: int) -> None:
    assert pg.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()[0]
    wait_for(lambda: pid not in listener_pids(pg), 5, f"backend {pid} to exit")


def test_a_killed_listener_connection_reconnects_and_no_wake_up_is_lost(new_app, pg, start_waiter):
    recheck = 2
    known = listener_pids(pg)
    app = new_app(LONG_POLL_RECHECK_SECONDS=recheck)
    client = app.test_client()
    setup(client)
    waiter = start_waiter(app, wait=10)
    killed = new_listener(pg, known)
    terminate(pg, killed)

    # Published while the listener may still be down: its NOTIFY may be lost, the re-check is not.
    published = publish(client, [{"n": 1}])
    assert [m["payload"] for m in waiter.result()] == [{"n": 1}]
    assert waiter.finished - published < recheck + SLACK

    # It reconnected by itself, once, and NOTIFY wakes waiters promptly again: well within the
    # re-check period, twice in a row, which the re-check alone would seldom manage.
    reconnected = new_listener(pg, known | {killed}, timeout=10)
    for n in (2, 3):
        waiter = start_waiter(app, consumer=f"after-{n}", wait=10)
        time.sleep(0.3)
        assert waiter.is_alive()
        published = publish(client, [{"n": n}])
        assert [m["payload"] for m in waiter.result()] == [{"n": n}]
        assert waiter.finished - published < 0.5 * recheck
    assert listener_pids(pg) - known == {reconnected}


def test_a_publish_sends_at_most_one_notification_per_subscription(new_app, pg, database_url, start_waiter):
    known = listener_pids(pg)
    app = new_app()
    client = app.test_client()
    setup(client, {"sub": {}, "sub2": {}})
    # A connection of its own that runs nothing after LISTEN, so no notification is consumed unseen.
    with psycopg.connect(libpq_url(database_url), autocommit=True) as listening:
        listening.execute(f"LISTEN {CHANNEL}")
        waiter = start_waiter(app, wait=10)
        new_listener(pg, known)
        time.sleep(0.2)
        publish(client, [{"n": n} for n in range(50)])  # one statement: 50 copies for each subscription
        assert len(waiter.result()) == 10
        notifications = list(listening.notifies(timeout=1.0))
    assert {n.channel for n in notifications} == {CHANNEL}
    # "<subscription> <messages it got> <transaction id>"
    payloads = [n.payload.split(" ") for n in notifications]
    per_subscription = Counter(subscription for subscription, _, _ in payloads)
    assert per_subscription["sub"] == 1, per_subscription
    assert max(per_subscription.values()) == 1, per_subscription
    assert set(per_subscription) <= {"sub", "sub2"}
    assert {count for _, count, _ in payloads} == {"50"}
    assert len({xid for _, _, xid in payloads}) == 1 and payloads[0][2].isdigit()


def test_stopping_the_app_closes_its_listener_connection_at_once(new_app, pg, start_waiter):
    # However long the re-check period, stopping does not wait for it.
    known = listener_pids(pg)
    app = new_app(LONG_POLL_RECHECK_SECONDS=30)
    client = app.test_client()
    setup(client)
    waiter = start_waiter(app, wait=10)
    new_listener(pg, known)
    time.sleep(0.2)
    publish(client, [{"n": 1}])
    assert len(waiter.result()) == 1
    started = time.monotonic()
    db.dispose(app)
    wait_for(lambda: not listener_pids(pg) - known, 5, "the listener to disconnect")
    assert time.monotonic() - started < 2


# --- The real server ----------------------------------------------------------------------------


def http_get(port: int, path: str, timeout: float = 15) -> tuple[int, object, float]:
    return http_request(port, "GET", path, timeout=timeout)


def http_request(
    port: int, method: str, path: str, body=None, timeout: float = 15
) -> tuple[int, object, float]:
    """One request on a new connection: status, decoded JSON body, seconds it took."""
    started = time.monotonic()
    status, answer = request(port, method, path, body, timeout)
    return status, answer, time.monotonic() - started


class HttpWaiter(threading.Thread):
    def __init__(self, port: int, path: str):
        super().__init__(name=f"http-waiter {path}", daemon=True)
        self.port, self.path = port, path
        self.outcome: tuple[int, object, float] | None = None
        self.error: BaseException | None = None
        self.finished = 0.0

    def run(self) -> None:
        try:
            self.outcome = http_get(self.port, self.path)
        except BaseException as error:
            self.error = error
        finally:
            self.finished = time.monotonic()


def declined_header(port: int, path: str) -> tuple[int, str | None, float]:
    """A GET on a new connection: its status, its Pubsub-Long-Poll header, seconds it took."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("Pubsub-Long-Poll"), time.monotonic() - started
    finally:
        conn.close()


@pytest.mark.slow
def test_waiting_consumers_take_no_thread_that_serves_requests(database_settings, pg, tmp_path):
    """A gunicorn worker serves requests with API_NUM_THREADS threads (here 2) and lets up to
    LONG_POLL_MAX_WAITERS consumers (here 40) wait beside them, each in a thread of its own that
    holds no database connection and, while it waits, none of the API_NUM_THREADS: everything
    else is answered at once meanwhile. The 41st long poll is declined at once, and says so."""
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(
        **serve_settings(database_settings),
        API_PORT=str(port),
        API_NUM_WORKERS="1",
        API_NUM_THREADS="2",
        LONG_POLL_MAX_WAITERS="40",
        LONG_POLL_RECHECK_SECONDS="30",
    )
    waiters: list[HttpWaiter] = []
    known = listener_pids(pg)  # this process's, if any
    try:
        with serving(env, log) as process:
            wait_until_live(process, port, log)
            assert http_request(port, "POST", "/topics", {"id": "other"})[0] == 201
            waiting_on_server(port, 40, "wait_seconds=8&batch_size=1", waiters)
            assert all(w.is_alive() for w in waiters)

            # Meanwhile the two request threads answer everything else quickly.
            for n in range(5):
                status, _, took = http_get(port, "/topics")
                assert status == 200 and took < 1
                status, _, took = http_request(port, "POST", "/topics/other/messages", [{"n": n}])
                assert status == 204 and took < 1
            status, header, took = declined_header(
                port, "/subscriptions/sub/messages?consumer_id=late&wait_seconds=5"
            )
            assert (status, header) == (200, "declined") and took < 1
            assert all(w.is_alive() for w in waiters)

            # One listener connection for the worker, and a publish of 40 wakes all 40 at once.
            assert len(listener_pids(pg) - known) == 1
            status, _, _ = http_request(
                port, "POST", "/topics/orders/messages", [{"n": n} for n in range(40)]
            )
            published = time.monotonic()
            assert status == 204
            got = []
            for w in waiters:
                w.join(JOIN_TIMEOUT)
                assert w.error is None and w.outcome[0] == 200, w.outcome
                assert len(w.outcome[1]["data"]) == 1
                got.append(w.outcome[1]["data"][0]["payload"]["n"])
                assert w.finished - published < SLACK
            assert sorted(got) == list(range(40))
            assert "Traceback" not in output_of(log)
    finally:
        for waiter in waiters:
            waiter.join(JOIN_TIMEOUT)


def waiting_on_server(port: int, count: int, query: str, waiters: list[HttpWaiter]) -> None:
    """Topic orders, its subscription sub, and `count` consumers long-polling it (`query`), added
    to `waiters` (for the caller to join, whatever happens) and all waiting."""
    assert http_request(port, "POST", "/topics", {"id": "orders"})[0] == 201
    assert http_request(port, "POST", "/subscriptions", {"id": "sub", "topic_id": "orders"})[0] == 201
    path = "/subscriptions/sub/messages?consumer_id="
    for i in range(count):
        waiters.append(HttpWaiter(port, f"{path}c{i}&{query}"))
        waiters[-1].start()
    wait_for(
        lambda: metric_value(port, "pubsub_long_poll_waiting") == count, 10, f"{count} waiting consumers"
    )


def metric_value(port: int, name: str) -> float:
    """A sample of /metrics without labels (0 when absent)."""
    status, text = request(port, "GET", "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    return 0.0


def test_worker_processes_share_out_a_notifications_messages(tmp_path):
    path = str(tmp_path / "wakes")
    SharedWakes.create(path)
    first, second = SharedWakes(path), SharedWakes(path)
    try:
        # (taken, left for the others), whichever process reads the notification first.
        assert first.take("sub 3 100", 3, 2) == (2, 1)
        assert second.take("sub 3 100", 3, 5) == (1, 0)
        assert first.take("sub 3 100", 3, 5) == (0, 0)
        assert second.take("sub 3 101", 3, 0) == (0, 3)  # no idle waiter there: all left
        assert first.take("sub 3 101", 3, 3) == (3, 0)
        assert second.take("other 1 101", 1, 1) == (1, 0)
    finally:
        first.close()
        second.close()


@pytest.mark.slow
def test_two_workers_wake_about_one_waiter_per_published_message(database_settings, tmp_path):
    """Both worker processes receive every notification; the first with idle waiters takes its
    messages, so a message costs about one claim in the server, not one per worker."""
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(
        **serve_settings(database_settings),
        API_PORT=str(port),
        API_NUM_WORKERS="2",
        LONG_POLL_RECHECK_SECONDS="30",
    )
    waiters: list[HttpWaiter] = []
    try:
        with serving(env, log) as process:
            wait_until_live(process, port, log)
            # A wait longer than the bound on their joining: a worker slow to boot (a loaded CI
            # machine) delays the first polls, and a waiter that gave up would never be counted.
            waiting_on_server(port, 30, "wait_seconds=15&batch_size=1", waiters)
            time.sleep(0.3)  # every first claim is counted
            before = metric_value(port, "pubsub_claims_total")
            for n in range(10):
                assert http_request(port, "POST", "/topics/orders/messages", [{"n": n}])[0] == 204
                time.sleep(0.05)
            wait_for(lambda: sum(not w.is_alive() for w in waiters) == 10, 5, "10 waiters served")
            time.sleep(0.3)
            claims = metric_value(port, "pubsub_claims_total") - before
            assert 10 <= claims <= 13, f"{claims} claims for 10 messages"
            got = sorted(w.outcome[1]["data"][0]["payload"]["n"] for w in waiters if not w.is_alive())
            assert got == list(range(10))
            # The other 20 get a message each rather than keeping the test for their whole wait.
            assert (
                http_request(port, "POST", "/topics/orders/messages", [{"n": n} for n in range(10, 30)])[0]
                == 204
            )
            wait_for(lambda: not any(w.is_alive() for w in waiters), 5, "every waiter served")
    finally:
        for waiter in waiters:
            waiter.join(JOIN_TIMEOUT)


@pytest.mark.slow
def test_a_stopping_server_answers_its_waiting_consumers_at_once(database_settings, tmp_path):
    """SIGTERM: the workers stop taking connections and their waiting consumers get an empty
    answer at once, instead of keeping the server up for the rest of their wait."""
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(**serve_settings(database_settings), API_PORT=str(port), API_NUM_WORKERS="2")
    waiters: list[HttpWaiter] = []
    try:
        with serving(env, log) as process:
            wait_until_live(process, port, log)
            waiting_on_server(port, 10, "wait_seconds=20", waiters)
            stopped = time.monotonic()
            process.send_signal(signal.SIGTERM)
            for w in waiters:
                w.join(JOIN_TIMEOUT)
                assert w.error is None and w.outcome[:2] == (200, {"data": []}), (w.outcome, w.error)
                assert w.finished - stopped < 3
            assert process.wait(15) == 0
            assert time.monotonic() - stopped < 8
    finally:
        for waiter in waiters:
            waiter.join(JOIN_TIMEOUT)


@pytest.mark.slow
def test_a_long_poll_its_client_gave_up_on_claims_nothing(database_settings, tmp_path):
    """A consumer that hangs up while waiting: the publish that wakes its poll is claimed by
    someone still there, not leased to no one until the ack deadline."""
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(**serve_settings(database_settings), API_PORT=str(port), API_NUM_WORKERS="1")
    with serving(env, log) as process:
        wait_until_live(process, port, log)
        assert http_request(port, "POST", "/topics", {"id": "orders"})[0] == 201
        assert http_request(port, "POST", "/subscriptions", {"id": "sub", "topic_id": "orders"})[0] == 201
        gone = socket.create_connection(("127.0.0.1", port))
        path = b"/subscriptions/sub/messages?consumer_id=gone&wait_seconds=20"
        gone.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: metric_value(port, "pubsub_long_poll_waiting") == 1, 10, "the poll waiting")
        gone.close()
        time.sleep(0.3)
        assert http_request(port, "POST", "/topics/orders/messages", [{"n": 1}])[0] == 204
        wait_for(lambda: metric_value(port, "pubsub_long_poll_waiting") == 0, 5, "the poll to end")
        status, body, _ = http_get(port, "/subscriptions/sub/messages?consumer_id=here")
        assert status == 200 and [m["payload"] for m in body["data"]] == [{"n": 1}]
