"""The Python client (client/, package pubsub_client) against the real server: `flask pubsub
serve` on a loopback port, auth off and auth on; and against a scripted local HTTP server for
what a real one does not do on demand (503s, lost answers, expiring tokens)."""

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pubsub_client import (
    AuthError,
    Client,
    ConflictError,
    Nack,
    NotFoundError,
    Publisher,
    PubSubError,
    ServerError,
    Subscriber,
    ValidationError,
)
from pubsub_client.errors import ConnectionFailedError

from tests.auth_support import SECRET_KEY, new_client
from tests.test_serve import free_port, serve_env, serving, wait_until_live

pytestmark = pytest.mark.slow

WAIT = 15  # seconds: bound of every wait for something asynchronous


def start_server(database_url: str, log, **settings: str):
    port = free_port()
    env = serve_env(DATABASE_URL=database_url, API_PORT=str(port), API_NUM_WORKERS="2", **settings)
    return port, serving(env, log)


@pytest.fixture(scope="module")
def url(database_url, tmp_path_factory) -> Iterator[str]:
    """A real server, auth off."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port, context = start_server(database_url, log)
    with context as process:
        wait_until_live(process, port, log)
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def auth_url(database_url, tmp_path_factory) -> Iterator[str]:
    """A real server, auth on."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port, context = start_server(database_url, log, AUTH_ENABLED="true", AUTH_SECRET_KEY=SECRET_KEY)
    with context as process:
        wait_until_live(process, port, log)
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def ps(url) -> Iterator[Client]:
    with Client(url) as client:
        client.create_topic("orders")
        yield client


def wait_for(predicate: Callable[[], object], what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"not within {timeout}s: {what}")


def drain(client: Client, subscription: str, consumer: str = "drain") -> list:
    messages, batch = [], client.consume(subscription, consumer, 100)
    while batch:
        messages.extend(batch)
        batch = client.consume(subscription, consumer, 100)
    return messages


# --- Calls and errors ---------------------------------------------------------------------------


def test_topic_and_subscription_calls_round_trip(ps):
    assert ps.get_topic("orders")["id"] == "orders"
    ps.create_topic("payments")
    assert [t["id"] for t in ps.list_topics()] == ["orders", "payments"]
    created = ps.create_subscription(
        "billing", "orders", filter={"country": ["BR"]}, max_delivery_attempts=3, ack_deadline_seconds=30
    )
    assert created["filter"] == {"country": ["BR"]} and created["ack_deadline_seconds"] == 30
    assert ps.get_subscription("billing") == created
    assert (
        ps.create_subscription("ledger", "orders", ordering_key="customer_id")["ordering_key"]
        == "customer_id"
    )
    assert [s["id"] for s in ps.list_subscriptions()] == ["billing", "ledger"]
    ps.delete_subscription("billing")
    ps.delete_subscription("ledger")
    ps.delete_topic("payments")
    assert ps.list_subscriptions() == [] and [t["id"] for t in ps.list_topics()] == ["orders"]


def test_listing_pages_through_more_than_one_page(ps):
    for n in range(105):
        ps.create_topic(f"t{n:03}")
    assert len(ps.list_topics()) == 106


@pytest.mark.parametrize(
    "call, kind, status, detail",
    [
        (lambda c: c.get_topic("missing"), NotFoundError, 404, "Topic not found"),
        (lambda c: c.delete_subscription("missing"), NotFoundError, 404, "Subscription not found"),
        (lambda c: c.publish("missing", [{"n": 1}]), NotFoundError, 404, "Topic not found"),
        (lambda c: c.consume("missing", "c1"), NotFoundError, 404, "Subscription not found"),
        (lambda c: c.create_topic("orders"), ConflictError, 409, "This topic already exists"),
        (lambda c: c.create_topic("not an id!"), ValidationError, 422, "Validation error"),
        (lambda c: c.consume("missing", "c1", batch_size=101), ValidationError, 422, "Validation error"),
    ],
)
def test_refusals_raise_typed_errors_with_the_servers_detail(ps, call, kind, status, detail):
    with pytest.raises(kind) as caught:
        call(ps)
    assert isinstance(caught.value, PubSubError)
    assert (caught.value.status, caught.value.detail) == (status, detail)
    if status == 422:
        assert caught.value.errors


