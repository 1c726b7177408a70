"""The harness of the client's fault tests (tests/test_client_faults.py): a real server that a test
may kill and start again on the same port, and a recorder that writes what the client library
(pubsub_client) does into a history of tests/history.py, for its checker.

- `Server`: `flask pubsub serve` on a fixed loopback port, stopped with SIGTERM or SIGKILL (to the
  gunicorn master, as a crash) and started again.
- `record_client(history, client)` wraps one Client's consume, ack, nack and extend: each consume
  records its deliveries with the call's interval, each ack or nack a settle with its outcome
  (ok, refused on a 4xx error, unknown on any other error). A Subscriber built on that Client is
  recorded as it works; the history checker then finds lost messages, acks applied twice, etc.
- `Handled`: every handler call (start, end, outcome), in memory and optionally in a journal file.
- `publish_all(...)` feeds a Publisher one message per publish() call and records each message's
  outcome when its future resolves.
- `python -m tests.client_support subscriber ...`: a Subscriber in a process of its own, writing
  its history and its handler calls to journals, stopped by SIGTERM (the client's signal helper)
  or killed, for the tests that kill subscribers.

Server lease expiry needs no cleanup-stuck run: the checker learns of it from one `Release` that
spans the scenario (`record_lease_expiry`), with the ack deadline as its lock timeout.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.history import Delivery, History, Publish, Release, Settle

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The client is its own distribution (client/); run from a checkout, it may not be installed.
if (PROJECT_ROOT / "client").is_dir() and str(PROJECT_ROOT / "client") not in sys.path:
    try:
        import pubsub_client  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(PROJECT_ROOT / "client"))

import pubsub_client  # noqa: E402

FLASK = str(Path(sys.executable).parent / "flask")
START_TIMEOUT = 40.0  # seconds for serve to answer /liveness
STOP_TIMEOUT = 25.0  # above gunicorn's graceful_timeout (20 s)


def value_of(payload: object) -> str | None:
    return payload.get("value") if isinstance(payload, dict) else None


# --- The server --------------------------------------------------------------------------------


class Server:
    """`flask pubsub serve` on one loopback port, in a process group of its own; a test may stop it
    (SIGTERM: gunicorn's graceful stop; SIGKILL: the gunicorn master dies, its workers follow) and
    start it again on the same port. `close()` stops whatever is left."""

    def __init__(self, database_url: str, port: int, log: Path, workers: int = 2, threads: int = 8):
        from tests.test_serve import serve_env

        self.port, self.log = port, log
        self.url = f"http://127.0.0.1:{port}"
        self.env = serve_env(
            DATABASE_URL=database_url,
            API_PORT=str(port),
            API_NUM_WORKERS=str(workers),
            API_NUM_THREADS=str(threads),
        )
        self.workers = workers
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        from tests.test_serve import wait_until_live

        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                [FLASK, "pubsub", "serve"],
                cwd=PROJECT_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        wait_until_live(self.process, self.port, self.log)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """SIGTERM: serve passes it to gunicorn, which finishes its requests and exits. SIGKILL: to
        every process of the server at once (serve, the gunicorn master, its workers), as a crash:
        requests in flight are cut. (Killing the master alone leaves its workers serving until
        they notice, then finishing their requests: up to a long poll's 20 s.) Either way, nothing
        of it is left on return."""
        from tests.test_serve import stop_group

        if not self.running:
            return
        if signum == signal.SIGKILL:
            os.killpg(self.process.pid, signal.SIGKILL)
        stop_group(self.process)  # SIGTERM, and a bounded wait; then SIGKILL to what is left

    def restart(self, signum: int = signal.SIGTERM) -> None:
        self.stop(signum)
        self.start()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def close(self) -> None:
        if self.process is not None:
            from tests.test_serve import stop_group

            if self.process.poll() is None:
                stop_group(self.process)


# --- Recording what the client does -----------------------------------------------------------


def status_of(error: BaseException) -> int | None:
    """The HTTP status an error of the client carries, if any (None: no answer, outcome unknown)."""
    for name in ("status", "status_code"):
        status = getattr(error, name, None)
        if isinstance(status, int):
            return status
    return None


def record_client(history: History, client: "pubsub_client.Client") -> dict[str, int]:
    """Record this Client's consumes, acks and nacks in the history, from now on, by wrapping the
    instance's methods (the Subscriber calls them as any caller does). Returns live counters of
    the calls: consume, ack, nack, extend (and the ids each acked, nacked or extended)."""
    consume, ack, nack, extend = client.consume, client.ack, client.nack, client.extend
    by_ack_id: dict[str, tuple[str, str]] = {}  # ack_id -> (message id, consumer)
    lock = threading.Lock()
    counts = {
        "consume": 0,
        "ack": 0,
        "nack": 0,
        "extend": 0,
        "acked ids": 0,
        "nacked ids": 0,
        "extended ids": 0,
    }

    def count(kind: str, ids: int = 0) -> None:
        with lock:
            counts[kind] += 1
            if ids:
                counts[{"ack": "acked ids", "nack": "nacked ids", "extend": "extended ids"}[kind]] += ids

    def recording_consume(subscription, consumer_id, *args, **kwargs):
        t0 = time.monotonic()
        messages = consume(subscription, consumer_id, *args, **kwargs)
        t1 = time.monotonic()
        count("consume")
        with lock:
            for m in messages:
                by_ack_id[m.ack_id] = (m.id, consumer_id)
        if messages:
            history.record_deliveries(
                [
                    Delivery(
                        subscription,
                        consumer_id,
                        m.id,
                        value_of(m.payload),
                        m.payload,
                        m.delivery_attempts,
                        t0,
                        t1,
                    )
                    for m in messages
                ]
            )
        return messages

    def recording(kind: str, method: Callable) -> Callable:
        def settle(subscription, ack_ids, *args, **kwargs):
            ack_ids = list(ack_ids)
            t0, status = time.monotonic(), 204
            try:
                return method(subscription, ack_ids, *args, **kwargs)
            except BaseException as error:
                status = status_of(error)
                if status is not None and status < 400:
                    status = None
                raise
            finally:
                t1 = time.monotonic()
                count(kind, len(ack_ids))
                if kind != "extend":
                    # One settle per consumer (a Subscriber has one), with message ids, as the
                    # checker matches them against that consumer's deliveries.
                    by_consumer: dict[str, list[str]] = {}
                    with lock:
                        for ack_id in ack_ids:
                            message_id, consumer = by_ack_id.get(ack_id, (ack_id.split(":")[0], "?"))
                            by_consumer.setdefault(consumer, []).append(message_id)
                    for consumer, ids in by_consumer.items():
                        history.record_settle(Settle(kind, subscription, consumer, ids, status, t0, t1))

        return settle

    client.consume = recording_consume
    client.ack = recording("ack", ack)
    client.nack = recording("nack", nack)
    client.extend = recording("extend", extend)
    return counts


def record_lease_expiry(history: History, ack_deadline: float, since: float) -> None:
    """Tell the checker that from `since` on, any lease may lapse `ack_deadline` seconds after its
    claim (the server's own expiry, no cleanup-stuck run): one release spanning the scenario."""
    history.record_release(Release(ack_deadline, since, float("inf")))


@dataclass
class Call:
    """One handler call: the delivery it was given and how it ended ("ok", "raised", "nack" or
    None while it runs)."""

    consumer: str
    message_id: str
    value: str | None
    attempts: int
    t0: float
    t1: float | None = None
    outcome: str | None = None


class Handled:
    """Every handler call of a Subscriber, in memory and, for a process that may be killed, in a
    journal file (one JSON line per start and end)."""

    def __init__(self, journal: str | os.PathLike | None = None):
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.journal = open(journal, "a", encoding="utf-8", buffering=1) if journal else None

    def wrap(self, consumer: str, handler: Callable) -> Callable:
        """The handler, recording each call around it."""

        def recorded(message):
            call = Call(
                consumer, message.id, value_of(message.payload), message.delivery_attempts, time.monotonic()
            )
            self._write("start", call)
            try:
                result = handler(message)
            except pubsub_client.Nack:
                call.outcome = "nack"
                raise
            except BaseException:
                call.outcome = "raised"
                raise
            else:
                call.outcome = "ok"
                return result
            finally:
                call.t1 = time.monotonic()
                self._write("end", call)

        return recorded

    def _write(self, event: str, call: Call) -> None:
        with self.lock:
            if event == "start":
                self.calls.append(call)
            if self.journal:
                self.journal.write(json.dumps({"event": event, **asdict(call)}) + "\n")

    def close(self) -> None:
        if self.journal:
            self.journal.close()

    def ok_values(self) -> set[str]:
        with self.lock:
            return {c.value for c in self.calls if c.outcome == "ok"}

    @staticmethod
    def load(path: str | os.PathLike) -> list[Call]:
        """The calls of a journal, each as of its last line (a line cut by a kill is skipped)."""
        calls: dict[tuple[str, int], Call] = {}
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                entry.pop("event")
                calls[entry["message_id"], entry["attempts"]] = Call(**entry)
        return list(calls.values())


# --- Publishing -------------------------------------------------------------------------------


def payload(name: str, n: int) -> dict:
    """A payload with a unique value, as the history's producers make."""
    return {"value": f"{name}-{n:06d}", "n": n}


def record_publish_future(
    history: History,
    name: str,
    topic: str,
    body: dict,
    t0: float,
    future: Future,
    errors: Counter | None = None,
) -> None:
    """Record one Publisher message's outcome when its future resolves (and count its error)."""

    def done(future: Future) -> None:
        error = future.exception()
        if error is not None and errors is not None:
            errors[repr(error)[:200]] += 1
        status = 204 if error is None else status_of(error)
        if error is not None and status is not None and status < 400:
            status = None  # an error, yet a 2xx or 3xx: treat as unknown
        history.record_publish(Publish(name, topic, [body["value"]], [body], status, t0, time.monotonic()))

    future.add_done_callback(done)


def publish_all(
    history: History,
    publisher: "pubsub_client.Publisher",
    name: str,
    topic: str,
    count: int,
    *,
    pause_every: int = 0,
    pause: float = 0.0,
    stop: Callable[[], bool] = lambda: False,
    errors: Counter | None = None,
) -> list[Future]:
    """Feed a Publisher `count` messages, one publish() call each, recording each message's
    outcome; optionally pausing `pause` s every `pause_every` messages (a steady stream)."""
    futures = []
    for n in range(1, count + 1):
        if stop():
            break
        body = payload(name, n)
        t0 = time.monotonic()
        future = publisher.publish(body)
        record_publish_future(history, name, topic, body, t0, future, errors)
        futures.append(future)
        if pause_every and n % pause_every == 0:
            time.sleep(pause)
    return futures


def publish_batches(
    history: History, client: "pubsub_client.Client", name: str, topic: str, count: int, batch: int = 500
) -> None:
    """Publish `count` messages with client.publish, `batch` per call, recording each call."""
    for first in range(1, count + 1, batch):
        bodies = [payload(name, n) for n in range(first, min(count, first + batch - 1) + 1)]
        t0, status = time.monotonic(), 204
        try:
            client.publish(topic, bodies)
        except BaseException as error:
            status = status_of(error)
            raise
        finally:
            values = [b["value"] for b in bodies]
            history.record_publish(Publish(name, topic, values, bodies, status, t0, time.monotonic()))


def wait_for(condition: Callable[[], bool], seconds: float, interval: float = 0.05) -> bool:
    """Poll until the condition holds (True) or the bound passes (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def published_ok(history: History, topic: str | None = None) -> set[str]:
    return {
        value
        for p in history.publishes
        if p.outcome == "ok" and (topic is None or p.topic == topic)
        for value in p.values
    }


# --- A subscriber as a process, to be killed or stopped ---------------------------------------


def subscriber_command(
    url: str,
    subscription: str,
    name: str,
    journal: Path,
    handled: Path,
    *,
    handler_seconds: float = 0.0,
    seconds: float = 60.0,
    **options: int | float,
) -> list[str]:
    command = [sys.executable, "-m", "tests.client_support", "subscriber", "--url", url]
    command += ["--subscription", subscription, "--name", name, "--journal", str(journal)]
    command += [
        "--handled",
        str(handled),
        "--handler-seconds",
        str(handler_seconds),
        "--seconds",
        str(seconds),
    ]
    for option, value in options.items():
        command += [f"--{option.replace('_', '-')}", str(value)]
    return command


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.client_support subscriber ...`: a Subscriber whose handler sleeps
    `--handler-seconds` and returns (ack), recording its history and handler calls to journals,
    until SIGTERM (the client's own signal handling stops it) or `--seconds` pass."""
    parser = argparse.ArgumentParser(prog="python -m tests.client_support")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("subscriber")
    sub.add_argument("--url", required=True)
    sub.add_argument("--subscription", required=True)
    sub.add_argument("--name", required=True)
    sub.add_argument("--journal", required=True)
    sub.add_argument("--handled", required=True)
    sub.add_argument("--handler-seconds", type=float, default=0.0)
    sub.add_argument("--seconds", type=float, default=60.0)
    sub.add_argument("--max-workers", type=int, default=4)
    sub.add_argument("--max-outstanding", type=int, default=20)
    sub.add_argument("--wait-seconds", type=int, default=20)
    args = parser.parse_args(argv)

    history = History(journal=args.journal)
    handled = Handled(args.handled)
    client = pubsub_client.Client(args.url)
    record_client(history, client)

    def handler(message) -> None:
        time.sleep(args.handler_seconds)

    subscriber = pubsub_client.Subscriber(
        client,
        args.subscription,
        handled.wrap(args.name, handler),
        consumer_id=args.name,
        max_workers=args.max_workers,
        max_outstanding=args.max_outstanding,
        wait_seconds=args.wait_seconds,
    )
    subscriber.install_signal_handlers()  # SIGTERM and SIGINT: stop(), from the client
    subscriber.start()
    # A bound, should the test die first: stop by ourselves.
    timer = threading.Timer(args.seconds, subscriber.stop)
    timer.daemon = True
    timer.start()
    try:
        subscriber.wait()
    finally:
        timer.cancel()
        client.close()
        handled.close()
        history.close()


def values_of(calls: Iterable[Call], outcome: str | None = "ok") -> list[str]:
    return [c.value for c in calls if outcome is None or c.outcome == outcome]


if __name__ == "__main__":
    main()
