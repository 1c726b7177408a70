"""The `longpoll` scenario's load: many consumers long-polling at once (issue 15).

N consumers hold one keep-alive connection each and long-poll (wait_seconds) their subscription;
they run as asyncio tasks over raw sockets in a few forked processes, so that 1,000 waiting
connections cost the load generator almost nothing while they wait. A publisher thread in the
coordinator sends R single-message publishes a second, round robin over the topics. The run has
phases: the server's memory before any consumer connects; consumers connect and settle; an idle
phase (consumers waiting, nothing published: the server's CPU and memory with N waiters); a
publish phase (latency, declined polls, requests, claim statements, CPU); a drain until every
published message was received and acked. Every consume answer is stamped, so each phase's
figures come from the answers that arrived within it.
"""

import asyncio
import math
import multiprocessing
import queue
import socket
import threading
import time
import traceback
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson
import psutil

from bench.app import tree_processes
from bench.load import IDLE_RECONNECT, HttpClient, machine_busy_seconds

CONSUMERS_PER_PROC = 500
CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 60.0
ERROR_PAUSE = 0.1
# Kinds of consume answers.
GOT = 0  # messages
EMPTY = 1  # empty, after waiting (the wait ran out)
DECLINED = 2  # empty, the server did not wait (by its header, or: well before half the wait)
EARLY = 3  # empty before half the wait, without the server's declined header


class Conn:
    """HTTP/1.1 on one keep-alive connection, asyncio streams; reopened after an idle spell
    (gunicorn drops idle keep-alive connections) or an error."""

    def __init__(self, host: str, port: int, token: str | None):
        self.host, self.port = host, port
        headers = f"Host: {host}:{port}\r\nContent-Type: application/json\r\n"
        if token:
            headers += f"Authorization: Bearer {token}\r\n"
        self.headers = headers.encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last_used = 0.0

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict, bytes]:
        if self.writer is not None and time.monotonic() - self.last_used > IDLE_RECONNECT:
            self.close()
        if self.writer is None:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT
            )
            self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = b"%s %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n" % (
            method.encode(),
            path.encode(),
            self.headers,
            len(body),
        )
        try:
            self.writer.write(head + body)
            status, headers, data = await asyncio.wait_for(self.read_response(), REQUEST_TIMEOUT)
        except BaseException:
            self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        self.last_used = time.monotonic()
        return status, headers, data

    async def read_response(self) -> tuple[int, dict, bytes]:
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head[:-4].split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise ConnectionError(f"unexpected Transfer-Encoding: {headers['transfer-encoding']}")
        data = await self.reader.readexactly(int(headers.get("content-length", 0)))
        return int(status_line.split(" ", 2)[1]), headers, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


@dataclass
class ConsumerReport:
    """What one consumer process saw; merged over processes."""

    answer_at: array = field(default_factory=lambda: array("d"))  # monotonic time of each consume answer
    answer_kind: array = field(default_factory=lambda: array("b"))  # GOT, EMPTY or DECLINED
    keys: array = field(default_factory=lambda: array("q"))  # keys of every message acked
    received_at: array = field(default_factory=lambda: array("d"))  # monotonic, per message received
    e2e: array = field(default_factory=lambda: array("d"))  # publish start -> received, seconds
    ack_latency: array = field(default_factory=lambda: array("d"))
    errors: int = 0
    error_samples: list = field(default_factory=list)
    connected: int = 0  # consumers whose first consume got an answer

    def error(self, exc: BaseException | str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
            self.error_samples.append(text[:300])

    def merge(self, other: "ConsumerReport") -> None:
        for name in ("answer_at", "answer_kind", "keys", "received_at", "e2e", "ack_latency"):
            getattr(self, name).extend(getattr(other, name))
        self.errors += other.errors
        self.connected += other.connected
        self.error_samples.extend(other.error_samples[: max(0, 5 - len(self.error_samples))])


@dataclass
class Plan:
    url: str
    token: str | None
    topics: list[str]
    subscriptions: list[str]  # subscription i belongs to topic i
    consumers: int  # spread evenly over the subscriptions
    batch: int
    wait: int  # wait_seconds
    rate: float  # single-message publishes per second, in all
    publishers: int  # threads sharing the schedule
    duration: float  # of the publish phase
    idle: float  # of the idle phase
    settle: float  # from the consumers' start to the idle phase
    drain: float  # bound on the drain after the publish phase
    pause: float  # a consumer's pause after a declined poll
    declined_header: str | None
    declined_value: str
    procs: int
    pad: str


@dataclass
class Phase:
    start: float
    end: float
    cpu: dict  # CPU seconds in the phase by meter name (None: unknown)
    claims: float | None  # claim statements in the phase (None: unknown)

    @property
    def elapsed(self) -> float:
        return self.end - self.start


@dataclass
class Result:
    report: ConsumerReport
    idle: Phase
    publish: Phase
    published: int
    published_keys: array
    published_by_subscription: list[int]
    publish_latency: array
    publish_errors: int
    publish_error_samples: list
    rss_idle: int | None  # bytes, app processes, before any consumer connected
    rss_waiting: int | None  # at the end of the idle phase
    waiting: float | None  # long polls waiting in the server then, by its own gauge (None: unknown)
    drained_in: float  # seconds from the end of publishing to the last ack


def consumer_main(index, plan: Plan, assigned: list[tuple[int, str]], signals, results) -> None:
    try:
        report = asyncio.run(run_consumers(plan, assigned, signals))
        results.put(("ok", index, report))
    except BaseException:
        results.put(("error", index, traceback.format_exc()))


async def run_consumers(plan: Plan, assigned: list[tuple[int, str]], signals) -> ConsumerReport:
    parts = urlsplit(plan.url)
    report = ConsumerReport()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(
            consume_loop(plan, parts.hostname, parts.port or 80, i, sub, signals, report, stop)
        )
        for i, sub in assigned
    ]
    while not signals["stop"].is_set():
        await asyncio.sleep(0.05)
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return report


