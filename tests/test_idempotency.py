"""Idempotent publish (issue 16, point 1): a publish with an Idempotency-Key stores once per topic
and key within PUBLISH_IDEMPOTENCY_SECONDS; a repeat gets the first answer, the same message ids
included; another body with the same key is a 422; concurrent requests with one key store once;
the cleanup command forgets old keys."""

import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from pubsub import clients, db, idempotency
from pubsub.errors import RetryConflict
from tests.auth_support import bearer, new_client, token_request
from tests.conftest import threaded_server
from tests.history import (
    Client,
    Consumer,
    Delivery,
    History,
    Producer,
    Publish,
    Settle,
    check,
    drain,
    wait_until_consumed,
)

PUBLISH = "/topics/orders/messages"
PREFER = {"Prefer": "return=representation"}
WAIT = 10  # seconds: bound of every wait for another thread or backend


def keyed(key: str, **headers: str) -> dict[str, str]:
    return {"Idempotency-Key": key, **headers}


@pytest.fixture
def orders(api):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    api.create_subscription("other", "orders")
    return api


def stored(api, subscription: str = "sub") -> list[dict]:
    """Every message in the subscription (leased by the look)."""
    return api.consume(subscription, batch_size=100)


def test_a_repeat_stores_nothing_and_gets_the_first_answer_with_the_same_ids(orders, client):
    body = [{"n": 1}, {"n": 2}]
    first = client.post(PUBLISH, json=body, headers=keyed("k-1", **PREFER))
    assert first.status_code == 201, first.json
    assert "Idempotent-Replayed" not in first.headers
    assert [r["subscriptions"] for r in first.json["data"]] == [2, 2]
    again = client.post(PUBLISH, json=body, headers=keyed("k-1", **PREFER))
    assert again.status_code == 201, again.json
    assert again.json == first.json
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Preference-Applied"] == "return=representation"
    plain = client.post(PUBLISH, json=body, headers=keyed("k-1"))
    assert plain.status_code == 204 and plain.headers["Idempotent-Replayed"] == "true"
    assert [m["id"] for m in stored(orders)] == [r["id"] for r in first.json["data"]]
    assert orders.metrics("other")["available"] == 2


def test_a_repeat_asking_for_receipts_gets_the_ids_a_first_publish_without_them_stored(orders, client):
    first = client.post(PUBLISH, json=[{"n": 1}, {"n": 2}], headers=keyed("k-1"))
    assert first.status_code == 204 and "Idempotent-Replayed" not in first.headers
    again = client.post(PUBLISH, json=[{"n": 1}, {"n": 2}], headers=keyed("k-1", **PREFER))
    assert again.status_code == 201, again.json
    ids = [m["id"] for m in stored(orders)]
    assert again.json["data"] == [{"id": i, "subscriptions": 2} for i in ids]


def test_the_same_key_with_another_body_is_a_422_and_stores_nothing(orders, client):
    assert client.post(PUBLISH, json=[{"n": 1}], headers=keyed("k-1")).status_code == 204
    other = client.post(PUBLISH, json=[{"n": 2}], headers=keyed("k-1"))
    assert other.status_code == 422
    assert other.json == {"detail": idempotency.KEY_REUSED}
    assert [m["payload"] for m in stored(orders)] == [{"n": 1}]


def test_a_keyed_publish_may_be_delayed_and_its_repeat_must_ask_for_the_same_delay(orders, client):
    delayed = f"{PUBLISH}?delay_seconds=60"
    first = client.post(delayed, json=[{"n": 1}], headers=keyed("k-1", **PREFER))
    assert first.status_code == 201, first.json
    metrics = orders.metrics("sub")
    assert (metrics["delayed"], metrics["available"]) == (1, 0)  # stored, not yet claimable
    again = client.post(delayed, json=[{"n": 1}], headers=keyed("k-1", **PREFER))
    assert (again.status_code, again.json) == (201, first.json)
    for other in (PUBLISH, f"{PUBLISH}?delay_seconds=30"):  # no delay, or another one
        response = client.post(other, json=[{"n": 1}], headers=keyed("k-1"))
        assert (response.status_code, response.json) == (422, {"detail": idempotency.KEY_REUSED})
    assert orders.metrics("sub")["delayed"] == 1
    late = client.post(f"{PUBLISH}?deliver_at=2999-01-01T00:00:00Z", json=[{"n": 2}], headers=keyed("k-2"))
    assert late.status_code == 422, late.json  # too far ahead: refused, and the key not taken
    assert client.post(PUBLISH, json=[{"n": 2}], headers=keyed("k-2")).status_code == 204


