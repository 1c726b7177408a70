"""Subscriber: pull threads lease messages, a pool of worker threads runs the handler on each,
one thread sends the outcomes in batches and another extends the leases of slow handlers."""

import logging
import os
import queue
import random
import secrets
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from pubsub_client.client import MAX_IDS, Aborted, Client, InFlight, Message, backoff_delay
from pubsub_client.errors import AuthError, Nack, NotFoundError, PubSubError, ValidationError

log = logging.getLogger("pubsub_client")

MAX_PULLERS = 4
MIN_ACK_DEADLINE = 10  # the server's smallest ack_deadline_seconds: assumed when it cannot be read
LEASE_TICK = 0.5  # seconds between two looks at the leases of unfinished messages
FATAL = (NotFoundError, AuthError, ValidationError)  # a pull that fails so will fail again
QUEUED, RUNNING, SETTLED = 0, 1, 2


class _Lease:
    """The messages of one pull, and when their leases next need extending."""

    __slots__ = ("messages", "received", "extend_at")

    def __init__(self, messages: list[Message], received: float, extend_every: float):
        self.messages = messages
        self.received = received
        self.extend_at = received + extend_every


class Subscriber:
    """Runs handler(message) on every message of a subscription, in a pool of max_workers
    threads, with at most max_outstanding messages received and not yet handled. A handler that
    returns acks its message; one that raises nacks it (the subscription's backoff), and one that
    raises Nack(delay_seconds=N) nacks it to come back after N seconds. Outcomes are sent in
    batches (every ack_batch_seconds, or at once when 1000 are waiting) with the lease-qualified
    ack ids, so an outcome that arrives after its lease lapsed changes nothing. The leases of
    handlers still running near their ack deadline are extended, for up to
    max_extension_seconds."""

    def __init__(
        self,
        client: Client,
        subscription: str,
        handler: Callable[[Message], object],
        consumer_id: str | None = None,
        max_workers: int = 8,
        max_outstanding: int = 100,
        batch_size: int | None = None,
        wait_seconds: int = 20,
        max_extension_seconds: float = 3600,
        ack_batch_seconds: float = 0.05,
    ):
        self.client = client
        self.subscription = subscription
        self.handler = handler
        self.consumer_id = (
            consumer_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"[-128:]
        )
        self.max_workers = max(1, max_workers)
        self.max_outstanding = max(1, max_outstanding)
        # Two pulls of half the window each by default: one is answered while the other's
        # messages are handled.
        self.batch_size = min(100, self.max_outstanding, batch_size or max(1, self.max_outstanding // 2))
        self.pullers = max(1, min(MAX_PULLERS, self.max_outstanding // self.batch_size))
        self.wait_seconds = wait_seconds
        self.max_extension_seconds = max_extension_seconds
        self.ack_batch_seconds = ack_batch_seconds
        self.error: BaseException | None = None  # what stopped the subscriber, if not stop()
        self._ack_deadline = MIN_ACK_DEADLINE
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._room = threading.Condition()
        self._free = self.max_outstanding  # messages that may be received now
        self._pull_at_least = max(1, self.batch_size // 2)
        self._acks: deque[str] = deque()
        self._nacks: deque[tuple[str, int | None]] = deque()
        self._new_leases: deque[_Lease] = deque()
        self._flush_now = threading.Event()
        self._stopping = False
        self._stop_event = threading.Event()
        self._workers_done = threading.Event()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._stop_deadline = float("inf")  # the settling thread gives up on failed sends past it
        self._in_flight: list[InFlight] = []
        self._threads: dict[str, list[threading.Thread]] = {}
        self._started = False

    # --- Lifecycle ------------------------------------------------------------------------------

    def start(self) -> "Subscriber":
        if self._started:
            return self
        self._started = True
        try:
            self._ack_deadline = int(self.client.get_subscription(self.subscription)["ack_deadline_seconds"])
        except NotFoundError:
            raise
        except (PubSubError, KeyError, TypeError, ValueError) as error:  # e.g. no read scope
            log.info(
                "assuming an ack deadline of %ds for %s (%s)", MIN_ACK_DEADLINE, self.subscription, error
            )
        name = f"pubsub-{self.subscription}"
        self._in_flight = [InFlight() for _ in range(self.pullers)]
        self._threads = {
            "pullers": [
                threading.Thread(target=self._pull, args=(f,), name=f"{name}-pull-{i}", daemon=True)
                for i, f in enumerate(self._in_flight)
            ],
            "workers": [
                threading.Thread(target=self._work, name=f"{name}-worker-{i}", daemon=True)
                for i in range(self.max_workers)
            ],
            "settlers": [
                threading.Thread(target=self._flush, name=f"{name}-acks", daemon=True),
                threading.Thread(target=self._extend, name=f"{name}-leases", daemon=True),
            ],
        }
        for threads in self._threads.values():
            for thread in threads:
                thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop pulling, let running handlers finish and send their outcomes, nack (delay 0) the
        messages received but not started, and return: then nothing stays leased. A long poll
        in flight is waited for (up to wait_seconds), and what it brings is nacked. Past
        timeout, it returns anyway: a pull still in flight is cut, handlers still running keep
        their messages leased (the leases lapse after the ack deadline)."""
        deadline = time.monotonic() + timeout
        with self._stop_lock:
            self._stop_deadline = min(self._stop_deadline, deadline)
            first = not self._stopping
            self._stopping = True
        if not first or not self._started:
            self._stopped.wait(timeout)
            if not self._started:
                self._stopped.set()
            return
        self._stop_event.set()
        with self._room:
            self._room.notify_all()
        me = threading.current_thread()
        pullers = [t for t in self._threads["pullers"] if t is not me]
        # A waiting long poll is left to end by itself (within wait_seconds): the server would
        # still claim messages for a cut one, and they would stay leased to nobody until their
        # ack deadline. What it brings is nacked at once, as every message not started.
        for thread in pullers:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in pullers):
            log.warning("stop of %s: cutting a pull still running at the timeout", self.subscription)
            for in_flight in self._in_flight:
                in_flight.abort()
        for _ in self._threads["workers"]:
            self._queue.put(None)
        for thread in self._threads["workers"]:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._workers_done.set()
        self._flush_now.set()
        for thread in self._threads["settlers"]:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._stopped.set()
        log.info("subscriber of %s stopped", self.subscription)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the subscriber stops (Ctrl-C stops it); re-raise what stopped it, if it
        was not stop()."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._stopped.wait(0.2):
                if deadline is not None and time.monotonic() >= deadline:
                    return
        except KeyboardInterrupt:
            self.stop()
        if self.error is not None:
            raise self.error

    def install_signal_handlers(self, signals=(signal.SIGINT, signal.SIGTERM)) -> None:
        """Make these signals stop the subscriber (call from the main thread)."""

        def handle(signum, frame):
            log.info("signal %d: stopping the subscriber of %s", signum, self.subscription)
            threading.Thread(target=self.stop, name="pubsub-stop", daemon=True).start()

        for signum in signals:
            signal.signal(signum, handle)

    @property
    def running(self) -> bool:
        return self._started and not self._stopped.is_set()

    def __enter__(self) -> "Subscriber":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- Threads --------------------------------------------------------------------------------

    def _release(self, count: int) -> None:
        with self._room:
            self._free += count
            if self._free >= self._pull_at_least:
                self._room.notify()

    def _fail(self, error: BaseException) -> None:
        """Stop for good on an error that retrying cannot cure (e.g. the subscription is gone)."""
        log.error("subscriber of %s stops: %s", self.subscription, error)
        if self.error is None:
            self.error = error
        threading.Thread(target=self.stop, name="pubsub-stop", daemon=True).start()

    def _pull(self, in_flight: InFlight) -> None:
        failures = 0
        extend_every = self._ack_deadline - max(2.0, self._ack_deadline / 4)
        while not self._stopping:
            with self._room:
                while self._free < self._pull_at_least and not self._stopping:
                    self._room.wait()
                if self._stopping:
                    return
                count = min(self.batch_size, self._free)
                self._free -= count
            started = time.monotonic()
            try:
                messages = self.client.consume(
                    self.subscription, self.consumer_id, count, self.wait_seconds, in_flight=in_flight
                )
            except Aborted:
                self._release(count)
                return
            except FATAL as error:
                self._release(count)
                self._fail(error)
                return
            except Exception as error:  # the server restarting, unreachable, ...: try again
                self._release(count)
                failures += 1
                delay = backoff_delay(min(failures, 6))
                log.warning("consume from %s failed (%s); again in %.1fs", self.subscription, error, delay)
                self._stop_event.wait(delay)
                continue
            failures = 0
            received = time.monotonic()
            if len(messages) < count:
                self._release(count - len(messages))
            if not messages:
                # A long poll answered early (the server's waiters are all busy), or a short poll
                # that found nothing: pause, as the server asks, instead of asking again at once.
                if not self.wait_seconds or received - started < self.wait_seconds / 2:
                    self._stop_event.wait(random.uniform(0.1, 0.5))
                continue
            self._new_leases.append(_Lease(messages, received, extend_every))
            put = self._queue.put
            for message in messages:
                put(message)

    def _work(self) -> None:
        get, handler = self._queue.get, self.handler
        acks, nacks = self._acks, self._nacks
        while True:
            message = get()
            if message is None:
                return
            if self._stopping:  # received, not started: back to the queue at once
                nacks.append((message.ack_id, 0))
            else:
                message._state = RUNNING
                try:
                    handler(message)
                except Nack as nack:
                    nacks.append((message.ack_id, nack.delay_seconds))
                except BaseException:
                    log.warning("handler failed on message %s; nacked", message.id, exc_info=True)
                    nacks.append((message.ack_id, None))
                else:
                    acks.append(message.ack_id)
                    if len(acks) >= MAX_IDS:
                        self._flush_now.set()
            message._state = SETTLED
            self._release(1)

    def _flush(self) -> None:
        """Send the outcomes, every ack_batch_seconds or when 1000 acks are waiting; after stop,
        until none is left (or the stop's deadline passes)."""
        failures = 0
        while True:
            final = self._workers_done.is_set()
            if not final:
                self._flush_now.wait(self.ack_batch_seconds)
                self._flush_now.clear()
            if self._send_outcomes():
                failures = 0
            else:
                failures += 1
                if final and time.monotonic() >= self._stop_deadline:
                    log.error(
                        "subscriber of %s stopped with %d acks and %d nacks unsent",
                        self.subscription,
                        len(self._acks),
                        len(self._nacks),
                    )
                    return
                time.sleep(backoff_delay(min(failures, 5)))
                continue
            if final and not self._acks and not self._nacks:
                return

    def _send_outcomes(self) -> bool:
        """Send what is waiting; False if a request failed (its ids wait for the next try)."""
        acks, nacks = self._acks, self._nacks
        while acks:
            ids = [acks.popleft() for _ in range(min(MAX_IDS, len(acks)))]
            if not self._settle("ack", ids, lambda ids=ids: self.client.ack(self.subscription, ids)):
                acks.extendleft(reversed(ids))
                return False
        if nacks:
            by_delay: dict[int | None, list[str]] = {}
            for _ in range(len(nacks)):
                ack_id, delay = nacks.popleft()
                by_delay.setdefault(delay, []).append(ack_id)
            for delay, ids in by_delay.items():
                if not self._settle(
                    "nack", ids, lambda d=delay, ids=ids: self.client.nack(self.subscription, ids, d)
                ):
                    nacks.extendleft((ack_id, delay) for ack_id in reversed(ids))
                    for other, rest in by_delay.items():
                        if other != delay and rest:
                            nacks.extend((ack_id, other) for ack_id in rest)
                    return False
                ids.clear()
        return True

    def _settle(self, what: str, ids: list[str], send: Callable[[], None]) -> bool:
        try:
            send()
        except NotFoundError as error:  # the subscription is gone, and its messages with it
            log.warning("%s of %d messages dropped: %s", what, len(ids), error)
        except Exception as error:
            log.warning("%s of %d messages failed (%s); will retry", what, len(ids), error)
            return False
        return True

    def _extend(self) -> None:
        """Extend the leases of messages not yet handled near their ack deadline."""
        leases: list[_Lease] = []
        extend_every = self._ack_deadline - max(2.0, self._ack_deadline / 4)
        while not self._workers_done.wait(LEASE_TICK):
            while self._new_leases:
                leases.append(self._new_leases.popleft())
            now = time.monotonic()
            kept, due = [], []
            for lease in leases:
                pending = [m for m in lease.messages if m._state != SETTLED]
                if not pending:
                    continue
                kept.append(lease)
                if now >= lease.extend_at and now - lease.received < self.max_extension_seconds:
                    due.extend(m.ack_id for m in pending)
                    lease.extend_at = now + extend_every
            leases = kept
            for start in range(0, len(due), MAX_IDS):
                try:
                    self.client.extend(self.subscription, due[start : start + MAX_IDS])
                except Exception as error:
                    log.warning("extending %d leases failed: %s", len(due), error)