def test_publish_returns_the_ids_that_consumers_get(ps):
    ps.create_subscription("sub", "orders")
    ids = ps.publish("orders", [{"n": n} for n in range(1500)])  # two requests
    assert len(ids) == len(set(ids)) == 1500
    messages = drain(ps, "sub")
    assert {m.id: m.payload["n"] for m in messages} == {i: n for n, i in enumerate(ids)}
    first = messages[0]
    assert first.delivery_attempts == 1 and first.ack_id.startswith(first.id)
    assert first.created_at.tzinfo is not None


def test_publish_with_a_delay_is_claimable_only_once_it_is_over(ps):
    ps.create_subscription("sub", "orders")
    [later] = ps.publish("orders", [{"n": 1}], delay_seconds=1)
    [due] = ps.publish(
        "orders", [{"n": 2}], deliver_at=datetime(2000, 1, 1, tzinfo=timezone(timedelta(hours=2)))
    )
    assert [m.id for m in ps.consume("sub", "c1", 10)] == [due]
    assert ps.metrics("sub")["delayed"] == 1
    got = wait_for(lambda: ps.consume("sub", "c1", 10), "the delayed message", timeout=3)
    assert [m.id for m in got] == [later]


def test_publish_with_deliver_at_sends_the_time_with_its_offset(ps):
    ps.create_subscription("sub", "orders")
    soon = datetime.now(timezone(timedelta(hours=-3))) + timedelta(seconds=60)
    ps.publish("orders", [{"n": 1}], deliver_at=soon)
    ps.publish("orders", [{"n": 2}], deliver_at=soon.isoformat())
    assert ps.consume("sub", "c1", 10) == [] and ps.metrics("sub")["delayed"] == 2


@pytest.mark.parametrize(
    "delay",
    [
        {"delay_seconds": 1, "deliver_at": "2030-01-01T00:00:00Z"},
        {"deliver_at": datetime(2030, 1, 1)},  # naive: whose clock?
    ],
    ids=["both", "naive"],
)
def test_a_delay_the_client_can_tell_is_wrong_raises_before_sending(ps, delay):
    with pytest.raises(ValueError):
        ps.publish("orders", [{"n": 1}], **delay)
    with pytest.raises(ValueError):
        Publisher(ps, "orders", **delay)


def test_a_delay_the_server_refuses_raises_a_validation_error(ps):
    with pytest.raises(ValidationError) as caught:
        ps.publish("orders", [{"n": 1}], deliver_at=datetime.now(UTC) + timedelta(days=8))
    assert "query.deliver_at" in caught.value.errors
    with pytest.raises(ValidationError):
        ps.publish("orders", [{"n": 1}], delay_seconds=-1)


def test_ack_nack_extend_use_lease_qualified_ids_so_a_stale_one_does_nothing(ps):
    ps.create_subscription("sub", "orders")
    ps.publish("orders", [{"n": 1}])
    (old,) = ps.consume("sub", "c1")
    ps.nack("sub", [old.ack_id], delay_seconds=0)
    (again,) = ps.consume("sub", "c2")
    assert again.id == old.id and again.ack_id != old.ack_id
    ps.ack("sub", [old.ack_id])  # late: settles nothing
    ps.extend("sub", [old.ack_id], seconds=60)
    assert ps.metrics("sub")["delivered"] == 1
    ps.extend("sub", [again.ack_id], seconds=60)
    ps.ack("sub", [again.ack_id])
    assert ps.metrics("sub") == {
        "subscription_id": "sub",
        "available": 0,
        "delayed": 0,
        "delivered": 0,
        "acked": 1,
        "dlq": 0,
        "waiting": 0,
    }


def test_dead_letters_are_listed_and_reprocessed(ps):
    ps.create_subscription("sub", "orders", max_delivery_attempts=1)
    ps.publish("orders", [{"n": 1}])
    (message,) = ps.consume("sub", "c1")
    ps.nack("sub", [message.ack_id])
    (dead,) = ps.dlq("sub")
    assert dead.id == message.id and dead.ack_id is None and dead.payload == {"n": 1}
    ps.reprocess("sub", [dead.id])
    (back,) = ps.consume("sub", "c1")
    assert back.id == message.id and back.delivery_attempts == 1