def test_keys_are_per_topic(orders, client):
    orders.create_topic("payments")
    orders.create_subscription("pay", "payments")
    for path in (PUBLISH, "/topics/payments/messages"):
        response = client.post(path, json=[{"n": 1}], headers=keyed("k-1"))
        assert response.status_code == 204 and "Idempotent-Replayed" not in response.headers
    assert len(stored(orders)) == len(stored(orders, "pay")) == 1


def test_a_repeat_of_a_refused_publish_is_a_new_publish(api, client):
    missing = client.post(PUBLISH, json=[{"n": 1}], headers=keyed("k-1"))
    assert missing.status_code == 404 and missing.json == {"detail": "Topic not found"}
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    nul = client.post(
        PUBLISH, data=b'[{"s": "\\u0000"}]', content_type="application/json", headers=keyed("k-2")
    )
    assert nul.status_code == 422 and nul.json["detail"].startswith("invalid data:")
    for key in ("k-1", "k-2"):
        response = client.post(PUBLISH, json=[{"n": 1}], headers=keyed(key))
        assert response.status_code == 204 and "Idempotent-Replayed" not in response.headers
    assert len(stored(api)) == 2


def test_a_key_in_double_quotes_is_the_same_key(orders, client):
    assert client.post(PUBLISH, json=[{"n": 1}], headers=keyed('"k-1"')).status_code == 204
    again = client.post(PUBLISH, json=[{"n": 1}], headers=keyed("k-1"))
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(stored(orders)) == 1


@pytest.mark.parametrize(
    "key",
    [
        "",
        " ",
        "x" * 256,
        "two words",
        "a,b",
        '"unclosed',
        '"a"b"',
        "caf\u00e9".encode().decode("latin-1"),
        "tab\tkey",
    ],
)
def test_an_invalid_key_is_a_422_naming_the_header_and_stores_nothing(orders, client, key):
    response = client.post(PUBLISH, json=[{"n": 1}], headers=keyed(key))
    assert response.status_code == 422, response.json
    assert response.json["detail"] == "Validation error"
    assert list(response.json["errors"]) == ["headers.Idempotency-Key"]
    assert stored(orders) == []


def test_the_longest_key_and_every_allowed_character_are_accepted(orders, client):
    for key in ("x" * 255, "Az09-._~:+/="):
        assert client.post(PUBLISH, json=[{"n": 1}], headers=keyed(key)).status_code == 204
    assert len(stored(orders)) == 2


def test_after_the_window_a_key_is_new_again(orders, make_app):
    client = make_app(PUBLISH_IDEMPOTENCY_SECONDS=2).test_client()
    first = client.post(PUBLISH, json=[{"n": 1}], headers=keyed("k-1", **PREFER))
    time.sleep(2.1)
    again = client.post(PUBLISH, json=[{"n": 1}], headers=keyed("k-1", **PREFER))
    assert again.status_code == 201 and "Idempotent-Replayed" not in again.headers
    assert again.json["data"][0]["id"] != first.json["data"][0]["id"]
    replay = client.post(PUBLISH, json=[{"n": 1}], headers=keyed("k-1", **PREFER))
    assert replay.json == again.json and replay.headers["Idempotent-Replayed"] == "true"
    assert len(stored(orders)) == 2


def test_a_key_record_that_vanished_since_the_claim_answers_409_retry(app, orders):
    with app.app_context(), db.begin() as conn, pytest.raises(RetryConflict) as conflict:
        idempotency.stored_receipts(conn, "orders", "gone", idempotency.body_hash(b"[]"))
    assert conflict.value.status == 409 and conflict.value.headers == {"Retry-After": "1"}


