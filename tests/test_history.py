"""No acknowledged publish is ever lost: history-checked workloads (tests/history.py) under
concurrency, consumer crashes, killed gunicorn workers and deletions, and the checker itself
shown to catch each anomaly on synthetic histories. On ordered subscriptions (ordering keys),
the checker also finds messages of a key delivered out of publish order or two at once.

Every scenario is bounded in time and count, talks to 127.0.0.1 only, and stops every thread,
process and server it started, even when it fails.
"""

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa

from pubsub import db, messages
from pubsub.subscriptions import create_subscription
from tests.conftest import serve_settings, threaded_server
from tests.history import (
    KEY_FIELD,
    SLACK,
    Call,
    Client,
    Consumer,
    ConsumerCrashed,
    Delivery,
    Extend,
    History,
    Producer,
    Publish,
    Release,
    Settle,
    Workers,
    check,
    drain,
    last_journal_kind,
    matches,
    redrive_loop,
    release_loop,
    wait_until_consumed,
)
from tests.test_serve import (
    PROJECT_ROOT,
    free_port,
    gunicorn_processes,
    output_of,
    serve_env,
    serving,
    wait_until_live,
)

# Busiest first: with 8 consumers over 5 subscriptions, the first three get two each.
FILTERS = {
    "all": None,
    "all-too": {},
    "not-japan": {"country": ["BR", "US", "DE", "IN"]},
    "br": {"country": ["BR"]},
    "americas-premium": {"country": ["BR", "US"], "premium": [True]},
}


# --- The checker, on synthetic histories -------------------------------------------------------


def payload_of(value: str, key: str | None) -> dict:
    """A synthetic payload; with a key, its "customer" field (the ordered subscriptions' key)."""
    return {"value": value, "country": "BR"} | ({} if key is None else {"customer": key})


def published(
    history: History,
    *values: str,
    status: int | None = 204,
    t: float = 0.0,
    topic: str = "t",
    key: str | None = None,
):
    payloads = [payload_of(v, key) for v in values]
    history.record_publish(Publish("p", topic, list(values), payloads, status, t, t + 0.01))


def delivered(
    history: History,
    value: str,
    message_id: str,
    consumer: str,
    t: float,
    attempts: int = 1,
    key: str | None = None,
):
    payload = payload_of(value, key)
    history.record_deliveries([Delivery("s", consumer, message_id, value, payload, attempts, t, t + 0.01)])


def settled(history: History, kind: str, message_id: str, consumer: str, t: float, status: int | None = 204):
    history.record_settle(Settle(kind, "s", consumer, [message_id], status, t, t + 0.01))


def cleanup_ran(history: History, lock_timeout: float, t: float) -> None:
    history.record_release(Release(lock_timeout, t, t + 0.01, 1, 0))


def extended(history: History, message_id: str, consumer: str, seconds: float, t: float) -> None:
    history.record_extend(Extend("s", consumer, [message_id], seconds, 204, t, t + 0.01))


@pytest.fixture
def synthetic() -> History:
    """A subscription s of topic t created at time 0, and a clean history: a and b published,
    a acked at once, b nacked then redelivered after its backoff and acked."""
    history = History()
    history.record_subscription("s", "t", None, created=0.0)
    published(history, "a", "b", t=0.5)
    delivered(history, "a", "m-a", "c1", t=1.0)
    settled(history, "ack", "m-a", "c1", t=1.1)
    delivered(history, "b", "m-b", "c2", t=1.0)
    settled(history, "nack", "m-b", "c2", t=1.1)
    delivered(history, "b", "m-b", "c1", t=2.2, attempts=2)
    settled(history, "ack", "m-b", "c1", t=2.3)
    return history


def test_checker_passes_a_clean_history_with_a_nack_and_a_redelivery(synthetic):
    report = check(synthetic)
    assert report.ok, report.summary()
    assert report.stats["redeliveries"] == 1


def test_checker_reports_a_value_published_with_2xx_and_never_acked(synthetic):
    published(synthetic, "c", t=0.6)
    delivered(synthetic, "c", "m-c", "c1", t=1.5)
    settled(synthetic, "nack", "m-c", "c1", t=1.6)
    report = check(synthetic)
    assert len(report.lost) == 1 and report.lost[0].startswith("s/c:"), report.summary()
    assert not report.ok


def test_checker_does_not_require_unknown_or_refused_publishes_nor_dead_letters(synthetic):
    published(synthetic, "unknown", status=None, t=0.6)
    published(synthetic, "refused", status=422, t=0.6)
    published(synthetic, "dead", t=0.6)
    synthetic.record_dead("s", ["dead"])
    assert check(synthetic).ok


def test_checker_reports_values_never_published_refused_or_filtered_out(synthetic):
    published(synthetic, "refused", status=422, t=0.6)
    delivered(synthetic, "refused", "m-r", "c1", t=3.0)
    delivered(synthetic, "ghost", "m-g", "c1", t=3.0)
    synthetic.subscriptions["s"].filter = {"country": ["US"]}
    reasons = "\n".join(check(synthetic).unexpected)
    assert "s/refused (m-r): its publish was refused (422)" in reasons
    assert "s/ghost (m-g): never published" in reasons
    assert "s/a (m-a): does not match the filter" in reasons


def test_checker_reports_one_message_delivered_to_two_consumers_while_locked(synthetic):
    published(synthetic, "c", t=0.6)
    delivered(synthetic, "c", "m-c", "c1", t=3.0)
    delivered(synthetic, "c", "m-c", "c2", t=4.0, attempts=2)
    settled(synthetic, "ack", "m-c", "c1", t=5.0)
    report = check(synthetic)
    assert len(report.locked_twice) == 1 and "to c1" in report.locked_twice[0], report.summary()


def test_checker_accepts_a_redelivery_after_the_lock_expired(synthetic):
    published(synthetic, "c", t=0.6)
    delivered(synthetic, "c", "m-c", "c1", t=3.0)  # c1 dies holding it
    cleanup_ran(synthetic, lock_timeout=2, t=5.5)
    delivered(synthetic, "c", "m-c", "c2", t=5.6, attempts=2)
    settled(synthetic, "ack", "m-c", "c2", t=5.7)
    # Late: the ack may have been ignored (204 either way), so the redelivery is no anomaly.
    settled(synthetic, "ack", "m-c", "c1", t=5.8)
    assert check(synthetic).ok, check(synthetic).summary()


