"""gunicorn's gthread worker, serving a kept-alive connection's next request in the same thread.

gthread hands every kept-alive connection back to its main thread after each response: the
main thread registers the socket with its poller, waits for the next request, unregisters it
and submits it to the thread pool again. With one message per request, that round trip through
the main thread cost about a quarter of the worker's CPU (bench/README.md, "Where the time
goes"). This worker lets the thread that answered wait a little for the connection's next
request and serve it itself, but only while this worker has no more connections than threads:
then every connection can have a thread of its own, and a waiting thread keeps no other
connection waiting. Otherwise (more connections than threads, a stopping worker, a connection
quiet for LINGER_SECONDS) the thread hands the connection back to the main thread, as gthread
does.
"""

import select

from gunicorn.workers import gthread

# How long a thread waits for a kept-alive connection's next request, in slices after each of
# which it checks whether the pool needs it.
LINGER_SECONDS = 1.0
LINGER_SLICE_MS = 20


class ThreadWorker(gthread.ThreadWorker):
    def handle(self, conn):
        keepalive = super().handle(conn)
        while keepalive is True and self.next_request_arrives(conn):
            keepalive = super().handle(conn)
        return keepalive

    def may_linger(self) -> bool:
        # With no more connections than threads, a connection queued for the pool always finds
        # a thread that is not waiting on another one.
        return self.alive and self.nr_conns <= self.cfg.threads

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