def test_operators_dead_letter_redrive_and_purge(ps):
    ps.create_subscription("sub", "orders", max_delivery_attempts=5)
    ids = ps.publish("orders", [{"n": n} for n in range(6)])
    batch = ps.consume("sub", "c1", 6)
    for message in batch:  # one by one: the DLQ keeps the order they died in
        ps.nack("sub", [message.ack_id], dead_letter=True)
    assert [m.id for m in ps.dlq("sub")] == [m.id for m in batch]
    assert ps.metrics("sub")["dlq"] == 6
    first = [m.id for m in batch[:2]]
    assert ps.redrive_dlq("sub", limit=2) == 2
    assert sorted(m.id for m in ps.consume("sub", "c1", 10)) == sorted(first)
    assert ps.purge_dlq("sub", [batch[2].id]) == 1
    assert ps.purge_dlq("sub") == 3
    assert ps.redrive_dlq("sub") == 0
    assert ps.purge("sub", before=datetime(2000, 1, 1, tzinfo=UTC)) == 0
    assert ps.purge("sub") == 2  # the two redriven, delivered to c1 above
    assert ps.metrics("sub") == {
        "subscription_id": "sub",
        "available": 0,
        "delivered": 0,
        "acked": 0,
        "delayed": 0,
        "dlq": 0,
        "waiting": 0,
    }
    assert len(ids) == 6
    with pytest.raises(ValueError):
        ps.purge("sub", before=datetime(2000, 1, 1))


def test_update_subscription_changes_only_what_is_given(ps):
    created = ps.create_subscription("sub", "orders", filter={"country": ["BR"]}, max_delivery_attempts=3)
    updated = ps.update_subscription("sub", max_delivery_attempts=7, ack_deadline_seconds=20)
    assert updated == {**created, "max_delivery_attempts": 7, "ack_deadline_seconds": 20}
    assert ps.update_subscription("sub", filter=None)["filter"] is None
    with pytest.raises(ValidationError) as caught:
        ps.update_subscription("sub", backoff_min_seconds=10_000)
    assert "json.backoff_min_seconds" in caught.value.errors
    with pytest.raises(NotFoundError):
        ps.update_subscription("missing", max_delivery_attempts=2)


def test_a_redriven_message_reaches_a_waiting_long_poll_consumer_at_once(ps):
    ps.create_subscription("sub", "orders", max_delivery_attempts=1)
    ps.publish("orders", [{"n": 1}])
    ps.nack("sub", [m.ack_id for m in ps.consume("sub", "c1")])
    got: list = []
    waiter = threading.Thread(target=lambda: got.extend(ps.consume("sub", "waiter", wait_seconds=10)))
    waiter.start()
    time.sleep(1.5)  # the waiter is parked, past its first re-check
    started = time.monotonic()
    assert ps.redrive_dlq("sub") == 1
    waiter.join(WAIT)
    assert [m.payload for m in got] == [{"n": 1}]
    # The NOTIFY wakes it; the re-check every LONG_POLL_RECHECK_SECONDS (1) would take longer.
    assert time.monotonic() - started < 0.5


# --- Tokens, against the real server with auth on -----------------------------------------------


def test_with_credentials_the_client_gets_a_token_and_works(app, auth_url):
    client_id, secret = new_client(app, "*")
    with Client(auth_url, client_id, secret) as client:
        client.create_topic("orders")
        client.create_subscription("sub", "orders")
        ids = client.publish("orders", [{"n": 1}])
        (message,) = client.consume("sub", "c1")
        assert message.id == ids[0]
        client.ack("sub", [message.ack_id])
        assert client.metrics("sub")["acked"] == 1


def test_a_rejected_token_is_renewed_once_and_the_call_retried(app, auth_url):
    client_id, secret = new_client(app, "*")
    with Client(auth_url, client_id, secret) as client:
        client.create_topic("orders")
        client._token = "not-a-token"  # what a revoked or expired token looks like to the server
        assert client.get_topic("orders")["id"] == "orders"
        assert client._token != "not-a-token"


