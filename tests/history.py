"""A history-checking workload, as queues are tested by Jepsen's queue checker: run producers and
consumers against a live server, record every operation with the client's clock around it, then
check the history for anomalies.

- Producers publish batches of payloads carrying unique values (``p1-000042``), with fields that
  filters can select on (``country``, ``premium``), and record each publish's outcome: ok (2xx),
  refused (4xx) or unknown (no response, or a 5xx: it may or may not have committed). Some
  batches may be published with a delay (``?delay_seconds=N``), recorded with the publish.
  Payloads may carry an ordering key (``customer``: one of a few values) for ordered
  subscriptions.
- Consumers claim batches, record every delivery (message id, value, attempts, the time interval
  of the claim), then ack or nack each message at random and record those calls too. A consumer
  may also abandon some messages after shortening their lease to a second (``extend``), so that
  leases lapse and the messages are claimed again.
- A drain acks everything left until several empty polls and the subscription's metrics show
  nothing available or locked.
- ``check(history)`` reports each anomaly class as a list of readable examples.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process of the machine), so
consumers in subprocesses can write their history to a journal file that the test merges.

This module imports only the standard library: ``python -m tests.history consumer ...`` starts in
a few tens of milliseconds, so a scenario can run consumers as processes and SIGKILL them.
"""

import argparse
import http.client
import json
import os
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from urllib.parse import quote

COUNTRIES = ("BR", "US", "DE", "JP", "IN")
KEY_FIELD = "customer"  # the payload field that the Producer's `keys` option fills
REQUEST_TIMEOUT = 10.0  # seconds; a request slower than this counts as unknown
IDLE_RECONNECT = 1.5  # seconds; gunicorn closes keep-alive connections idle for 2 s
# Seconds by which the checker widens what the server may legitimately have done: PostgreSQL's
# clock and ours tick together, but now() is the start of a statement, not of our request.
SLACK = 0.05

Stop = Callable[[], bool]


def outcome_of(status: int | None) -> str:
    """ok (2xx), refused (4xx: it did not happen) or unknown (no answer or a 5xx: it may have)."""
    if status is not None and 200 <= status < 300:
        return "ok"
    if status is not None and 400 <= status < 500:
        return "refused"
    return "unknown"


# --- The events of a history -------------------------------------------------------------------


@dataclass
class Call:
    """One HTTP exchange; status None when no response came back (connection error, timeout).
    `error` says what went wrong: the exception, or an error response's detail."""

    client: str
    method: str
    path: str
    status: int | None
    t0: float
    t1: float
    error: str | None = None


@dataclass
class Publish:
    producer: str
    topic: str
    values: list[str]
    payloads: list[dict]
    status: int | None
    t0: float
    t1: float
    delay_seconds: float = 0.0  # claimable from the server's now() + this, no earlier than t0 + this
    # A publish sent with an Idempotency-Key, and the message ids its receipts named, if it asked.
    key: str | None = None
    ids: list[str] | None = None

    @property
    def outcome(self) -> str:
        return outcome_of(self.status)


@dataclass
class Delivery:
    """A message in a consume response: claimed (and locked) at some instant between t0 and t1."""

    subscription: str
    consumer: str
    message_id: str
    value: str | None
    payload: object
    attempts: int
    t0: float
    t1: float


@dataclass
class Settle:
    """An ack or nack call by a consumer for some of its deliveries."""

    kind: str  # "ack", "nack" or "dead_letter" (a nack with ?dead_letter=true)
    subscription: str
    consumer: str
    message_ids: list[str]
    status: int | None
    t0: float
    t1: float

    @property
    def outcome(self) -> str:
        return outcome_of(self.status)


@dataclass
class Extend:
    """An extend call: the leases of the named deliveries end `seconds` after the server's now()
    (None: the subscription's ack deadline), earlier or later than they would have."""

    subscription: str
    consumer: str
    message_ids: list[str]
    seconds: float | None
    status: int | None
    t0: float
    t1: float

    @property
    def outcome(self) -> str:
        return outcome_of(self.status)


@dataclass
class Release:
    """A cleanup-stuck run: releases locks taken more than lock_timeout seconds before it ran."""

    lock_timeout: float
    t0: float
    t1: float
    released: int | None = None
    dead: int | None = None


@dataclass
class SubscriptionInfo:
    id: str
    topic: str
    filter: dict | None
    created: float  # when its creation was answered: publishes after that must reach it
    deleted: float | None = None  # when its deletion (or its topic's) was requested
    ordering_key: str | None = None  # the payload field whose values order its messages
    ack_deadline: float | None = None  # seconds a delivery's lease lasts (None: not known)
    max_attempts: int | None = None  # deliveries before a nack or a lapse dead-letters (None: not known)


EVENT_TYPES = {
    "call": Call,
    "publish": Publish,
    "deliveries": Delivery,
    "settle": Settle,
    "release": Release,
    "extend": Extend,
}


