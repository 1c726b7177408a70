"""Several API servers on one database (issue 17, point 1): three `flask pubsub serve` instances,
each on its own port with its own two gunicorn workers, share the test database under the history
harness's load (tests/history.py). Publishers and consumers are spread over the servers; long
polls on one server are woken by publishes made on another; one server is SIGKILLed (its whole
process group, master and workers) and started again midway. The checker finds nothing lost and
nothing acked twice, and the only failed requests are the killed server's cut connections.

Bounded (about 30 s), loopback only; every server is stopped at the end, even on failure.
"""

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pubsub import db, messages
from tests.conftest import serve_settings
from tests.history import (
    Client,
    Consumer,
    History,
    Producer,
    WakeUp,
    Workers,
    check,
    drain,
    release_loop,
    wake_up,
)
from tests.test_serve import free_port, output_of, serve_env, serving, wait_until_live

pytestmark = pytest.mark.slow

SERVERS = 3
# Each server: two workers, few connections each (three servers share the suite's PostgreSQL and
# its 100 connections: 3 x 2 x (3 + 2 + 1 listener) = 36 at most).
SETTINGS = {
    "API_NUM_WORKERS": "2",
    "API_NUM_THREADS": "8",
    "DATABASE_POOL_SIZE": "3",
    "DATABASE_MAX_OVERFLOW": "2",
    # Waiters look for themselves only every 20 s: a long poll answered within WAKE_BOUND of a
    # publish on another server was woken by that publish's NOTIFY, not by a re-check.
    "LONG_POLL_RECHECK_SECONDS": "20",
}
WAKE_BOUND = 4.0  # seconds from a publish to the long poll on another server answering with it (a
# missed notification: no answer within its 10 s wait, the re-check being 20 s away)
LOAD_SECONDS = 2.0
LOCK_TIMEOUT = 2  # cleanup-stuck: the killed server's claims stay locked until released
KILLED = SERVERS - 1
SUBSCRIPTIONS = {"all": None, "br": {"country": ["BR"]}}
WAKE = "wake"  # a topic and its one subscription, for the timed wake-ups only


