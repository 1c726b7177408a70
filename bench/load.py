"""The load: worker processes, each running a few client threads, each client with its own
keep-alive HTTP connection (or, in raw mode, its own PostgreSQL connection running the app's
statements). Clients publish or consume until a shared deadline; every process measures the CPU
it used and sends back counts, latencies and the keys of the messages it consumed."""

import math
import multiprocessing
import os
import queue
import socket
import threading
import time
import traceback
from array import array
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson
import psutil

COUNTRIES = ("BR", "US", "DE", "JP", "IN")  # payload["country"] = COUNTRIES[seq % 5]; filters use it
SEQ_BITS = 32  # a message key is client index << 32 | sequence number within that client
IDLE_RECONNECT = 1.5  # seconds; gunicorn drops keep-alive connections idle for 2 s
REQUEST_TIMEOUT = 60
START_TIMEOUT = 120  # for worker processes to import, connect and report ready
EMPTY_POLL = 0.005  # seconds a consumer waits after an empty claim while publishers still run
EARLY = 0.5  # seconds: a long-poll claim that comes back empty this much before its wait ended


class RequestFailed(Exception):
    pass


class HttpClient:
    """The REST API over one keep-alive connection (reopened after an idle spell or an error).

    HTTP/1.1 by hand on a socket: http.client costs ~0.4 ms of CPU per request, as much as a
    third of what the app spends, on the same two cores. This reads what gunicorn sends (a
    status line, headers, a Content-Length body) and nothing more; anything else is an error."""

    def __init__(self, url: str, token: str | None):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        headers = f"Host: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
        if token:
            headers += f"Authorization: Bearer {token}\r\n"
        self.headers = headers.encode()
        self.sock: socket.socket | None = None
        self.buffer = b""
        self.last_used = 0.0

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        now = time.monotonic()
        if self.sock is not None and now - self.last_used > IDLE_RECONNECT:
            self.close()
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=REQUEST_TIMEOUT)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buffer = b""
        body = body or b""
        head = b"%s %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n" % (
            method.encode(),
            path.encode(),
            self.headers,
            len(body),
        )
        try:
            self.sock.sendall(head + body)
            status, data, keep_alive = self.read_response()
        except BaseException:
            self.close()
            raise
        if not keep_alive:
            self.close()
        self.last_used = time.monotonic()
        return status, data

    def read_response(self) -> tuple[int, bytes, bool]:
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self.receive()
        head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4 :]
        status_line, *header_lines = head.split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise RequestFailed(f"unexpected Transfer-Encoding: {headers['transfer-encoding']}")
        length = int(headers.get("content-length", 0))
        while len(self.buffer) < length:
            self.receive()
        data, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, data, headers.get("connection", "").lower() != "close"

    def receive(self) -> None:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def expect(self, status: int, expected: int, data: bytes, what: str) -> None:
        if status != expected:
            raise RequestFailed(f"{what}: HTTP {status} {data[:200]!r}")

    def publish(self, topic_id: str, body: bytes) -> None:
        status, data = self.request("POST", f"/topics/{topic_id}/messages", body)
        self.expect(status, 204, data, "publish")

    def claim(
        self, subscription_id: str, consumer_id: str, batch_size: int, wait_seconds: int = 0
    ) -> list[tuple]:
        path = f"/subscriptions/{subscription_id}/messages?consumer_id={consumer_id}&batch_size={batch_size}"
        if wait_seconds:
            path += f"&wait_seconds={wait_seconds}"
        status, data = self.request("GET", path)
        self.expect(status, 200, data, "consume")
        return [(m["id"], m["payload"]) for m in orjson.loads(data)["data"]]

    def ack(self, subscription_id: str, ids: list) -> None:
        status, data = self.request("POST", f"/subscriptions/{subscription_id}/acks", orjson.dumps(ids))
        self.expect(status, 204, data, "ack")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# No token to check (messages.GATE, messages.publish_ctes): raw mode is the ceiling without auth.
NO_TOKEN = {"client_id": None, "token_version": None}