class History:
    """Everything that happened, recorded by any number of threads; optionally also written to a
    journal file, one JSON line per event as it happens, for a process that may be killed."""

    def __init__(self, journal: str | os.PathLike | None = None):
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.publishes: list[Publish] = []
        self.deliveries: list[Delivery] = []
        self.settles: list[Settle] = []
        self.releases: list[Release] = []
        self.extends: list[Extend] = []
        self.subscriptions: dict[str, SubscriptionInfo] = {}
        self.dead: dict[str, set[str]] = defaultdict(set)  # subscription -> values in its DLQ
        self.final_metrics: dict[str, dict] = {}
        self.clients: list[Client] = []  # closed with the history
        self.journal = open(journal, "a", encoding="utf-8", buffering=1) if journal else None

    def close(self) -> None:
        """Close every client's connection, and the journal."""
        for client in self.clients:
            client.close()
        if self.journal:
            self.journal.close()

    def _lists(self) -> dict[str, list]:
        return {
            "call": self.calls,
            "publish": self.publishes,
            "deliveries": self.deliveries,
            "settle": self.settles,
            "release": self.releases,
            "extend": self.extends,
        }

    def _record(self, kind: str, events: list) -> None:
        with self.lock:
            self._lists()[kind].extend(events)
            if self.journal:
                # One write per line: a SIGKILL can only cut the last line short.
                self.journal.write(json.dumps({"kind": kind, "events": [asdict(e) for e in events]}) + "\n")

    def record_call(self, call: Call) -> None:
        self._record("call", [call])

    def record_publish(self, publish: Publish) -> None:
        self._record("publish", [publish])

    def record_deliveries(self, deliveries: list[Delivery]) -> None:
        self._record("deliveries", deliveries)

    def record_settle(self, settle: Settle) -> None:
        self._record("settle", [settle])

    def record_release(self, release: Release) -> None:
        self._record("release", [release])

    def record_extend(self, extend: Extend) -> None:
        self._record("extend", [extend])

    def record_subscription(
        self, subscription_id: str, topic: str, filter: dict | None, created: float, **settings
    ) -> None:
        """`settings`: SubscriptionInfo's ordering_key, ack_deadline and max_attempts."""
        with self.lock:
            self.subscriptions[subscription_id] = SubscriptionInfo(
                subscription_id, topic, filter, created, **settings
            )

    def record_deleted_subscription(self, subscription_id: str, at: float) -> None:
        with self.lock:
            self.subscriptions[subscription_id].deleted = at

    def record_deleted_topic(self, topic: str, at: float) -> None:
        with self.lock:
            for info in self.subscriptions.values():
                if info.topic == topic and info.deleted is None:
                    info.deleted = at

    def record_dead(self, subscription_id: str, values: Iterable[str]) -> None:
        with self.lock:
            self.dead[subscription_id].update(values)

    def record_metrics(self, subscription_id: str, metrics: dict) -> None:
        with self.lock:
            self.final_metrics[subscription_id] = metrics

    def load_journal(self, path: str | os.PathLike) -> int:
        """Merge the events of a journal; a line cut short by a kill is skipped. Returns how many."""
        count = 0
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                events = [EVENT_TYPES[entry["kind"]](**e) for e in entry["events"]]
                with self.lock:
                    self._lists()[entry["kind"]].extend(events)
                count += len(events)
        return count

    def failed_calls(self) -> list[Call]:
        """Calls that got no response or a 5xx."""
        return [c for c in self.calls if c.status is None or c.status >= 500]

    def unsettled(self, consumer: str) -> list[Delivery]:
        """The consumer's deliveries that it never acked or nacked (it held them when it died)."""
        settled = {(s.subscription, m) for s in self.settles if s.consumer == consumer for m in s.message_ids}
        return [
            d
            for d in self.deliveries
            if d.consumer == consumer and (d.subscription, d.message_id) not in settled
        ]


def last_journal_kind(path: str | os.PathLike) -> str | None:
    """The kind of the last complete event in a journal (e.g. "deliveries": a batch is in hand)."""
    try:
        with open(path, "rb") as journal:
            journal.seek(0, os.SEEK_END)
            journal.seek(max(0, journal.tell() - 65536))
            tail = journal.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            return json.loads(line)["kind"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return None


# --- The client and the workload ---------------------------------------------------------------


@dataclass
class Response:
    status: int | None
    body: object
    t0: float
    t1: float


class Client:
    """The REST API over one keep-alive connection (http.client), reopened after an idle spell
    or an error. Every call is recorded; a request is never retried (its outcome is the data)."""

    def __init__(self, history: History, name: str, port: int, timeout: float = REQUEST_TIMEOUT):
        self.history, self.name, self.port, self.timeout = history, name, port, timeout
        self.conn: http.client.HTTPConnection | None = None
        self.last_used = 0.0
        with history.lock:
            history.clients.append(self)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, method: str, path: str, body: object = None, headers: dict | None = None) -> Response:
        if self.conn is not None and time.monotonic() - self.last_used > IDLE_RECONNECT:
            self.close()
        headers = {**({"Content-Type": "application/json"} if body is not None else {}), **(headers or {})}
        data = None if body is None else json.dumps(body)
        t0 = time.monotonic()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            self.conn.request(method, path, body=data, headers=headers)
            response = self.conn.getresponse()
            raw = response.read()
            if response.will_close:
                self.close()
        except (OSError, http.client.HTTPException) as error:
            self.close()
            t1 = self.last_used = time.monotonic()
            self.history.record_call(Call(self.name, method, path.split("?")[0], None, t0, t1, repr(error)))
            return Response(None, None, t0, t1)
        t1 = self.last_used = time.monotonic()
        decoded: object = raw.decode("utf-8", "replace")
        if raw and (response.getheader("Content-Type") or "").startswith("application/json"):
            decoded = json.loads(raw)
        error = None
        if response.status >= 400:
            error = decoded.get("detail") if isinstance(decoded, dict) else repr(decoded)[:200]
        self.history.record_call(Call(self.name, method, path.split("?")[0], response.status, t0, t1, error))
        return Response(response.status, decoded, t0, t1)

    def create_topic(self, topic: str) -> None:
        response = self.request("POST", "/topics", {"id": topic})
        assert response.status == 201, (response.status, response.body)

    def create_subscription(
        self,
        subscription_id: str,
        topic: str,
        filter: dict | None = None,
        ordering_key: str | None = None,
        **fields,
    ) -> None:
        """Create it (fast retries for the workload: backoff_min_seconds=1) and record it, with
        the ordering key, ack deadline and attempts that the server answered."""
        settings = {"max_delivery_attempts": 50, "backoff_min_seconds": 1, "backoff_max_seconds": 2, **fields}
        if ordering_key is not None:  # not sent otherwise: a fastpubsub body
            settings["ordering_key"] = ordering_key
        body = {"id": subscription_id, "topic_id": topic, "filter": filter, **settings}
        response = self.request("POST", "/subscriptions", body)
        assert response.status == 201, (response.status, response.body)
        self.history.record_subscription(
            subscription_id,
            topic,
            filter,
            response.t1,
            ordering_key=response.body.get("ordering_key"),
            ack_deadline=response.body.get("ack_deadline_seconds"),
            max_attempts=response.body.get("max_delivery_attempts"),
        )

    def metrics(self, subscription_id: str) -> dict | None:
        response = self.request("GET", f"/subscriptions/{quote(subscription_id)}/metrics")
        return response.body if response.status == 200 else None

    def dead_letters(self, subscription_id: str) -> list[dict]:
        """Every message in the DLQ, page by page."""
        found: list[dict] = []
        while True:
            path = f"/subscriptions/{quote(subscription_id)}/dlq?offset={len(found)}&limit=100"
            response = self.request("GET", path)
            assert response.status == 200, (response.status, response.body)
            found.extend(response.body["data"])
            if len(response.body["data"]) < 100:
                return found


