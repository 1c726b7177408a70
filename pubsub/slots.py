"""Work slots: how many requests of a gunicorn worker run at once, long-poll consumers apart.

A worker's thread pool has API_NUM_THREADS threads for requests plus LONG_POLL_MAX_WAITERS for
long-poll consumers (pubsub.worker). Every request takes one of API_NUM_THREADS slots while it
runs; a long-poll consumer gives its slot back while it waits and takes one again when it wakes.
So a thousand waiting consumers cost a thousand idle threads, and the work in flight (CPU, the
GIL, database connections) stays what API_NUM_THREADS allows, as with plain gthread.

Outside the pubsub worker (tests, `flask run`) nothing is configured and the slots are free.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_slots: threading.Semaphore | None = None
_held = threading.local()


def configure_slots(count: int) -> None:
    """Called once per worker process, before it serves anything."""
    global _slots
    _slots = threading.Semaphore(count)


@contextmanager
def slot_held() -> Iterator[None]:
    """Hold a work slot for the block: a request being served."""
    slots = _slots
    if slots is None:
        yield
        return
    slots.acquire()
    _held.value = True
    try:
        yield
    finally:
        _held.value = False
        slots.release()


@contextmanager
def slot_released() -> Iterator[None]:
    """Give this thread's slot back for the block (a long-poll wait), and take one again after."""
    slots = _slots
    if slots is None or not getattr(_held, "value", False):
        yield
        return
    _held.value = False
    slots.release()
    try:
        yield
    finally:
        slots.acquire()
        _held.value = True