def test_bad_credentials_and_missing_scopes_raise_auth_errors(app, auth_url):
    client_id, _ = new_client(app, "topics:read")
    with Client(auth_url, client_id, "0" * 64) as client, pytest.raises(AuthError) as caught:
        client.list_topics()
    assert (caught.value.status, caught.value.detail) == (401, "invalid client credentials")
    client_id, secret = new_client(app, "topics:read")
    with Client(auth_url, client_id, secret) as client, pytest.raises(AuthError) as caught:
        client.create_topic("orders")
    assert (caught.value.status, caught.value.detail) == (403, "Insufficient scope")
    with Client(auth_url) as client, pytest.raises(AuthError) as caught:
        client.list_topics()
    assert caught.value.status == 401


# --- A scripted server: retries, lost answers, token renewal ------------------------------------


class Script:
    """A local HTTP server answering each request with the next scripted answer: (status,
    headers, body), or None to read the request and close the connection without answering."""

    def __init__(self, answers: list, port: int = 0, tokens: bool = False):
        self.answers = list(answers)
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.tokens = 0
        script = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if tokens and self.path == "/oauth/token":
                    script.tokens += 1
                    answer = (201, {}, {"access_token": f"t{script.tokens}", "expires_in": 1})
                else:
                    script.requests.append((self.command, self.path, dict(self.headers), body))
                    answer = script.answers.pop(0)
                if answer is None:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, headers, payload = answer
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                if headers.get("X-Then-Close"):  # a kept-alive connection the server drops later
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_WR)  # the FIN; what comes next is unread
                    time.sleep(0.5)
                    self.close_connection = True

            do_GET = do_POST = do_DELETE = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def script() -> Iterator[Callable[..., Script]]:
    made = []

    def make(answers: list, **kwargs) -> Script:
        made.append(Script(answers, **kwargs))
        return made[-1]

    yield make
    for server in made:
        server.close()


UNAVAILABLE = (503, {"Retry-After": "1"}, {"detail": "database is unavailable"})
RECEIPT = (201, {}, {"data": [{"id": "m1", "subscriptions": 1}]})


def test_a_503_is_retried_after_its_retry_after(script):
    server = script([UNAVAILABLE, (200, {}, {"id": "orders", "created_at": "2026-12-06T00:00:00+00:00"})])
    with Client(server.url) as client:
        started = time.monotonic()
        assert client.get_topic("orders")["id"] == "orders"
        assert time.monotonic() - started >= 1
    assert len(server.requests) == 2


def test_503s_beyond_max_retries_raise_a_server_error(script):
    server = script([(503, {}, {"detail": "database is unavailable"})] * 3)
    with Client(server.url, max_retries=2) as client, pytest.raises(ServerError) as caught:
        client.metrics("sub")
    assert (caught.value.status, caught.value.detail) == (503, "database is unavailable")
    assert len(server.requests) == 3


def test_a_publish_is_never_sent_twice_after_a_503(script):
    """The server's 503 may follow a commit whose answer the database connection lost."""
    server = script([UNAVAILABLE, RECEIPT])
    with Client(server.url) as client, pytest.raises(ServerError) as caught:
        client.publish("orders", [{"n": 1}])
    assert caught.value.maybe_stored
    assert len(server.requests) == 1


def test_a_publish_whose_answer_is_lost_is_not_sent_again(script):
    server = script([None, RECEIPT])
    with Client(server.url) as client, pytest.raises(ConnectionFailedError) as caught:
        client.publish("orders", [{"n": 1}])
    assert caught.value.maybe_stored
    assert len(server.requests) == 1


def test_a_publish_is_not_sent_on_a_kept_alive_connection_the_server_closed(script):
    server = script([(201, {"X-Then-Close": "1"}, {"data": [{"id": "m1", "subscriptions": 1}]}), RECEIPT])
    with Client(server.url) as client:
        assert client.publish("orders", [{"n": 1}]) == ["m1"]
        time.sleep(0.1)  # the server has closed it by now; the client still holds it
        assert client.publish("orders", [{"n": 2}]) == ["m1"]
    assert len(server.requests) == 2


def test_a_read_whose_answer_is_lost_is_retried(script):
    server = script([None, (200, {}, {"data": []})])
    with Client(server.url) as client:
        assert client.consume("sub", "c1") == []
    assert len(server.requests) == 2