class Producer:
    """Publishes `batches` batches of `batch_size` payloads with unique values to a topic. With
    `keys`, each payload's KEY_FIELD is one of `keys` values (k0, k1, ...), drawn at random: few
    enough that each key has several messages, and producers sharing a key publish concurrently."""

    def __init__(
        self,
        history: History,
        port: int,
        name: str,
        topic: str,
        *,
        batches: int = 50,
        batch_size: int = 10,
        seed: int = 0,
        pause: float = 0.0,
        delay_ratio: float = 0.0,
        max_delay_seconds: int = 2,
        keys: int = 0,
    ):
        self.history, self.name, self.topic = history, name, topic
        self.keys = keys
        self.batches, self.batch_size, self.pause = batches, batch_size, pause
        self.delay_ratio, self.max_delay_seconds = delay_ratio, max_delay_seconds
        self.client = Client(history, name, port)
        self.rng = random.Random(f"{seed}-{name}")
        self.sequence = 0

    def payload(self) -> dict:
        self.sequence += 1
        payload = {
            "value": f"{self.name}-{self.sequence:06d}",
            "n": self.sequence,
            "country": self.rng.choice(COUNTRIES),
            "premium": self.rng.random() < 0.5,
        }
        if self.keys:  # drawn only then, so that other scenarios see the same draws
            payload[KEY_FIELD] = f"k{self.rng.randrange(self.keys)}"
        return payload

    def publish_batch(self, size: int | None = None, **extra) -> Publish:
        payloads = [{**self.payload(), **extra} for _ in range(size or self.batch_size)]
        delay = 0
        if self.delay_ratio and self.rng.random() < self.delay_ratio:
            delay = self.rng.randint(1, self.max_delay_seconds)
        query = f"?delay_seconds={delay}" if delay else ""
        response = self.client.request("POST", f"/topics/{quote(self.topic)}/messages{query}", payloads)
        publish = Publish(
            self.name,
            self.topic,
            [p["value"] for p in payloads],
            payloads,
            response.status,
            response.t0,
            response.t1,
            delay,
        )
        self.history.record_publish(publish)
        return publish

    def run(self, stop: Stop) -> None:
        for _ in range(self.batches):
            if stop():
                break
            if self.publish_batch().outcome != "ok":
                time.sleep(0.05)  # a deleted topic or a dead worker: do not spin
            elif self.pause:
                time.sleep(self.pause)
        self.client.close()


class ConsumerCrashed(Exception):
    """The consumer died holding its batch (it neither acked nor nacked it)."""


class Consumer:
    """Claims batches from one subscription, then acks or nacks each message at random.

    It nacks only messages delivered fewer than `nack_below_attempts` times, so that retries end
    (each waits the subscription's backoff). `work_seconds` is how long it "processes" a batch
    before settling it; `crashes_on(payload)` makes it die (raise ConsumerCrashed) holding a batch
    that contains such a payload. It abandons a `lapse_ratio` of its messages: it shortens their
    leases to a second (extend?seconds=1) as soon as they come, and never settles them, so that
    their leases lapse and the next consume claims them again."""

    def __init__(
        self,
        history: History,
        port: int,
        name: str,
        subscription: str,
        *,
        batch_size: int = 10,
        nack_ratio: float = 0.2,
        nack_below_attempts: int = 3,
        seed: int = 0,
        work_seconds: float = 0.0,
        crashes_on: Callable[[object], bool] | None = None,
        idle_sleep: float = 0.1,
        dead_letter_ratio: float = 0.0,
        wait_seconds: int = 0,
        lapse_ratio: float = 0.0,
    ):
        self.history, self.name, self.subscription = history, name, subscription
        self.wait_seconds = wait_seconds  # a long poll: each claim waits up to this for a message
        self.dead_letter_ratio, self.lapse_ratio = dead_letter_ratio, lapse_ratio
        self.batch_size, self.nack_ratio, self.work_seconds = batch_size, nack_ratio, work_seconds
        self.nack_below_attempts = nack_below_attempts
        self.crashes_on, self.idle_sleep = crashes_on, idle_sleep
        self.client = Client(history, name, port)
        self.rng = random.Random(f"{seed}-{name}")
        self.last_status: int | None = None
        self.path = f"/subscriptions/{quote(subscription)}"

    def poll_once(self) -> int | None:
        """One claim and the settling of its batch: how many messages came, None if it failed."""
        query = f"consumer_id={quote(self.name)}&batch_size={self.batch_size}"
        if self.wait_seconds:
            query += f"&wait_seconds={self.wait_seconds}"
        response = self.client.request("GET", f"{self.path}/messages?{query}")
        self.last_status = response.status
        if response.status != 200:
            return None
        batch = [
            Delivery(
                self.subscription,
                self.name,
                m["id"],
                m["payload"].get("value") if isinstance(m["payload"], dict) else None,
                m["payload"],
                m["delivery_attempts"],
                response.t0,
                response.t1,
            )
            for m in response.body["data"]
        ]
        if not batch:
            return 0
        self.history.record_deliveries(batch)
        if self.lapse_ratio:  # drawn only then, so that other scenarios see the same draws
            abandoned = {d.message_id for d in batch if self.rng.random() < self.lapse_ratio}
            if abandoned:
                self.extend(sorted(abandoned), seconds=1)
                batch = [d for d in batch if d.message_id not in abandoned]
        if self.work_seconds:
            time.sleep(self.work_seconds * self.rng.uniform(0.5, 1.5))
        if self.crashes_on and any(self.crashes_on(d.payload) for d in batch):
            raise ConsumerCrashed(f"{self.name} crashed holding {[d.value for d in batch]}")
        nacks = [
            d.message_id
            for d in batch
            if d.attempts < self.nack_below_attempts and self.rng.random() < self.nack_ratio
        ]
        dead = []
        if self.dead_letter_ratio:  # drawn only then, so that other scenarios see the same draws
            dead = [
                d.message_id
                for d in batch
                if d.message_id not in nacks and self.rng.random() < self.dead_letter_ratio
            ]
        acks = [d.message_id for d in batch if d.message_id not in nacks and d.message_id not in dead]
        for kind, ids in self.rng.sample([("ack", acks), ("nack", nacks)], 2):
            if ids:
                self.settle(kind, ids)
        if dead:
            self.settle("dead_letter", dead)
        return len(batch)

    def settle(self, kind: str, ids: list[str]) -> Settle:
        path = f"{self.path}/nacks?dead_letter=true" if kind == "dead_letter" else f"{self.path}/{kind}s"
        response = self.client.request("POST", path, ids)
        settle = Settle(kind, self.subscription, self.name, ids, response.status, response.t0, response.t1)
        self.history.record_settle(settle)
        return settle

    def extend(self, ids: list[str], seconds: float | None = None) -> Extend:
        query = f"?seconds={seconds:g}" if seconds is not None else ""
        response = self.client.request("POST", f"{self.path}/extend{query}", ids)
        extend = Extend(self.subscription, self.name, ids, seconds, response.status, response.t0, response.t1)
        self.history.record_extend(extend)
        return extend

    def run(self, stop: Stop) -> None:
        try:
            while not stop():
                if not self.poll_once():
                    time.sleep(self.idle_sleep)
        finally:
            self.client.close()