def test_checker_reports_a_redelivery_before_the_lock_could_expire(synthetic):
    published(synthetic, "c", t=0.6)
    delivered(synthetic, "c", "m-c", "c1", t=3.0)
    cleanup_ran(synthetic, lock_timeout=2, t=4.0)  # too early for that lock
    delivered(synthetic, "c", "m-c", "c2", t=4.2, attempts=2)
    settled(synthetic, "ack", "m-c", "c2", t=4.3)
    assert len(check(synthetic).locked_twice) == 1


def test_checker_reports_a_message_acked_twice_and_redelivered_after_its_ack(synthetic):
    delivered(synthetic, "a", "m-a", "c2", t=3.0, attempts=2)  # acked at 1.1, yet here again
    settled(synthetic, "ack", "m-a", "c2", t=3.1)
    report = check(synthetic)
    assert len(report.redelivered_after_ack) == 1 and "acked by c1" in report.redelivered_after_ack[0]
    assert len(report.acked_twice) == 1 and report.acked_twice[0].startswith("s/a:"), report.summary()


def test_checker_lets_an_unknown_publish_appear_once_but_not_twice(synthetic):
    published(synthetic, "u", status=None, t=0.6)
    delivered(synthetic, "u", "m-u1", "c1", t=3.0)
    settled(synthetic, "ack", "m-u1", "c1", t=3.1)
    assert check(synthetic).ok
    delivered(synthetic, "u", "m-u2", "c2", t=3.0)
    settled(synthetic, "ack", "m-u2", "c2", t=3.1)
    report = check(synthetic)
    assert report.duplicated == ["s/u: delivered as ['m-u1', 'm-u2']"], report.summary()
    assert len(report.acked_twice) == 1


def test_checker_reports_messages_left_behind_by_the_drain(synthetic):
    synthetic.record_metrics("s", {"available": 0, "delivered": 0, "acked": 2, "dlq": 0})
    assert check(synthetic).ok
    synthetic.record_metrics("s", {"available": 1, "delivered": 0, "acked": 2, "dlq": 0})
    assert len(check(synthetic).not_drained) == 1


def test_checker_counts_an_ack_cut_short_as_maybe_done(synthetic):
    published(synthetic, "c", t=0.6)
    delivered(synthetic, "c", "m-c", "c1", t=3.0)
    settled(synthetic, "ack", "m-c", "c1", t=3.1, status=None)  # it may have deleted the message
    assert check(synthetic).ok


def test_checker_ignores_the_messages_of_a_deleted_subscription(synthetic):
    published(synthetic, "c", t=0.6)
    synthetic.record_deleted_topic("t", at=3.0)
    assert check(synthetic).ok


def test_checker_reports_a_delayed_message_claimed_before_its_time_and_accepts_one_claimed_after(synthetic):
    synthetic.record_publish(
        Publish("p", "t", ["late"], [{"value": "late", "country": "BR"}], 204, 3.0, 3.01, 2)
    )
    delivered(synthetic, "late", "m-late", "c1", t=5.0)  # claimed in [5.0, 5.01]: due from 5.0 on
    settled(synthetic, "ack", "m-late", "c1", t=5.1)
    assert check(synthetic).ok, check(synthetic).summary()
    assert check(synthetic).stats["delayed"] == 1
    synthetic.record_publish(
        Publish("p", "t", ["soon"], [{"value": "soon", "country": "BR"}], 204, 3.0, 3.01, 2)
    )
    delivered(synthetic, "soon", "m-soon", "c2", t=4.0)  # by 4.01: a second early
    settled(synthetic, "ack", "m-soon", "c2", t=4.1)
    report = check(synthetic)
    assert len(report.early) == 1 and report.early[0].startswith("s/soon (m-soon)"), report.summary()
    assert not report.ok


def test_checker_reports_delayed_messages_left_behind_by_the_drain(synthetic):
    synthetic.record_metrics("s", {"available": 0, "delayed": 3, "delivered": 0, "acked": 2, "dlq": 0})
    assert len(check(synthetic).not_drained) == 1


def test_checker_reports_a_redelivery_before_the_lease_lapsed_and_accepts_one_after(synthetic):
    synthetic.subscriptions["s"].ack_deadline = 10
    published(synthetic, "c", "d", t=0.6)
    delivered(synthetic, "c", "m-c", "c1", t=3.0)  # c1 dies holding it: its lease lapses at 13.0
    delivered(synthetic, "c", "m-c", "c2", t=13.1, attempts=2)
    settled(synthetic, "ack", "m-c", "c2", t=13.2)
    delivered(synthetic, "d", "m-d", "c1", t=3.0)
    extended(synthetic, "m-d", "c1", seconds=1, t=3.05)  # ... and this one's at 4.05
    delivered(synthetic, "d", "m-d", "c2", t=4.1, attempts=2)
    settled(synthetic, "ack", "m-d", "c2", t=4.2)
    assert check(synthetic).ok, check(synthetic).summary()
    assert check(synthetic).stats["lease extensions"] == 1
    delivered(synthetic, "c", "m-c", "c3", t=12.0, attempts=2)  # 1 s before c1's lease lapsed
    settled(synthetic, "nack", "m-c", "c3", t=12.5)
    report = check(synthetic)
    assert len(report.locked_twice) == 1 and "to c1" in report.locked_twice[0], report.summary()


@pytest.fixture
def ordered() -> History:
    """A subscription s of topic t ordered by "customer" (ack deadline 10 s, 3 attempts), created
    at time 0; a1 and a2 of key a published in that order in one call at 0.5, b1 of key b
    with them: b1 acked at once, and a1 delivered at 1.0 (claimed by 1.01)."""
    history = History()
    history.record_subscription("s", "t", None, 0.0, ordering_key="customer", ack_deadline=10, max_attempts=3)
    history.record_publish(
        Publish(
            "p", "t", ["a1", "a2", "b1"], [payload_of(v, v[0]) for v in ("a1", "a2", "b1")], 204, 0.5, 0.51
        )
    )
    delivered(history, "b1", "m-b1", "c2", t=1.0, key="b")
    settled(history, "ack", "m-b1", "c2", t=1.1)
    delivered(history, "a1", "m-a1", "c1", t=1.0, key="a")
    return history


