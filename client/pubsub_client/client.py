"""Client: every REST call of the service, over kept-alive HTTP/1.1 connections, with access
tokens, retries and typed errors."""

import http.client
import json
import logging
import random
import select
import socket
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from urllib.parse import quote, urlencode, urlsplit

from pubsub_client.errors import AuthError, ConnectionFailedError, PubSubError, ServerError, error_for

log = logging.getLogger("pubsub_client")

MAX_PUBLISH_BATCH = 1000  # messages per publish request, the server's limit
MAX_IDS = 1000  # ids per ack, nack, extend or reprocess request
PAGE = 100  # the server's largest page
RETRY_STATUSES = (502, 503, 504)
# A keyed publish also retries a 409: another request with its key was in progress.
KEYED_PUBLISH_RETRY_STATUSES = (409, *RETRY_STATUSES)
BACKOFF_BASE = 0.2  # seconds; attempt n sleeps up to BACKOFF_BASE * 2**n (full jitter)
BACKOFF_CAP = 10.0
# A kept-alive connection idle longer than this may have been closed by the server (gunicorn's
# keepalive is 2 s): a publish never goes on one, since a failure there could not tell whether
# the server had the request. Other calls use it and retry at once on a new one if it fails.
SAFE_IDLE_SECONDS = 1.0
MAX_IDLE_CONNECTIONS = 32
# A token is renewed once this share of its lifetime has passed.
TOKEN_RENEW_SHARE = 0.8
LONG_POLL_SLACK = 10.0  # seconds of socket timeout beyond a long poll's wait_seconds
DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# update_subscription: a field not given is left as it is (None is sent: it clears or resets).
UNSET = object()


class Message:
    """A delivered message. ack_id is the lease token of this delivery (None in DLQ listings):
    acks, nacks and extensions that send it act only while this delivery is the current one."""

    __slots__ = ("id", "payload", "delivery_attempts", "ack_id", "subscription_id", "_created_at", "_state")

    def __init__(self, data: dict):
        self.id: str = data["id"]
        self.payload = data["payload"]
        self.delivery_attempts: int = data["delivery_attempts"]
        self.ack_id: str | None = data.get("ack_id")
        self.subscription_id: str | None = data.get("subscription_id")
        self._created_at: str = data["created_at"]
        self._state = 0  # Subscriber's: 0 queued, 1 running, 2 settled

    @property
    def created_at(self) -> datetime:
        return datetime.fromisoformat(self._created_at)

    def to_dict(self) -> dict:
        data = {
            "id": self.id,
            "payload": self.payload,
            "delivery_attempts": self.delivery_attempts,
            "created_at": self._created_at,
        }
        if self.ack_id is not None:
            data["ack_id"] = self.ack_id
        return data

    def __repr__(self) -> str:
        return (
            f"Message(id={self.id!r}, delivery_attempts={self.delivery_attempts}, payload={self.payload!r})"
        )


def delay_query(delay_seconds: int | None, deliver_at: datetime | str | None) -> str:
    """The query string of a delayed publish ("" for none): ?delay_seconds=N or ?deliver_at=T."""
    if delay_seconds is not None and deliver_at is not None:
        raise ValueError("give delay_seconds or deliver_at, not both")
    if delay_seconds is not None:
        return "?" + urlencode({"delay_seconds": int(delay_seconds)})
    if isinstance(deliver_at, datetime):
        if deliver_at.utcoffset() is None:
            raise ValueError("deliver_at must be an aware datetime (with a timezone)")
        deliver_at = deliver_at.isoformat()
    if deliver_at is not None:
        return "?" + urlencode({"deliver_at": deliver_at})  # a + in the offset becomes %2B
    return ""


class _NotSent(Exception):
    """The request never reached the server (connection refused, or it failed while being sent)."""


class _MaybeSent(Exception):
    """The connection broke after the whole request was sent: the server may have acted on it."""

    def __init__(self, error: BaseException, reused: bool):
        super().__init__(str(error))
        self.reused = reused


class Aborted(Exception):
    """The call was cancelled by abort() on its InFlight (a Subscriber stopping a long poll)."""