@dataclass
class WakeUp:
    """A long poll on one server and a publish of one message on another: how long after the
    publish was sent the waiting consume answered with it (None: it did not get it)."""

    waiter_port: int
    publisher_port: int
    latency: float | None


def wake_up(
    history: History, name: str, topic: str, waiter_port: int, publisher_port: int, wait_seconds: int = 10
) -> WakeUp:
    """A consumer long-polls the topic's subscription of the same name (which nothing else
    consumes) on one server; once it has waited `park_seconds`, a producer publishes one message
    on the other. Both are recorded in the history, so the checker sees them too."""
    park_seconds = 1.0
    consumer = Consumer(
        history, waiter_port, f"{name}-c", topic, batch_size=1, nack_ratio=0, wait_seconds=wait_seconds
    )
    got: list[int | None] = []
    waiter = threading.Thread(target=lambda: got.append(consumer.poll_once()), name=f"{name}-c", daemon=True)
    waiter.start()
    waiter.join(park_seconds)
    if not waiter.is_alive():  # answered before anything was published: no wake-up to time
        consumer.client.close()
        return WakeUp(waiter_port, publisher_port, None)
    producer = Producer(history, publisher_port, f"{name}-p", topic, batch_size=1)
    publish = producer.publish_batch()
    producer.client.close()
    waiter.join(wait_seconds + REQUEST_TIMEOUT)
    consumer.client.close()
    with history.lock:
        answered = [d.t1 for d in history.deliveries if d.consumer == consumer.name]
    if publish.outcome != "ok" or got != [1] or not answered:
        return WakeUp(waiter_port, publisher_port, None)
    return WakeUp(waiter_port, publisher_port, answered[0] - publish.t0)


def drain(
    history: History,
    port: int,
    subscriptions: Iterable[str],
    *,
    empty_polls: int = 3,
    seconds: float = 30.0,
    batch_size: int = 100,
    poll_interval: float = 0.05,
) -> None:
    """Ack everything left, one thread per subscription, until `empty_polls` empty polls in a
    row and metrics showing nothing available (ready or in backoff), delayed or locked; bounded
    by `seconds`. Records each subscription's final metrics, which the checker looks at."""
    deadline = time.monotonic() + seconds

    def drain_one(subscription: str) -> None:
        consumer = Consumer(
            history, port, f"drain-{subscription}", subscription, batch_size=batch_size, nack_ratio=0
        )
        empties = 0
        while time.monotonic() < deadline:
            got = consumer.poll_once()
            if got:
                empties = 0
                continue
            if consumer.last_status == 404:
                break
            empties += 1
            if empties >= empty_polls:
                if is_drained(consumer.client.metrics(subscription)):
                    break
            time.sleep(poll_interval)
        metrics = consumer.client.metrics(subscription)
        if metrics is not None:
            history.record_metrics(subscription, metrics)
        consumer.client.close()

    workers = Workers()
    for subscription in subscriptions:
        workers.start(f"drain-{subscription}", drain_one, subscription)
    workers.join(timeout=seconds + 15, stop=False)


def is_drained(metrics: dict | None) -> bool:
    """Whether a subscription's metrics show nothing available, delayed, locked or waiting
    behind its ordering key."""
    return metrics is not None and not (
        metrics["available"] or metrics.get("delayed") or metrics["delivered"] or metrics.get("waiting")
    )


def wait_until_consumed(client: Client, subscriptions: Iterable[str], seconds: float = 20.0) -> bool:
    """Wait (bounded) until no subscription has messages available, delayed or locked, as its
    consumers work through the backlog and the retries; True if they got there."""
    deadline = time.monotonic() + seconds
    pending = list(subscriptions)
    while pending and time.monotonic() < deadline:
        if is_drained(client.metrics(pending[0])):
            pending.pop(0)
        else:
            time.sleep(0.1)
    return not pending


