"""The Python client (pubsub_client) against the real server under faults: its Subscriber and
Publisher carry 10,000 messages, dead-letter what always fails, keep the lease of a slow handler,
ride out restarts of the server and of PostgreSQL, and lose nothing when a subscriber process is
killed or stopped. Every scenario records what the client did into a history (tests/history.py,
through tests/client_support.py) that the history checker judges: nothing lost, nothing acked
twice, nothing redelivered after an ack, nothing left leased.

The module runs its own PostgreSQL cluster (tests/pgcluster.py) and `flask pubsub serve` on a
loopback port, both restartable; every scenario is bounded in time and stops every process,
thread and subscriber it started, even when it fails. Ack deadlines are the server's minimum
(10 s) so that lapsed leases come back quickly.
"""

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask_migrate import upgrade

from pubsub import create_app, db
from pubsub.tables import MIN_ACK_DEADLINE_SECONDS
from tests.client_support import (
    PROJECT_ROOT,
    Handled,
    Server,
    publish_all,
    publish_batches,
    published_ok,
    record_client,
    record_lease_expiry,
    subscriber_command,
    wait_for,
)
from tests.client_support import pubsub_client as pc
from tests.history import SLACK, History, check, drain
from tests.pgcluster import TempCluster
from tests.test_serve import free_port

pytestmark = pytest.mark.slow

ACK_DEADLINE = MIN_ACK_DEADLINE_SECONDS  # 10 s: the least the server allows
# Subscribers long-poll for 2 s: stop() lets a waiting long poll end by itself (a cut one would
# leave what the server claims for it leased to nobody), so it takes up to wait_seconds; and the
# server's graceful stop (SIGTERM) waits for the long polls in flight.
WAIT_SECONDS = 2
FAST_RETRIES = {"max_delivery_attempts": 50, "backoff_min_seconds": 1, "backoff_max_seconds": 1}


@pytest.fixture
def clean_tables() -> None:
    """Overrides conftest's: this module runs its own cluster; each test uses names of its own."""


