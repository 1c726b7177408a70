"""Long-poll wake-ups: one LISTEN connection per process wakes the consumers waiting in it.

A consume with `wait_seconds` that finds nothing registers a waiter here and sleeps on an Event,
holding no database connection. Publishes NOTIFY the channel with the subscription id, once per
statement per subscription, but only while `subscriptions.notify_until` says some process has
waiters on it (mark_waiting). A NOTIFY takes a lock that serializes the notifying commits of
the whole PostgreSQL instance: in every publish, it halved single-message publish throughput at
8 concurrent publishers. (Sending it after the commit, in a statement that does not wait for the
disk, won back only 7 %: the cost is the notification queue, not the fsync.)

Missed wake-ups are covered by a re-check every LONG_POLL_RECHECK_SECONDS: one query for all of
this process's waited subscriptions, which also catches messages that become claimable without a
publish (a backoff or an ack deadline running out, a reprocess). If the LISTEN connection drops,
the thread reconnects by itself, and meanwhile wakes every waiter at each re-check.

Each waiter holds a gunicorn thread, so a process lets at most API_NUM_THREADS -
LONG_POLL_RESERVED_THREADS consumers wait at once; the others are answered at once.
"""

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from flask import Flask

from pubsub import db, subscriptions
from pubsub.messages import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

APPLICATION_NAME = "pubsub-listener"
# How long a mark asks publishers to NOTIFY, and when it is renewed: a waiter (at most 20 s)
# that starts with more than RENEW_SECONDS left is covered to its end.
MARK_SECONDS = 60
RENEW_SECONDS = 30
RECONNECT_MAX_SECONDS = 5.0
STOP_SLICE_SECONDS = 0.2
_create_lock = threading.Lock()

RECHECK = """
SELECT s.id FROM unnest(CAST(%(ids)s AS text[])) AS s (id)
WHERE EXISTS (
    SELECT 1 FROM subscription_messages AS sm
    WHERE sm.subscription_id = s.id AND sm.state IN (0, 1) AND sm.available_at <= now()
)
"""


class Listener:
    """The waiters of one app in one process, and the thread that wakes them."""

    def __init__(self, app: Flask):
        config = app.config
        self.engine = db.get_engine(app)
        self.recheck_seconds = config["LONG_POLL_RECHECK_SECONDS"]
        self.capacity = max(1, config["API_NUM_THREADS"] - config["LONG_POLL_RESERVED_THREADS"])
        self.lock = threading.Lock()
        self.waiters: dict[str, set[threading.Event]] = {}
        self.waiting = 0
        self.marks: dict[str, float] = {}  # subscription -> when our mark lapses (monotonic)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.pid = 0

    @contextmanager
    def wait_on(self, subscription_id: str) -> Iterator[threading.Event | None]:
        """An Event set whenever the subscription may have messages to claim, or None when this
        process already has as many waiters as it allows."""
        event = threading.Event()
        with self.lock:
            if self.waiting >= self.capacity:
                event = None
            else:
                self.waiting += 1
                self.waiters.setdefault(subscription_id, set()).add(event)
                self.start()
        if event is None:
            yield None
            return
        try:
            self.mark(subscription_id)
            yield event
        finally:
            with self.lock:
                self.waiting -= 1
                events = self.waiters[subscription_id]
                events.discard(event)
                if not events:
                    del self.waiters[subscription_id]

    def mark(self, subscription_id: str) -> None:
        """Ask publishers to NOTIFY this subscription for the next MARK_SECONDS (unless our last
        mark still covers a whole wait). Taken with FOR UPDATE, which waits for publishes in
        flight: every publish either commits before our next claim or sees the mark."""
        now = time.monotonic()
        if self.marks.get(subscription_id, 0) - now > RENEW_SECONDS:
            return
        with db.connect() as conn:
            subscriptions.mark_waiting(conn, subscription_id, MARK_SECONDS)
        self.marks[subscription_id] = now + MARK_SECONDS

    def start(self) -> None:
        """Start the thread in this process (called with the lock held); after a fork the
        parent's thread is gone, so the pid tells."""
        if self.pid == os.getpid() and self.thread is not None and self.thread.is_alive():
            return
        self.pid = os.getpid()
        self.stopping.clear()
        self.thread = threading.Thread(target=self.run, name=APPLICATION_NAME, daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def wake(self, subscription_ids) -> None:
        with self.lock:
            for subscription_id in subscription_ids:
                for event in self.waiters.get(subscription_id, ()):
                    event.set()

    def waited(self) -> list[str]:
        with self.lock:
            return list(self.waiters)

    def run(self) -> None:
        delay = 0.1
        while not self.stopping.is_set():
            try:
                with self.connect() as conn:
                    delay = 0.1
                    self.listen(conn)
            except (psycopg.Error, OSError) as error:
                if self.stopping.is_set():
                    break
                log.warning("long-poll listener disconnected (%s); reconnecting", error)
            except Exception:  # a bug must not leave waiters without their wake-ups for good
                log.exception("long-poll listener failed; restarting")
            # Notifications may be lost while we are away: waiters look for themselves.
            self.wake(self.waited())
            self.stopping.wait(min(delay, self.recheck_seconds))
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def connect(self) -> psycopg.Connection:
        args, kwargs = self.engine.dialect.create_connect_args(self.engine.url)
        kwargs = {**kwargs, "autocommit": True, "application_name": APPLICATION_NAME, "connect_timeout": 5}
        return psycopg.connect(*args, **kwargs)

    def listen(self, conn: psycopg.Connection) -> None:
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        # Anything published before LISTEN took effect was not notified to us.
        self.wake(self.waited())
        recheck_at = time.monotonic() + self.recheck_seconds
        while not self.stopping.is_set():
            # Each notification wakes its waiters as it arrives. The wait is cut in slices so
            # that stop() takes effect at once, whatever the re-check period.
            timeout = min(STOP_SLICE_SECONDS, max(0.0, recheck_at - time.monotonic()))
            for notify in conn.notifies(timeout=timeout):
                self.wake((notify.payload,))
            if time.monotonic() >= recheck_at:
                recheck_at = time.monotonic() + self.recheck_seconds
                waited = self.waited()
                if waited:
                    self.wake(row[0] for row in conn.execute(RECHECK, {"ids": waited}))


def get_listener(app: Flask) -> Listener:
    listener = app.extensions.get("pubsub_listener")
    if listener is None:
        with _create_lock:
            listener = app.extensions.get("pubsub_listener")
            if listener is None:
                listener = app.extensions["pubsub_listener"] = Listener(app)
    return listener