def redrive_loop(
    client: Client, subscription: str, limit: int, counts: list, stop: Stop, interval: float = 0.3
) -> None:
    """An operator sending the `limit` oldest dead letters back to the queue every `interval`
    seconds until stopped; appends each redrive's count to `counts` (None for a failed call)."""
    while not stop():
        response = client.request("POST", f"/subscriptions/{quote(subscription)}/dlq/redrive?limit={limit}")
        counts.append(response.body["count"] if response.status == 200 else None)
        time.sleep(interval)
    client.close()


def release_loop(
    history: History,
    release: Callable[[int], tuple[int, int]],
    lock_timeout: int,
    stop: Stop,
    interval: float = 0.5,
) -> None:
    """Run cleanup-stuck (`release(lock_timeout)` -> (released, dead-lettered)) every `interval`
    seconds until stopped, recording each run: the checker needs them to tell a lock that
    expired from a lock that was broken."""
    while not stop():
        t0 = time.monotonic()
        released, dead = release(lock_timeout)
        history.record_release(Release(lock_timeout, t0, time.monotonic(), released, dead))
        time.sleep(interval)


class Workers:
    """Threads running workload loops. join() stops and waits for them (bounded) and re-raises
    the first exception any of them raised, so no failure is lost in a thread."""

    def __init__(self):
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def stopped(self) -> bool:
        return self.stop_event.is_set()

    def start(self, name: str, target: Callable, *args) -> threading.Thread:
        def run() -> None:
            try:
                target(*args)
            except BaseException as error:  # re-raised by join()
                self.errors.append(error)

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def join(self, timeout: float, stop: bool = True, threads: list[threading.Thread] | None = None) -> None:
        if stop:
            self.stop_event.set()
        deadline = time.monotonic() + timeout
        for thread in threads if threads is not None else self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                self.stop_event.set()
                raise AssertionError(f"thread {thread.name} still running after {timeout}s")
        if self.errors:
            raise self.errors[0]


# --- The checker -------------------------------------------------------------------------------