class SqlClient:
    """The app's own statements (pubsub.messages) on one connection, run as a request runs them:
    on the psycopg connection, in autocommit, one statement per call. No HTTP, no Flask, no pool
    checkout: the ceiling for this schema."""

    def __init__(self, engine):
        # Imported before the window: importing pubsub loads Flask and the rest of the app.
        from pubsub.messages import ACK_CURRENT, CLAIM, PUBLISH, driver_sql, uuid_array

        self.statements = {
            "publish": driver_sql(PUBLISH),
            "claim": driver_sql(CLAIM),
            "ack": driver_sql(ACK_CURRENT),
        }
        self.uuid_array = uuid_array
        self.engine_conn = engine.connect()
        self.conn = self.engine_conn.connection.driver_connection
        self.conn.autocommit = True

    def publish(self, topic_id: str, body: bytes) -> None:
        params = {
            "topic_ids": orjson.dumps([topic_id]).decode(),
            "payloads": f"[{body.decode()}]",
            "tokens": None,
            "delays": None,
        }
        found = self.conn.execute(self.statements["publish"], params).fetchone()[0]
        if not found:
            raise RequestFailed(f"publish: topic {topic_id!r} not found")

    def claim(
        self, subscription_id: str, consumer_id: str, batch_size: int, wait_seconds: int = 0
    ) -> list[tuple]:
        if wait_seconds:
            raise RequestFailed("long-poll (wait_seconds) is an HTTP feature: raw mode cannot wait")
        params = {
            "subscription_id": subscription_id,
            "consumer_id": consumer_id,
            "batch_size": batch_size,
            **NO_TOKEN,
        }
        rows = self.conn.execute(self.statements["claim"], params).fetchall()
        return [(row[0], orjson.loads(row[1])) for row in rows]

    def ack(self, subscription_id: str, ids: list) -> None:
        params = {"subscription_id": subscription_id, "ids": self.uuid_array(ids), **NO_TOKEN}
        self.conn.execute(self.statements["ack"], params).fetchall()

    def close(self) -> None:
        self.conn.autocommit = False
        self.engine_conn.close()