class InFlight:
    """Lets another thread cut a call's connection, e.g. to end a long poll at once."""

    def __init__(self):
        self.conn: http.client.HTTPConnection | None = None
        self.aborted = False
        self.started = 0.0

    def abort(self) -> None:
        self.aborted = True
        conn = self.conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether the server has closed this idle kept-alive connection (it is readable: EOF)."""
    if conn.sock is None:
        return True
    poller = select.poll()
    poller.register(conn.sock, select.POLLIN)
    return bool(poller.poll(0))


def backoff_delay(attempt: int, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter, never shorter than the server's Retry-After."""
    delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
    return max(delay, retry_after) if retry_after is not None else delay


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return min(BACKOFF_CAP * 6, max(0.0, float(value)))
    except ValueError:
        return None  # an HTTP date: rare, and the backoff covers it


class Client:
    """A thread-safe client of one pubsub server. With client_id and client_secret it fetches an
    access token from /oauth/token and renews it before it expires (and once on a 401)."""

    def __init__(
        self,
        url: str,
        client_id: str | None = None,
        client_secret: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 5,
    ):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._host_header = parts.netloc
        self.timeout = timeout
        self.max_retries = max_retries
        self._credentials = (client_id, client_secret) if client_id and client_secret else None
        self._token: str | None = None
        self._token_renew_at = 0.0
        self._token_lock = threading.Lock()
        self._idle: list[tuple[http.client.HTTPConnection, float]] = []  # (connection, idle since)
        self._idle_lock = threading.Lock()
        self._closed = False

    # --- Topics ---------------------------------------------------------------------------------

    def create_topic(self, topic_id: str) -> dict:
        return self._call("POST", "/topics", {"id": topic_id}, idempotent=False)

    def get_topic(self, topic_id: str) -> dict:
        return self._call("GET", f"/topics/{quote(topic_id, safe='')}")

    def list_topics(self) -> list[dict]:
        """Every topic, ordered by id (fetched page by page)."""
        return self._list_all("/topics")

    def delete_topic(self, topic_id: str) -> None:
        self._call("DELETE", f"/topics/{quote(topic_id, safe='')}")

    def publish(
        self,
        topic_id: str,
        payloads: Iterable[dict],
        delay_seconds: int | None = None,
        deliver_at: datetime | str | None = None,
        idempotency_key: str | None = None,
    ) -> list[str]:
        """Publish JSON objects; their message ids, in order. Over 1000 go in several requests,
        in order: an error leaves the earlier ones published. With delay_seconds (0 to 604800)
        or deliver_at (an aware datetime, or RFC 3339 text), the messages become claimable only
        then, by the server's clock (each request's delay counts from its own arrival). With an
        idempotency_key (at most 1000 objects: one key names one request), see publish_raw."""
        payloads = list(payloads)
        if idempotency_key is not None and len(payloads) > MAX_PUBLISH_BATCH:
            raise ValueError(f"an idempotency_key names one request: at most {MAX_PUBLISH_BATCH} payloads")
        ids: list[str] = []
        for start in range(0, max(len(payloads), 1), MAX_PUBLISH_BATCH):
            body = DUMPS(payloads[start : start + MAX_PUBLISH_BATCH]).encode()
            ids.extend(self.publish_raw(topic_id, body, delay_seconds, deliver_at, idempotency_key))
        return ids

    def publish_raw(
        self,
        topic_id: str,
        body: bytes,
        delay_seconds: int | None = None,
        deliver_at: datetime | str | None = None,
        idempotency_key: str | None = None,
    ) -> list[str]:
        """Publish a JSON array of objects given as bytes; the message ids, in order. A delay as
        for publish(). Without an idempotency_key, retried only when the request surely did not
        reach the server. With one (sent as the Idempotency-Key header), retried like a read, and
        on a 409 too: the server stores the batch once and answers every repeat (same key, body
        and delay) with the first one's ids. A ServerError says maybe_stored unless the request
        surely never reached the server (with a key, always: publish again with the same key and
        body to find out)."""
        query = delay_query(delay_seconds, deliver_at)
        headers = {"Prefer": "return=representation"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = f'"{idempotency_key}"'  # the IETF draft's string form
        try:
            answer = self._call(
                "POST",
                f"/topics/{quote(topic_id, safe='')}/messages{query}",
                body,
                idempotent=idempotency_key is not None,
                headers=headers,
                retry_statuses=KEYED_PUBLISH_RETRY_STATUSES,
            )
        except ServerError as error:
            # A 5xx answer may follow a commit too (a 503 whose outcome is unknown, a proxy's 502).
            error.maybe_stored = error.maybe_stored or idempotency_key is not None or error.status is not None
            raise
        return [receipt["id"] for receipt in answer["data"]]

    # --- Subscriptions --------------------------------------------------------------------------

    def create_subscription(
        self,
        subscription_id: str,
        topic_id: str,
        filter: dict | None = None,
        max_delivery_attempts: int | None = None,
        backoff_min_seconds: int | None = None,
        backoff_max_seconds: int | None = None,
        ack_deadline_seconds: int | None = None,
        ordering_key: str | None = None,
    ) -> dict:
        body = {"id": subscription_id, "topic_id": topic_id}
        for name, value in (
            ("filter", filter),
            ("max_delivery_attempts", max_delivery_attempts),
            ("backoff_min_seconds", backoff_min_seconds),
            ("backoff_max_seconds", backoff_max_seconds),
            ("ack_deadline_seconds", ack_deadline_seconds),
            ("ordering_key", ordering_key),
        ):
            if value is not None:
                body[name] = value
        return self._call("POST", "/subscriptions", body, idempotent=False)

    def get_subscription(self, subscription_id: str) -> dict:
        return self._call("GET", self._sub(subscription_id))

    def list_subscriptions(self) -> list[dict]:
        """Every subscription, ordered by id (fetched page by page)."""
        return self._list_all("/subscriptions")

    def delete_subscription(self, subscription_id: str) -> None:
        self._call("DELETE", self._sub(subscription_id))

    def consume(
        self,
        subscription_id: str,
        consumer_id: str,
        batch_size: int = 10,
        wait_seconds: int = 0,
        in_flight: InFlight | None = None,
    ) -> list[Message]:
        """Lease up to batch_size messages (1-100) to consumer_id, waiting up to wait_seconds
        (0-20) for some to arrive."""
        query = {"consumer_id": consumer_id, "batch_size": batch_size}
        if wait_seconds:
            query["wait_seconds"] = wait_seconds
        answer = self._call(
            "GET",
            f"{self._sub(subscription_id)}/messages?{urlencode(query)}",
            timeout=max(self.timeout, wait_seconds + LONG_POLL_SLACK),
            in_flight=in_flight,
        )
        return [Message(item) for item in answer["data"]]

    def ack(self, subscription_id: str, ack_ids: Iterable[str]) -> None:
        """Acknowledge deliveries: ids not delivered right now (or stale ack_ids) are ignored."""
        self._post_ids(subscription_id, "acks", ack_ids)

    def nack(
        self,
        subscription_id: str,
        ack_ids: Iterable[str],
        delay_seconds: int | None = None,
        dead_letter: bool = False,
    ) -> None:
        """Retry after delay_seconds (None: the subscription's backoff), or dead-letter. With
        dead_letter, send them to the DLQ at once instead of retrying them."""
        flag = "true" if dead_letter else None
        self._post_ids(subscription_id, "nacks", ack_ids, delay_seconds=delay_seconds, dead_letter=flag)

    def extend(self, subscription_id: str, ack_ids: Iterable[str], seconds: int | None = None) -> None:
        """Move the ack deadline of deliveries to now + seconds (None: the subscription's)."""
        self._post_ids(subscription_id, "extend", ack_ids, seconds=seconds)

    def metrics(self, subscription_id: str) -> dict:
        return self._call("GET", f"{self._sub(subscription_id)}/metrics")

    def dlq(self, subscription_id: str, offset: int = 0, limit: int = PAGE) -> list[Message]:
        """Dead letters, in the order they died."""
        path = f"{self._sub(subscription_id)}/dlq?{urlencode({'offset': offset, 'limit': limit})}"
        return [Message(item) for item in self._call("GET", path)["data"]]

    def reprocess(self, subscription_id: str, ids: Iterable[str]) -> None:
        """Send dead letters back to the queue, their attempts reset."""
        self._post_ids(subscription_id, "dlq/reprocess", ids)

    def update_subscription(
        self,
        subscription_id: str,
        filter: dict | None | object = UNSET,
        max_delivery_attempts: int | None | object = UNSET,
        backoff_min_seconds: int | None | object = UNSET,
        backoff_max_seconds: int | None | object = UNSET,
        ack_deadline_seconds: int | None | object = UNSET,
    ) -> dict:
        """Change only the fields given (None: no filter, or the server's default); the
        subscription as it is now. A new filter applies to messages published afterwards."""
        body = {
            name: value
            for name, value in (
                ("filter", filter),
                ("max_delivery_attempts", max_delivery_attempts),
                ("backoff_min_seconds", backoff_min_seconds),
                ("backoff_max_seconds", backoff_max_seconds),
                ("ack_deadline_seconds", ack_deadline_seconds),
            )
            if value is not UNSET
        }
        return self._call("PATCH", self._sub(subscription_id), body)

    def redrive_dlq(self, subscription_id: str, limit: int | None = None) -> int:
        """Move dead letters back to the queue, attempts reset: all, or the `limit` that died
        first. How many were moved."""
        query = f"?{urlencode({'limit': limit})}" if limit is not None else ""
        path = f"{self._sub(subscription_id)}/dlq/redrive{query}"
        return self._call("POST", path, idempotent=False)["count"]

    def purge_dlq(self, subscription_id: str, ids: Iterable[str] | None = None) -> int:
        """Delete dead letters: all of them, or those named. How many were deleted."""
        path = f"{self._sub(subscription_id)}/dlq"
        if ids is None:
            return self._call("DELETE", path, idempotent=False)["count"]
        ids = list(ids)
        return sum(
            self._call("DELETE", path, DUMPS(ids[start : start + MAX_IDS]).encode())["count"]
            for start in range(0, len(ids), MAX_IDS)
        )

    def purge(self, subscription_id: str, before: datetime | None = None) -> int:
        """Delete the subscription's backlog (available and delivered messages, not the DLQ), or
        only what was published before `before` (a datetime with its timezone). How many."""
        if before is None:
            return self._call("POST", f"{self._sub(subscription_id)}/purge", idempotent=False)["count"]
        if before.tzinfo is None:
            raise ValueError("before needs a timezone (e.g. datetime.now(timezone.utc))")
        query = urlencode({"before": before.isoformat()})
        return self._call("POST", f"{self._sub(subscription_id)}/purge?{query}")["count"]

    def subscribe(self, subscription_id: str, handler, **kwargs):
        """A started Subscriber (see pubsub_client.Subscriber for the arguments)."""
        from pubsub_client.subscriber import Subscriber

        subscriber = Subscriber(self, subscription_id, handler, **kwargs)
        subscriber.start()
        return subscriber

    # --- Plumbing -------------------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _sub(self, subscription_id: str) -> str:
        return f"/subscriptions/{quote(subscription_id, safe='')}"

    def _list_all(self, path: str) -> list[dict]:
        items: list[dict] = []
        while True:
            page = self._call("GET", f"{path}?offset={len(items)}&limit={PAGE}")["data"]
            items.extend(page)
            if len(page) < PAGE:
                return items

    def _post_ids(self, subscription_id: str, action: str, ids: Iterable[str], **query) -> None:
        ids = list(ids)
        query = {name: value for name, value in query.items() if value is not None}
        path = f"{self._sub(subscription_id)}/{action}" + (f"?{urlencode(query)}" if query else "")
        for start in range(0, len(ids), MAX_IDS):
            self._call("POST", path, DUMPS(ids[start : start + MAX_IDS]).encode())

    def _call(
        self,
        method: str,
        path: str,
        body=None,
        idempotent: bool = True,
        headers: dict | None = None,
        timeout: float | None = None,
        in_flight: InFlight | None = None,
        authenticate: bool = True,
        retry_statuses: tuple[int, ...] = RETRY_STATUSES,
    ):
        """Send a request and decode its JSON answer (None for 204), retrying what is safe to retry:
        every failure of an idempotent call (connection errors and retry_statuses), and of the
        others only what surely never reached the server."""
        if body is not None and not isinstance(body, bytes):
            body = DUMPS(body).encode()
        all_headers = {"Host": self._host_header, "Accept": "application/json"}
        if body is not None:
            all_headers["Content-Type"] = "application/json"
        if headers:
            all_headers.update(headers)
        renewed = False
        attempt = 0
        while True:
            token = self._current_token() if authenticate and self._credentials else None
            if token is not None:
                all_headers["Authorization"] = f"Bearer {token}"
            retry_after = None
            try:
                status, reply_headers, data = self._send(
                    method, path, body, all_headers, timeout or self.timeout, idempotent, in_flight
                )
            except _NotSent as error:
                failure: PubSubError = ConnectionFailedError(f"cannot reach {self.url}: {error}")
            except _MaybeSent as error:
                if not idempotent:
                    raise ConnectionFailedError(
                        f"no answer from {self.url} ({error}): the request may have been acted on",
                        maybe_stored=True,
                    ) from None
                if error.reused and attempt == 0:
                    attempt += 1  # most likely a kept-alive connection the server had closed
                    continue
                failure = ConnectionFailedError(f"no answer from {self.url}: {error}")
            else:
                if status < 300:
                    return json.loads(data) if data else None
                failure = self._error(status, reply_headers, data)
                if status == 401 and token is not None and not renewed:
                    renewed = True
                    self._forget_token(token)
                    continue
                if status not in retry_statuses or not idempotent:
                    raise failure
                retry_after = parse_retry_after(reply_headers.get("retry-after"))
            if in_flight is not None and in_flight.aborted:
                raise Aborted()
            attempt += 1
            if attempt > self.max_retries or self._closed:
                raise failure
            delay = backoff_delay(attempt - 1, retry_after)
            log.info("%s %s failed (%s); retry %d in %.2fs", method, path, failure, attempt, delay)
            time.sleep(delay)

    @staticmethod
    def _error(status: int, headers: dict, data: bytes) -> PubSubError:
        detail, errors = http.client.responses.get(status, "error"), None
        try:
            answer = json.loads(data)
            if isinstance(answer, dict) and isinstance(answer.get("detail"), str):
                detail, errors = answer["detail"], answer.get("errors")
        except ValueError:
            if data:
                detail = data[:200].decode(errors="replace")
        return error_for(status, detail, errors, headers.get("x-request-id"))

    def _send(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict,
        timeout: float,
        idempotent: bool,
        in_flight: InFlight | None,
    ) -> tuple[int, dict, bytes]:
        """One request on a kept-alive connection: status, headers (lower-case names), body."""
        conn, reused = self._checkout(idempotent)
        if in_flight is not None:
            if in_flight.aborted:
                self._checkin(conn, False)
                raise Aborted()
            in_flight.conn, in_flight.started = conn, time.monotonic()
        try:
            try:
                if conn.sock is None:
                    conn.timeout = timeout
                    conn.connect()
                else:
                    conn.sock.settimeout(timeout)
            except OSError as error:
                conn.close()
                raise _NotSent(error) from None
            try:
                conn.putrequest(method, self._prefix + path, skip_host=True, skip_accept_encoding=True)
                for name, value in headers.items():
                    conn.putheader(name, value)
                if body is not None:
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
            except OSError as error:
                # Not all of it left: the server cannot act on a request it has not read whole.
                conn.close()
                if in_flight is not None and in_flight.aborted:
                    raise Aborted() from None
                raise _NotSent(error) from None
            try:
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as error:
                conn.close()
                if in_flight is not None and in_flight.aborted:
                    raise Aborted() from None
                raise _MaybeSent(error, reused) from None
        finally:
            if in_flight is not None:
                in_flight.conn = None
        reply_headers = {name.lower(): value for name, value in response.getheaders()}
        self._checkin(conn, not response.will_close)
        return response.status, reply_headers, data

    def _checkout(self, idempotent: bool) -> tuple[http.client.HTTPConnection, bool]:
        now = time.monotonic()
        stale = []
        conn = None
        with self._idle_lock:
            while self._idle:
                candidate, since = self._idle.pop()
                if (idempotent or now - since < SAFE_IDLE_SECONDS) and not dropped(candidate):
                    conn = candidate
                    break
                stale.append(candidate)
        for old in stale:
            old.close()
        if conn is not None:
            return conn, True
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return kind(self._host, self._port, timeout=self.timeout), False

    def _checkin(self, conn: http.client.HTTPConnection, keep: bool) -> None:
        if keep and not self._closed:
            with self._idle_lock:
                if len(self._idle) < MAX_IDLE_CONNECTIONS:
                    self._idle.append((conn, time.monotonic()))
                    return
        conn.close()

    # --- Tokens ---------------------------------------------------------------------------------

    def _current_token(self) -> str:
        token = self._token
        if token is not None and time.monotonic() < self._token_renew_at:
            return token
        with self._token_lock:
            if self._token is None or time.monotonic() >= self._token_renew_at:
                self._fetch_token()
            return self._token

    def _forget_token(self, token: str) -> None:
        """After a 401: renew the token, unless another thread already has."""
        with self._token_lock:
            if self._token == token:
                self._token = None

    def _fetch_token(self) -> None:
        client_id, secret = self._credentials
        try:
            answer = self._call(
                "POST",
                "/oauth/token",
                {"client_id": client_id, "client_secret": secret},
                authenticate=False,
            )
        except AuthError:
            log.error("the server refused the client credentials of %s", client_id)
            raise
        lifetime = float(answer.get("expires_in") or 60)
        self._token = answer["access_token"]
        self._token_renew_at = time.monotonic() + lifetime * TOKEN_RENEW_SHARE