def test_checker_accepts_a_key_delivered_in_order_one_at_a_time(ordered):
    settled(ordered, "ack", "m-a1", "c1", t=1.1)  # answered at 1.11
    # Claimed while the ack was under way: it began before this claim ended, so it may have
    # deleted a1 first.
    delivered(ordered, "a2", "m-a2", "c2", t=1.105, key="a")
    settled(ordered, "ack", "m-a2", "c2", t=1.2)
    report = check(ordered)
    assert report.ok, report.summary()
    assert report.stats["ordered pairs"] == 1


def test_checker_reports_a_message_claimed_while_the_one_before_it_waits_for_its_retry(ordered):
    settled(ordered, "nack", "m-a1", "c1", t=1.1)  # a1 is back in the queue, in its backoff
    delivered(ordered, "a2", "m-a2", "c2", t=1.5, key="a")
    settled(ordered, "ack", "m-a2", "c2", t=1.6)
    delivered(ordered, "a1", "m-a1", "c1", t=2.5, attempts=2, key="a")
    settled(ordered, "ack", "m-a1", "c1", t=2.6)
    report = check(ordered)
    assert len(report.out_of_order) == 1, report.summary()
    assert report.out_of_order[0].startswith('s/"a": a2 (m-a2) claimed by 1.510 by c2 (attempt 1); a1')
    assert report.two_of_a_key == [] and not report.ok  # a1's lease ended with its nack


@pytest.mark.parametrize(
    ("leaves", "left"),
    [
        ("dead-letter nack", 1.1),
        ("nack out of attempts", 1.3),
        ("lease lapsed out of attempts", 1.2 + 10 - SLACK),
        ("unseen, in the DLQ at the end", 1.2),
    ],
)
def test_checker_accepts_the_next_message_once_the_one_before_it_was_dead_lettered(ordered, leaves, left):
    """a1 leaves for the DLQ at `left` at the earliest (as far as the history can tell), and a2
    is claimed after that; claimed just before, it is out of order."""
    if leaves == "dead-letter nack":
        settled(ordered, "dead_letter", "m-a1", "c1", t=1.1)
    else:
        settled(ordered, "nack", "m-a1", "c1", t=1.1)  # not out of attempts: a1 stays
    if leaves in ("nack out of attempts", "lease lapsed out of attempts"):
        delivered(ordered, "a1", "m-a1", "c3", t=1.2, attempts=3, key="a")
    if leaves == "nack out of attempts":
        settled(ordered, "nack", "m-a1", "c3", t=1.3)
    if leaves == "unseen, in the DLQ at the end":
        # A consume call cut short may have delivered a1's last attempts, whose lease lapsed.
        ordered.record_call(Call("c3", "GET", "/subscriptions/s/messages", None, 1.2, 11.2, "timeout"))
    ordered.record_dead("s", ["a1"])
    delivered(ordered, "a2", "m-a2", "c2", t=left + 0.01, key="a")
    settled(ordered, "ack", "m-a2", "c2", t=left + 0.1)
    report = check(ordered)
    assert report.ok, report.summary()
    ordered.deliveries[-1] = Delivery(
        "s", "c2", "m-a2", "a2", payload_of("a2", "a"), 1, left - 0.02, left - 0.01
    )
    report = check(ordered)
    assert len(report.out_of_order) == 1 and "m-a2" in report.out_of_order[0], report.summary()


def test_checker_orders_only_what_was_published_in_a_known_order(ordered):
    """Publishes that overlapped in time, or one cut short (it may have committed later), give no
    order: a3 and a4 may be delivered before a2, after a1's ack."""
    settled(ordered, "ack", "m-a1", "c1", t=1.1)
    published(ordered, "a3", t=0.505, key="a")  # [0.505, 0.515]: overlaps a1 and a2's publish
    published(ordered, "a4", t=0.3, status=None, key="a")  # ended before it, with no answer
    for i, value in enumerate(("a3", "a4", "a2")):
        delivered(ordered, value, f"m-{value}", "c2", t=2.0 + i, key="a")
        settled(ordered, "ack", f"m-{value}", "c2", t=2.1 + i)
    report = check(ordered)
    assert report.ok, report.summary()
    assert report.stats["ordered pairs"] == 1  # a1 before a2 only
    # With an answer, a4's publish comes before the others: a1 and a3 came before its ack at 3.1.
    ordered.publishes[-1].status = 204
    assert [line.split(";")[0] for line in check(ordered).out_of_order] == [
        's/"a": a1 (m-a1) claimed by 1.010 by c1 (attempt 1)',
        's/"a": a3 (m-a3) claimed by 2.010 by c2 (attempt 1)',
    ]
    assert check(ordered).stats["ordered pairs"] == 4


def test_checker_reports_two_messages_of_a_key_leased_at_once(ordered):
    """a3's publish overlapped a1's, so either may go first, but not both at once."""
    published(ordered, "a3", t=0.505, key="a")
    delivered(ordered, "a3", "m-a3", "c2", t=1.5, key="a")  # a1 is still leased to c1
    settled(ordered, "ack", "m-a1", "c1", t=2.0)
    settled(ordered, "ack", "m-a3", "c2", t=2.1)
    delivered(ordered, "a2", "m-a2", "c2", t=2.2, key="a")
    settled(ordered, "ack", "m-a2", "c2", t=2.3)
    report = check(ordered)
    assert len(report.two_of_a_key) == 1, report.summary()
    assert report.two_of_a_key[0].startswith(
        's/"a": a1 (m-a1) to c1 (claimed by 1.010, leased until at least 2.000)'
    )
    assert report.out_of_order == [] and not report.ok


def test_checker_accepts_a_message_of_a_key_leased_after_the_other_one_lapsed_or_was_settled(ordered):
    published(ordered, "a3", t=0.505, key="a")
    extended(ordered, "m-a1", "c1", seconds=1, t=1.1)  # c1 gives a1 up: its lease lapses from 2.05
    delivered(ordered, "a3", "m-a3", "c2", t=2.1, key="a")
    # c3's ack of a3 by message id (c3 held it once, say) acts on whichever delivery is current:
    # c2's lease may end then.
    settled(ordered, "ack", "m-a3", "c3", t=2.2)
    delivered(ordered, "a1", "m-a1", "c3", t=2.205, attempts=2, key="a")
    settled(ordered, "ack", "m-a1", "c3", t=2.3)
    settled(ordered, "ack", "m-a3", "c2", t=2.4)  # late: its delivery was gone
    delivered(ordered, "a2", "m-a2", "c2", t=2.5, key="a")
    settled(ordered, "ack", "m-a2", "c2", t=2.6)
    report = check(ordered)
    assert report.ok, report.summary()


