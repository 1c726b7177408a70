"""Long-poll wake-ups: one LISTEN connection per process wakes, for each message published, about
one of the consumers waiting in it.

A consume with `wait_seconds` that finds nothing waits here, holding no database connection and
no work slot (pubsub.slots): up to LONG_POLL_MAX_WAITERS consumers per process; beyond that a
long poll is declined (answered empty at once, with a `Pubsub-Long-Poll: declined` header).

Publishes NOTIFY the channel once per statement per subscription, with how many messages the
subscription got ("<subscription> <count> <transaction id>"), but only while
`subscriptions.notify_until` says some process has waiters on it (mark_waiting): a NOTIFY takes a
lock that serializes the notifying commits of the whole PostgreSQL instance, which halved
single-message publish throughput at 8 concurrent publishers.

Who wakes. A process keeps, per subscription, its idle waiters oldest first. A notification of
k messages wakes idle waiters until their batch sizes cover k; each claims once. The worker
processes of one server share a small table of notifications (SharedWakes), so that k messages
wake about k waiters in the whole server, not k in every process. A claim that comes back full,
with more than its waiter was woken for, may have left more: it wakes one more waiter. Messages
notified when no waiter is idle are `pending`: the next waiter to park or arrive claims at once
instead of waiting. A new long poll skips its first claim and waits when its subscription's last
claim here found less than a full batch, idle waiters are there, and nothing is pending: nothing
known is claimable then, or they would have been woken. (While a backlog drains, claims come back
full, and every new long poll claims at once.)

Missed wake-ups are covered by a re-check every LONG_POLL_RECHECK_SECONDS: one query for all of
this process's waited subscriptions, which also catches messages that become claimable without a
publish (a backoff or an ack deadline running out, a reprocess) and subscriptions deleted under
their waiters (woken, they answer 404). If the LISTEN connection drops, the thread reconnects by
itself, and meanwhile wakes every waiter at each re-check.
"""

import fcntl
import hashlib
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterable

import psycopg
import sqlalchemy as sa
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
# The LISTEN wait is cut in slices so that stop() takes effect: each costs a wake-up, which with
# the re-check was half of an idle server's CPU at 0.2 s.
STOP_SLICE_SECONDS = 0.5
# The gunicorn master creates this file for its workers (pubsub.gunicorn_config).
SHARED_WAKES_ENV = "PUBSUB_SHARED_WAKES_FILE"
# A re-check counts at most this many claimable messages of a subscription (enough to wake all
# the waiters a process has on one subscription, at batch size 1, with room).
RECHECK_COUNT_LIMIT = 1000
_create_lock = threading.Lock()

# Per waited subscription: how many messages are claimable now (at most RECHECK_COUNT_LIMIT), and
# whether it still exists. Only the subscriptions with something to say come back.
RECHECK = f"""
SELECT s.id, c.n, EXISTS (SELECT FROM subscriptions WHERE id = s.id) AS known
FROM unnest(CAST(%(ids)s AS text[])) AS s (id)
CROSS JOIN LATERAL (
    SELECT count(*) AS n FROM (
        SELECT 1 FROM subscription_messages AS sm
        WHERE sm.subscription_id = s.id AND sm.state IN (0, 1) AND sm.available_at <= now()
        LIMIT {RECHECK_COUNT_LIMIT}
    ) AS claimable
) AS c
WHERE c.n > 0 OR NOT EXISTS (SELECT FROM subscriptions WHERE id = s.id)
"""


class SharedWakes:
    """A table, shared by the worker processes of one server, of how many messages of each recent
    notification no process has yet woken a waiter for. Every process receives every
    notification; the first to read one with idle waiters takes what they can claim, and the
    others take only what is left. A slot holds one notification (a 64-bit hash of its payload);
    a later one that hashes to the same slot replaces it, which costs at most one wasted claim."""

    SLOTS = 4096
    SLOT = struct.Struct("<QI4x")  # payload hash, messages left to wake a waiter for
    SIZE = SLOTS * SLOT.size

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR)
        self.map = mmap.mmap(self.fd, self.SIZE)

    @classmethod
    def create(cls, path: str) -> None:
        with open(path, "wb") as file:
            file.truncate(cls.SIZE)

    def take(self, payload: str, messages: int, wanted: int) -> tuple[int, int]:
        """Take up to `wanted` of the notification's `messages`: (taken, left for the others)."""
        digest = int.from_bytes(hashlib.blake2b(payload.encode(), digest_size=8).digest(), "little")
        tag = digest or 1  # 0 marks an empty slot
        offset = (digest % self.SLOTS) * self.SLOT.size
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            stored, left = self.SLOT.unpack_from(self.map, offset)
            if stored != tag:
                left = messages
            taken = min(wanted, left)
            self.SLOT.pack_into(self.map, offset, tag, left - taken)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return taken, left - taken

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def shared_wakes() -> SharedWakes | None:
    path = os.environ.get(SHARED_WAKES_ENV)
    if not path:
        return None
    try:
        return SharedWakes(path)
    except (OSError, ValueError) as error:  # a worker that outlived its master's file
        log.warning("long-poll wake-ups not shared between workers (%s): %s", path, error)
        return None


