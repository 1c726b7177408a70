"""Group commit: the statements of concurrent requests, run as one statement with one commit.

A request hands its item to the group and waits. If no statement of the group is running, the
request runs one itself (it leads), for its own item and the items queued behind it; items that
arrive meanwhile queue up, and when the statement ends, the first of them leads the next. So a
lone request runs its statement at once, with no delay, and under load each commit serves as
many requests as arrived during the previous one.

Every request gets its own answer. When a group's statement fails in a way that committed
nothing (retry_alone(error) says so), each of its requests runs its item again in a statement
of its own, outside the group: one request's bad data fails that request only, and a request
that has to wait (for a lock, say) waits without holding up the group. Any other failure (the
connection lost, with the commit's outcome unknown) reaches every request of the group.

When a group's statement failed for taking too long (queue_error(error) gives the error to
answer with), the requests queued behind it get that error at once instead of running their own
statement: a database that did not answer one statement within its bound would have each of them
wait as long again, one group after the other, while new requests keep queueing.
"""

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Waiter(Generic[Item, Result]):
    __slots__ = ("item", "size", "woken", "lead", "alone", "result", "error")

    def __init__(self, item: Item, size: int) -> None:
        self.item = item
        self.size = size
        # Held until the waiter is woken: a bare lock costs a fraction of a threading.Event.
        self.woken = threading.Lock()
        self.woken.acquire()
        self.lead = False  # woken to lead the next statement
        self.alone = False  # woken to run its item alone
        self.result: Result | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[Item, Result]):
    """run(item) answers with run_group(items)'s result for it (one result per item, in order),
    for groups of at most max_items items and max_size in total size; an item larger than
    max_size goes to run_alone(item) at once, as does each item of a group whose statement failed
    with an error for which retry_alone(error) is true. If queue_error(error) is an error, every
    item queued behind the failed statement fails with it."""

    def __init__(
        self,
        run_group: Callable[[Sequence[Item]], Sequence[Result]],
        run_alone: Callable[[Item], Result],
        retry_alone: Callable[[Exception], bool],
        max_items: int,
        max_size: int,
        queue_error: Callable[[Exception], Exception | None] = lambda error: None,
    ) -> None:
        self._run_group = run_group
        self._run_alone = run_alone
        self._retry_alone = retry_alone
        self._queue_error = queue_error
        self._max_items = max_items
        self._max_size = max_size
        self._lock = threading.Lock()
        self._queue: list[_Waiter[Item, Result]] = []
        self._running = False

    def run(self, item: Item, size: int = 0) -> Result:
        """The result of item, once the statement that carried it has committed."""
        if size > self._max_size:
            return self._run_alone(item)
        waiter: _Waiter[Item, Result] = _Waiter(item, size)
        with self._lock:
            self._queue.append(waiter)
            lead = not self._running
            self._running = True
        if not lead:
            waiter.woken.acquire()
            if waiter.error is not None:
                raise waiter.error
            if waiter.alone:
                return self._run_alone(item)
            if not waiter.lead:
                return waiter.result  # type: ignore[return-value]
        group = self._take_group()
        try:
            results = self._run_group([w.item for w in group])
        except BaseException as error:
            queue_error = self._queue_error(error) if isinstance(error, Exception) else None
            if queue_error is None:
                self._hand_over()
            else:
                self._fail_queue(queue_error)
            alone = isinstance(error, Exception) and self._retry_alone(error)
            for other in group[1:]:
                if alone:
                    other.alone = True
                else:
                    other.error = error
                other.woken.release()
            if not alone:
                raise
            return self._run_alone(item)
        self._hand_over()
        for other, result in zip(group[1:], results[1:], strict=True):
            other.result = result
            other.woken.release()
        return results[0]

    def _take_group(self) -> list[_Waiter[Item, Result]]:
        """The leader's own item, first in the queue, then as many queued ones as fit."""
        with self._lock:
            size = self._queue[0].size
            end = 1
            while end < len(self._queue) and end < self._max_items:
                size += self._queue[end].size
                if size > self._max_size:
                    break
                end += 1
            group, self._queue = self._queue[:end], self._queue[end:]
        return group

    def _fail_queue(self, error: Exception) -> None:
        """Answer every queued request with error, and let the group go idle."""
        with self._lock:
            queue, self._queue = self._queue, []
            self._running = False
        for waiter in queue:
            waiter.error = error
            waiter.woken.release()

    def _hand_over(self) -> None:
        """Wake the first queued request to lead the next statement, or let the group go idle."""
        with self._lock:
            if not self._queue:
                self._running = False
                return
            following = self._queue[0]
        following.lead = True
        following.woken.release()
