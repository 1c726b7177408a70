"""gunicorn's gthread worker, serving a kept-alive connection's next request in the same thread.

gthread hands every kept-alive connection back to its main thread after each response: the
main thread registers the socket with its poller, waits for the next request, unregisters it
and submits it to the thread pool again. With one message per request, that round trip through
the main thread cost about a quarter of the worker's CPU (bench/README.md, "Where the time
goes"). This worker lets the thread that answered wait a little for the connection's next
request and serve it itself, but only while this worker has no more connections than pool
threads: then every connection can have a thread of its own, and a waiting thread keeps no other
connection waiting. Otherwise (more connections than threads, a stopping worker, a connection
quiet for LINGER_SECONDS) the thread hands the connection back to the main thread, as gthread
does. A long-poll consumer asks again as soon as it has its answer, so its connection stays with
one thread from poll to poll.

Its thread pool holds API_NUM_THREADS (gunicorn's --threads) threads for requests plus
LONG_POLL_MAX_WAITERS for long-poll consumers, and every request takes a work slot while the app
serves it (pubsub.slots): a long-poll consumer gives its slot back while it waits, so waiting
consumers never keep requests waiting, and the requests served at once stay API_NUM_THREADS.

It also answers the requests that gunicorn refuses before the app sees them (a malformed request
line, a line or headers over gunicorn's limits, an invalid header) as the app answers everything,
with {"detail": ...} JSON, where gunicorn writes an HTML page.
"""

import os
import select
import ssl
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

import orjson
from gunicorn import util
from gunicorn.http import errors
from gunicorn.workers import gthread

from pubsub import config, slots

# How long a thread waits for a kept-alive connection's next request, in slices after each of
# which it checks whether the pool needs it.
LINGER_SECONDS = 1.0
LINGER_SLICE_MS = 100
# The health probes take no work slot: /liveness must answer at once, and /readiness within its
# own bound, even while every slot waits on a database that stopped answering.
PROBE_PATHS = ("/liveness", "/readiness")


# The status that gunicorn's own handle_error (gunicorn/workers/base.py) gives each error, first
# match first. Any other request gunicorn cannot parse is the client's fault, a 400 (where
# gunicorn forgets a few, e.g. a bad PROXY header, with a 500); anything else is a 500.
ERROR_STATUS = (
    ((errors.InvalidResponseHeader, errors.InvalidResponseHeaderName, errors.ConfigurationProblem), 500),
    (errors.LimitRequestLine, 414),
    (errors.LimitRequestHeaders, 431),
    (errors.UnsupportedTransferCoding, 501),
    (errors.ExpectationFailed, 417),
    ((errors.ForbiddenProxyRequest, ssl.SSLError), 403),
    (errors.ParseException, 400),
)


def error_response(status: int, detail: str, request_id: str) -> bytes:
    """A complete HTTP response, {"detail": ...}, after which the connection closes."""
    body = orjson.dumps({"detail": detail})
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Request-ID: {request_id}\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + body


def long_poll_max_waiters() -> int:
    """LONG_POLL_MAX_WAITERS, which `flask pubsub serve` passes on in the environment."""
    return int(os.environ.get("PUBSUB_LONG_POLL_MAX_WAITERS", config.LONG_POLL_MAX_WAITERS))


class ThreadWorker(gthread.ThreadWorker):
    def get_thread_pool(self):
        slots.configure_slots(self.cfg.threads)
        self.pool_size = self.cfg.threads + long_poll_max_waiters()
        # Threads are started as requests need them: an idle worker holds no more than gthread's.
        return ThreadPoolExecutor(max_workers=self.pool_size)

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        # Waiting consumers would keep a stopping worker up to 20 s: they answer now instead.
        # Deferred to the main loop, which runs it outside the signal handler.
        self.method_queue.defer(self.release_waiters)

    def release_waiters(self):
        waits = getattr(self.wsgi, "extensions", {}).get("pubsub_listener")
        if waits is not None:
            waits.release_waiters()

    def handle_request(self, req, conn):
        if req.path in PROBE_PATHS:  # no work slot: they answer even while every slot waits
            return super().handle_request(req, conn)
        with slots.slot_held():
            return super().handle_request(req, conn)

    def handle_error(self, req, client, addr, exc):
        """gunicorn's answer to a request it could not parse, or that failed before the app
        responded: the status gunicorn gives it, as JSON. Called in handle()'s except block."""
        status = next((code for kinds, code in ERROR_STATUS if isinstance(exc, kinds)), 500)
        # No request id came through: the request never reached the app, or not in one piece.
        request_id = os.urandom(16).hex()
        if status == 500:
            self.log.exception(
                "error handling request %s (X-Request-ID %s)", getattr(req, "uri", ""), request_id
            )
            detail = "internal server error"  # as errors.handle_unexpected says it
        else:
            ip = addr[0] if addr else ""
            self.log.warning("invalid request from ip=%s (X-Request-ID %s): %s", ip, request_id, exc)
            detail = str(exc)
        try:
            util.write_nonblock(client, error_response(status, detail, request_id))
        except Exception:
            self.log.debug("Failed to send error message.")

    def handle(self, conn):
        keepalive = super().handle(conn)
        while keepalive is True and self.next_request_arrives(conn):
            keepalive = super().handle(conn)
        return keepalive

    def may_linger(self) -> bool:
        # With no more connections than threads, a connection queued for the pool always finds
        # a thread that is not waiting on another one.
        return self.alive and self.nr_conns <= self.pool_size

    def next_request_arrives(self, conn) -> bool:
        """Whether the connection's next request is here, within LINGER_SECONDS, while this
        thread may wait for it."""
        if conn.parser.unreader.buf.getvalue():
            return True  # already read: serve it now, as gthread does
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        for _ in range(int(min(LINGER_SECONDS, self.cfg.keepalive) * 1000 / LINGER_SLICE_MS)):
            if not self.may_linger():
                return False
            if poller.poll(LINGER_SLICE_MS):
                return True
        return False