class Waiter:
    """One waiting consume: woken (its event set) for `granted` messages."""

    __slots__ = ("subscription_id", "batch_size", "event", "granted", "claim_first")

    def __init__(self, subscription_id: str, batch_size: int):
        self.subscription_id = subscription_id
        self.batch_size = batch_size
        self.event = threading.Event()
        self.granted = 0
        self.claim_first = True


class Waits:
    """A subscription's waiters in this process."""

    __slots__ = ("idle", "count", "pending", "drained")

    def __init__(self):
        self.idle: dict[Waiter, None] = {}  # waiting and not woken, oldest first
        self.count = 0  # every waiter: idle, woken, or claiming
        self.pending = 0  # messages notified when no waiter was idle to wake for them
        self.drained = False  # the last claim to finish here found less than a full batch


class Listener:
    """The waiters of one app in one process, and the thread that wakes them."""

    def __init__(self, app: Flask):
        config = app.config
        self.config = config
        self.engine = db.get_engine(app)
        self.listen_url = sa.engine.make_url(db.listen_url(app))  # LISTEN needs a session
        self.driver_options = db.driver_options(config)
        self.recheck_seconds = config["LONG_POLL_RECHECK_SECONDS"]
        self.capacity = config["LONG_POLL_MAX_WAITERS"]
        self.lock = threading.Lock()
        self.waits: dict[str, Waits] = {}
        self.waiting = 0
        self.marks: dict[str, float] = {}  # subscription -> when our mark lapses (monotonic)
        self.shared = shared_wakes()
        self.releasing = False  # the process is stopping: waiters answer at once
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.pid = 0

    # --- The waiters' side (request threads) ----------------------------------------------------

    def join(self, subscription_id: str, batch_size: int) -> Waiter | None:
        """A new waiter, idle from now on, or None when this process has as many as it allows.
        Its claim_first says whether it must claim before it waits."""
        waiter = Waiter(subscription_id, batch_size)
        with self.lock:
            if self.waiting >= self.capacity or self.releasing:
                return None
            self.waiting += 1
            waits = self.waits.get(subscription_id)
            if waits is None:
                waits = self.waits[subscription_id] = Waits()
            waiter.claim_first = not (waits.drained and waits.idle) or waits.pending > 0
            if waits.pending:
                waits.pending -= min(waits.pending, batch_size)
            waits.idle[waiter] = None
            waits.count += 1
            self.start()
        try:
            self.mark(subscription_id)
        except BaseException:
            self.leave(waiter)
            raise
        return waiter

    def claiming(self, waiter: Waiter) -> int:
        """The waiter claims now, using whatever woke it: for how many messages that was."""
        with self.lock:
            granted = waiter.granted
            waiter.event.clear()
            waiter.granted = 0
            return granted

    def claimed(self, waiter: Waiter, rows: int, granted: int) -> None:
        """A claim took `rows` places of the waiter's batch. A full batch that is more than the
        waiter was woken for may have left more: another waiter is woken for them."""
        with self.lock:
            waits = self.waits[waiter.subscription_id]
            waits.drained = rows < waiter.batch_size
            if not waits.drained and rows > granted:
                self.dispatch(waits, 1)

    def park(self, waiter: Waiter) -> bool:
        """After a claim that found nothing: whether to wait (True) or claim again at once
        (woken meanwhile, or messages pending)."""
        with self.lock:
            if waiter.event.is_set():
                return False
            waits = self.waits[waiter.subscription_id]
            if waits.pending:
                waits.pending -= min(waits.pending, waiter.batch_size)
                return False
            waits.idle[waiter] = None
            return True

    def leave(self, waiter: Waiter) -> None:
        """The waiter answers its request. A wake it did not use goes to another waiter."""
        with self.lock:
            self.waiting -= 1
            waits = self.waits[waiter.subscription_id]
            waits.idle.pop(waiter, None)
            waits.count -= 1
            if waiter.event.is_set() and waiter.granted:
                self.dispatch(waits, waiter.granted)
            if not waits.count:
                del self.waits[waiter.subscription_id]

    def release_waiters(self) -> None:
        """The process is stopping (pubsub.worker): every waiter answers now, with nothing, and
        new long polls are answered at once."""
        with self.lock:
            self.releasing = True
            for waits in self.waits.values():
                self.wake_idle(waits, sum(w.batch_size for w in waits.idle))

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

    # --- Waking (the listener thread; called with the lock held) --------------------------------

    def dispatch(self, waits: Waits, messages: int) -> None:
        """Wake idle waiters until their batches cover the messages; the rest is pending, for
        waiters now claiming to take when they park."""
        messages -= self.wake_idle(waits, messages)
        if messages > 0 and waits.count > len(waits.idle):
            waits.pending += messages

    @staticmethod
    def wake_idle(waits: Waits, messages: int) -> int:
        """Wake idle waiters, oldest first, for up to `messages`; how many they cover."""
        covered = 0
        while covered < messages and waits.idle:
            waiter = next(iter(waits.idle))
            del waits.idle[waiter]
            waiter.granted = min(waiter.batch_size, messages - covered)
            covered += waiter.granted
            waiter.event.set()
        return covered

    @staticmethod
    def idle_room(waits: Waits, messages: int) -> int:
        """How many of the messages this process's idle waiters can claim."""
        room = 0
        for waiter in waits.idle:
            room += waiter.batch_size
            if room >= messages:
                return messages
        return room

    def notified(self, payload: str) -> None:
        """A publish gave a subscription messages: "<subscription> <count> <transaction id>"."""
        subscription_id, _, rest = payload.partition(" ")
        count, _, _ = rest.partition(" ")
        with self.lock:
            waits = self.waits.get(subscription_id)
            if waits is None:
                return
            if not count.isdigit():  # not a payload of ours: wake them all, to look for themselves
                self.wake_idle(waits, len(waits.idle) * 100)
                return
            messages = int(count)
            wanted = self.idle_room(waits, messages)
            if self.shared is not None:
                taken, left = self.shared.take(payload, messages, wanted)
            else:
                taken, left = wanted, messages - wanted
            self.wake_idle(waits, taken)
            if left and waits.count > len(waits.idle):
                waits.pending += left

    def wake_all(self, subscription_ids: Iterable[str]) -> None:
        """Every idle waiter of these subscriptions looks for itself."""
        with self.lock:
            for subscription_id in subscription_ids:
                waits = self.waits.get(subscription_id)
                if waits is not None:
                    self.wake_idle(waits, sum(w.batch_size for w in waits.idle))

    def waited(self) -> list[str]:
        with self.lock:
            return list(self.waits)

    def recheck(self, conn: psycopg.Connection) -> None:
        waited = self.waited()
        if not waited:
            return
        rows = conn.execute(RECHECK, {"ids": waited}).fetchall()
        with self.lock:
            for subscription_id, claimable, known in rows:
                waits = self.waits.get(subscription_id)
                if waits is None:
                    continue
                if known:
                    self.dispatch(waits, claimable)
                else:  # deleted under its waiters: they answer 404
                    self.wake_idle(waits, sum(w.batch_size for w in waits.idle))

    # --- The thread ------------------------------------------------------------------------------

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
        if self.shared is not None:
            self.shared.close()
            self.shared = None

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
            self.wake_all(self.waited())
            self.stopping.wait(min(delay, self.recheck_seconds))
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def connect(self) -> psycopg.Connection:
        args, kwargs = self.engine.dialect.create_connect_args(self.listen_url)
        kwargs = {**kwargs, "autocommit": True, "application_name": APPLICATION_NAME, "connect_timeout": 5}
        kwargs.update(self.driver_options)
        # Its LISTEN and re-checks time out as the pool's statements do, and give up on a server
        # that does not answer them as the pool's do; keepalives tell it soon when the server
        # goes silent while it waits for notifications. Either way it reconnects.
        kwargs = db.bounded_waits(self.config, kwargs)
        return db.connect_bounded(self.config, *args, **kwargs)

    def listen(self, conn: psycopg.Connection) -> None:
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        # Anything published before LISTEN took effect was not notified to us.
        self.wake_all(self.waited())
        recheck_at = time.monotonic() + self.recheck_seconds
        while not self.stopping.is_set():
            # Each notification wakes its waiters as it arrives. The wait is cut in slices so
            # that stop() takes effect at once, whatever the re-check period.
            timeout = min(STOP_SLICE_SECONDS, max(0.0, recheck_at - time.monotonic()))
            for notify in conn.notifies(timeout=timeout):
                self.notified(notify.payload)
            if time.monotonic() >= recheck_at:
                recheck_at = time.monotonic() + self.recheck_seconds
                self.recheck(conn)


def get_listener(app: Flask) -> Listener:
    listener = app.extensions.get("pubsub_listener")
    if listener is None:
        with _create_lock:
            listener = app.extensions.get("pubsub_listener")
            if listener is None:
                listener = app.extensions["pubsub_listener"] = Listener(app)
    return listener