@pytest.fixture(scope="module")
def cluster() -> Iterator[TempCluster]:
    with TempCluster(bin_dir=os.environ.get("PUBSUB_TEST_PG_BIN") or None) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory) -> Iterator[Server]:
    """`flask pubsub serve` (two workers) on a migrated database of the module's cluster."""
    url = cluster.create_database("pubsub_client_faults")
    app = create_app({"DATABASE_URL": url})
    with app.app_context():
        upgrade()
    db.dispose(app)
    server = Server(url, free_port(), tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def live(server, cluster) -> Server:
    """The server and its database, running (a failed test may have left either stopped)."""
    if not cluster.running:
        cluster.start()
    if not server.running:
        server.start()
    return server


@pytest.fixture
def connect(live) -> Iterator:
    """Make pubsub_client Clients of the live server (options as Client's); closed at the end.
    Ask for it before `subscribers`, so that their subscribers stop first."""
    made: list = []

    def make(**options) -> "pc.Client":
        made.append(pc.Client(live.url, **options))
        return made[-1]

    yield make
    for client in made:
        client.close()


@pytest.fixture
def client(connect) -> "pc.Client":
    """Overrides conftest's (Flask's test client): a pubsub_client Client of the live server."""
    return connect()


@pytest.fixture
def subscribers() -> Iterator[list]:
    """Subscribers a test starts; stopped at the end whatever happens."""
    started: list = []
    yield started
    for subscriber in started:
        subscriber.stop(timeout=15)


@pytest.fixture
def processes() -> Iterator[dict[str, subprocess.Popen]]:
    """Subscriber processes a test starts, by name; killed at the end if still running."""
    started: dict[str, subprocess.Popen] = {}
    yield started
    for process in started.values():
        if process.poll() is None:
            process.kill()
        process.wait(10)


def create(client, history: History, name: str, **settings) -> None:
    """A topic and its one subscription, both named `name`, recorded in the history."""
    client.create_topic(name)
    client.create_subscription(name, name, ack_deadline_seconds=ACK_DEADLINE, **settings)
    history.record_subscription(name, name, None, time.monotonic())
    record_lease_expiry(history, ACK_DEADLINE, since=time.monotonic())


def start_subscriber(
    subscribers: list, client, subscription: str, handled: Handled, name: str, handler, **options
):
    """A Subscriber named `name` (its consumer id) whose handler calls `handled` records."""
    options = {"wait_seconds": WAIT_SECONDS, **options}
    subscriber = pc.Subscriber(client, subscription, handled.wrap(name, handler), consumer_id=name, **options)
    subscribers.append(subscriber)
    subscriber.start()
    return subscriber


def start_process(processes: dict, tmp_path: Path, url: str, subscription: str, name: str, **options):
    """A subscriber process; returns its journal and its handler-call journal."""
    journal, handled = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.handled.jsonl"
    options = {"wait_seconds": WAIT_SECONDS, **options}
    command = subscriber_command(url, subscription, name, journal, handled, **options)
    with (tmp_path / f"{name}.log").open("ab") as log:
        processes[name] = subprocess.Popen(
            command, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    return journal, handled


def process_log(tmp_path: Path, name: str) -> str:
    path = tmp_path / f"{name}.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def acked_twice(history: History) -> list[str]:
    """Deliveries (by consumer and message, between two claims) that a consumer acked in two
    calls that both answered 2xx: the client sent one ack twice."""
    acks = Counter()
    for settle in history.settles:
        if settle.kind == "ack" and settle.outcome == "ok":
            for message_id in settle.message_ids:
                acks[settle.consumer, message_id] += 1
    claims = Counter((d.consumer, d.message_id) for d in history.deliveries)
    return [f"{c}/{m}: {n} acks, {claims[c, m]} deliveries" for (c, m), n in acks.items() if n > claims[c, m]]


def assert_clean(history: History, port: int, subscriptions: list[str]) -> None:
    """Drain what is left (recording the final metrics), then hold the history to the checker."""
    drain(history, port, subscriptions, seconds=20)
    report = check(history)
    assert report.ok, report.summary()
    assert not acked_twice(history), acked_twice(history)[:5]


# --- 1. Ten thousand messages -----------------------------------------------------------------


def test_ten_thousand_messages_through_a_subscriber_none_lost_none_acked_twice(
    live, client, history, subscribers
):
    create(client, history, "flow", **FAST_RETRIES)
    counts = record_client(history, client)
    handled = Handled()

    def handler(message) -> None:
        # Some first attempts fail, both ways: an exception (nack with the backoff) and Nack(0).
        n = message.payload["n"]
        if message.delivery_attempts == 1 and n % 97 == 0:
            raise RuntimeError(f"flaky {n}")
        if message.delivery_attempts == 1 and n % 89 == 0:
            raise pc.Nack(delay_seconds=0)

    start_subscriber(subscribers, client, "flow", handled, "s1", handler, max_workers=8)
    publisher = pc.Publisher(client, "flow")
    try:
        publish_all(history, publisher, "p", "flow", 10_000)
        publisher.flush()
    finally:
        publisher.close()
    assert published_ok(history) == {f"p-{n:06d}" for n in range(1, 10_001)}
    assert wait_for(lambda: handled.ok_values() >= published_ok(history), 60), (
        f"handled {len(handled.ok_values())} of 10000; client calls {counts}"
    )
    subscribers[0].stop(timeout=15)

    assert_clean(history, live.port, ["flow"])
    assert not [d for d in history.deliveries if d.consumer.startswith("drain-")], "the subscriber left some"
    # Each message was handled to success once; only the failed first attempts came again.
    ok = Counter(c.value for c in handled.calls if c.outcome == "ok")
    assert set(ok.values()) == {1}, [v for v, n in ok.items() if n > 1][:5]
    failed = {c.value for c in handled.calls if c.outcome in ("raised", "nack")}
    assert failed == {f"p-{n:06d}" for n in range(1, 10_001) if n % 97 == 0 or n % 89 == 0}
    assert counts["nacked ids"] == len(failed) and counts["acked ids"] == 10_000
    assert history.final_metrics["flow"] == {
        "subscription_id": "flow", "available": 0, "delayed": 0, "delivered": 0, "acked": 10_000, "dlq": 0,
        "waiting": 0,
    }  # fmt: skip


# --- 2. The dead-letter queue -----------------------------------------------------------------


def test_a_handler_that_always_raises_sends_its_message_to_the_dlq_after_max_delivery_attempts(
    live, client, history, subscribers
):
    create(client, history, "poison", max_delivery_attempts=3, backoff_min_seconds=1, backoff_max_seconds=1)
    record_client(history, client)
    publish_batches(history, client, "p", "poison", 5)
    handled = Handled()

    def handler(message) -> None:
        raise ValueError("cannot handle this")

    start_subscriber(subscribers, client, "poison", handled, "s1", handler, max_workers=4)
    assert wait_for(lambda: client.metrics("poison")["dlq"] == 5, 30), client.metrics("poison")
    time.sleep(1.5)  # a message in the DLQ is never handled again: wait past a backoff to see
    subscribers[0].stop(timeout=15)

    by_value: dict[str, list[int]] = {}
    for call in sorted(handled.calls, key=lambda c: c.t0):
        by_value.setdefault(call.value, []).append(call.attempts)
    assert by_value == {f"p-{n:06d}": [1, 2, 3] for n in range(1, 6)}
    assert {c.outcome for c in handled.calls} == {"raised"}
    dead = client.dlq("poison")
    assert sorted(m.payload["value"] for m in dead) == sorted(by_value)
    assert all(m.delivery_attempts == 3 for m in dead)
    history.record_dead("poison", by_value)
    assert_clean(history, live.port, ["poison"])
    assert history.final_metrics["poison"] == {
        "subscription_id": "poison", "available": 0, "delayed": 0, "delivered": 0, "acked": 0, "dlq": 5,
        "waiting": 0,
    }  # fmt: skip


# --- 3. Leases --------------------------------------------------------------------------------


def test_a_handler_three_times_longer_than_the_ack_deadline_keeps_its_lease_and_is_not_redelivered(
    live, client, connect, history, subscribers, workers
):
    create(client, history, "slow", **FAST_RETRIES)
    counts = record_client(history, client)
    publish_batches(history, client, "p", "slow", 3)
    handled = Handled()

    def handler(message) -> None:
        time.sleep(3 * ACK_DEADLINE)

    start_subscriber(subscribers, client, "slow", handled, "s1", handler, max_workers=4)
    assert wait_for(lambda: len(handled.calls) == 3, 10), handled.calls
    # A rival polls all along: a lapsed lease would hand it a message.
    rival = connect()
    record_client(history, rival)
    got: list = []

    def poll() -> None:
        while not workers.stopped():
            got.extend(rival.consume("slow", "rival", batch_size=10))
            time.sleep(0.25)

    workers.start("rival", poll)
    ended = wait_for(lambda: all(c.t1 is not None for c in handled.calls), 3 * ACK_DEADLINE + 15)
    workers.join(timeout=10)
    subscribers[0].stop(timeout=15)

    # No lease lapsed: neither the rival nor the subscriber itself got a message again.
    assert got == [], f"the rival got {[m.payload for m in got]}; handler calls {handled.calls}"
    assert [c.attempts for c in handled.calls] == [1, 1, 1], handled.calls
    assert ended and [c.outcome for c in handled.calls] == ["ok"] * 3, handled.calls
    assert counts["extend"] >= 2, counts  # 30 s on a 10 s deadline: extended at least twice
    assert_clean(history, live.port, ["slow"])
    assert not [d for d in history.deliveries if d.consumer.startswith("drain-")]
    assert history.final_metrics["slow"]["acked"] == 3


# --- 4. Restarts --------------------------------------------------------------------------------

LOAD_SECONDS = 1.5  # of load between disruptions


def test_server_and_postgresql_restarted_mid_stream_lose_nothing_and_the_subscriber_recovers(
    live, cluster, client, connect, history, subscribers, workers
):
    create(client, history, "restart", **FAST_RETRIES)
    # One retry per call: the outages outlast the client's own retries, so what is tested is how
    # the Subscriber recovers (and how the Publisher's batches fail), not the retry loop.
    client = connect(max_retries=1)
    counts = record_client(history, client)
    handled = Handled()

    def handler(message) -> None:
        time.sleep(0.002)

    start_subscriber(subscribers, client, "restart", handled, "s1", handler, max_workers=8)
    publisher = pc.Publisher(client, "restart")
    errors = Counter()
    # About 1000 messages a second, one publish() call each, until stopped.
    workers.start(
        "publisher",
        lambda: publish_all(
            history,
            publisher,
            "p",
            "restart",
            1_000_000,
            pause_every=10,
            pause=0.01,
            stop=workers.stopped,
            errors=errors,
        ),
    )
    outages: list[tuple[str, float, float]] = []  # what, when it began, when it was over
    try:
        time.sleep(LOAD_SECONDS)
        for signum in (signal.SIGTERM, signal.SIGKILL):
            down = time.monotonic()
            live.restart(signum)
            outages.append((f"server {signal.Signals(signum).name}", down, time.monotonic()))
            time.sleep(LOAD_SECONDS)
        down = time.monotonic()
        cluster.stop("immediate")
        time.sleep(LOAD_SECONDS)
        cluster.start()
        outages.append(("PostgreSQL stop immediate", down, time.monotonic()))
        time.sleep(2 * LOAD_SECONDS)
        workers.join(timeout=15)
        publisher.flush()
    finally:
        publisher.close()

    timeline = phases(history, outages, errors)
    expected = published_ok(history)
    assert wait_for(lambda: handled.ok_values() >= expected, 2 * ACK_DEADLINE + 20), (
        f"handled {len(handled.ok_values() & expected)} of {len(expected)}; client calls {counts}\n{timeline}"
    )
    subscribers[0].stop(timeout=15)
    assert_clean(history, live.port, ["restart"])
    # The subscriber got every message itself: the drain found none left.
    assert not [d for d in history.deliveries if d.consumer.startswith("drain-")]
    # The stream went on through every outage: publishes succeeded before each and after it,
    # and the subscriber, by itself, handled what was published after each.
    for _, down, up in outages:
        before = published_between(history, down - LOAD_SECONDS, down)
        after = published_between(history, up, up + LOAD_SECONDS)
        assert before and after, timeline
        assert after <= handled.ok_values()


def published_between(history: History, start: float, end: float) -> set[str]:
    return {v for p in history.publishes if p.outcome == "ok" and start <= p.t0 < end for v in p.values}


def phases(history: History, outages: list[tuple[str, float, float]], errors: Counter) -> str:
    """The outages, and the publishes' outcomes second by second: for failure messages."""
    first = min(p.t0 for p in history.publishes)
    by_second: dict[int, Counter] = {}
    for p in history.publishes:
        by_second.setdefault(int(p.t0 - first), Counter())[p.outcome] += len(p.values)
    lines = [f"{what}: from {down - first:.1f}s to {up - first:.1f}s" for what, down, up in outages]
    lines += [f"{second:3d}s {dict(counts)}" for second, counts in sorted(by_second.items())]
    lines += [f"{n} publishes failed with {error}" for error, n in errors.most_common(5)]
    return "\n".join(lines)


# --- 5. Subscriber processes killed and stopped ---------------------------------------------------


def test_a_subscriber_process_killed_leaves_its_messages_leased_until_the_deadline_then_another_gets_them(
    live, client, history, subscribers, processes, tmp_path
):
    create(client, history, "kill", **FAST_RETRIES)
    publish_batches(history, client, "p", "kill", 30)
    journal, handled_journal = start_process(
        processes, tmp_path, live.url, "kill", "victim", handler_seconds=60, max_workers=4, max_outstanding=10
    )
    started = lambda: handled_journal.exists() and len(Handled.load(handled_journal)) >= 4  # noqa: E731
    assert wait_for(started, 20), process_log(tmp_path, "victim")
    processes["victim"].send_signal(signal.SIGKILL)
    processes["victim"].wait(10)
    killed = time.monotonic()
    history.load_journal(journal)
    held = history.unsettled("victim")
    assert len(held) >= 4, held

    record_client(history, client)
    handled = Handled()
    start_subscriber(subscribers, client, "kill", handled, "heir", lambda m: None)
    assert wait_for(lambda: handled.ok_values() >= published_ok(history), ACK_DEADLINE + 15), (
        len(handled.ok_values()),
        client.metrics("kill"),
    )
    subscribers[0].stop(timeout=15)

    for orphan in held:
        again = [d for d in history.deliveries if d.message_id == orphan.message_id and d.consumer == "heir"]
        assert len(again) == 1, (orphan, again)
        # Not before its lease lapsed, and soon after.
        assert again[0].t1 >= orphan.t0 + ACK_DEADLINE - SLACK, (orphan, again[0])
        assert again[0].t1 < killed + ACK_DEADLINE + 5, (orphan, again[0], killed)
        assert again[0].attempts == orphan.attempts + 1
    assert_clean(history, live.port, ["kill"])


def test_a_subscriber_process_stopped_with_sigterm_finishes_its_handlers_and_leaves_nothing_leased(
    live, client, history, subscribers, processes, tmp_path
):
    handler_seconds = 1.0
    create(client, history, "term", **FAST_RETRIES)
    publish_batches(history, client, "p", "term", 40)
    journal, handled_journal = start_process(
        processes,
        tmp_path,
        live.url,
        "term",
        "leaver",
        handler_seconds=handler_seconds,
        max_workers=4,
        max_outstanding=12,
    )
    started = lambda: handled_journal.exists() and len(Handled.load(handled_journal)) >= 4  # noqa: E731
    assert wait_for(started, 20), process_log(tmp_path, "leaver")
    processes["leaver"].send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    try:
        code = processes["leaver"].wait(handler_seconds + 10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 10 s after its handlers could end:\n{process_log(tmp_path, 'leaver')}")
    exited = time.monotonic()
    metrics = client.metrics("term")
    assert code == 0, process_log(tmp_path, "leaver")
    assert metrics["delivered"] == 0, metrics  # nothing left leased: acked or nacked before exit
    calls = Handled.load(handled_journal)
    assert calls and all(c.outcome == "ok" for c in calls), calls  # every started handler finished
    assert exited - signalled < handler_seconds + WAIT_SECONDS + 3  # its handlers, a long poll, the acks
    history.load_journal(journal)
    done = {c.value for c in calls}
    assert metrics["acked"] == len(done)

    record_client(history, client)
    handled = Handled()
    start_subscriber(subscribers, client, "term", handled, "heir", lambda m: None)
    assert wait_for(lambda: handled.ok_values() | done >= published_ok(history), 20), client.metrics("term")
    subscribers[0].stop(timeout=15)
    # The leaver's acks all went out before it exited: none of its messages came again.
    assert not done & {c.value for c in handled.calls}
    assert_clean(history, live.port, ["term"])