def test_a_publish_to_a_server_not_yet_listening_is_sent_once_it_listens(script):
    port = free_port()
    servers = []
    timer = threading.Timer(0.5, lambda: servers.append(script([RECEIPT], port=port)))
    timer.start()
    try:
        with Client(f"http://127.0.0.1:{port}", max_retries=10) as client:
            assert client.publish("orders", [{"n": 1}]) == ["m1"]
    finally:
        timer.join()
    assert [r[1] for r in servers[0].requests] == ["/topics/orders/messages"]
    assert servers[0].requests[0][2]["Prefer"] == "return=representation"


def test_a_token_is_renewed_before_it_expires(script):
    ok = (200, {}, {"data": []})
    server = script([ok, ok], tokens=True)
    with Client(server.url, "id", "secret") as client:
        client.consume("sub", "c1")
        time.sleep(0.9)  # the token lasts 1 s; it is renewed after 80% of that
        client.consume("sub", "c1")
    assert server.tokens == 2
    assert [r[2]["Authorization"] for r in server.requests] == ["Bearer t1", "Bearer t2"]


def test_a_401_renews_the_token_and_retries_once(script):
    unauthorized = (401, {"WWW-Authenticate": "Bearer"}, {"detail": "token has been revoked"})
    server = script([unauthorized, (200, {}, {"data": []}), unauthorized, unauthorized], tokens=True)
    with Client(server.url, "id", "secret") as client:
        assert client.consume("sub", "c1") == []
        with pytest.raises(AuthError) as caught:
            client.consume("sub", "c1")
    assert caught.value.detail == "token has been revoked"
    assert [r[2]["Authorization"] for r in server.requests] == ["Bearer t1", "Bearer t2"] + [
        "Bearer t2",
        "Bearer t3",
    ]


# --- Publisher ----------------------------------------------------------------------------------


def record_batches(client: Client, gate: threading.Event | None = None) -> list[int]:
    """Make the client record the size of each publish request (and wait for the gate first)."""
    sizes: list[int] = []
    publish_raw = client.publish_raw

    def recording(topic, body, **options):
        if gate is not None:
            assert gate.wait(WAIT)
        sizes.append(len(json.loads(body)))
        return publish_raw(topic, body, **options)

    client.publish_raw = recording
    return sizes


def test_publisher_futures_resolve_to_the_ids_consumers_get(ps):
    ps.create_subscription("sub", "orders")
    with Publisher(ps, "orders") as publisher:
        futures = [publisher.publish({"n": n}) for n in range(2500)]
    ids = [f.result(0) for f in futures]
    assert {m.id: m.payload["n"] for m in drain(ps, "sub")} == {i: n for n, i in enumerate(ids)}


def test_a_delayed_publishers_batches_share_its_delay(ps):
    ps.create_subscription("sub", "orders")
    with Publisher(ps, "orders", max_batch_messages=3, delay_seconds=60) as publisher:
        futures = [publisher.publish({"n": n}) for n in range(7)]
    assert len({f.result(0) for f in futures}) == 7
    assert ps.consume("sub", "c1", 10) == [] and ps.metrics("sub")["delayed"] == 7


def test_publisher_batches_by_count_and_by_bytes(ps):
    sizes = record_batches(ps)
    with Publisher(ps, "orders", max_batch_messages=10, linger_seconds=5) as publisher:
        for n in range(35):
            publisher.publish({"n": n})
    assert sizes == [10, 10, 10, 5]
    sizes.clear()
    one = len(json.dumps({"n": 10, "pad": "x" * 80}, separators=(",", ":"))) + 1
    with Publisher(ps, "orders", max_batch_bytes=2 + 4 * one, linger_seconds=5) as publisher:
        for n in range(10, 20):
            publisher.publish({"n": n, "pad": "x" * 80})
    assert sizes == [4, 4, 2]


def test_publisher_sends_a_partial_batch_after_the_linger(ps):
    with Publisher(ps, "orders", linger_seconds=0.2) as publisher:
        started = time.monotonic()
        future = publisher.publish({"n": 1})
        future.result(WAIT)
        assert 0.15 < time.monotonic() - started < 2


