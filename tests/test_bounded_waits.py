"""A database that stops answering never wedges the server: statements time out with a 503 and
Retry-After, pool checkouts are bounded, the probes keep answering (issue 17, point 6).

A test session holds a lock that every message statement needs (`LOCK TABLE subscription_messages
IN ACCESS EXCLUSIVE MODE`), so that statements hang as they would on a database that stopped
answering, with DATABASE_STATEMENT_TIMEOUT_SECONDS at 1.
"""

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from flask_migrate import upgrade
from sqlalchemy.engine import make_url

from pubsub import create_app, db, messages
from pubsub.blueprints.health import READINESS_TIMEOUT_SECONDS
from pubsub.errors import DATABASE_TIMED_OUT, OUTCOME_UNKNOWN
from pubsub.listener import Listener
from tests.pgcluster import TempCluster
from tests.test_serve import free_port, request, serve_env, serving, wait_until_live

TIMEOUT = 1  # DATABASE_STATEMENT_TIMEOUT_SECONDS of these tests' apps
# A request that timed out answers within this: its statement's timeout, plus one more for a
# publish queued behind a group statement that timed out, plus room for a loaded machine.
BOUND = 2 * TIMEOUT + 2.5
TIMED_OUT = {"detail": DATABASE_TIMED_OUT}


@pytest.fixture(scope="module")
def timed_app(make_app):
    return make_app(DATABASE_STATEMENT_TIMEOUT_SECONDS=TIMEOUT)


@pytest.fixture
def timed_client(timed_app):
    return timed_app.test_client()