@dataclass
class Server:
    index: int
    port: int
    log: Path
    settings: dict[str, str]
    stack: ExitStack = field(default_factory=ExitStack)
    process: subprocess.Popen | None = None

    def start(self) -> None:
        env = serve_env(API_PORT=str(self.port), **SETTINGS, **self.settings)
        self.process = self.stack.enter_context(serving(env, self.log))
        wait_until_live(self.process, self.port, self.log)

    def kill(self) -> None:
        """SIGKILL the process group: the master and its workers die at once, mid-request."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.stack.close()


@pytest.fixture
def servers(database_settings, tmp_path, history, workers) -> Iterator[list[Server]]:
    """Three servers on the test database. The workload is stopped and its connections closed
    before the servers (idle keep-alive connections would hold up gunicorn's graceful stop)."""
    settings = serve_settings(database_settings)
    started = [Server(i, free_port(), tmp_path / f"serve-{i}.log", settings) for i in range(SERVERS)]
    try:
        for server in started:
            server.start()
        yield started
    finally:
        workers.stop_event.set()
        for thread in workers.threads:
            thread.join(15)
        history.close()
        for server in started:
            server.stack.close()


@pytest.fixture
def release(make_app) -> Iterator[Callable[[int], tuple[int, int]]]:
    """cleanup-stuck in this process, on a pool of its own (closed at the end)."""
    app = make_app(DATABASE_POOL_SIZE=1, DATABASE_MAX_OVERFLOW=0)
    engine = db.get_engine(app)

    def release_stuck(lock_timeout: int) -> tuple[int, int]:
        with engine.begin() as conn:
            return messages.release_stuck(conn, lock_timeout)

    yield release_stuck
    db.dispose(app)


def wake_ups(
    history: History, servers: list[Server], rounds: list[tuple[int, int]], tag: str
) -> list[WakeUp]:
    """One timed wake-up per (waiting server, publishing server) pair, in turn."""
    return [
        wake_up(history, f"wake-{tag}{n}", WAKE, servers[w].port, servers[p].port)
        for n, (w, p) in enumerate(rounds)
    ]


def logs(servers: list[Server]) -> str:
    return "\n".join(f"--- server {s.index}\n{output_of(s.log)[-2000:]}" for s in servers)


def test_three_servers_share_one_database_and_a_killed_one_loses_nothing(servers, release, history, workers):
    ports = [server.port for server in servers]
    admin = Client(history, "admin", ports[0])
    admin.create_topic("orders")
    for subscription, filter in SUBSCRIPTIONS.items():
        admin.create_subscription(subscription, "orders", filter)
    admin.create_topic(WAKE)
    admin.create_subscription(WAKE, WAKE)

    # Every server gets a producer, a polling consumer and a long-polling consumer per
    # subscription; clients are named after their server ("s2-p", "s2-c-all", "s2-lp-br").
    for s, port in enumerate(ports):
        producer = Producer(history, port, f"s{s}-p", "orders", batches=10_000, seed=s, pause=0.02)
        workers.start(producer.name, producer.run, workers.stopped)
        for subscription in SUBSCRIPTIONS:
            for kind, wait in (("c", 0), ("lp", 2)):
                name = f"s{s}-{kind}-{subscription}"
                consumer = Consumer(
                    history, port, name, subscription, seed=s, nack_ratio=0.2, wait_seconds=wait
                )
                workers.start(name, consumer.run, workers.stopped)
    workers.start("cleanup-stuck", release_loop, history, release, LOCK_TIMEOUT, workers.stopped)

    # Long polls woken by publishes on another server, all three ways round, under the load.
    woken = wake_ups(history, servers, [(0, 1), (1, 2), (2, 0)], "before")
    time.sleep(LOAD_SECONDS)

    killed = servers[KILLED]
    kill_at = time.monotonic()
    killed.kill()
    time.sleep(1.0)  # its clients get connection errors meanwhile
    killed.start()
    restarted_at = time.monotonic()
    # The restarted server's listener wakes its waiters, and its publishes wake the others'.
    woken += wake_ups(history, servers, [(KILLED, 0), (1, KILLED)], "after")
    time.sleep(LOAD_SECONDS)
    workers.join(timeout=20)

    cleanup = Workers()
    cleanup.start("cleanup-stuck", release_loop, history, release, LOCK_TIMEOUT, cleanup.stopped)
    try:
        drain(history, ports[0], [*SUBSCRIPTIONS, WAKE], seconds=30)
    finally:
        cleanup.join(timeout=10)

    report = check(history)
    assert report.ok, f"{report.summary()}\n{logs(servers)}"
    assert report.stats["values published ok"] > 0

    late = [w for w in woken if w.latency is None or w.latency > WAKE_BOUND]
    assert not late, f"long polls not woken within {WAKE_BOUND}s by a publish on another server: {woken}"

    # The only failures: connections to the killed server cut or refused while it was down.
    failed = history.failed_calls()
    assert all(c.status is None for c in failed), [c for c in failed if c.status][:5]
    elsewhere = [c for c in failed if not c.client.startswith(f"s{KILLED}-")]
    assert not elsewhere, elsewhere[:5]
    assert any(c.t0 >= kill_at - 0.5 for c in failed), "the kill cut no request"
    assert all(c.t1 <= restarted_at + 1.0 for c in failed), [c for c in failed if c.t1 > restarted_at + 1.0][
        :5
    ]
    # The restarted server served its clients again.
    served_again = [
        c
        for c in history.calls
        if c.client.startswith(f"s{KILLED}-") and c.t0 > restarted_at and c.status == 200
    ]
    assert served_again, logs(servers)
    log = logs(servers)
    assert "Traceback" not in log and "unhandled error" not in log, log