def test_publisher_blocks_when_max_queued_messages_wait(ps):
    gate = threading.Event()
    sizes = record_batches(ps, gate)
    publisher = Publisher(ps, "orders", max_queued_messages=5, linger_seconds=0)
    queued = []
    thread = threading.Thread(target=lambda: queued.extend(publisher.publish({"n": n}) for n in range(8)))
    thread.start()
    wait_for(lambda: len(sizes) == 0 and publisher._queued == 5, "five queued")
    time.sleep(0.2)
    assert thread.is_alive()  # the sixth publish waits for room
    gate.set()
    thread.join(WAIT)
    publisher.close(WAIT)
    assert len(queued) == 8 and all(f.result(0) for f in queued)


def test_publisher_close_flushes_and_then_refuses(ps):
    publisher = Publisher(ps, "orders", linger_seconds=10)
    futures = [publisher.publish({"n": n}) for n in range(3)]
    publisher.flush(WAIT)
    assert all(f.done() for f in futures)
    late = publisher.publish({"n": 3})
    publisher.close(WAIT)
    assert late.result(0)
    with pytest.raises(RuntimeError):
        publisher.publish({"n": 4})
    with pytest.raises(TypeError):
        Publisher(ps, "orders").publish(["not", "an", "object"])


def test_a_failed_batch_fails_each_of_its_futures(ps):
    with Publisher(ps, "missing") as publisher:
        futures = [publisher.publish({"n": n}) for n in range(3)]
    for future in futures:
        with pytest.raises(NotFoundError):
            future.result(0)


# --- Subscriber ---------------------------------------------------------------------------------


def test_subscriber_handles_every_message_exactly_once_and_acks_its_deliveries(ps):
    ps.create_subscription("sub", "orders")
    ids = ps.publish("orders", [{"n": n} for n in range(3000)])
    seen: list[tuple[str, str]] = []
    sent: list[str] = []
    ack = ps.ack
    ps.ack = lambda subscription, ack_ids: (sent.extend(ack_ids), ack(subscription, ack_ids))[1]
    subscriber = ps.subscribe("sub", lambda m: seen.append((m.id, m.ack_id)), wait_seconds=1)
    wait_for(lambda: len(seen) >= 3000, "every message handled")
    subscriber.stop(WAIT)
    assert sorted(i for i, _ in seen) == sorted(ids)
    # By lease-qualified ack ids, in batches: an ack that comes too late settles nothing.
    assert sorted(sent) == sorted(a for _, a in seen) and all(a.startswith(f"{i}:") for i, a in seen)
    metrics = ps.metrics("sub")
    assert (metrics["acked"], metrics["available"], metrics["delivered"]) == (3000, 0, 0)


def test_a_handler_that_raises_nacks_until_the_dlq(ps):
    ps.create_subscription(
        "sub", "orders", max_delivery_attempts=2, backoff_min_seconds=1, backoff_max_seconds=1
    )
    attempts = []

    def fail(message):
        attempts.append(message.delivery_attempts)
        raise RuntimeError("poison")

    with Subscriber(ps, "sub", fail, wait_seconds=1):
        ps.publish("orders", [{"n": 1}])
        wait_for(lambda: ps.metrics("sub")["dlq"] == 1, "the message dead-lettered")
    assert attempts == [1, 2]


def test_a_handler_raising_nack_with_a_delay_sees_the_message_again_after_it(ps):
    ps.create_subscription("sub", "orders")
    seen = []

    def handler(message):
        seen.append((message.delivery_attempts, time.monotonic()))
        if message.delivery_attempts == 1:
            raise Nack(delay_seconds=1)

    with Subscriber(ps, "sub", handler, wait_seconds=1):
        ps.publish("orders", [{"n": 1}])
        wait_for(lambda: len(seen) == 2, "the second delivery")
    assert seen[1][1] - seen[0][1] >= 0.9
    assert ps.metrics("sub")["acked"] == 1


def test_a_slow_handler_keeps_its_lease_past_the_ack_deadline(ps):
    ps.create_subscription("sub", "orders", ack_deadline_seconds=10)  # the server's minimum
    calls = []

    def slow(message):
        calls.append(message.id)
        time.sleep(12)

    with Subscriber(ps, "sub", slow, wait_seconds=1):
        ps.publish("orders", [{"n": 1}])
        wait_for(lambda: calls, "the handler started")
        started = time.monotonic()
        while time.monotonic() - started < 11.5:  # past the deadline: nobody else gets it
            assert ps.consume("sub", "other") == []
            time.sleep(0.25)
        wait_for(lambda: ps.metrics("sub")["acked"] == 1, "the slow ack")
    assert len(calls) == 1