def test_journal_of_a_killed_consumer_is_read_back_without_its_cut_line(tmp_path):
    journal = tmp_path / "c1.jsonl"
    child = History(journal=journal)
    child.record_deliveries([Delivery("s", "c1", "m-1", "a", {"value": "a"}, 1, 1.0, 1.1)])
    child.record_settle(Settle("ack", "s", "c1", ["m-1"], 204, 1.2, 1.3))
    child.close()
    with journal.open("a") as cut:
        cut.write('{"kind": "deliveries", "events": [{"subscr')
    assert last_journal_kind(journal) == "settle"
    merged = History()
    assert merged.load_journal(journal) == 2
    assert merged.deliveries == child.deliveries and merged.settles == child.settles


@pytest.mark.parametrize(
    ("filter", "payload", "expected"),
    [
        (None, {"country": "BR"}, True),
        ({}, {}, True),
        ({"country": ["BR", "US"]}, {"country": "US"}, True),
        ({"country": ["BR"]}, {"country": "JP"}, False),
        ({"country": ["BR"]}, {}, False),
        ({"premium": [True]}, {"premium": 1}, False),
        ({"n": [1]}, {"n": 1.0}, True),
        ({"country": ["BR"], "premium": [True]}, {"country": "BR", "premium": False}, False),
    ],
)
def test_checker_filter_semantics(filter, payload, expected):
    assert matches(filter, payload) is expected


# --- A server in this process, cleanup-stuck, and the workload's threads -----------------------


@pytest.fixture(scope="module")
def history_app(make_app):
    # Production error handling (no TESTING), and a database connection for every client thread.
    # Its pool closes with the module, not the session: the suite's connections stay under
    # PostgreSQL's max_connections (100).
    app = make_app(TESTING=False, DATABASE_POOL_SIZE=20, DATABASE_MAX_OVERFLOW=10)
    yield app
    db.dispose(app)


@pytest.fixture
def live_port(history_app) -> Iterator[int]:
    """The app on werkzeug's threaded server, on a loopback port of its own."""
    with threaded_server(history_app) as port:
        yield port


@pytest.fixture
def release(history_app) -> Callable[[int], tuple[int, int]]:
    """cleanup-stuck: what `flask pubsub cleanup-stuck --lock-timeout N` runs, in this process."""
    engine = db.get_engine(history_app)

    def release_stuck(lock_timeout: int) -> tuple[int, int]:
        with engine.begin() as conn:
            return messages.release_stuck(conn, lock_timeout)

    return release_stuck


def start_producers(workers: Workers, history: History, port: int, topics: list[str], **options) -> list:
    """One producer thread per topic in the list, named p0, p1, ..."""
    return [
        workers.start(
            f"p{i}", Producer(history, port, f"p{i}", topic, seed=i, **options).run, workers.stopped
        )
        for i, topic in enumerate(topics)
    ]


def start_consumers(
    workers: Workers, history: History, port: int, subscriptions: list[str], **options
) -> None:
    """One consumer thread per subscription in the list, named c0, c1, ..."""
    for i, subscription in enumerate(subscriptions):
        consumer = Consumer(history, port, f"c{i}", subscription, seed=i, **options)
        workers.start(f"c{i}", consumer.run, workers.stopped)


def delivered_values(history: History, subscription: str) -> set[str]:
    return {d.value for d in history.deliveries if d.subscription == subscription}


def published_values(history: History, topic: str, filter: dict | None) -> set[str]:
    return {
        value
        for p in history.publishes
        if p.outcome == "ok" and p.topic == topic
        for value, payload in zip(p.values, p.payloads, strict=True)
        if matches(filter, payload)
    }


def abandoned_deliveries(history: History) -> list[Delivery]:
    """The deliveries that their consumer extended to a second and let lapse (lapse_ratio): for
    each message an extend named, the consumer's last claim of it before the extend."""
    return [
        max(
            (
                d
                for d in history.deliveries
                if d.consumer == extend.consumer and d.message_id == message_id and d.t1 <= extend.t0
            ),
            key=lambda d: d.t1,
        )
        for extend in history.extends
        for message_id in extend.message_ids
    ]


def assert_retried_first(history: History, abandoned: list[Delivery]) -> None:
    """Each delivery of an ordered subscription that its consumer abandoned (killed, or its lease
    left to lapse) is the next claim of its key, one attempt later, unless its attempts were
    used up (then it went to the DLQ and the next of its key may go)."""
    for first in abandoned:
        info = history.subscriptions[first.subscription]
        key = first.payload[info.ordering_key]
        after = sorted(
            (
                d
                for d in history.deliveries
                if d.subscription == first.subscription
                and d.t0 > first.t1
                and d.payload[info.ordering_key] == key
            ),
            key=lambda d: d.t0,
        )
        if first.attempts < info.max_attempts:
            assert after, f"{first} never came back"
            assert (after[0].message_id, after[0].attempts) == (first.message_id, first.attempts + 1), (
                first,
                after[0],
                key_timeline(history, first.subscription, key),
            )


def key_timeline(history: History, subscription: str, key: object) -> list[str]:
    """What happened to one key's messages, in time order, to read when a check fails."""
    info = history.subscriptions[subscription]
    ids = {
        d.message_id
        for d in history.deliveries
        if d.subscription == subscription and d.payload.get(info.ordering_key) == key
    }
    events = [
        (d.t0, f"{d.t0:.3f}-{d.t1:.3f} claimed {d.message_id[:8]} attempt {d.attempts} by {d.consumer}")
        for d in history.deliveries
        if d.message_id in ids
    ]
    for kind, calls in (("settle", history.settles), ("extend", history.extends)):
        for call in calls:
            named = [m[:8] for m in call.message_ids if m in ids]
            if named:
                what = getattr(call, "kind", kind)
                events.append(
                    (
                        call.t0,
                        f"{call.t0:.3f}-{call.t1:.3f} {what} {named} by {call.consumer} -> {call.status}",
                    )
                )
    return [text for _, text in sorted(events)]