async def consume_loop(plan: Plan, host, port, index, subscription, signals, report, stop) -> None:
    conn = Conn(host, port, plan.token)
    claim = (
        f"/subscriptions/{subscription}/messages?consumer_id=lp-{index}"
        f"&batch_size={plan.batch}&wait_seconds={plan.wait}"
    )
    acks = f"/subscriptions/{subscription}/acks"
    # Spread the connects over a few hundred ms rather than 1,000 SYNs at once.
    await asyncio.sleep((index % 100) * 0.003)
    first = True
    try:
        while not stop.is_set():
            started = time.monotonic()
            try:
                status, headers, data = await conn.request("GET", claim)
                if status != 200:
                    raise ConnectionError(f"consume: HTTP {status} {data[:200]!r}")
                rows = orjson.loads(data)["data"]
            except Exception as exc:  # counted (and fails the run); the consumer goes on
                report.error(exc)
                await asyncio.sleep(ERROR_PAUSE)
                continue
            answered = time.monotonic()
            if first:
                report.connected += 1
                first = False
            report.answer_at.append(answered)
            if not rows:
                early = answered - started < plan.wait / 2
                if plan.declined_header:
                    declined = headers.get(plan.declined_header.lower(), "").lower() == plan.declined_value
                else:
                    declined = early
                report.answer_kind.append(DECLINED if declined else EARLY if early else EMPTY)
                if declined:
                    await asyncio.sleep(plan.pause)
                continue
            report.answer_kind.append(GOT)
            wall = time.time()
            for row in rows:
                report.e2e.append(wall - row["payload"]["ts"])
                report.received_at.append(answered)
            try:
                status, _, data = await conn.request("POST", acks, orjson.dumps([row["id"] for row in rows]))
                if status != 204:
                    raise ConnectionError(f"ack: HTTP {status} {data[:200]!r}")
            except Exception as exc:  # the lease runs out and the message comes again: the checks tell
                report.error(exc)
                continue
            report.ack_latency.append(time.monotonic() - answered)
            report.keys.extend(row["payload"]["k"] for row in rows)
            with signals["acked"].get_lock():
                signals["acked"].value += len(rows)
    finally:
        conn.close()