def test_stop_finishes_running_handlers_and_gives_back_the_rest(ps):
    ps.create_subscription("sub", "orders")
    ps.publish("orders", [{"n": n} for n in range(20)])
    release, calls = threading.Event(), []

    def blocked(message):
        calls.append(message.id)
        assert release.wait(WAIT)

    subscriber = Subscriber(ps, "sub", blocked, max_workers=1, max_outstanding=50, wait_seconds=1).start()
    wait_for(lambda: calls and ps.metrics("sub")["delivered"] == 20, "all 20 received, one started")
    stopper = threading.Thread(target=subscriber.stop, args=(WAIT,))
    stopper.start()
    time.sleep(0.3)
    assert stopper.is_alive()  # waiting for the running handler
    release.set()
    stopper.join(WAIT)
    assert not stopper.is_alive() and len(calls) == 1
    metrics = ps.metrics("sub")
    assert (metrics["delivered"], metrics["acked"], metrics["available"]) == (0, 1, 19)
    assert len(ps.consume("sub", "next", 100)) == 19  # nacked with no delay: available at once


def test_a_handler_may_stop_its_own_subscriber(ps):
    ps.create_subscription("sub", "orders")
    ps.publish("orders", [{"n": n} for n in range(10)])
    calls = []

    def handle_one(message):
        calls.append(message.id)
        subscriber.stop()

    subscriber = Subscriber(ps, "sub", handle_one, max_workers=1, wait_seconds=1)
    subscriber.start().wait(WAIT)
    assert len(calls) == 1
    metrics = ps.metrics("sub")
    assert (metrics["acked"], metrics["available"], metrics["delivered"]) == (1, 9, 0)
    started = time.monotonic()
    Subscriber(ps, "sub", handle_one).stop()  # never started: nothing to wait for
    assert time.monotonic() - started < 1


def test_stop_waits_for_a_long_poll_and_gives_back_what_it_brings(ps):
    """A cut long poll would still claim what arrives for it, leased to nobody."""
    ps.create_subscription("sub", "orders")
    calls = []
    subscriber = ps.subscribe("sub", calls.append, wait_seconds=3, max_outstanding=10)
    time.sleep(0.5)  # both pulls are waiting
    stopper = threading.Thread(target=subscriber.stop, args=(WAIT,))
    stopper.start()
    time.sleep(0.2)
    ps.publish("orders", [{"n": 1}])
    stopper.join(WAIT)
    assert not subscriber.running and calls == []
    metrics = ps.metrics("sub")
    assert (metrics["delivered"], metrics["available"]) == (0, 1)


def test_a_subscriber_of_a_deleted_subscription_stops_with_the_error(ps):
    ps.create_subscription("sub", "orders")
    subscriber = ps.subscribe("sub", lambda m: None, wait_seconds=1)
    ps.delete_subscription("sub")
    with pytest.raises(NotFoundError):
        subscriber.wait(WAIT)


# --- Command line -------------------------------------------------------------------------------


def cli(url: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pubsub_client", "--url", url, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_publishes_stdin_and_tails_with_and_without_ack(ps, url):
    ps.create_subscription("sub", "orders")
    published = cli(url, "publish", "orders", stdin="".join(f'{{"n": {n}}}\n' for n in range(5)) + "\n")
    assert published.returncode == 0, published.stderr
    assert "published 5 messages" in published.stderr

    looked = cli(url, "tail", "sub", "--max", "3", "--wait-seconds", "1")
    assert looked.returncode == 0, looked.stderr
    assert len([json.loads(line) for line in looked.stdout.splitlines()]) == 3
    assert ps.metrics("sub")["delivered"] == 0  # given back

    taken = cli(url, "tail", "sub", "--ack", "--max", "5", "--wait-seconds", "1")
    assert sorted(json.loads(line)["payload"]["n"] for line in taken.stdout.splitlines()) == list(range(5))
    assert ps.metrics("sub")["acked"] == 5