def test_deleting_the_topic_forgets_its_keys(orders, client):
    assert client.post(PUBLISH, json=[{"n": 1}], headers=keyed("k-1")).status_code == 204
    assert client.delete("/topics/orders").status_code == 204
    orders.create_topic("orders")
    orders.create_subscription("sub", "orders")
    again = client.post(PUBLISH, json=[{"n": 1}], headers=keyed("k-1"))
    assert again.status_code == 204 and "Idempotent-Replayed" not in again.headers
    assert len(stored(orders)) == 1


# --- concurrent requests with one key ------------------------------------------------------------


def backends_waiting(engine: sa.Engine, query_part: str) -> list[int]:
    """The pids of backends waiting for a lock in a statement that contains query_part."""
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database() AND position(:part in query) > 0"
                ),
                {"part": query_part},
            ).scalars()
        )


# The publish statement as pg_stat_activity shows it: its first 1 kB (track_activity_query_size),
# where its lock on the subscriptions, further down, is not.
PUBLISH_STATEMENT = "WITH revoked AS MATERIALIZED"


def wait_for_waiters(engine: sa.Engine, query_part: str, count: int) -> list[int]:
    deadline = time.monotonic() + WAIT
    while len(pids := backends_waiting(engine, query_part)) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{count} backends never waited in {query_part!r}: {pids}")
        time.sleep(0.01)
    return pids


@pytest.fixture
def subscription_lock(engine):
    """Hold the subscriptions' rows FOR UPDATE, which a publish's FOR KEY SHARE waits for, until
    release() (or the end of the test)."""
    conn = engine.connect()
    transaction = conn.begin()
    conn.execute(sa.text("SELECT id FROM subscriptions FOR UPDATE"))
    yield transaction.rollback
    if transaction.is_active:
        transaction.rollback()
    conn.close()


class Requests:
    """Publishes sent in threads, each with a test client of its own."""

    def __init__(self, app):
        self.app = app
        self.threads: list[threading.Thread] = []
        self.answers: dict[str, object] = {}

    def send(self, name: str, body: list, headers: dict) -> None:
        def run() -> None:
            self.answers[name] = self.app.test_client().post(PUBLISH, json=body, headers=headers)

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> dict:
        for thread in self.threads:
            thread.join(WAIT)
            assert not thread.is_alive(), f"{thread.name} still waiting"
        return self.answers


@pytest.fixture
def requests(app):
    sent = Requests(app)
    yield sent
    for thread in sent.threads:
        thread.join(WAIT)


def test_concurrent_requests_with_one_key_store_once_and_all_get_its_ids(
    app, engine, orders, subscription_lock, requests
):
    body = [{"n": 1}, {"n": 2}, {"n": 3}]
    requests.send("first", body, keyed("k-1", **PREFER))
    wait_for_waiters(engine, PUBLISH_STATEMENT, 1)  # it holds the key, publishing
    for n in range(4):
        requests.send(f"repeat-{n}", body, keyed("k-1", **PREFER))
    wait_for_waiters(engine, "INSERT INTO publish_keys", 4)  # they wait on its key
    subscription_lock()
    answers = requests.join()
    assert {a.status_code for a in answers.values()} == {201}
    assert len({str(a.json) for a in answers.values()}) == 1
    assert [name for name, a in answers.items() if "Idempotent-Replayed" not in a.headers] == ["first"]
    assert [m["id"] for m in stored(orders)] == [r["id"] for r in answers["first"].json["data"]]


def test_a_repeat_waiting_on_a_publish_that_fails_publishes_itself(
    app, engine, orders, subscription_lock, requests
):
    body = [{"n": 1}]
    requests.send("first", body, keyed("k-1", **PREFER))
    [first_pid] = wait_for_waiters(engine, PUBLISH_STATEMENT, 1)
    requests.send("repeat", body, keyed("k-1", **PREFER))
    wait_for_waiters(engine, "INSERT INTO publish_keys", 1)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_cancel_backend(:pid)"), {"pid": first_pid}).scalar()
    time.sleep(0.2)  # the first rolls back while the lock is still held; the repeat now publishes
    subscription_lock()
    answers = requests.join()
    assert answers["first"].status_code == 503
    assert answers["repeat"].status_code == 201 and "Idempotent-Replayed" not in answers["repeat"].headers
    assert [m["id"] for m in stored(orders)] == [answers["repeat"].json["data"][0]["id"]]