# --- Scenario 1: concurrent consumers and producers --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("subscriptions", [["all"], list(FILTERS)], ids=["one-subscription", "fan-out-to-5"])
def test_concurrent_consumers_lose_nothing_and_each_subscription_gets_exactly_its_matching_set(
    live_port, history, workers, subscriptions
):
    admin = Client(history, "admin", live_port)
    admin.create_topic("orders")
    for subscription in subscriptions:
        admin.create_subscription(subscription, "orders", FILTERS[subscription])
    producers = start_producers(workers, history, live_port, ["orders"] * 4, batches=25, pause=0.02)
    consumers = [subscriptions[i % len(subscriptions)] for i in range(8)]
    start_consumers(workers, history, live_port, consumers, batch_size=20, nack_ratio=0.2)
    workers.join(timeout=60, stop=False, threads=producers)
    assert wait_until_consumed(admin, subscriptions), "the consumers did not keep up"
    workers.join(timeout=15)
    drain(history, live_port, subscriptions)

    report = check(history)
    assert report.ok, report.summary()
    assert not history.failed_calls()
    assert report.stats["values published ok"] == 4 * 25 * 10
    for subscription in subscriptions:
        expected = published_values(history, "orders", FILTERS[subscription])
        assert delivered_values(history, subscription) == expected, subscription
    # The work was shared, and the retry path ran: nacked messages came back and were acked.
    assert len({d.consumer for d in history.deliveries if not d.consumer.startswith("drain-")}) == 8
    assert report.stats["nacks"] > 0 and report.stats["redeliveries"] > 0


@pytest.mark.slow
def test_consumers_dead_letter_some_messages_an_operator_redrives_them_and_nothing_is_lost(
    live_port, history, workers
):
    admin = Client(history, "admin", live_port)
    admin.create_topic("orders")
    admin.create_subscription("work", "orders")
    producers = start_producers(workers, history, live_port, ["orders"] * 2, batches=20, pause=0.05)
    start_consumers(
        workers, history, live_port, ["work"] * 4, batch_size=10, nack_ratio=0.1, dead_letter_ratio=0.15
    )
    redriven: list = []
    operator = Client(history, "operator", live_port)
    workers.start("operator", redrive_loop, operator, "work", 7, redriven, workers.stopped, 0.2)
    workers.join(timeout=60, stop=False, threads=producers)
    deadline = time.monotonic() + 30
    while admin.dead_letters("work") and time.monotonic() < deadline:  # the operator redrives them all
        time.sleep(0.2)
    assert wait_until_consumed(admin, ["work"]), "the consumers did not keep up"
    workers.join(timeout=15)
    drain(history, live_port, ["work"])
    dead = admin.dead_letters("work")
    history.record_dead("work", [m["payload"]["value"] for m in dead])

    report = check(history)
    assert report.ok, report.summary()
    assert not history.failed_calls()
    assert report.stats["values published ok"] == 2 * 20 * 10
    assert report.stats["dead-lettered"] > 0 and None not in redriven and sum(redriven) > 0
    # Redriven messages came back with their attempts reset: the first delivery of a message after
    # each of its dead-letterings is attempt 1.
    firsts = []
    for settle in history.settles:
        if settle.kind == "dead_letter" and settle.outcome == "ok":
            for message_id in settle.message_ids:
                later = [d for d in history.deliveries if d.message_id == message_id and d.t0 > settle.t1]
                if later:
                    firsts.append(min(later, key=lambda d: d.t0).attempts)
    assert firsts and set(firsts) == {1}, firsts
    metrics = admin.metrics("work")
    assert metrics["acked"] + metrics["dlq"] == 2 * 20 * 10 and metrics["dlq"] == len(dead)


@pytest.mark.slow
def test_delayed_publishes_are_delivered_once_each_never_before_their_time_and_none_is_lost(
    live_port, history, workers
):
    subscriptions = ["all", "br"]
    admin = Client(history, "admin", live_port)
    admin.create_topic("orders")
    for subscription in subscriptions:
        admin.create_subscription(subscription, "orders", FILTERS[subscription])
    # Half the batches wait 1 or 2 s: consumers poll all along, so they claim each at its time.
    producers = start_producers(
        workers, history, live_port, ["orders"] * 3, batches=15, pause=0.05, delay_ratio=0.5
    )
    consumers = [subscriptions[i % 2] for i in range(4)]
    start_consumers(workers, history, live_port, consumers, batch_size=20, nack_ratio=0.2, idle_sleep=0.02)
    workers.join(timeout=60, stop=False, threads=producers)
    assert wait_until_consumed(admin, subscriptions), "the consumers did not keep up"
    workers.join(timeout=15)
    drain(history, live_port, subscriptions)

    report = check(history)
    assert report.ok, report.summary()
    assert not history.failed_calls()
    assert report.stats["values published ok"] == 3 * 15 * 10
    assert 0 < report.stats["delayed"] < report.stats["values published ok"]
    for subscription in subscriptions:
        expected = published_values(history, "orders", FILTERS[subscription])
        assert delivered_values(history, subscription) == expected, subscription
    # Delayed values were claimed by the workload's consumers (not only by the drain), at their time.
    delayed = {v for p in history.publishes if p.delay_seconds for v in p.values}
    assert {d.value for d in history.deliveries if not d.consumer.startswith("drain-")} & delayed


# --- Scenario 2: consumers killed mid-batch ----------------------------------------------------

LOCK_TIMEOUT = 2  # seconds, for cleanup-stuck


@pytest.fixture
def processes() -> Iterator[dict[str, subprocess.Popen]]:
    """Processes a test starts, by name; killed at the end if still running."""
    started: dict[str, subprocess.Popen] = {}
    yield started
    for process in started.values():
        if process.poll() is None:
            process.kill()
        process.wait(10)