class Publisher:
    """R single-message publishes a second in all, round robin over the topics, on a fixed
    schedule (slot i at start + i/R) shared by `publishers` threads, so that a publish slower
    than 1/R does not lower the rate; until stopped. A message's key is its slot."""

    def __init__(self, plan: Plan, start_at: float):
        self.plan, self.start_at = plan, start_at
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.next_slot = 0
        self.keys = array("q")  # slots whose publish answered 204
        self.by_topic = [0] * len(plan.topics)
        self.latency = array("d")
        self.errors = 0
        self.error_samples: list[str] = []
        self.threads = [
            threading.Thread(target=self.loop, daemon=True, name=f"longpoll-publisher-{i}")
            for i in range(plan.publishers)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(REQUEST_TIMEOUT)

    def loop(self) -> None:
        client = HttpClient(self.plan.url, self.plan.token)
        topics, pad = self.plan.topics, self.plan.pad
        try:
            while True:
                with self.lock:
                    slot, self.next_slot = self.next_slot, self.next_slot + 1
                delay = self.start_at + slot / self.plan.rate - time.monotonic()
                if (delay > 0 and self.stopping.wait(delay)) or self.stopping.is_set():
                    break
                topic = slot % len(topics)
                body = orjson.dumps([{"k": slot, "ts": time.time(), "pad": pad}])
                started = time.perf_counter()
                try:
                    client.publish(topics[topic], body)
                except Exception as exc:  # counted; it may or may not have been stored
                    with self.lock:
                        self.errors += 1
                        if len(self.error_samples) < 5:
                            self.error_samples.append(f"{type(exc).__name__}: {exc}"[:300])
                    continue
                elapsed = time.perf_counter() - started
                with self.lock:
                    self.latency.append(elapsed)
                    self.keys.append(slot)
                    self.by_topic[topic] += 1
        finally:
            client.close()

    @property
    def published(self) -> int:
        return len(self.keys)


def loadgen_meter(workers: list) -> Callable[[], float]:
    """CPU seconds of this process (every thread: the publisher's too) and the consumer processes."""
    me = psutil.Process()
    processes = [psutil.Process(w.pid) for w in workers]

    def meter() -> float:
        total = sum(me.cpu_times()[:2])
        for process in processes:
            try:
                total += sum(process.cpu_times()[:2])
            except psutil.NoSuchProcess:
                pass
        return total

    return meter


def read_all(meters: dict[str, Callable]) -> dict:
    values = {}
    for name, meter in meters.items():
        try:
            values[name] = meter()
        except Exception:
            values[name] = None
    return values


def difference(after: dict, before: dict) -> dict:
    return {
        name: None if after[name] is None or before[name] is None else after[name] - before[name]
        for name in after
    }


def run_longpoll(
    plan: Plan,
    meters: dict[str, Callable],
    rss: Callable[[], int | None],
    claims: Callable[[], float | None],
    waiting: Callable[[], float | None],
    say: Callable[[str], None],
) -> Result:
    """Run the phases (see the module's docstring); meters: name -> cumulative CPU seconds."""
    meters = {**meters, "machine": machine_busy_seconds}
    ctx = multiprocessing.get_context("fork")
    procs = consumer_procs(plan.consumers, plan.procs)
    assignment = [(i, plan.subscriptions[i % len(plan.subscriptions)]) for i in range(plan.consumers)]
    signals = {"stop": ctx.Event(), "acked": ctx.Value("q", 0)}
    results = ctx.Queue()
    rss_idle = rss()
    workers = [
        ctx.Process(target=consumer_main, args=(p, plan, assignment[p::procs], signals, results), daemon=True)
        for p in range(procs)
    ]
    for worker in workers:
        worker.start()
    publisher = None
    try:
        meters["loadgen"] = loadgen_meter(workers)
        time.sleep(plan.settle)
        say(f"longpoll: {plan.consumers} consumers started; idle phase of {plan.idle:g}s")

        idle_start, cpu0, claims0 = time.monotonic(), read_all(meters), claims()
        time.sleep(plan.idle)
        idle_end, cpu1, claims1 = time.monotonic(), read_all(meters), claims()
        rss_waiting, waiters = rss(), waiting()
        idle = Phase(idle_start, idle_end, difference(cpu1, cpu0), delta(claims1, claims0))

        say(f"longpoll: publishing {plan.rate:g}/s for {plan.duration:g}s")
        publish_start = time.monotonic()
        publisher = Publisher(plan, publish_start)
        cpu2, claims2 = read_all(meters), claims()
        publisher.start()
        time.sleep(max(0.0, publish_start + plan.duration - time.monotonic()))
        publisher.stop()
        publish_end, cpu3, claims3 = time.monotonic(), read_all(meters), claims()
        publish = Phase(publish_start, publish_end, difference(cpu3, cpu2), delta(claims3, claims2))

        # Drain: until every message published was received and acked (or the bound).
        deadline = time.monotonic() + plan.drain
        while signals["acked"].value < publisher.published and time.monotonic() < deadline:
            if not any(w.is_alive() for w in workers):
                break
            time.sleep(0.01)
        drained_in = time.monotonic() - publish_end
        signals["stop"].set()
        report = ConsumerReport()
        for _ in workers:
            try:
                status, index, payload = results.get(timeout=REQUEST_TIMEOUT)
            except queue.Empty:
                raise RuntimeError("longpoll consumer processes did not report in time") from None
            if status != "ok":
                raise RuntimeError(f"longpoll consumer process {index} failed:\n{payload}")
            report.merge(payload)
        for worker in workers:
            worker.join(timeout=10)
    finally:
        signals["stop"].set()
        if publisher is not None:
            publisher.stopping.set()
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
    return Result(
        report=report,
        idle=idle,
        publish=publish,
        published=publisher.published,
        published_keys=publisher.keys,
        published_by_subscription=publisher.by_topic,
        publish_latency=publisher.latency,
        publish_errors=publisher.errors,
        publish_error_samples=publisher.error_samples,
        rss_idle=rss_idle,
        rss_waiting=rss_waiting,
        waiting=waiters,
        drained_in=drained_in,
    )


def delta(after, before):
    return None if after is None or before is None else after - before


def tree_rss(roots: list[psutil.Process]) -> int | None:
    """Resident memory of these processes and their descendants, bytes (None if none)."""
    if not roots:
        return None
    total = 0
    for process in tree_processes(roots):
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def consumer_procs(consumers: int, procs: int) -> int:
    return max(1, min(procs, math.ceil(consumers / CONSUMERS_PER_PROC)))