def plain_url(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(False)


# The lock goes after this many seconds at the latest, so that a statement timeout that does not
# work fails a test (answers too late) instead of hanging it.
HOLD_MAX = 15


@contextmanager
def table_locked(database_url: str, table: str = "subscription_messages") -> Iterator[None]:
    """Another session holds an ACCESS EXCLUSIVE lock on the table for the block (at most
    HOLD_MAX seconds)."""
    with psycopg.connect(plain_url(database_url)) as conn:
        conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        release = threading.Timer(HOLD_MAX, conn.rollback)
        release.start()
        try:
            yield
        finally:
            release.cancel()
            release.join()
            conn.rollback()


def timed(call):
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def assert_timed_out(response, elapsed: float) -> None:
    assert (response.status_code, response.json) == (503, TIMED_OUT)
    assert response.headers["Retry-After"] == "1"
    assert elapsed < BOUND, f"answered after {elapsed:.1f}s"


def stored_messages(database_url: str) -> int:
    with psycopg.connect(plain_url(database_url)) as conn:
        return conn.execute("SELECT count(*) FROM subscription_messages").fetchone()[0]


def test_publish_consume_and_ack_answer_503_while_a_lock_holds_them_then_serve_again(
    timed_client, database_url
):
    client = timed_client
    assert client.post("/topics", json={"id": "orders"}).status_code == 201
    assert client.post("/subscriptions", json={"id": "sub", "topic_id": "orders"}).status_code == 201
    assert client.post("/topics/orders/messages", json=[{"n": 0}]).status_code == 204
    consume = "/subscriptions/sub/messages?consumer_id=c&batch_size=10"
    leased = client.get(consume).json["data"]
    assert len(leased) == 1

    receipts = {"Prefer": "return=representation"}
    with table_locked(database_url):
        for call in [
            lambda: client.post("/topics/orders/messages", json=[{"n": 1}]),  # the group commit
            lambda: client.post("/topics/orders/messages", json=[{"n": 2}], headers=receipts),
            lambda: client.get(consume),
            lambda: client.post("/subscriptions/sub/acks", json=[leased[0]["id"]]),
        ]:
            assert_timed_out(*timed(call))

    assert client.post("/subscriptions/sub/acks", json=[leased[0]["id"]]).status_code == 204
    assert client.post("/topics/orders/messages", json=[{"n": 3}]).status_code == 204
    assert [m["payload"] for m in client.get(consume).json["data"]] == [{"n": 3}]
    # n=3 only (n=0 was acked, which takes it out of the table): nothing of what answered 503.
    assert stored_messages(database_url) == 1


def test_concurrent_publishes_of_a_group_all_answer_503_within_the_bound(timed_app, database_url):
    client = timed_app.test_client()
    assert client.post("/topics", json={"id": "orders"}).status_code == 201
    assert client.post("/subscriptions", json={"id": "sub", "topic_id": "orders"}).status_code == 201
    answers: list[tuple[int, float]] = []
    start = threading.Barrier(12)

    def publish(n: int) -> None:
        own = timed_app.test_client()
        start.wait(5)
        response, elapsed = timed(lambda: own.post("/topics/orders/messages", json=[{"n": n}]))
        answers.append((response.status_code, response.headers.get("Retry-After"), elapsed))

    with table_locked(database_url):
        threads = [threading.Thread(target=publish, args=(n,)) for n in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(BOUND + 5)
        assert not any(thread.is_alive() for thread in threads), "a publish still waits"

    assert sorted((status, retry) for status, retry, _ in answers) == [(503, "1")] * 12
    slowest = max(elapsed for _, _, elapsed in answers)
    assert slowest < BOUND, f"the slowest publish answered after {slowest:.1f}s"
    assert stored_messages(database_url) == 0


@pytest.mark.parametrize(
    ("error", "alone"),
    [
        (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"), False),
        (psycopg.errors.LockNotAvailable("could not obtain lock"), True),  # PUBLISH_NOWAIT's
        (psycopg.errors.CheckViolation("bad"), True),
        (ValueError("bad data"), True),
        (psycopg.errors.AdminShutdown("terminating connection"), False),  # outcome unknown
    ],
)
def test_a_group_statement_that_timed_out_is_not_run_again_alone(error, alone):
    assert messages.retry_group_alone(error) is alone


def test_probes_answer_while_a_lock_holds_the_messages(client, database_url):
    # The default statement timeout (30 s): readiness answers within its own, shorter bound.
    assert client.get("/readiness").status_code == 200
    with table_locked(database_url):
        response, elapsed = timed(lambda: client.get("/liveness"))
        assert (response.status_code, elapsed < 0.5) == (200, True)
        response, elapsed = timed(lambda: client.get("/readiness"))
        assert (response.status_code, response.headers["Retry-After"]) == (503, "1")
        assert READINESS_TIMEOUT_SECONDS - 0.1 < elapsed < READINESS_TIMEOUT_SECONDS + 1.5
    deadline = time.monotonic() + 5
    while client.get("/readiness").status_code != 200:  # the hung probe ends with the lock
        assert time.monotonic() < deadline, "not ready 5 s after the lock was released"


def test_every_connection_has_the_statement_timeout_and_its_name(timed_app):
    with timed_app.app_context(), db.connect() as conn:
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == f"{TIMEOUT}s"
        assert conn.exec_driver_sql("SHOW application_name").scalar() == db.APPLICATION_NAME
        assert conn.exec_driver_sql("SHOW TimeZone").scalar() == "UTC"
        driver = conn.connection.driver_connection
        assert isinstance(driver, db.BoundedConnection)
        assert driver.answer_bound == TIMEOUT + db.ANSWER_GRACE_SECONDS
        info = driver.info
        assert info.get_parameters()["keepalives_idle"] == str(db.TCP_PARAMETERS["keepalives_idle"])
    with Listener(timed_app).connect() as conn:
        assert conn.answer_bound == TIMEOUT + db.ANSWER_GRACE_SECONDS
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == f"{TIMEOUT}s"
        assert conn.execute("SHOW application_name").fetchone()[0] == "pubsub-listener"
        assert conn.info.get_parameters()["tcp_user_timeout"] == str(db.TCP_PARAMETERS["tcp_user_timeout"])


def test_a_request_waits_for_a_pooled_connection_at_most_the_pool_timeout(make_app):
    app = make_app(DATABASE_POOL_SIZE=1, DATABASE_MAX_OVERFLOW=0, DATABASE_POOL_TIMEOUT_SECONDS=1)
    client = app.test_client()
    with db.get_engine(app).connect():  # the pool's only connection, taken
        response, elapsed = timed(lambda: client.get("/topics"))
    assert (response.status_code, response.headers["Retry-After"]) == (503, "1")
    assert elapsed < 3, f"answered after {elapsed:.1f}s"


def test_cleanup_commands_are_not_cut_by_the_statement_timeout(timed_app, database_url):
    runner = timed_app.test_cli_runner()
    for command, table in [("cleanup-acked", "acked_messages"), ("cleanup-stuck", "subscription_messages")]:
        with psycopg.connect(plain_url(database_url)) as conn:
            conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            # Longer than the statement timeout and the answer bound.
            release = threading.Timer(TIMEOUT + db.ANSWER_GRACE_SECONDS + 1, conn.rollback)
            release.start()
            try:
                result = runner.invoke(args=["pubsub", command])
            finally:
                release.join()
        assert result.exit_code == 0, result.output


def test_a_lifted_statement_timeout_and_answer_bound_come_back_after_the_block(timed_app):
    with timed_app.app_context(), db.begin() as conn:
        driver = conn.connection.driver_connection
        with db.statement_timeout_lifted(conn):
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "0"
            assert driver.answer_bound is None
        assert driver.answer_bound == TIMEOUT + db.ANSWER_GRACE_SECONDS
    with timed_app.app_context(), db.connect() as conn:
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == f"{TIMEOUT}s"


def test_a_statement_timeout_can_be_turned_off(make_app):
    app = make_app(DATABASE_STATEMENT_TIMEOUT_SECONDS=0)
    with app.app_context(), db.connect() as conn:
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "0"


# The same through `flask pubsub serve`: gunicorn's work slots (API_NUM_THREADS) all taken by
# requests that wait on the database must not keep the probes or later requests waiting forever.


def create_orders(port: int) -> None:
    assert request(port, "POST", "/topics", {"id": "orders"})[0] == 201
    assert request(port, "POST", "/subscriptions", {"id": "sub", "topic_id": "orders"})[0] == 201


def served_publishes_while_stuck(
    port: int, count: int, stuck, wait: float
) -> list[tuple[int, object, float]]:
    """`count` publishes at once to the app served on port, inside the `stuck` block (which
    makes the database hang), where /liveness answers at once and /readiness 503 within its bound
    while every work slot waits; each publish's status, body and time, once all answered."""
    answers: list[tuple[int, object, float]] = []

    def publish(n: int) -> None:
        started = time.monotonic()
        status, body = request(port, "POST", "/topics/orders/messages", [{"n": n}], timeout=30)
        answers.append((status, body, time.monotonic() - started))

    with stuck:
        threads = [threading.Thread(target=publish, args=(n,)) for n in range(count)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)  # every work slot now waits on the database
        started = time.monotonic()
        assert request(port, "GET", "/liveness") == (200, {"status": "alive"})
        assert time.monotonic() - started < 0.5, "liveness waited for a work slot"
        started = time.monotonic()
        assert request(port, "GET", "/readiness")[0] == 503
        assert time.monotonic() - started < READINESS_TIMEOUT_SECONDS + 1.5
        for thread in threads:
            thread.join(wait)
        assert not any(thread.is_alive() for thread in threads), "a publish still waits"
    return answers


def wait_ready(port: int, since: str) -> None:
    deadline = time.monotonic() + 5
    while request(port, "GET", "/readiness")[0] != 200:
        assert time.monotonic() < deadline, f"not ready 5 s after {since}"


@pytest.mark.slow
def test_a_served_app_answers_503_and_its_probes_while_a_lock_holds_every_work_slot(database_url, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(
        DATABASE_URL=database_url,
        API_PORT=str(port),
        API_NUM_WORKERS="1",
        API_NUM_THREADS="2",
        DATABASE_STATEMENT_TIMEOUT_SECONDS=str(TIMEOUT),
    )
    with serving(env, log) as process:
        wait_until_live(process, port, log)
        create_orders(port)
        assert request(port, "GET", "/readiness")[0] == 200
        answers = served_publishes_while_stuck(port, 4, table_locked(database_url), 4 * BOUND)

        # Four publishes through two slots, each slot's turn bounded by the timeout.
        assert [(status, body) for status, body, _ in answers] == [(503, TIMED_OUT)] * 4
        assert max(elapsed for _, _, elapsed in answers) < 2 * BOUND
        assert request(port, "POST", "/topics/orders/messages", [{"n": 9}])[0] == 204
        wait_ready(port, "the lock was released")
        assert stored_messages(database_url) == 1


# Commits that wait for a synchronous standby that is gone (the failover by hand): the
# statement timeout does not cut them (PostgreSQL stops a statement's timer before its commit);
# the pool's answer bound does, and says the outcome is unknown, since the commit took place on
# the primary.


@pytest.fixture(scope="module")
def cluster() -> Iterator[TempCluster]:
    with TempCluster(bin_dir=os.environ.get("PUBSUB_TEST_PG_BIN") or None) as cluster:
        yield cluster


def set_synchronous_standby(cluster: TempCluster, names: str) -> None:
    with psycopg.connect(cluster.url, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
        conn.execute("SELECT pg_reload_conf()")


@contextmanager
def standby_missing(cluster: TempCluster) -> Iterator[None]:
    """Every commit that writes waits for a synchronous standby that does not exist."""
    set_synchronous_standby(cluster, "gone")
    time.sleep(0.5)  # the reload takes effect
    try:
        yield
    finally:
        set_synchronous_standby(cluster, "")  # releases every commit still waiting


# A request whose commit waits answers after its answer bound (the statement timeout plus the
# grace), once the cancel has come back; one queued behind a group statement, after two.
ANSWER_BOUND = TIMEOUT + db.ANSWER_GRACE_SECONDS
UNKNOWN = {"detail": OUTCOME_UNKNOWN}
CONNECT_TIMEOUT = 5  # libpq's connect_timeout of the pool's connections (db.create_engine)


def migrate(url: str, **settings):
    """An app on the database at url, which this migrates to the newest schema."""
    app = create_app({"DATABASE_URL": url, "TESTING": True, **settings})
    with app.app_context():
        upgrade()
    return app


def answered_within(seconds: float, call):
    """timed(call), failing the test if it has no answer within `seconds` (instead of hanging it:
    the waiting commits end with the test's standby_missing block)."""
    answer = []
    thread = threading.Thread(target=lambda: answer.append(timed(call)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert answer, f"no answer within {seconds} s"
    return answer[0]


@pytest.mark.slow
def test_requests_answer_503_outcome_unknown_while_commits_wait_for_a_missing_synchronous_standby(cluster):
    url = cluster.create_database("pubsub_bounded")
    app = migrate(url, DATABASE_STATEMENT_TIMEOUT_SECONDS=TIMEOUT)
    client = app.test_client()
    try:
        assert client.post("/topics", json={"id": "orders"}).status_code == 201
        assert client.post("/subscriptions", json={"id": "sub", "topic_id": "orders"}).status_code == 201
        assert client.post("/topics/orders/messages", json=[{"n": 0}]).status_code == 204
        consume = "/subscriptions/sub/messages?consumer_id=c&batch_size=10"
        leased = client.get(consume).json["data"]
        assert client.get("/readiness").status_code == 200
        answers: dict[int, tuple[int, str, float]] = {}

        def publish(n: int) -> None:
            own = app.test_client()
            response, elapsed = timed(lambda: own.post("/topics/orders/messages", json=[{"n": n}]))
            answers[n] = (response.status_code, response.json["detail"], elapsed)

        with standby_missing(cluster):
            for call in [
                lambda: client.post("/topics/orders/messages", json=[{"n": 1}]),  # the group commit
                lambda: client.post(
                    "/topics/orders/messages", json=[{"n": 2}], headers={"Prefer": "return=representation"}
                ),
                lambda: client.get(consume),
                lambda: client.post("/subscriptions/sub/acks", json=[leased[0]["id"]]),
                lambda: client.post("/topics", json={"id": "invoices"}),  # a transaction's COMMIT
            ]:
                response, elapsed = answered_within(ANSWER_BOUND + 5, call)
                assert (response.status_code, response.json) == (503, UNKNOWN), elapsed
                assert response.headers["Retry-After"] == "1"
                assert ANSWER_BOUND - 0.1 < elapsed < ANSWER_BOUND + 2.5, f"answered after {elapsed:.1f}s"
            response, elapsed = timed(lambda: client.get("/readiness"))
            assert (response.status_code, response.headers["Retry-After"]) == (503, "1")
            assert elapsed < READINESS_TIMEOUT_SECONDS + 1.5, f"answered after {elapsed:.1f}s"
            assert client.get("/liveness").status_code == 200

            # One stuck commit does not hold the others forever: 12 publishes at once, all
            # answered within two bounds (a group's, then the next group's).
            threads = [threading.Thread(target=publish, args=(n,)) for n in range(10, 22)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(2 * ANSWER_BOUND + 10)
            assert not any(thread.is_alive() for thread in threads), "a publish still waits"
        # A group's statement answers "unknown"; the publishes queued behind it "nothing was
        # done", at once, instead of each group waiting in turn.
        assert sorted(answers) == list(range(10, 22))
        assert {(status, detail) for status, detail, _ in answers.values()} <= {
            (503, OUTCOME_UNKNOWN),
            (503, DATABASE_TIMED_OUT),
        }
        unknown = {n for n, (_, detail, _) in answers.items() if detail == OUTCOME_UNKNOWN}
        slowest = max(elapsed for _, _, elapsed in answers.values())
        assert slowest < 2 * ANSWER_BOUND + 2.5, f"the slowest publish answered after {slowest:.1f}s"

        # Both answers are honest: each "unknown" commit took place on the primary, unconfirmed,
        # and nothing of a "nothing was done" is stored.
        with psycopg.connect(url) as conn:
            stored = {n for (n,) in conn.execute("SELECT (payload->>'n')::int FROM subscription_messages")}
            topics = {id for (id,) in conn.execute("SELECT id FROM topics")}
        assert stored == {1, 2, *unknown}  # n=0 acked
        assert topics == {"orders", "invoices"}

        deadline = time.monotonic() + 5
        while client.get("/readiness").status_code != 200:
            assert time.monotonic() < deadline, "not ready 5 s after the standby requirement went"
        assert client.post("/topics/orders/messages", json=[{"n": 3}]).status_code == 204
        # n=1 and 2 stay leased: the consume that answered "unknown" leased them on the primary.
        everything = client.get("/subscriptions/sub/messages?consumer_id=c&batch_size=100").json["data"]
        assert {m["payload"]["n"] for m in everything} == {3, *unknown}
    finally:
        db.dispose(app)


@pytest.mark.slow
def test_a_served_app_answers_every_publish_while_commits_wait_for_a_missing_synchronous_standby(
    cluster, tmp_path
):
    # The failover by hand: two workers, every publish thread of both queued behind a
    # group-commit leader whose commit waits for the standby, and /readiness silent for minutes.
    url = cluster.create_database("pubsub_bounded_served")
    db.dispose(migrate(url))
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(
        DATABASE_URL=url,
        API_PORT=str(port),
        API_NUM_WORKERS="2",
        API_NUM_THREADS="4",
        DATABASE_STATEMENT_TIMEOUT_SECONDS=str(TIMEOUT),
    )
    with serving(env, log) as process:
        wait_until_live(process, port, log)
        create_orders(port)
        answers = served_publishes_while_stuck(port, 8, standby_missing(cluster), 4 * ANSWER_BOUND + 10)

        # Eight publishes, four work slots per worker: at most two turns of a worker's slots, in
        # each a group statement that answers "unknown", and the publishes queued behind it in
        # its worker "nothing was done" at once (before, each waited for a statement of its own).
        assert {(status, body["detail"]) for status, body, _ in answers} <= {
            (503, OUTCOME_UNKNOWN),
            (503, DATABASE_TIMED_OUT),
        }
        assert len(answers) == 8
        assert max(elapsed for _, _, elapsed in answers) < 2 * ANSWER_BOUND + 2.5
        assert request(port, "POST", "/topics/orders/messages", [{"n": 9}])[0] == 204
        wait_ready(port, "the standby requirement went")


# A network that goes silent between the API and the database: bytes sent are acknowledged (by
# the relay's kernel) but never delivered, so neither TCP keepalives nor tcp_user_timeout notice
# it; only the answer bound ends the wait.


class SilentNetwork:
    """A TCP relay to a database port that can go silent: while `silent`, the bytes of either
    direction are read and dropped, and new connections are accepted and never relayed."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.silent = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.sockets.append(client)
            if self.silent:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets.append(upstream)
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.relay, args=(source, target), daemon=True).start()

    def relay(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self.silent:
                    target.sendall(data)
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.server.close()
        for sock in self.sockets:
            sock.close()


@pytest.mark.slow
def test_requests_answer_503_when_the_network_to_the_database_goes_silent(cluster):
    url = cluster.create_database("pubsub_silent")
    db.dispose(migrate(url))
    network = SilentNetwork(cluster.port)
    relayed = url.replace(f":{cluster.port}/", f":{network.port}/")
    app = create_app(
        {"DATABASE_URL": relayed, "TESTING": True, "DATABASE_STATEMENT_TIMEOUT_SECONDS": TIMEOUT}
    )
    client = app.test_client()
    try:
        assert client.post("/topics", json={"id": "orders"}).status_code == 201
        assert client.post("/subscriptions", json={"id": "sub", "topic_id": "orders"}).status_code == 201
        consume = "/subscriptions/sub/messages?consumer_id=c&batch_size=10"
        network.silent = True
        # The answer bound, then the cancel (which the silent network swallows too) given up.
        bound = ANSWER_BOUND + db.CANCEL_WAIT_SECONDS
        response, elapsed = answered_within(
            bound + 5, lambda: client.post("/topics/orders/messages", json=[{"n": 1}])
        )
        assert (response.status_code, response.json) == (503, UNKNOWN), elapsed
        assert response.headers["Retry-After"] == "1"
        assert elapsed < bound + 2.5, f"answered after {elapsed:.1f}s"
        # The closed connection had the pool replace the others, so the consume needs a new
        # one: a connect that the silent network never answers, given up after connect_timeout.
        response, elapsed = answered_within(bound + 5, lambda: client.get(consume))
        assert (response.status_code, response.headers["Retry-After"]) == (503, "1")
        assert response.json["detail"] in (OUTCOME_UNKNOWN, "database is unavailable")
        assert elapsed < max(bound, CONNECT_TIMEOUT) + 2.5, f"answered after {elapsed:.1f}s"
        response, elapsed = answered_within(5, lambda: client.get("/readiness"))
        assert response.status_code == 503
        assert elapsed < READINESS_TIMEOUT_SECONDS + 1.5, f"answered after {elapsed:.1f}s"

        network.silent = False  # new connections get through again; the stuck ones were closed
        deadline = time.monotonic() + bound + 5  # the readiness probe's own wait ends first
        while client.get("/readiness").status_code != 200:
            assert time.monotonic() < deadline, "not ready after the network came back"
        assert client.post("/topics/orders/messages", json=[{"n": 2}]).status_code == 204
        assert [m["payload"]["n"] for m in client.get(consume).json["data"]] == [2]
    finally:
        network.silent = False
        db.dispose(app)
        network.close()


@pytest.mark.slow
def test_the_listener_gives_up_on_a_silent_network_as_the_pool_does(cluster):
    network = SilentNetwork(cluster.port)
    relayed = cluster.url.replace(f":{cluster.port}/", f":{network.port}/")
    app = create_app(
        {"DATABASE_URL": relayed, "TESTING": True, "DATABASE_STATEMENT_TIMEOUT_SECONDS": TIMEOUT}
    )
    conn = Listener(app).connect()
    try:
        conn.execute("SELECT 1")
        network.silent = True

        def recheck() -> Exception | None:  # one the server never answers
            try:
                conn.execute("SELECT 1")
            except Exception as error:
                return error
            return None

        bound = ANSWER_BOUND + db.CANCEL_WAIT_SECONDS
        error, elapsed = answered_within(bound + 5, recheck)
        # The listener's run loop reconnects on it (a psycopg.Error).
        assert isinstance(error, db.OutcomeUnknown), error
        assert elapsed < bound + 2.5, f"gave up after {elapsed:.1f}s"
    finally:
        network.close()  # first: a recheck still waiting then ends
        conn.close()