def start_consumer_process(
    processes: dict, tmp_path: Path, port: int, name: str, work_seconds: float
) -> Path:
    """`python -m tests.history consumer` on the subscription "work"; returns its journal."""
    journal = tmp_path / f"{name}.jsonl"
    command = [sys.executable, "-m", "tests.history", "consumer", "--port", str(port)]
    command += ["--subscription", "work", "--name", name, "--journal", str(journal)]
    command += ["--stop-file", str(tmp_path / "stop"), "--seconds", "60", "--batch-size", "10"]
    command += ["--work-seconds", str(work_seconds), "--seed", str(len(processes))]
    with (tmp_path / f"{name}.log").open("ab") as log:
        processes[name] = subprocess.Popen(
            command, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    return journal


@pytest.mark.slow
@pytest.mark.parametrize("ordering_key", [None, KEY_FIELD], ids=["unordered", "ordered"])
def test_consumers_killed_mid_batch_lose_nothing_their_messages_return_after_the_lock_timeout(
    live_port, history, release, workers, processes, tmp_path, ordering_key
):
    """Ordered, the orphans' keys wait for them: each comes back before the rest of its key."""
    admin = Client(history, "admin", live_port)
    admin.create_topic("orders")
    admin.create_subscription("work", "orders", ordering_key=ordering_key)
    # The victims, c0 and c1, work on each batch for 0.25-0.75 s: a kill can land mid-batch.
    journals = {
        name: start_consumer_process(processes, tmp_path, live_port, name, work)
        for name, work in (("c0", 0.5), ("c1", 0.5), ("c2", 0.02), ("c3", 0.02))
    }
    producers = start_producers(
        workers, history, live_port, ["orders"] * 2, batches=30, pause=0.05, keys=30 if ordering_key else 0
    )
    workers.start("cleanup-stuck", release_loop, history, release, LOCK_TIMEOUT, workers.stopped)

    for victim in ("c0", "c1"):
        time.sleep(0.5)
        # Mid-batch: the last event in its journal is a batch that it has not settled yet.
        deadline = time.monotonic() + 10
        while last_journal_kind(journals[victim]) != "deliveries" and time.monotonic() < deadline:
            time.sleep(0.005)
        processes[victim].send_signal(signal.SIGKILL)
        processes[victim].wait(10)
        name = f"{victim}-after"
        journals[name] = start_consumer_process(processes, tmp_path, live_port, name, 0.02)

    workers.join(timeout=60, stop=False, threads=producers)
    assert wait_until_consumed(admin, ["work"]), "the consumers did not keep up"
    (tmp_path / "stop").touch()
    for process in processes.values():
        process.wait(15)
    drain(history, live_port, ["work"])
    workers.join(timeout=15)
    for journal in journals.values():
        history.load_journal(journal)

    report = check(history)
    assert report.ok, report.summary()
    assert not history.failed_calls()
    for victim in ("c0", "c1"):
        held = history.unsettled(victim)
        assert held, f"{victim} was killed holding nothing"
        for orphan in held:
            again = sorted(
                (d for d in history.deliveries if d.message_id == orphan.message_id and d.t1 > orphan.t1),
                key=lambda d: d.t1,
            )
            assert again, f"{orphan} never came back"
            # Not before the lock timeout: the dead consumer's lock held until cleanup-stuck.
            assert again[0].t1 >= orphan.t0 + LOCK_TIMEOUT - SLACK, (orphan, again[0])
            assert again[0].attempts == orphan.attempts + 1
        if ordering_key:
            assert_retried_first(history, held)
    if ordering_key:
        assert report.stats["ordered pairs"] > 0


# --- Scenario 3: a poison message --------------------------------------------------------------


def is_poison(payload: object) -> bool:
    return isinstance(payload, dict) and payload.get("poison") is True


@pytest.mark.slow
def test_a_poison_message_that_crashes_every_consumer_ends_in_the_dlq_while_the_others_flow(
    live_port, history, release, workers
):
    attempts = 3
    admin = Client(history, "admin", live_port)
    admin.create_topic("orders")
    admin.create_subscription("work", "orders", max_delivery_attempts=attempts)
    producers = start_producers(workers, history, live_port, ["orders"] * 2, batches=15, pause=0.1)
    time.sleep(0.3)
    poison = Producer(history, live_port, "poison", "orders").publish_batch(size=1, poison=True)
    assert poison.outcome == "ok"
    crashes = []

    def consume_and_restart(index: int) -> None:
        """A consumer taking one message at a time, which dies on the poison; replaced at once.
        (Never nacks: with 3 attempts, random nacks would dead-letter good messages too.)"""
        generation = 0
        while not workers.stopped():
            name = f"c{index}-{generation}"
            consumer = Consumer(
                history, live_port, name, "work", batch_size=1, nack_ratio=0, crashes_on=is_poison
            )
            try:
                consumer.run(workers.stopped)
            except ConsumerCrashed:
                crashes.append(name)
            generation += 1

    for i in range(4):
        workers.start(f"c{i}", consume_and_restart, i)
    workers.start("cleanup-stuck", release_loop, history, release, 1, workers.stopped, 0.3)
    deadline = time.monotonic() + 30
    while not admin.dead_letters("work") and time.monotonic() < deadline:
        time.sleep(0.2)
    workers.join(timeout=60, stop=False, threads=producers)
    workers.join(timeout=15)
    drain(history, live_port, ["work"])
    dead = admin.dead_letters("work")
    history.record_dead("work", [m["payload"]["value"] for m in dead])

    report = check(history)
    assert report.ok, report.summary()
    assert not history.failed_calls()
    assert [(m["payload"], m["delivery_attempts"]) for m in dead] == [(poison.payloads[0], attempts)]
    poisoned = [d for d in history.deliveries if is_poison(d.payload)]
    assert [d.attempts for d in poisoned] == list(range(1, attempts + 1))
    assert sorted(crashes) == sorted(d.consumer for d in poisoned)
    # The others flowed while the poison made its rounds: acked between its first and last claim.
    acked_meanwhile = [
        s for s in history.settles if s.kind == "ack" and poisoned[0].t1 < s.t0 and s.t1 < poisoned[-1].t0
    ]
    assert acked_meanwhile
    metrics = {
        "subscription_id": "work",
        "available": 0,
        "delayed": 0,
        "delivered": 0,
        "acked": 2 * 15 * 10,
        "waiting": 0,
        "dlq": 1,
    }
    assert admin.metrics("work") == metrics


# --- Scenario 5: gunicorn workers killed during publish and ack --------------------------------


def live_workers(master: psutil.Process, killed: list[int]) -> list[psutil.Process]:
    alive = []
    for worker in master.children():
        try:
            if worker.pid not in killed and worker.status() != psutil.STATUS_ZOMBIE:
                alive.append(worker)
        except psutil.NoSuchProcess:
            pass
    return alive


def open_connections(worker: psutil.Process, port: int) -> int:
    """Client connections the worker holds (gthread keeps each keep-alive connection in one worker)."""
    try:
        return sum(
            1
            for c in worker.net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
        )
    except psutil.NoSuchProcess:
        return 0


@pytest.fixture
def gunicorn(database_settings, history, workers, tmp_path) -> Iterator[tuple[int, Path, psutil.Process]]:
    """`flask pubsub serve` with 2 workers: its port, its log and the gunicorn master. The
    workload is stopped and its connections closed before the server (idle keep-alive
    connections would hold up gunicorn's graceful stop)."""
    port, log = free_port(), tmp_path / "serve.log"
    env = serve_env(
        **serve_settings(database_settings), API_PORT=str(port), API_NUM_WORKERS="2", API_NUM_THREADS="8"
    )
    with serving(env, log) as process:
        try:
            wait_until_live(process, port, log)
            master, _ = gunicorn_processes(process, 2)
            yield port, log, master
        finally:
            workers.stop_event.set()
            for thread in workers.threads:
                thread.join(15)
            history.close()


@pytest.mark.slow
def test_gunicorn_workers_killed_during_publish_and_ack_lose_no_acknowledged_publish(
    gunicorn, history, release, workers
):
    port, log, master = gunicorn
    admin = Client(history, "admin", port)
    admin.create_topic("orders")
    admin.create_subscription("all", "orders")
    admin.create_subscription("br", "orders", FILTERS["br"])
    start_producers(workers, history, port, ["orders"] * 4, batches=10_000, pause=0.01)
    start_consumers(workers, history, port, ["all", "br"] * 4, nack_ratio=0.2)
    workers.start("cleanup-stuck", release_loop, history, release, LOCK_TIMEOUT, workers.stopped)

    killed: list[int] = []
    for _ in range(3):
        time.sleep(1.0)
        # The busier worker: it has requests in flight, and the most clients to cut off.
        victim = max(live_workers(master, killed), key=lambda worker: open_connections(worker, port))
        victim.send_signal(signal.SIGKILL)
        killed.append(victim.pid)
        deadline = time.monotonic() + 30  # gunicorn forks a new worker, which imports the app
        while len(live_workers(master, killed)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(live_workers(master, killed)) == 2, f"worker {victim.pid} not replaced:\n{output_of(log)}"
    time.sleep(1.0)  # the new workers take the load too
    workers.join(timeout=20)

    # Service continues: a publish after the kills goes through (and must be drained below).
    assert Producer(history, port, "after", "orders").publish_batch().outcome == "ok"
    cleanup = Workers()
    cleanup.start("cleanup-stuck", release_loop, history, release, LOCK_TIMEOUT, cleanup.stopped)
    try:
        drain(history, port, ["all", "br"], seconds=40)
    finally:
        cleanup.join(timeout=10)

    report = check(history)
    assert report.ok, f"{report.summary()}\n{output_of(log)[-3000:]}"
    assert report.stats["values published ok"] > 0
    # The kills cut publishes short (producers kept connections to the dead workers): their
    # outcome is unknown, and they may appear or not, once. No request got a 5xx.
    failed = history.failed_calls()
    assert any(c.method == "POST" and c.path == "/topics/orders/messages" for c in failed)
    assert all(c.status is None for c in failed), [c for c in failed if c.status][:5]


# --- Scenario 6: deletions under load ----------------------------------------------------------


def count_orphans(history_app) -> dict[str, int]:
    """Rows of subscriptions that no longer exist."""
    orphans = sa.text("""
        SELECT (SELECT count(*) FROM subscription_messages m
                WHERE NOT EXISTS (SELECT 1 FROM subscriptions s WHERE s.id = m.subscription_id)),
               (SELECT count(*) FROM acked_messages a
                WHERE NOT EXISTS (SELECT 1 FROM subscriptions s WHERE s.id = a.subscription_id))
    """)
    with db.get_engine(history_app).connect() as conn:
        messages_left, acks_left = conn.execute(orphans).one()
    return {"subscription_messages": messages_left, "acked_messages": acks_left}


@pytest.mark.slow
def test_deleting_subscriptions_and_topics_under_load_gives_clean_404s_and_leaves_no_orphans(
    live_port, history_app, history, workers
):
    admin = Client(history, "admin", live_port)
    admin.create_topic("orders")
    admin.create_topic("doomed")
    subscriptions = {"kept": "orders", "dropped": "orders", "doomed-a": "doomed", "doomed-br": "doomed"}
    for subscription, topic in subscriptions.items():
        admin.create_subscription(subscription, topic, FILTERS["br"] if subscription.endswith("br") else None)
    start_producers(
        workers, history, live_port, ["orders", "orders", "doomed", "doomed"], batches=10_000, pause=0.01
    )
    start_consumers(workers, history, live_port, list(subscriptions) * 2, nack_ratio=0.2)

    def churn() -> None:
        """Subscriptions of the doomed topic created, consumed and deleted all along."""
        client = Client(history, "churn", live_port)
        for n in range(10_000):
            if workers.stopped():
                break
            if (
                client.request("POST", "/subscriptions", {"id": f"churn-{n}", "topic_id": "doomed"}).status
                == 201
            ):
                client.request("GET", f"/subscriptions/churn-{n}/messages?consumer_id=churn")
                client.request("DELETE", f"/subscriptions/churn-{n}")
            else:
                time.sleep(0.01)

    workers.start("churn", churn)
    time.sleep(1.0)
    deleted = admin.request("DELETE", "/subscriptions/dropped")
    assert deleted.status == 204
    history.record_deleted_subscription("dropped", deleted.t0)
    time.sleep(1.0)
    deleted = admin.request("DELETE", "/topics/doomed")
    assert deleted.status == 204
    history.record_deleted_topic("doomed", deleted.t0)
    time.sleep(1.0)
    workers.join(timeout=20)
    drain(history, live_port, ["kept"])

    report = check(history)
    assert report.ok, report.summary()
    unclean = [c for c in history.calls if c.status is None or not (200 <= c.status < 300 or c.status == 404)]
    assert not unclean, unclean[:10]
    # The deletions happened under load: those still using what was deleted got 404s, in JSON.
    not_found = {(c.method, c.path) for c in history.calls if c.status == 404}
    details = {c.error for c in history.calls if c.status == 404}
    assert all(str(d) in ("Topic not found", "Subscription not found") for d in details), details
    assert ("GET", "/subscriptions/dropped/messages") in not_found
    assert ("POST", "/topics/doomed/messages") in not_found
    assert ("POST", "/subscriptions") in not_found  # a churn subscription of the deleted topic
    assert admin.request("GET", "/topics/doomed").status == 404
    assert [s["id"] for s in admin.request("GET", "/subscriptions?limit=100").body["data"]] == ["kept"]
    assert count_orphans(history_app) == {"subscription_messages": 0, "acked_messages": 0}


def wait_for_lock_wait(engine: sa.Engine, seconds: float = 10.0) -> bool:
    """Wait (bounded) until a session of this database waits for a lock."""
    waiting = sa.text("""
        SELECT count(*) FROM pg_stat_activity
        WHERE datname = current_database() AND wait_event_type = 'Lock'
    """)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(waiting).scalar():
                return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_a_topic_deleted_while_a_subscription_is_being_created_leaves_no_orphan_messages(
    live_port, history_app, history, workers
):
    """Scenario 6's race, made deterministic. DELETE /topics deletes the topic's subscriptions,
    then their messages, then the topic. A POST /subscriptions in flight holds a key-share lock
    on the topic row (its foreign-key check) until it commits, so the topic's DELETE waits for
    it; meanwhile another subscription is created and published to. If the DELETE has already
    listed the topic's subscriptions by then, the foreign key's cascade deletes the ones it did
    not see, but nothing deletes their messages."""
    admin = Client(history, "admin", live_port)
    admin.create_topic("doomed")
    engine = db.get_engine(history_app)
    statuses = {}

    def delete_topic() -> None:
        statuses["delete"] = Client(history, "deleter", live_port).request("DELETE", "/topics/doomed").status

    def create_and_publish() -> None:
        client = Client(history, "late", live_port)
        statuses["create"] = client.request(
            "POST", "/subscriptions", {"id": "late", "topic_id": "doomed"}
        ).status
        statuses["publish"] = client.request("POST", "/topics/doomed/messages", [{"n": 1}, {"n": 2}]).status

    with engine.connect() as in_flight:
        # A subscription being created: the view's own call, paused before its commit.
        create_subscription(in_flight, "slow", "doomed", None, 5, 1, 2, 60)
        deleting = workers.start("delete", delete_topic)
        assert wait_for_lock_wait(engine), "the topic's DELETE did not wait for the creation in flight"
        late = workers.start("late", create_and_publish)
        late.join(2)  # done at once, unless the DELETE holds new subscriptions back until it commits
        in_flight.commit()
    workers.join(timeout=10, threads=[deleting, late])
    assert statuses["delete"] == 204
    assert statuses["create"] in (201, 404) and statuses["publish"] in (204, 404), statuses
    assert admin.request("GET", "/subscriptions/late").status == 404
    assert count_orphans(history_app) == {"subscription_messages": 0, "acked_messages": 0}, statuses


# --- Scenario 7: ordering keys -----------------------------------------------------------------
# With ordered subscriptions, check() also looks at each key's order (out_of_order, two_of_a_key);
# consumers killed mid-batch on an ordered subscription are in scenario 2.


@pytest.mark.slow
def test_an_ordered_subscription_with_concurrent_consumers_and_producers_keeps_each_keys_order(
    live_port, history, workers
):
    """4 producers share 20 keys (30 messages each); 8 consumers nack and dead-letter some."""
    admin = Client(history, "admin", live_port)
    admin.create_topic("orders")
    admin.create_subscription("ordered", "orders", ordering_key=KEY_FIELD)
    producers = start_producers(workers, history, live_port, ["orders"] * 4, batches=15, pause=0.02, keys=20)
    start_consumers(
        workers,
        history,
        live_port,
        ["ordered"] * 8,
        batch_size=10,
        nack_ratio=0.1,
        dead_letter_ratio=0.05,
        idle_sleep=0.02,
    )
    workers.join(timeout=60, stop=False, threads=producers)
    assert wait_until_consumed(admin, ["ordered"], seconds=30), "the consumers did not keep up"
    workers.join(timeout=15)
    drain(history, live_port, ["ordered"])
    history.record_dead("ordered", [m["payload"]["value"] for m in admin.dead_letters("ordered")])

    report = check(history)
    assert report.ok, report.summary()
    assert not history.failed_calls()
    assert report.stats["values published ok"] == 4 * 15 * 10
    assert delivered_values(history, "ordered") == published_values(history, "orders", None)
    # The keys were shared out, many pairs had a known order, and the retry and DLQ paths ran.
    assert len({d.consumer for d in history.deliveries if not d.consumer.startswith("drain-")}) == 8
    assert report.stats["ordered pairs"] > 1000
    assert (
        report.stats["nacks"] > 0 and report.stats["redeliveries"] > 0 and report.stats["dead-lettered"] > 0
    )


@pytest.mark.slow
def test_lapsed_leases_on_an_ordered_subscription_are_retried_before_the_rest_of_their_key(
    live_port, history, workers
):
    """Consumers give up 30 % of their messages: they shorten the lease to a second and never
    settle. Each comes back before the rest of its key, until a third attempt lapses and
    sends it to the DLQ (in the consume that claims the next of its key)."""
    attempts = 3
    admin = Client(history, "admin", live_port)
    admin.create_topic("orders")
    admin.create_subscription("ordered", "orders", ordering_key=KEY_FIELD, max_delivery_attempts=attempts)
    producers = start_producers(workers, history, live_port, ["orders"] * 2, batches=10, pause=0.05, keys=20)
    start_consumers(
        workers,
        history,
        live_port,
        ["ordered"] * 4,
        batch_size=10,
        nack_ratio=0.1,
        lapse_ratio=0.3,
        idle_sleep=0.02,
    )
    workers.join(timeout=60, stop=False, threads=producers)
    assert wait_until_consumed(admin, ["ordered"], seconds=30), "the consumers did not keep up"
    workers.join(timeout=15)
    drain(history, live_port, ["ordered"])
    dead = admin.dead_letters("ordered")
    history.record_dead("ordered", [m["payload"]["value"] for m in dead])

    report = check(history)
    assert report.ok, report.summary()
    assert not history.failed_calls()
    assert delivered_values(history, "ordered") == published_values(history, "orders", None)
    abandoned = abandoned_deliveries(history)
    assert abandoned and report.stats["lease extensions"] == len(abandoned)
    assert_retried_first(history, abandoned)
    # Only lapses of last attempts dead-lettered (nacks stop below it): those went to the DLQ.
    assert {m["id"] for m in dead} == {d.message_id for d in abandoned if d.attempts == attempts} != set()
    metrics = admin.metrics("ordered")
    assert metrics["acked"] + metrics["dlq"] == 2 * 10 * 10 and metrics["dlq"] == len(dead)