# --- the cleanup command -------------------------------------------------------------------------


def test_cleanup_forgets_keys_older_than_asked_and_a_forgotten_key_publishes_again(orders, client, runner):
    for key in ("k-1", "k-2"):
        assert client.post(PUBLISH, json=[{"n": 1}], headers=keyed(key)).status_code == 204
    kept = runner.invoke(args=["pubsub", "cleanup-idempotency-keys", "--older-than", "3600"])
    assert kept.exit_code == 0, kept.output
    assert "deleted 0 idempotency keys older than 3600s" in kept.output
    time.sleep(0.01)
    result = runner.invoke(args=["pubsub", "cleanup-idempotency-keys", "--older-than", "0"])
    assert result.exit_code == 0, result.output
    assert "deleted 2 idempotency keys older than 0s" in result.output
    again = client.post(PUBLISH, json=[{"n": 1}], headers=keyed("k-1"))
    assert again.status_code == 204 and "Idempotent-Replayed" not in again.headers
    assert len(stored(orders)) == 3


def test_cleanup_defaults_to_the_window_and_deletes_in_chunks(orders, client, make_app, monkeypatch):
    for n in range(5):
        assert client.post(PUBLISH, json=[{"n": n}], headers=keyed(f"k-{n}")).status_code == 204
    monkeypatch.setattr(idempotency, "DELETE_CHUNK", 2)
    runner = make_app(PUBLISH_IDEMPOTENCY_SECONDS=1).test_cli_runner()
    time.sleep(1.05)
    result = runner.invoke(args=["pubsub", "cleanup-idempotency-keys"])
    assert "deleted 5 idempotency keys older than 1s" in result.output, result.output


