"""A server never opens more connections than README "Connections" says (issue 17, point 4):
API_NUM_WORKERS x (DATABASE_POOL_SIZE + DATABASE_MAX_OVERFLOW + 1 listener).

`flask pubsub serve` with small settings, on a database of its own, under publish, consume, ack,
long-poll and readiness load; pg_stat_activity is sampled all along.
"""

import http.client
import os
import threading
import time
from collections.abc import Iterator

import psutil
import psycopg
import pytest
from flask_migrate import upgrade

from pubsub import create_app, db
from pubsub.listener import APPLICATION_NAME as LISTENER_NAME
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

WORKERS, POOL_SIZE, MAX_OVERFLOW = 2, 2, 1
LOAD_SECONDS = 5


def server_connections(db_conn: psycopg.Connection, database: str) -> dict[str, int]:
    """The backends of the database's client connections, by application_name."""
    rows = db_conn.execute(
        "SELECT application_name, count(*) FROM pg_stat_activity"
        " WHERE datname = %s AND backend_type = 'client backend' GROUP BY 1",
        (database,),
    ).fetchall()
    return dict(rows)


def connections_to(pid: int, port: int) -> int:
    """How many connections to the PostgreSQL on 127.0.0.1:port the process holds, seen from its
    side. pg_stat_activity cannot say it exactly: the backend of a connection that its client
    closed (an overflow connection given back to a full pool) stays listed for a few
    milliseconds while it exits."""
    sockets = psutil.Process(pid).net_connections(kind="tcp")
    return sum(1 for s in sockets if s.raddr and s.raddr.port == port and s.status == psutil.CONN_ESTABLISHED)


@pytest.fixture(scope="module")
def cluster() -> Iterator[TempCluster]:
    """A PostgreSQL of this test's own, on a TCP port: nothing else connects to it, and the
    server's connections to it are told apart by their remote port."""
    with TempCluster(bin_dir=os.environ.get("PUBSUB_TEST_PG_BIN") or None) as cluster:
        yield cluster


def test_a_server_never_opens_more_connections_than_its_computed_maximum(cluster, tmp_path):
    bound = WORKERS * (POOL_SIZE + MAX_OVERFLOW + 1)
    database = "pubsub_connections"
    url = cluster.create_database(database)
    app = create_app({"DATABASE_URL": url})
    with app.app_context():
        upgrade()
    db.dispose(app)
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(
        DATABASE_URL=url,
        API_PORT=str(port),
        API_NUM_WORKERS=str(WORKERS),
        DATABASE_POOL_SIZE=str(POOL_SIZE),
        DATABASE_MAX_OVERFLOW=str(MAX_OVERFLOW),
    )
    watcher = psycopg.connect(cluster.url, autocommit=True)
    with serving(env, log) as process, watcher as watch:
        wait_until_live(process, port, log)
        master, workers = gunicorn_processes(process, WORKERS)
        processes = [process.pid, master.pid, *(worker.pid for worker in workers)]
        assert request(port, "POST", "/topics", {"id": "orders"})[0] == 201
        for sub in ("work", "waited"):
            assert request(port, "POST", "/subscriptions", {"id": sub, "topic_id": "orders"})[0] == 201
        stop = threading.Event()
        failures: list[str] = []

        def loop(send) -> None:
            while not stop.is_set():
                try:
                    status = send()
                except (OSError, http.client.HTTPException) as error:
                    failures.append(repr(error))
                    return
                if status >= 500:
                    failures.append(f"status {status}")

        def publish() -> int:
            return request(port, "POST", "/topics/orders/messages", [{"n": 1}, {"n": 2}])[0]

        def consume_and_ack() -> int:
            status, body = request(port, "GET", "/subscriptions/work/messages?consumer_id=c&batch_size=5")
            ids = [m["id"] for m in body["data"]] if status == 200 else []
            return request(port, "POST", "/subscriptions/work/acks", ids)[0] if ids else status

        def long_poll() -> int:
            path = "/subscriptions/waited/messages?consumer_id=w&batch_size=1&wait_seconds=1"
            return request(port, "GET", path)[0]

        def readiness() -> int:
            status = request(port, "GET", "/readiness")[0]
            return 200 if status == 503 else status  # a 503 here is an answer, not a failure

        senders = [publish] * 10 + [consume_and_ack] * 6 + [long_poll] * 6 + [readiness] * 2
        threads = [threading.Thread(target=loop, args=(send,), daemon=True) for send in senders]
        for thread in threads:
            thread.start()
        seen: dict[str, int] = {}  # the most backends listed at once, by application_name
        most = backends = 0  # the most connections held at once by the server; backends listed
        most_by_process = dict.fromkeys(processes, 0)
        try:
            deadline = time.monotonic() + LOAD_SECONDS
            while time.monotonic() < deadline:
                held = {pid: connections_to(pid, cluster.port) for pid in processes}
                most = max(most, sum(held.values()))
                for pid, count in held.items():
                    most_by_process[pid] = max(most_by_process[pid], count)
                counts = server_connections(watch, database)
                backends = max(backends, sum(counts.values()))
                for name, count in counts.items():
                    seen[name] = max(seen.get(name, 0), count)
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
        assert not failures, f"{failures[:5]}\n{output_of(log)}"
        assert not any(thread.is_alive() for thread in threads)

    # Every connection says whose it is, so the count is exact; the listeners of both workers ran.
    assert set(seen) == {db.APPLICATION_NAME, LISTENER_NAME}, seen
    assert seen[LISTENER_NAME] == WORKERS, seen
    assert most <= bound, f"{most} connections open at once, more than {bound} (backends: {seen})"
    # Per process: none for serve and the gunicorn master; each worker reaches its pool, its
    # overflow and its listener, and no more. So the bound is reached, and the test can fail.
    per_worker = POOL_SIZE + MAX_OVERFLOW + 1
    assert list(most_by_process.values()) == [0, 0] + [per_worker] * WORKERS, most_by_process
    print(f"connections at most {most} at once (bound {bound}), {most_by_process}; backends {backends}")