@dataclass
class Tally:
    """What the clients of one process did; summed over processes by merge()."""

    published: int = 0  # messages in publishes that succeeded within the window
    consumed: int = 0  # messages claimed and then acked within the window
    drained: int = 0  # consumed after the window, to empty the subscription for the checks
    requests: int = 0  # within the window
    claims: int = 0  # consume requests within the window
    empty_claims: int = 0  # of which answered no message
    early_empty: int = 0  # long-poll claims answered empty well before their wait ended
    errors: int = 0
    error_samples: list = field(default_factory=list)
    latency: dict = field(default_factory=dict)  # operation -> array of seconds
    e2e: array = field(default_factory=lambda: array("d"))  # publish start -> claimed, seconds
    keys: array = field(default_factory=lambda: array("q"))  # keys of every message acked
    countries: Counter = field(default_factory=Counter)  # published messages by payload country
    published_by_client: dict = field(default_factory=dict)  # client index -> messages published
    cpu_seconds: float = 0.0  # this process, from go to the end of the window

    def record(self, operation: str, seconds: float) -> None:
        self.requests += 1
        self.latency.setdefault(operation, array("d")).append(seconds)

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{type(exc).__name__}: {exc}"[:300])

    def merge(self, other: "Tally") -> None:
        counters = ("published", "consumed", "drained", "requests", "claims", "empty_claims", "early_empty")
        for name in (*counters, "errors", "cpu_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.error_samples.extend(other.error_samples[: max(0, 5 - len(self.error_samples))])
        for operation, values in other.latency.items():
            self.latency.setdefault(operation, array("d")).extend(values)
        self.e2e.extend(other.e2e)
        self.keys.extend(other.keys)
        self.countries.update(other.countries)
        self.published_by_client.update(other.published_by_client)


@dataclass
class Clock:
    """The window every client shares (time.monotonic is one clock for all processes on Linux)."""

    start: float
    deadline: float
    drain_deadline: float
    publishers_left: object  # multiprocessing.Value: publisher threads still running, all processes


def make_payloads(index: int, first: int, count: int, pad: str, keys: int | None = None) -> bytes:
    """A batch of payloads; with `keys`, each has an ordering key field, "customer", one of that
    many values (consume_ack_ordered)."""
    now = time.time()
    base = index << SEQ_BITS
    payloads = [
        {"k": base | seq, "ts": now, "country": COUNTRIES[seq % len(COUNTRIES)], "pad": pad}
        for seq in range(first, first + count)
    ]
    if keys:
        for payload in payloads:
            payload["customer"] = payload["k"] % keys
    return orjson.dumps(payloads)


def run_publisher(client, spec: dict, clock: Clock, tally: Tally, lock: threading.Lock) -> None:
    """Publish batches until the deadline (or until spec['messages'] are out), paced when
    spec['rate'] (messages/s for this client) is set."""
    batch, limit, pad = spec["batch"], spec.get("messages"), spec["pad"]
    interval = batch / spec["rate"] if spec.get("rate") else 0.0
    next_at = clock.start
    seq = 0
    local = Tally()
    try:
        while True:
            now = time.monotonic()
            if now >= clock.deadline or (limit is not None and seq >= limit):
                break
            if interval:
                if next_at > now:
                    time.sleep(min(next_at, clock.deadline) - now)
                    if time.monotonic() >= clock.deadline:
                        break
                next_at += interval
            count = batch if limit is None else min(batch, limit - seq)
            body = make_payloads(spec["index"], seq, count, pad, spec.get("keys"))
            started = time.perf_counter()
            try:
                client.publish(spec["topic"], body)
            except Exception as exc:  # counted; a failed batch may or may not have been stored
                local.error(exc)
                time.sleep(0.01)
                continue
            local.record("publish", time.perf_counter() - started)
            local.published += count
            for i in range(seq, seq + count):
                local.countries[COUNTRIES[i % len(COUNTRIES)]] += 1
            seq += count
    finally:
        local.published_by_client[spec["index"]] = seq
        with clock.publishers_left.get_lock():
            clock.publishers_left.value -= 1
        with lock:
            tally.merge(local)


def long_poll_wait(wait: int, clock: Clock, now: float, publishers_done: bool) -> int:
    """wait_seconds for the next claim: `wait`, but no longer than the window has left (rounded
    up, at least 1), so a consumer idle at the end holds the run up for a second at most; 0 once
    the publishers are done (draining: an empty answer then means the queue is empty)."""
    if not wait or publishers_done:
        return 0
    return max(1, min(wait, math.ceil(clock.deadline - now)))


def run_consumer(client, spec: dict, clock: Clock, tally: Tally, lock: threading.Lock) -> None:
    """Claim a batch, ack it, repeat: until the deadline, or until the subscription is empty
    (spec['until_empty']); with spec['drain'], go on after the deadline until the publishers are
    done and nothing is left, so that the checks can count every message.

    After an empty claim the consumer sleeps spec['poll'] seconds (default EMPTY_POLL); with
    spec['wait'] (seconds) it long-polls instead: the server holds the claim until messages come
    or the wait ends, and the consumer claims again at once."""
    subscription, batch = spec["subscription"], spec["batch"]
    consumer_id = f"bench-{spec['index']}"
    poll, wait = spec.get("poll", EMPTY_POLL), spec.get("wait", 0)
    local = Tally()
    try:
        while True:
            now = time.monotonic()
            in_window = now < clock.deadline
            if not in_window and (not spec.get("drain") or now >= clock.drain_deadline):
                break
            publishers_done = clock.publishers_left.value == 0  # read before the claim: see below
            wait_now = long_poll_wait(wait, clock, now, publishers_done)
            started = time.perf_counter()
            try:
                rows = client.claim(subscription, consumer_id, batch, wait_now)
            except Exception as exc:
                local.error(exc)
                time.sleep(0.01)
                continue
            claimed = time.perf_counter()
            if in_window:
                # A long-poll claim lasts as long as it waited: kept apart from request latency.
                local.record("long_poll" if wait_now else "consume", claimed - started)
                local.claims += 1
                local.empty_claims += not rows
            if not rows:
                # Publishers count themselves out after their last publish committed, so an empty
                # claim that started after they were all out means nothing is left.
                if spec.get("until_empty") or (not in_window and publishers_done):
                    break
                if not wait_now:
                    time.sleep(poll)
                elif claimed - started < wait_now - EARLY:
                    # The server did not wait (no waiting capacity left, say): do not spin.
                    local.early_empty += in_window
                    time.sleep(EMPTY_POLL)
                continue
            if spec.get("e2e") and in_window:
                wall = time.time()
                local.e2e.extend(wall - payload["ts"] for _, payload in rows)
            try:
                client.ack(subscription, [message_id for message_id, _ in rows])
            except Exception as exc:
                local.error(exc)
                continue
            if in_window:
                local.record("ack", time.perf_counter() - claimed)
                local.consumed += len(rows)
            else:
                local.drained += len(rows)
            local.keys.extend(payload["k"] for _, payload in rows)
    finally:
        with lock:
            tally.merge(local)


def make_client(target: dict, engine):
    if target["mode"] == "raw":
        return SqlClient(engine)
    return HttpClient(target["url"], target.get("token"))


@dataclass
class Signals:
    """What the coordinator and the worker processes share."""

    ready: object  # Barrier: every worker connected, and the coordinator
    go: object  # Event: the window starts at start_at
    start_at: object  # Value("d"), time.monotonic() of the start
    publishers_left: object  # Value("i"): publisher threads still running
    in_window: object  # Value("i"): worker processes whose window has not ended
    measured: object  # Event: the coordinator has read the CPU counters at the window's end


def worker_main(index: int, target: dict, specs: list[dict], signals: Signals, results, timing: dict):
    """One load-generator process: set up, wait for go, run the clients, report."""
    try:
        engine = None
        if target["mode"] == "raw":
            import sqlalchemy as sa

            engine = sa.create_engine(
                target["database_url"],
                pool_size=len(specs),
                max_overflow=0,
                connect_args={"options": "-c TimeZone=UTC"},
            )
        clients = [make_client(target, engine) for _ in specs]
        signals.ready.wait(timeout=START_TIMEOUT)
        if not signals.go.wait(timeout=START_TIMEOUT):
            raise TimeoutError("no go signal")
        cpu_start = time.process_time()
        start = signals.start_at.value
        clock = Clock(
            start,
            start + timing["duration"],
            start + timing["duration"] + timing["drain"],
            signals.publishers_left,
        )
        tally, lock = Tally(), threading.Lock()
        threads = [
            threading.Thread(
                target=run_publisher if spec["role"] == "publish" else run_consumer,
                args=(client, spec, clock, tally, lock),
                daemon=True,
            )
            for client, spec in zip(clients, specs, strict=True)
        ]
        for thread in threads:
            thread.start()
        # The window ends at the deadline, or earlier when every client is done (drained queue).
        while time.monotonic() < clock.deadline and any(t.is_alive() for t in threads):
            time.sleep(0.01)
        tally.cpu_seconds = time.process_time() - cpu_start
        with signals.in_window.get_lock():
            signals.in_window.value -= 1
        for thread in threads:
            thread.join(timeout=max(0.0, clock.drain_deadline - time.monotonic()) + REQUEST_TIMEOUT)
        # Connections stay open until the coordinator has read PostgreSQL's CPU counters: a
        # backend exiting in the middle of that reading would take its CPU time out of the sum.
        signals.measured.wait(timeout=REQUEST_TIMEOUT)
        for client in clients:
            client.close()
        if engine is not None:
            engine.dispose()
        results.put(("ok", index, tally))
    except BaseException:
        signals.ready.abort()  # the coordinator stops waiting for this process at once
        results.put(("error", index, traceback.format_exc()))


@dataclass
class Outcome:
    tally: Tally
    elapsed: float  # the measured window, seconds
    # CPU seconds within the window: "loadgen", one per meter ("app", "postgres"), and "machine"
    # (every process on the host, for spotting a neighbour that skews the run); None: unknown.
    cpu: dict[str, float | None]


def wait_until_quiet(max_seconds: float, threshold: float = 0.1) -> float:
    """Wait (at most max_seconds) for a second in which the machine uses under `threshold`
    cores; the app is idle meanwhile, so that is someone else's load. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < max_seconds:
        before = machine_busy_seconds()
        time.sleep(1.0)
        if machine_busy_seconds() - before < threshold:
            break
    return time.monotonic() - started


def machine_busy_seconds() -> float:
    """CPU seconds the whole host has spent busy (not idle, not waiting for I/O)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


def run_load(
    target: dict, specs: list[dict], procs: int, duration: float, drain: float, cpu_meters
) -> Outcome:
    """Run the clients spread over `procs` processes; measure the window and everyone's CPU.

    cpu_meters: {"app": callable, "postgres": callable} each returning cumulative CPU seconds
    (or None when that CPU cannot be measured).
    """
    cpu_meters = {**cpu_meters, "machine": machine_busy_seconds}
    # fork: workers start at once, with everything imported. The parent holds no database
    # connection and runs no thread when it forks (its engines are disposed after each use).
    ctx = multiprocessing.get_context("fork")
    procs = max(1, min(procs, len(specs)))
    groups = [specs[i::procs] for i in range(procs)]
    signals = Signals(
        ready=ctx.Barrier(procs + 1),
        go=ctx.Event(),
        start_at=ctx.Value("d", 0.0),
        publishers_left=ctx.Value("i", sum(1 for spec in specs if spec["role"] == "publish")),
        in_window=ctx.Value("i", procs),
        measured=ctx.Event(),
    )
    results = ctx.Queue()
    timing = {"duration": duration, "drain": drain}
    workers = [
        ctx.Process(target=worker_main, args=(i, target, group, signals, results, timing), daemon=True)
        for i, group in enumerate(groups)
    ]
    for worker in workers:
        worker.start()
    try:
        try:
            signals.ready.wait(timeout=START_TIMEOUT)
        except threading.BrokenBarrierError:
            raise RuntimeError(f"load generator did not start: {drain_errors(results)}") from None
        cpu_before = {name: meter() for name, meter in cpu_meters.items()}
        own_before = time.process_time()
        start = signals.start_at.value = time.monotonic()
        signals.go.set()
        # The window ends at the deadline, or when every client is done (a drained queue).
        while (
            time.monotonic() < start + duration
            and signals.in_window.value > 0
            and any(w.is_alive() for w in workers)
        ):
            time.sleep(0.01)
        window_end = time.monotonic()
        cpu_after = {name: meter() for name, meter in cpu_meters.items()}
        own_cpu = time.process_time() - own_before
        signals.measured.set()
        tally = Tally()
        bound = time.monotonic() + drain + 2 * REQUEST_TIMEOUT
        for _ in workers:
            try:
                status, index, payload = results.get(timeout=max(1.0, bound - time.monotonic()))
            except queue.Empty:
                raise RuntimeError("load generator processes did not report in time") from None
            if status != "ok":
                raise RuntimeError(f"load generator process {index} failed:\n{payload}")
            tally.merge(payload)
        for worker in workers:
            worker.join(timeout=10)
    finally:
        stop_processes(workers)

    cpu = {"loadgen": tally.cpu_seconds + own_cpu}
    for name in cpu_meters:
        known = cpu_before[name] is not None and cpu_after[name] is not None
        cpu[name] = cpu_after[name] - cpu_before[name] if known else None
    return Outcome(tally=tally, elapsed=window_end - start, cpu=cpu)


def drain_errors(results) -> str:
    errors = []
    while True:
        try:
            status, index, payload = results.get(timeout=1)
        except queue.Empty:
            break
        if status != "ok":
            errors.append(f"process {index}:\n{payload}")
    return "\n".join(errors) or "timed out"


def stop_processes(workers) -> None:
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(timeout=5)
        if worker.is_alive():
            os.kill(worker.pid, 9)
            worker.join(timeout=5)