def test_cleanup_refuses_a_negative_age_in_one_line(runner):
    result = runner.invoke(args=["pubsub", "cleanup-idempotency-keys", "--older-than", "-1"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("Error:") and len(result.output.strip().splitlines()) == 1


def test_the_cleanup_reads_only_the_records_it_deletes(app, orders, client):
    for n in range(5):
        assert client.post(PUBLISH, json=[], headers=keyed(f"old-{n}")).status_code == 204
    with app.app_context(), db.begin() as conn:
        cutoff = idempotency.key_cutoff(conn, 0)
    with app.app_context(), db.begin() as conn:
        for n in range(500):
            idempotency.publish_once(conn, "orders", f"new-{n}", b"[]", 3600)
    with app.app_context(), db.begin() as conn:
        conn.execute(sa.text("ANALYZE publish_keys"))
        explain = sa.text(f"EXPLAIN (ANALYZE, FORMAT JSON) {idempotency.DELETE_EXPIRED_KEYS.text}")
        plan = conn.execute(explain, {"cutoff": cutoff, "limit": 100}).scalar()[0]["Plan"]
    scans = list(plan_nodes(plan, "Scan"))
    # Whichever way in the planner takes to the rows (their address or the index again), no scan
    # reads a row that is not deleted.
    assert scans and "Seq Scan" not in {node["Node Type"] for node in scans}, plan
    assert [node["Actual Rows"] * node["Actual Loops"] for node in scans] == [5] * len(scans), plan
    assert "ix_publish_keys_created_at" in {node.get("Index Name") for node in scans}, plan


def plan_nodes(node: dict, kind: str):
    if kind in node["Node Type"]:
        yield node
    for child in node.get("Plans", ()):
        yield from plan_nodes(child, kind)


# --- auth on ---------------------------------------------------------------------------------------


def test_with_auth_on_a_keyed_publish_needs_the_scope_and_a_current_token(auth_app, auth_client, orders):
    def token(scopes: str) -> tuple[str, dict]:
        client_id, secret = new_client(auth_app, scopes)
        return client_id, bearer(token_request(auth_client, client_id, secret).json["access_token"])

    client_id, publisher = token("topics:publish:orders")
    headers = {**publisher, **keyed("k-1", **PREFER)}
    first = auth_client.post(PUBLISH, json=[{"n": 1}], headers=headers)
    assert first.status_code == 201, first.json
    again = auth_client.post(PUBLISH, json=[{"n": 1}], headers=headers)
    assert again.json == first.json and again.headers["Idempotent-Replayed"] == "true"
    assert auth_client.post(PUBLISH, json=[{"n": 1}], headers=keyed("k-1")).status_code == 401
    _, reader = token("topics:read")
    assert auth_client.post(PUBLISH, json=[{"n": 1}], headers={**reader, **keyed("k-1")}).status_code == 403
    with auth_app.app_context(), db.begin() as conn:
        clients.delete_client(conn, uuid.UUID(client_id))
    revoked = auth_client.post(PUBLISH, json=[{"n": 1}], headers=headers)
    assert revoked.status_code == 401 and revoked.json == {"detail": "token has been revoked"}
    assert len(stored(orders)) == 1


def test_the_openapi_document_marks_the_header_as_an_extension(client):
    operation = client.get("/openapi.json").json["paths"]["/topics/{id}/messages"]["post"]
    [header] = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
    assert header["in"] == "header" and not header["required"]
    assert header["x-pubsub-extension"] is True and "Extension to the fastpubsub API" in header["description"]
    assert "Extension to the fastpubsub API" in operation["responses"]["409"]["description"]
    assert "Idempotent-Replayed" in operation["responses"]["201"]["headers"]


# --- a publisher whose answers are lost, under the history checker -------------------------------


class CuttingProxy:
    """A loopback TCP proxy to the server that passes requests on whole and drops every
    `every`-th response: it reads that response to its end (so the server has committed and
    answered) and closes the client's connection instead of passing it on, as a network that
    fails after the server's commit would."""

    def __init__(self, target_port: int, every: int):
        self.target_port, self.every = target_port, every
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.responses = 0
        self.cut = 0
        self.sockets: list[socket.socket] = []
        self.threads = [self.start(self.serve)]

    def start(self, target, *args) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        return thread

    def serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=WAIT)
            except OSError:
                return  # closed
            with self.lock:
                self.sockets += [client, upstream]
                self.threads += [
                    self.start(self.pass_requests, client, upstream),
                    self.start(self.pass_responses, upstream, client),
                ]

    def pass_requests(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            close_both(client, upstream)

    def pass_responses(self, upstream: socket.socket, client: socket.socket) -> None:
        reader = upstream.makefile("rb")
        try:
            while head := read_head(reader):
                length = re.search(rb"\r\ncontent-length: *([0-9]+)", head, re.IGNORECASE)
                body = reader.read(int(length[1])) if length else b""
                with self.lock:
                    self.responses += 1
                    cut = self.responses % self.every == 0
                    self.cut += cut
                if cut:
                    return
                client.sendall(head + body)
        except OSError:
            pass
        finally:
            reader.close()
            close_both(client, upstream)

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                close_both(sock)
        for thread in self.threads:
            thread.join(WAIT)


def read_head(reader) -> bytes:
    """A response's status line and headers, up to and with the blank line; b"" at the end."""
    head = b""
    while line := reader.readline():
        head += line
        if line == b"\r\n":
            return head
    return b""


def close_both(*sockets: socket.socket) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


class RetryingProducer(Producer):
    """A producer that publishes each batch until it gets an answer (up to `attempts` times),
    with an Idempotency-Key of its own and asking for receipts when `keyed`, and without (as a
    client that retries blindly) when not. Every attempt is recorded."""

    def __init__(self, *args, keyed: bool, attempts: int = 10, **kwargs):
        super().__init__(*args, **kwargs)
        self.keyed, self.attempts = keyed, attempts

    def publish_batch(self, size: int | None = None, **extra) -> Publish:
        payloads = [{**self.payload(), **extra} for _ in range(size or self.batch_size)]
        key = f"{self.name}-{self.sequence}" if self.keyed else None
        headers = {"Idempotency-Key": key, "Prefer": "return=representation"} if key else {}
        for _ in range(self.attempts):
            response = self.client.request("POST", f"/topics/{self.topic}/messages", payloads, headers)
            ids = [r["id"] for r in response.body["data"]] if response.status == 201 else None
            values = [p["value"] for p in payloads]
            publish = Publish(
                self.name,
                self.topic,
                values,
                payloads,
                response.status,
                response.t0,
                response.t1,
                key=key,
                ids=ids,
            )
            self.history.record_publish(publish)
            if publish.outcome != "unknown":
                break
        return publish


@pytest.fixture(scope="module")
def live_app(make_app):
    # Production error handling (no TESTING), and a database connection for every client thread.
    # Its pool closes with the module, not the session: the suite's connections stay under
    # PostgreSQL's max_connections (100).
    app = make_app(TESTING=False, DATABASE_POOL_SIZE=20, DATABASE_MAX_OVERFLOW=10)
    yield app
    db.dispose(app)


@pytest.fixture
def live_port(live_app) -> Iterator[int]:
    """The app on werkzeug's threaded server, on a loopback port of its own."""
    with threaded_server(live_app) as port:
        yield port


@pytest.fixture
def proxy(live_port) -> Iterator[CuttingProxy]:
    cutting = CuttingProxy(live_port, every=3)
    try:
        yield cutting
    finally:
        cutting.close()


FILTERS = {"all": None, "br": {"country": ["BR"]}}
PRODUCERS, BATCHES, BATCH_SIZE = 4, 15, 10


@pytest.mark.slow
@pytest.mark.parametrize("keyed", [True, False], ids=["with-key", "without-key"])
def test_publishes_retried_after_their_answer_was_lost_are_stored_once_with_their_key(
    live_port, proxy, history, workers, keyed
):
    admin = Client(history, "admin", live_port)
    admin.create_topic("orders")
    for subscription, filter in FILTERS.items():
        admin.create_subscription(subscription, "orders", filter)
    producers = [
        workers.start(
            f"p{i}",
            RetryingProducer(
                history, proxy.port, f"p{i}", "orders", batches=BATCHES, seed=i, keyed=keyed
            ).run,
            workers.stopped,
        )
        for i in range(PRODUCERS)
    ]
    for i, subscription in enumerate([*FILTERS, *FILTERS]):
        consumer = Consumer(history, live_port, f"c{i}", subscription, seed=i, batch_size=20)
        workers.start(f"c{i}", consumer.run, workers.stopped)
    workers.join(timeout=60, stop=False, threads=producers)
    assert wait_until_consumed(admin, list(FILTERS)), "the consumers did not keep up"
    workers.join(timeout=15)
    drain(history, live_port, list(FILTERS))

    report = check(history)
    lost_answers = [p for p in history.publishes if p.status is None]
    assert proxy.cut >= 5 and len(lost_answers) == proxy.cut, report.summary()
    assert report.stats["values published ok"] == PRODUCERS * BATCHES * BATCH_SIZE, report.summary()
    if keyed:
        assert report.ok, report.summary()
        # Each cut publish was committed, retried, and answered from its key's record.
        answered = [p for p in history.publishes if p.status == 201]
        assert all(len(p.ids) == len(p.values) for p in answered), report.summary()
    else:  # the control: the same retries without a key store the cut batches twice
        assert len(report.duplicated) >= proxy.cut * BATCH_SIZE // 2, report.summary()


def test_the_checker_reports_a_value_delivered_under_another_id_than_its_receipt():
    history = History()
    history.record_subscription("s", "t", None, created=0.0)
    payload = {"value": "a"}
    history.record_publish(Publish("p", "t", ["a"], [payload], 201, 0.5, 0.6, key="k", ids=["m-1"]))
    history.record_deliveries([Delivery("s", "c", "m-2", "a", payload, 1, 1.0, 1.1)])
    history.record_settle(Settle("ack", "s", "c", ["m-2"], 204, 1.2, 1.3))
    assert check(history).unexpected == ["s/a (m-2): its publish's receipt named m-1"]
    history.publishes[0].ids = ["m-2"]
    assert check(history).ok