def same_json(a: object, b: object) -> bool:
    """JSON equality: true is not 1, but 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def matches(filter: dict | None, payload: object) -> bool:
    """The service's filter semantics (SPEC §2), for the checker's expected sets."""
    if not filter:
        return True
    if not isinstance(payload, dict):
        return False
    return all(
        key in payload and any(same_json(payload[key], allowed) for allowed in values)
        for key, values in filter.items()
    )


ANOMALIES = (
    "lost",
    "unexpected",
    "duplicated",
    "locked_twice",
    "acked_twice",
    "redelivered_after_ack",
    "not_drained",
    "early",
    "out_of_order",
    "two_of_a_key",
)


@dataclass
class Report:
    """Each anomaly class as a list of readable examples; `stats` counts what happened."""

    lost: list[str] = field(default_factory=list)  # 2xx publish, never acked (nor dead-lettered)
    unexpected: list[str] = field(default_factory=list)  # never published, refused, altered, filtered out
    duplicated: list[str] = field(default_factory=list)  # one value under two message ids in a subscription
    locked_twice: list[str] = field(default_factory=list)  # two deliveries whose locks surely overlapped
    acked_twice: list[str] = field(default_factory=list)  # two acks that surely took effect
    redelivered_after_ack: list[str] = field(default_factory=list)  # claimed after an ack surely deleted it
    not_drained: list[str] = field(default_factory=list)  # messages left available or locked at the end
    early: list[str] = field(default_factory=list)  # claimed before its publish's delay was surely over
    out_of_order: list[str] = field(default_factory=list)  # claimed before an earlier one of its key left
    two_of_a_key: list[str] = field(default_factory=list)  # two messages of a key surely leased at once
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(getattr(self, name) for name in ANOMALIES)

    def summary(self, examples: int = 5) -> str:
        lines = [", ".join(f"{key} {value}" for key, value in self.stats.items())]
        for name in ANOMALIES:
            found = getattr(self, name)
            lines.append(f"{name}: {len(found)}")
            lines.extend(f"    {example}" for example in found[:examples])
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def check(history: History) -> Report:
    """Find the anomalies of a finished history (after its drain).

    A delivery's lock is held from its claim (somewhere in the consume call [t0, t1]) until its
    consumer acks or nacks it, its lease lapses, or a cleanup-stuck run releases it. Its
    *horizon* is the earliest instant the lock may have ended: the start of the consumer's first
    ack/nack call naming the message, its *expiry*: the earliest instant its lease may have
    lapsed (the subscription's ack deadline after t0, or an extend's seconds after the extend
    call's t0, for an extend that may have acted after the claim) or the first cleanup run may
    have found the lock older than its timeout (both legitimately followed by a redelivery). The
    checker only reports what the recorded intervals prove:

    - locked_twice: two deliveries of one message, each surely claimed (after its t1) before the
      other's horizon;
    - an ack *surely took effect* when it answered 2xx before the lock could have expired: the
      message was still DELIVERED, so the service deleted it. redelivered_after_ack: a consume
      call started after such an ack that returned the message; acked_twice: two such acks of
      one value;
    - lost: a 2xx publish whose value, in a subscription that matches it and existed before the
      publish and was not deleted, was never named in an ack call that may have taken effect
      (2xx or unknown) and is not in the DLQ;
    - not_drained: final metrics with messages available or locked, which catches an ack that
      was ignored (lock expired) for a message never delivered again;
    - unexpected: a delivered value never published, whose publish was refused (4xx), whose
      payload changed, or that its subscription's topic or filter should not have let in;
    - duplicated: one value under two message ids in a subscription, i.e. a publish applied
      twice (a publish of unknown outcome may appear or not, but once; a publish retried with
      its Idempotency-Key, once in all);
    - unexpected also: a value delivered under another id than a 2xx publish's receipt named
      (a repeat of a keyed publish must answer the first one's ids);
    - early: a delivery of a delayed publish's value, surely claimed (by its t1) before the delay
      was over (the server's now() at the publish was at t0 at the earliest).

    In a subscription recorded with an ordering key (see check_ordering):

    - out_of_order: a message claimed before one published before it, with the same key, may
      have left the queue (acked or dead-lettered);
    - two_of_a_key: two messages of one key surely leased at the same instant.
    """
    report = Report()
    by_value: dict[str, tuple[Publish, dict]] = {}
    for publish in history.publishes:
        for value, payload in zip(publish.values, publish.payloads, strict=True):
            by_value[value] = (publish, payload)

    releases = sorted(history.releases, key=lambda r: r.t0)

    extends: dict[tuple[str, str], list[Extend]] = defaultdict(list)
    for extend in history.extends:
        if extend.outcome != "refused":
            for message_id in extend.message_ids:
                extends[extend.subscription, message_id].append(extend)

    def lapse(delivery: Delivery) -> float:
        """The earliest instant this delivery's lease may have lapsed: the ack deadline after its
        claim, or an extend's seconds after the extend, if that may have acted after the claim
        (one cut short may have acted at any time later)."""
        info = history.subscriptions.get(delivery.subscription)
        deadline = info.ack_deadline if info is not None else None
        ends = [delivery.t0 + deadline] if deadline else []
        for extend in extends[delivery.subscription, delivery.message_id]:
            seconds = extend.seconds if extend.seconds is not None else deadline
            if seconds is not None and (extend.t1 if extend.outcome == "ok" else float("inf")) > delivery.t0:
                ends.append(extend.t0 + seconds)
        return min(ends, default=float("inf")) - SLACK

    def expiry(delivery: Delivery) -> float:
        """The earliest instant this delivery's lock may have ended without a settle: its lease
        lapsed, or a cleanup run released it."""
        for release in releases:
            if release.t1 + SLACK - delivery.t0 > release.lock_timeout:
                return min(lapse(delivery), max(release.t0, delivery.t0 + release.lock_timeout) - SLACK)
        return lapse(delivery)

    # The settle calls of each consumer for each message, in time order.
    settles: dict[tuple[str, str, str], list[Settle]] = defaultdict(list)
    for settle in sorted(history.settles, key=lambda s: s.t0):
        for message_id in settle.message_ids:
            settles[settle.subscription, settle.consumer, message_id].append(settle)

    by_message: dict[tuple[str, str], list[Delivery]] = defaultdict(list)
    for delivery in history.deliveries:
        by_message[delivery.subscription, delivery.message_id].append(delivery)

    horizons: dict[int, float] = {}
    effective_acks: list[tuple[Delivery, Settle]] = []
    for deliveries in by_message.values():
        deliveries.sort(key=lambda d: d.t1)
        for i, delivery in enumerate(deliveries):
            # This delivery's settle calls come before the consumer's next claim of the message.
            later = [d.t1 for d in deliveries[i + 1 :] if d.consumer == delivery.consumer]
            until = later[0] if later else float("inf")
            own = [
                s
                for s in settles[delivery.subscription, delivery.consumer, delivery.message_id]
                if delivery.t1 <= s.t0 < until
            ]
            expires = expiry(delivery)
            horizons[id(delivery)] = min([expires, *(s.t0 for s in own)])
            for settle in own:
                if settle.kind == "ack" and settle.outcome == "ok" and settle.t1 <= expires:
                    effective_acks.append((delivery, settle))
                    break

    for (subscription, message_id), deliveries in by_message.items():
        for i, first in enumerate(deliveries):
            for second in deliveries[i + 1 :]:
                if second.t1 < min(horizons[id(first)], horizons[id(second)]):
                    report.locked_twice.append(
                        f"{subscription}/{first.value} ({message_id}): to {first.consumer} "
                        f"(attempt {first.attempts}, claimed by {first.t1:.3f}, lock held until at least "
                        f"{horizons[id(first)]:.3f}) and to {second.consumer} (attempt {second.attempts}, "
                        f"claimed by {second.t1:.3f})"
                    )

    acks_by_value: dict[tuple[str, str | None], list[tuple[Delivery, Settle]]] = defaultdict(list)
    for delivery, ack in effective_acks:
        acks_by_value[delivery.subscription, delivery.value].append((delivery, ack))
        for other in by_message[delivery.subscription, delivery.message_id]:
            if other.t0 > ack.t1:
                report.redelivered_after_ack.append(
                    f"{delivery.subscription}/{delivery.value} ({delivery.message_id}): acked by "
                    f"{delivery.consumer} at {ack.t1:.3f}, delivered again to {other.consumer} "
                    f"(attempt {other.attempts}) in a claim started at {other.t0:.3f}"
                )
    for (subscription, value), acks in acks_by_value.items():
        if len(acks) > 1:
            report.acked_twice.append(
                f"{subscription}/{value}: acked by "
                + ", ".join(f"{d.consumer} at {a.t1:.3f} ({d.message_id})" for d, a in acks)
            )

    # The message id each value got, as the receipts of a publish that answered 2xx named it.
    receipts = {
        value: message_id
        for publish in history.publishes
        if publish.outcome == "ok" and publish.ids is not None
        for value, message_id in zip(publish.values, publish.ids, strict=False)
    }
    ids_by_value: dict[tuple[str, str | None], set[str]] = defaultdict(set)
    for (subscription, message_id), deliveries in by_message.items():
        delivery = deliveries[0]
        ids_by_value[subscription, delivery.value].add(message_id)
        reason = unexpected_reason(delivery, by_value, history.subscriptions.get(subscription))
        if reason is None and receipts.get(delivery.value, message_id) != message_id:
            reason = f"its publish's receipt named {receipts[delivery.value]}"
        if reason:
            report.unexpected.append(f"{subscription}/{delivery.value} ({message_id}): {reason}")
        publish = by_value.get(delivery.value, (None,))[0]
        if publish is not None and publish.delay_seconds:
            due = publish.t0 + publish.delay_seconds
            for early in (d for d in deliveries if d.t1 < due - SLACK):
                report.early.append(
                    f"{subscription}/{delivery.value} ({message_id}): published at {publish.t0:.3f} with a"
                    f" {publish.delay_seconds}s delay, claimed by {early.t1:.3f} by {early.consumer}"
                )
    for (subscription, value), message_ids in ids_by_value.items():
        if len(message_ids) > 1:
            report.duplicated.append(f"{subscription}/{value}: delivered as {sorted(message_ids)}")
    ordered_pairs = check_ordering(history, report, expiry)

    maybe_acked: set[tuple[str, str]] = {
        (s.subscription, message_id)
        for s in history.settles
        if s.kind == "ack" and s.outcome != "refused"
        for message_id in s.message_ids
    }
    acked_values = {
        (subscription, deliveries[0].value)
        for (subscription, message_id), deliveries in by_message.items()
        if (subscription, message_id) in maybe_acked
    }
    for info in history.subscriptions.values():
        if info.deleted is not None:
            continue  # its messages went with it
        for value, (publish, payload) in by_value.items():
            if (
                publish.outcome == "ok"
                and publish.topic == info.topic
                and publish.t0 >= info.created
                and matches(info.filter, payload)
                and (info.id, value) not in acked_values
                and value not in history.dead.get(info.id, ())
            ):
                deliveries = [d for d in history.deliveries if d.subscription == info.id and d.value == value]
                report.lost.append(
                    f"{info.id}/{value}: published at {publish.t1:.3f} (2xx), "
                    f"{len(deliveries)} deliveries, never acked"
                )
        metrics = history.final_metrics.get(info.id)
        if metrics and not is_drained(metrics):
            report.not_drained.append(f"{info.id}: {metrics}")

    outcomes = defaultdict(int)
    for publish in history.publishes:
        outcomes[publish.outcome] += len(publish.values)
    report.stats = {
        "values published ok": outcomes["ok"],
        "delayed": sum(len(p.values) for p in history.publishes if p.outcome == "ok" and p.delay_seconds),
        "refused": outcomes["refused"],
        "unknown": outcomes["unknown"],
        "deliveries": len(history.deliveries),
        "redeliveries": sum(1 for d in history.deliveries if d.attempts > 1),
        "acked ids": len(maybe_acked),
        "nacks": sum(len(s.message_ids) for s in history.settles if s.kind == "nack"),
        "dead-lettered": sum(len(s.message_ids) for s in history.settles if s.kind == "dead_letter"),
        "cleanup runs": len(history.releases),
        "failed calls": len(history.failed_calls()),
        "lease extensions": sum(len(e.message_ids) for e in history.extends),
        "ordered pairs": ordered_pairs,
    }
    return report


def ordering_key_of(payload: object, field_name: str) -> str | None:
    """A payload's ordering key as JSON text (1 and "1" differ), None without one (or null)."""
    if not isinstance(payload, dict) or payload.get(field_name) is None:
        return None
    return json.dumps(payload[field_name], sort_keys=True)


def check_ordering(history: History, report: Report, expiry: Callable[[Delivery], float]) -> int:
    """The per-key order of the subscriptions recorded with an ordering key; returns how many
    pairs of messages of one key it found in a known order.

    A message of an ordered subscription S has a *key* when its payload's ordering-key field is
    there and not null (compared as JSON text: 1 and "1" differ, as in the service); it is in S
    when its publish was not refused, matched S's filter and started after S was created, or
    when S delivered it. m1 *comes before* m2 (same key) when their order is certain: the same
    publish call with m1 first in its body, or m1's publish answered 2xx (so it had committed)
    before m2's publish started. (A publish cut short may commit any time later.)

    m1 *may have left* S's queue (acked or dead-lettered, which makes the next of its key
    claimable) from the earliest of:

    - the start of any ack or dead-letter nack call naming it, by any consumer and whatever
      its answer but a 4xx (a message id acts on whichever delivery is current; an ack cut
      short may have acted);
    - the start of any plain nack naming it that may have acted after the claim of a delivery
      that used up S's attempts (that nack dead-letters it);
    - the expiry of a delivery that had used up the attempts (the consume or cleanup run after
      the lapse dead-letters it, and may claim the next one in the same statement);
    - if it is in S's DLQ at the end (History.record_dead): also the start of any consume call
      on S that got no answer. Such a call may have delivered it unseen, using up its attempts
      whose lapse then dead-lettered it; no other dead-lettering escapes the history;
    - S's deletion.

    Attempts unknown (None) count as used up. The anomalies:

    - out_of_order: m2 surely claimed (by its delivery's t1) before every instant m1, which
      comes before it, may have left the queue. A nacked or lapsed m1 stays in the queue, so m2
      must wait for it, and a redriven m1 has left once already: only the first leaving counts.
    - two_of_a_key: deliveries of two messages of one key, both surely claimed (by the later
      t1) before either may have ended: the lease of a delivery may end at its expiry or at the
      start of any settle call naming its message that may have acted after its claim (by any
      consumer: a message id acts on whichever delivery is current).
    """
    pairs = 0
    settles_of: dict[tuple[str, str], list[Settle]] = defaultdict(list)
    for settle in history.settles:
        if settle.outcome != "refused":
            for message_id in settle.message_ids:
                settles_of[settle.subscription, message_id].append(settle)

    for info in history.subscriptions.values():
        if info.ordering_key:
            pairs += check_subscription_order(history, info, report, expiry, settles_of)
    return pairs


def check_subscription_order(
    history: History,
    info: SubscriptionInfo,
    report: Report,
    expiry: Callable[[Delivery], float],
    settles_of: dict[tuple[str, str], list[Settle]],
) -> int:
    """check_ordering for one ordered subscription; returns its pairs in a known order."""
    inf = float("inf")
    pairs = 0
    deliveries: dict[str | None, list[Delivery]] = defaultdict(list)
    for delivery in history.deliveries:
        if delivery.subscription == info.id:
            deliveries[delivery.value].append(delivery)
    consume_path = f"/subscriptions/{quote(info.id)}/messages"
    unanswered_claims = [
        c.t0 for c in history.calls if c.path == consume_path and outcome_of(c.status) == "unknown"
    ]

    def used_up(delivery: Delivery) -> bool:
        return info.max_attempts is None or delivery.attempts >= info.max_attempts

    def left_from(value: str) -> float:
        """The earliest instant the message may have left the queue."""
        own = deliveries.get(value, [])
        # Plain nacks dead-letter once attempts are used up: those that may have acted after such
        # a claim.
        exhausted = min((d.t0 for d in own if used_up(d)), default=inf)
        ends = [
            s.t0
            for message_id in {d.message_id for d in own}
            for s in settles_of[info.id, message_id]
            if s.kind != "nack" or (s.t1 if s.outcome == "ok" else inf) > exhausted
        ]
        ends += [expiry(d) for d in own if used_up(d)]
        if value in history.dead.get(info.id, ()):
            ends += unanswered_claims
        if info.deleted is not None:
            ends.append(info.deleted)
        return min(ends, default=inf)

    # The messages of each key, in the order of their publish calls' starts.
    keyed: dict[str, list[tuple[Publish, int, str]]] = defaultdict(list)
    for publish in sorted(history.publishes, key=lambda p: p.t0):
        if publish.outcome == "refused" or publish.topic != info.topic:
            continue
        for index, (value, payload) in enumerate(zip(publish.values, publish.payloads, strict=True)):
            key = ordering_key_of(payload, info.ordering_key)
            if (
                key is not None
                and matches(info.filter, payload)
                and (publish.t0 >= info.created or value in deliveries)
            ):
                keyed[key].append((publish, index, value))

    for key, members in keyed.items():
        left = {value: left_from(value) for _, _, value in members}
        for publish, index, value in members:
            before = [
                earlier
                for other, i, earlier in members
                if (other is publish and i < index)
                or (other is not publish and other.outcome == "ok" and other.t1 < publish.t0)
            ]
            pairs += len(before)
            if not before:
                continue
            blocker = max(before, key=left.__getitem__)  # the last to leave
            for delivery in deliveries.get(value, []):
                if delivery.t1 < left[blocker]:
                    report.out_of_order.append(
                        f"{info.id}/{key}: {value} ({delivery.message_id}) claimed by {delivery.t1:.3f} "
                        f"by {delivery.consumer} (attempt {delivery.attempts}); {blocker}, published "
                        f"before it, could not have left the queue before {left[blocker]:.3f}"
                    )

    def lease_end(delivery: Delivery) -> float:
        """The earliest instant this delivery's lease may have ended."""
        ends = [expiry(delivery)]
        for settle in settles_of[info.id, delivery.message_id]:
            if (settle.t1 if settle.outcome == "ok" else inf) > delivery.t0:
                ends.append(settle.t0)
        if info.deleted is not None:
            ends.append(info.deleted)
        return min(ends)

    by_key: dict[str, list[Delivery]] = defaultdict(list)
    for value_deliveries in deliveries.values():
        for delivery in value_deliveries:
            key = ordering_key_of(delivery.payload, info.ordering_key)
            if key is not None:
                by_key[key].append(delivery)
    for key, key_deliveries in by_key.items():
        held: list[tuple[Delivery, float]] = []  # claimed earlier, lease maybe still on
        for second in sorted(key_deliveries, key=lambda d: d.t1):
            second_end = lease_end(second)
            for first, first_end in held:
                if first.message_id != second.message_id and second.t1 < min(first_end, second_end):
                    report.two_of_a_key.append(
                        f"{info.id}/{key}: {first.value} ({first.message_id}) to {first.consumer} "
                        f"(claimed by {first.t1:.3f}, leased until at least {first_end:.3f}) and "
                        f"{second.value} ({second.message_id}) to {second.consumer} (claimed by "
                        f"{second.t1:.3f}, leased until at least {second_end:.3f})"
                    )
            held = [(d, end) for d, end in held if end > second.t1] + [(second, second_end)]
    return pairs


def unexpected_reason(
    delivery: Delivery, by_value: dict[str, tuple[Publish, dict]], info: SubscriptionInfo | None
) -> str | None:
    """Why a delivered message should not exist in its subscription, or None if it may."""
    if delivery.value not in by_value:
        return "never published"
    publish, payload = by_value[delivery.value]
    if publish.outcome == "refused":
        return f"its publish was refused ({publish.status})"
    if delivery.payload != payload:
        return f"payload {delivery.payload!r} differs from the published {payload!r}"
    if info is not None and publish.topic != info.topic:
        return f"published to topic {publish.topic!r}, not {info.topic!r}"
    if info is not None and not matches(info.filter, payload):
        return f"does not match the filter {info.filter!r}"
    return None


# --- A consumer as a process, to be killed -----------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.history consumer ...`: one Consumer writing its history to a journal,
    until the stop file appears or `--seconds` pass (a bound should the test die first)."""
    parser = argparse.ArgumentParser(prog="python -m tests.history")
    commands = parser.add_subparsers(dest="command", required=True)
    consumer = commands.add_parser("consumer")
    consumer.add_argument("--port", type=int, required=True)
    consumer.add_argument("--subscription", required=True)
    consumer.add_argument("--name", required=True)
    consumer.add_argument("--journal", required=True)
    consumer.add_argument("--stop-file", required=True)
    consumer.add_argument("--seconds", type=float, default=60.0)
    consumer.add_argument("--batch-size", type=int, default=10)
    consumer.add_argument("--nack-ratio", type=float, default=0.2)
    consumer.add_argument("--work-seconds", type=float, default=0.0)
    consumer.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    history = History(journal=args.journal)
    deadline = time.monotonic() + args.seconds
    try:
        Consumer(
            history,
            args.port,
            args.name,
            args.subscription,
            batch_size=args.batch_size,
            nack_ratio=args.nack_ratio,
            seed=args.seed,
            work_seconds=args.work_seconds,
        ).run(lambda: time.monotonic() > deadline or os.path.exists(args.stop_file))
    finally:
        history.close()


if __name__ == "__main__":
    main()
