"""Publisher: one message per publish() call, sent in batches by a background thread."""

import logging
import threading
import time
import uuid
from concurrent.futures import Future, InvalidStateError
from datetime import datetime

from pubsub_client.client import DUMPS, MAX_PUBLISH_BATCH, Client, delay_query

log = logging.getLogger("pubsub_client")


class Publisher:
    """publish(payload) queues a JSON object and returns a Future of its message id. A batch
    leaves when it holds max_batch_messages or max_batch_bytes, or linger_seconds after its first
    message; publish() blocks while max_queued_messages are waiting for their answer. With
    delay_seconds or deliver_at, every batch is published with that delay (Client.publish): a
    batch's messages share one due time.

    A batch fails or succeeds whole: every future of a batch gets its ids, or the same exception.
    Each batch carries an Idempotency-Key of its own (a new UUID), so a batch whose answer was
    lost (a cut connection, a 503) is sent again, up to the client's max_retries, and stored once:
    the server answers the repeat with the first one's ids. With idempotency_keys=False (a server
    without the extension), a batch whose request may have reached the server is never sent
    again (its futures get a ConnectionFailedError with maybe_stored=True, or a ServerError)."""

    def __init__(
        self,
        client: Client,
        topic: str,
        max_batch_messages: int = MAX_PUBLISH_BATCH,
        max_batch_bytes: int = 1_000_000,
        linger_seconds: float = 0.005,
        max_queued_messages: int = 10_000,
        delay_seconds: int | None = None,
        deliver_at: datetime | str | None = None,
        idempotency_keys: bool = True,
    ):
        if not 1 <= max_batch_messages <= MAX_PUBLISH_BATCH:
            raise ValueError(f"max_batch_messages must be 1-{MAX_PUBLISH_BATCH}")
        delay_query(delay_seconds, deliver_at)  # a bad delay fails here, not in every batch
        delay = {"delay_seconds": delay_seconds, "deliver_at": deliver_at}
        self._delay = {name: value for name, value in delay.items() if value is not None}
        self.client = client
        self.topic = topic
        self.max_batch_messages = max_batch_messages
        self.max_batch_bytes = max_batch_bytes
        self.linger_seconds = linger_seconds
        self.max_queued_messages = max(1, max_queued_messages)
        self.idempotency_keys = idempotency_keys
        lock = threading.Lock()
        self._has_work = threading.Condition(lock)  # the sender waits on it
        self._has_room = threading.Condition(lock)  # publish() waits on it (back-pressure)
        self._done = threading.Condition(lock)  # flush() waits on it
        self._data: list[bytes] = []  # encoded payloads waiting to be sent
        self._futures: list[Future] = []
        self._bytes = 0  # of _data, with a comma each
        self._first_at = 0.0  # when the oldest waiting message was queued
        self._queued = 0  # waiting or being sent
        self._enqueued = 0  # ever queued
        self._resolved = 0  # ever answered
        self._flush_to = 0  # send without lingering until this many are resolved
        self._closing = False
        self._sender = threading.Thread(target=self._run, name=f"pubsub-publisher-{topic}", daemon=True)
        self._sender.start()

    def publish(self, payload: dict) -> Future:
        """Queue a JSON object; the Future resolves to its message id."""
        if not isinstance(payload, dict):
            raise TypeError(f"a payload must be a JSON object (dict), not {type(payload).__name__}")
        data = DUMPS(payload).encode()
        future: Future = Future()
        with self._has_work:
            while self._queued >= self.max_queued_messages and not self._closing:
                self._has_room.wait()
            if self._closing:
                raise RuntimeError("the publisher is closed")
            self._data.append(data)
            self._futures.append(future)
            self._bytes += len(data) + 1
            self._queued += 1
            self._enqueued += 1
            waiting = len(self._data)
            if waiting == 1:
                self._first_at = time.monotonic()
                self._has_work.notify()
            elif waiting == self.max_batch_messages or self._bytes >= self.max_batch_bytes:
                self._has_work.notify()
        return future

    def flush(self, timeout: float | None = None) -> None:
        """Send what is queued now at once, and wait until each of those messages has its answer.
        Raises TimeoutError if that takes longer than timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._has_work:
            target = self._enqueued
            self._flush_to = max(self._flush_to, target)
            self._has_work.notify()
            while self._resolved < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"{target - self._resolved} messages not yet published")
                if not self._sender.is_alive():
                    raise RuntimeError("the publisher's thread has died")
                self._done.wait(remaining)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new messages, flush the queued ones, and stop the sending thread."""
        with self._has_work:
            self._closing = True
            self._has_work.notify()
            self._has_room.notify_all()
        self.flush(timeout)
        self._sender.join(timeout)

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _next_batch(self) -> tuple[list[bytes], list[Future]] | None:
        """Wait for a batch that is full, lingered enough, flushed or closing; None when closed."""
        with self._has_work:
            while True:
                waiting = len(self._data)
                if not waiting:
                    if self._closing:
                        return None
                    self._has_work.wait()
                    continue
                full = waiting >= self.max_batch_messages or self._bytes >= self.max_batch_bytes
                if not full and not self._closing and self._flush_to <= self._resolved:
                    remaining = self._first_at + self.linger_seconds - time.monotonic()
                    if remaining > 0:
                        self._has_work.wait(remaining)
                        continue
                count, size = 0, 2
                limit = min(waiting, self.max_batch_messages)
                while count < limit:
                    size += len(self._data[count]) + 1
                    if size > self.max_batch_bytes and count:
                        break
                    count += 1
                data, self._data = self._data[:count], self._data[count:]
                futures, self._futures = self._futures[:count], self._futures[count:]
                self._bytes -= sum(len(d) for d in data) + count
                self._first_at = time.monotonic()  # the rest starts lingering now
                return data, futures

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            data, futures = batch
            try:
                body = b"[" + b",".join(data) + b"]"
                key = str(uuid.uuid4()) if self.idempotency_keys else None
                ids = self.client.publish_raw(self.topic, body, **self._delay, idempotency_key=key)
                if len(ids) != len(futures):
                    raise RuntimeError(f"{len(ids)} receipts for {len(futures)} messages")
            except BaseException as error:  # every future must get an answer
                log.warning("publishing %d messages to %s failed: %s", len(futures), self.topic, error)
                for future in futures:
                    try:
                        future.set_exception(error)
                    except InvalidStateError:  # cancelled by its caller
                        pass
            else:
                for future, message_id in zip(futures, ids, strict=True):
                    try:
                        future.set_result(message_id)
                    except InvalidStateError:
                        pass
            with self._has_work:
                self._queued -= len(futures)
                self._resolved += len(futures)
                self._has_room.notify_all()
                self._done.notify_all()
