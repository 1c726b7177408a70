"""Group commit (pubsub.grouping): concurrent publishes share a statement and its commit, and each
request still gets its own answer.

The group logic is tested with plain functions first, then through the API on PostgreSQL. To
make a group form on cue, a test holds the statement of the request that leads (a blocked
function, or a row lock its publish waits for) until the others have queued behind it.
"""

import threading
import time
import uuid
from collections.abc import Callable, Sequence

import psycopg
import pytest
from sqlalchemy.engine import make_url

from pubsub import clients, db, messages
from pubsub.grouping import GroupCommit
from tests.auth_support import bearer, new_client, token_request

WAIT = 10  # seconds: every wait below is bounded


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting after {WAIT}s: {what}")
        time.sleep(0.005)


def queued(group: GroupCommit) -> int:
    with group._lock:
        return len(group._queue)


class Runs:
    """Statements that record their items, answer item * 10, fail for items in `bad` (with
    `error`), and hold the first one until released."""

    def __init__(self, bad: Sequence[int] = (), error: type[Exception] = ValueError):
        self.statements: list[list[int]] = []
        self.alone: list[int] = []
        self.bad = set(bad)
        self.error = error
        self.release = threading.Event()
        self.first_running = threading.Event()

    def run_group(self, items: Sequence[int]) -> list[int]:
        self.statements.append(list(items))
        if len(self.statements) == 1:
            self.first_running.set()
            assert self.release.wait(WAIT)
        if self.bad.intersection(items):
            raise self.error(f"bad item in {list(items)}")
        return [item * 10 for item in items]

    def run_alone(self, item: int) -> int:
        self.alone.append(item)
        if item in self.bad:
            raise self.error(f"bad item {item}")
        return item * 10

    def group(self, max_items: int = 10, max_size: int = 100) -> GroupCommit:
        return GroupCommit(
            self.run_group, self.run_alone, lambda error: isinstance(error, ValueError), max_items, max_size
        )


def run_in_threads(group: GroupCommit, runs: Runs, first: int, others: list[int], size: int = 1) -> dict:
    """Run `first` (which leads and is held), queue `others` behind it, release: each item's
    result or exception."""
    answers: dict[int, object] = {}

    def run(item: int) -> None:
        try:
            answers[item] = group.run(item, size)
        except Exception as error:
            answers[item] = error

    threads = [threading.Thread(target=run, args=(first,), daemon=True)]
    threads[0].start()
    assert runs.first_running.wait(WAIT)
    for item in others:
        threads.append(threading.Thread(target=run, args=(item,), daemon=True))
        threads[-1].start()
    wait_until(lambda: queued(group) == len(others), "the other items to queue")
    runs.release.set()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()
    return answers


def test_a_lone_item_runs_at_once_in_a_statement_of_its_own():
    runs = Runs()
    runs.release.set()
    group = runs.group()
    assert group.run(4) == 40
    assert group.run(5) == 50
    assert runs.statements == [[4], [5]]


def test_items_that_arrive_during_a_statement_share_the_next_one_and_each_gets_its_result():
    runs = Runs()
    group = runs.group()
    answers = run_in_threads(group, runs, 1, [2, 3, 4, 5])
    assert answers == {1: 10, 2: 20, 3: 30, 4: 40, 5: 50}
    assert runs.statements[0] == [1]
    assert sorted(runs.statements[1]) == [2, 3, 4, 5]
    assert len(runs.statements) == 2


@pytest.mark.parametrize(
    ("max_items", "max_size", "size", "statements"),
    [
        (3, 100, 1, [1, 3, 3, 1]),  # seven queued items: groups of at most three
        (10, 5, 2, [1, 2, 2, 2, 1]),  # at most 5 in size: two items of 2 each
        (10, 100, 1, [1, 7]),
    ],
)
def test_a_group_stops_at_its_item_and_size_limits(max_items, max_size, size, statements):
    runs = Runs()
    group = runs.group(max_items, max_size)
    answers = run_in_threads(group, runs, 0, list(range(1, 8)), size=size)
    assert answers == {item: item * 10 for item in range(8)}
    assert [len(items) for items in runs.statements] == statements
    assert sorted(item for items in runs.statements for item in items) == list(range(8))


def test_an_item_larger_than_a_group_runs_alone_without_waiting_for_the_group():
    runs = Runs()
    group = runs.group()
    leader = threading.Thread(target=group.run, args=(1,), daemon=True)
    leader.start()
    assert runs.first_running.wait(WAIT)
    assert group.run(7, size=101) == 70  # while the first statement is still held
    runs.release.set()
    leader.join(WAIT)
    assert (runs.statements, runs.alone) == ([[1]], [7])


def test_when_a_shared_statement_fails_each_item_runs_alone_and_only_the_bad_one_fails():
    runs = Runs(bad=[3])
    group = runs.group()
    answers = run_in_threads(group, runs, 1, [2, 3, 4])
    assert isinstance(answers.pop(3), ValueError)
    assert answers == {1: 10, 2: 20, 4: 40}
    assert sorted(runs.statements[1]) == [2, 3, 4]  # the shared statement that failed
    assert len(runs.statements) == 2
    assert sorted(runs.alone) == [2, 3, 4]


def test_when_the_outcome_of_a_shared_statement_is_unknown_every_item_fails_with_it():
    runs = Runs(bad=[3], error=ConnectionError)  # retry_alone is false for it
    group = runs.group()
    answers = run_in_threads(group, runs, 1, [2, 3, 4])
    assert answers.pop(1) == 10
    assert all(isinstance(error, ConnectionError) for error in answers.values()), answers
    assert (len(runs.statements), runs.alone) == (2, [])


def test_items_queued_behind_a_statement_that_took_too_long_fail_at_once_without_running():
    class TookTooLong(Exception):
        pass

    runs = Runs(bad=[1], error=TookTooLong)
    gave_up = ValueError("nothing was done")
    group = GroupCommit(
        runs.run_group,
        runs.run_alone,
        lambda error: False,
        10,
        100,
        lambda error: gave_up if isinstance(error, TookTooLong) else None,
    )
    answers = run_in_threads(group, runs, 1, [2, 3, 4])
    assert isinstance(answers.pop(1), TookTooLong)
    assert answers == {2: gave_up, 3: gave_up, 4: gave_up}
    assert (runs.statements, runs.alone) == ([[1]], [])
    assert group.run(5) == 50  # and the group goes on


def test_a_lone_item_whose_statement_failed_runs_alone_once_more_and_the_group_goes_on():
    runs = Runs(bad=[3])
    runs.release.set()
    group = runs.group()
    with pytest.raises(ValueError):
        group.run(3)
    assert group.run(4) == 40
    assert (runs.statements, runs.alone) == ([[3], [4]], [3])


def test_a_leader_interrupted_by_a_base_exception_hands_over_to_the_next_group():
    class Stop(BaseException):
        pass

    statements = []
    release, running = threading.Event(), threading.Event()

    def run_group(items):
        statements.append(sorted(items))
        if len(statements) == 1:
            running.set()
            assert release.wait(WAIT)
            raise Stop()
        return [item * 10 for item in items]

    group = GroupCommit(run_group, lambda item: -item, lambda error: True, 10, 100)
    answers = {}

    def lead():
        with pytest.raises(Stop):
            group.run(1)

    leader = threading.Thread(target=lead, daemon=True)
    leader.start()
    assert running.wait(WAIT)
    followers = [
        threading.Thread(target=lambda i=i: answers.__setitem__(i, group.run(i)), daemon=True) for i in (2, 3)
    ]
    for follower in followers:
        follower.start()
    wait_until(lambda: queued(group) == 2, "the followers to queue")
    release.set()
    for thread in (leader, *followers):
        thread.join(WAIT)
        assert not thread.is_alive()
    assert answers == {2: 20, 3: 30}
    assert statements == [[1], [2, 3]]


# Through the API, on PostgreSQL.


def libpq(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(False)


class Locks:
    """Locks taken from a connection of the test's own, held until release()."""

    def __init__(self, database_url: str):
        self.url = libpq(database_url)
        self.conn = psycopg.connect(self.url)

    def hold_message_table(self) -> None:
        """Publishes wait for this (the INSERT's table lock) whatever the statement, NOWAIT too."""
        self.conn.execute("LOCK TABLE subscription_messages IN SHARE MODE")

    def hold_subscription(self, subscription_id: str) -> None:
        """Conflicts with the FOR KEY SHARE of publishes to its topic, as a delete does."""
        self.conn.execute("SELECT 1 FROM subscriptions WHERE id = %s FOR UPDATE", (subscription_id,))

    def release(self) -> None:
        self.conn.commit()

    def publishes_waiting(self) -> int:
        with psycopg.connect(self.url, autocommit=True) as other:
            # pg_stat_activity keeps a query's first 1024 bytes: the publish statement is
            # known by its start, where it reads its parameters.
            return other.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%jsonb_array_elements%'"
            ).fetchone()[0]


@pytest.fixture
def locks(database_url):
    locks = Locks(database_url)
    yield locks
    locks.conn.close()


def publish_in_thread(
    app, statuses: dict, index: int, topic: str, payloads: list, headers: dict | None = None
) -> threading.Thread:
    def publish() -> None:
        response = app.test_client().post(f"/topics/{topic}/messages", json=payloads, headers=headers)
        statuses[index] = response.status_code

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    return thread


def join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()


def publish_group_of(app, locks: Locks, first: tuple, others: list[tuple]) -> dict:
    """Publish `first`, held by a table lock until the others have queued behind it, then the
    others, each from a thread of its own: each request's status. A publish is (topic, payloads)
    or (topic, payloads, headers)."""
    statuses: dict[int, int] = {}
    locks.hold_message_table()
    threads = [publish_in_thread(app, statuses, 0, *first)]
    wait_until(lambda: locks.publishes_waiting() == 1, "the first publish to wait for the lock")
    group = app.extensions["pubsub_publish_group"]
    for index, publish in enumerate(others, 1):
        threads.append(publish_in_thread(app, statuses, index, *publish))
    wait_until(lambda: queued(group) == len(others), "the other publishes to queue")
    locks.release()
    join(threads)
    return statuses


def stored(database_url: str) -> list[tuple]:
    """(subscription, payload n, transaction) of every message, in seq order."""
    with psycopg.connect(libpq(database_url)) as conn:
        return conn.execute(
            "SELECT subscription_id, (payload->>'n')::int, xmin::text FROM subscription_messages ORDER BY seq"
        ).fetchall()


def test_publishes_queued_behind_a_statement_share_the_next_one_and_all_are_stored(
    app, api, database_url, locks
):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    api.create_topic("invoices")
    api.create_subscription("billing", "invoices")
    api.create_subscription("audit", "invoices")
    statuses = publish_group_of(
        app,
        locks,
        ("orders", [{"n": 0}]),
        [("orders", [{"n": 1}, {"n": 2}]), ("invoices", [{"n": 3}]), ("orders", [{"n": 4}])],
    )
    assert statuses == {0: 204, 1: 204, 2: 204, 3: 204}
    rows = stored(database_url)
    assert sorted((sub, n) for sub, n, _ in rows) == [
        ("audit", 3),
        ("billing", 3),
        ("sub", 0),
        ("sub", 1),
        ("sub", 2),
        ("sub", 4),
    ]
    # Two commits: the first publish's, and the one the other three shared.
    transactions = {n: xmin for _, n, xmin in rows}
    assert len(set(transactions.values())) == 2
    assert transactions[1] == transactions[2] == transactions[3] == transactions[4] != transactions[0]
    # A request's messages keep their order.
    assert [n for sub, n, _ in rows if sub == "sub" and n in (1, 2)] == [1, 2]
    assert api.consume("audit")[0]["id"] == api.consume("billing")[0]["id"]  # one id per message


@pytest.mark.parametrize(
    ("failing", "status"),
    [
        (("nowhere", [{"n": 2}]), 404),
        # jsonb cannot store \u0000: PostgreSQL refuses the whole statement it is in.
        (("orders", [{"n": 2, "text": "nul \u0000 here"}]), 422),
    ],
    ids=["missing topic", "data PostgreSQL refuses"],
)
def test_a_publish_that_fails_fails_alone_in_its_group(app, api, database_url, locks, failing, status):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    others = [("orders", [{"n": 1}]), failing, ("orders", [{"n": 3}])]
    statuses = publish_group_of(app, locks, ("orders", [{"n": 0}]), others)
    assert statuses == {0: 204, 1: 204, 2: status, 3: 204}
    assert sorted(n for _, n, _ in stored(database_url)) == [0, 1, 3]


def test_a_publish_waiting_for_a_locked_subscription_holds_up_no_other_topic(app, api, database_url, locks):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    api.create_topic("invoices")
    api.create_subscription("billing", "invoices")
    statuses: dict[int, int] = {}
    # As while the subscription is being deleted: its topic's publishes wait for the lock.
    locks.hold_subscription("sub")
    waiting = publish_in_thread(app, statuses, 0, "orders", [{"n": 0}])
    wait_until(lambda: locks.publishes_waiting() == 1, "the publish to orders to wait for the lock")
    started = time.monotonic()
    others = [publish_in_thread(app, statuses, n, "invoices", [{"n": n}]) for n in range(1, 6)]
    join(others)
    assert time.monotonic() - started < WAIT / 2
    assert statuses == {1: 204, 2: 204, 3: 204, 4: 204, 5: 204}
    locks.release()
    join([waiting])
    assert statuses[0] == 204
    assert sorted((sub, n) for sub, n, _ in stored(database_url)) == [("billing", n) for n in range(1, 6)] + [
        ("sub", 0)
    ]


# Each revokes a client's tokens (SPEC §4), by the domain function the API calls.
REVOCATIONS = {
    "deleted": clients.delete_client,
    "deactivated": lambda conn, client_id: clients.update_client(
        conn, client_id, "t", "topics:publish", False
    ),
    "updated": lambda conn, client_id: clients.update_client(conn, client_id, "t", "topics:publish", True),
}


def issued(app, scopes: str) -> tuple[uuid.UUID, dict]:
    """A new client's id, and the Authorization header of a token issued to it."""
    client_id, secret = new_client(app, scopes)
    return uuid.UUID(client_id), bearer(
        token_request(app.test_client(), client_id, secret).json["access_token"]
    )


def test_in_a_group_only_publishes_with_revoked_tokens_fail_and_nothing_of_theirs_is_stored(
    auth_app, api, database_url, locks
):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    _, current = issued(auth_app, "topics:publish")
    revoked = {}
    for how, revoke in REVOCATIONS.items():
        client_id, revoked[how] = issued(auth_app, "topics:publish")
        with auth_app.app_context(), db.begin() as conn:
            revoke(conn, client_id)
    others = [
        ("orders", [{"n": 1}], current),
        ("orders", [{"n": 2}], revoked["deleted"]),
        ("orders", [{"n": 3}], current),
        ("orders", [{"n": 4}], revoked["deactivated"]),
        ("orders", [{"n": 5}], revoked["updated"]),
        ("nowhere", [{"n": 6}], revoked["updated"]),  # revoked comes first, as before any statement
        ("nowhere", [{"n": 7}], current),
    ]
    statuses = publish_group_of(auth_app, locks, ("orders", [{"n": 0}], current), others)
    assert statuses == {0: 204, 1: 204, 2: 401, 3: 204, 4: 401, 5: 401, 6: 401, 7: 404}
    rows = stored(database_url)
    assert sorted(n for _, n, _ in rows) == [0, 1, 3]
    transactions = {n: xmin for _, n, xmin in rows}
    assert transactions[1] == transactions[3] != transactions[0]  # in the group's one statement


def test_publish_many_answers_each_batch_published_missing_or_revoked(app, api, database_url):
    api.create_topic("orders")
    api.create_subscription("sub", "orders")
    with app.app_context(), db.begin() as conn:
        kept, _ = clients.create_client(conn, "kept", "*")
        gone, _ = clients.create_client(conn, "gone", "*")
        clients.delete_client(conn, gone)
    kept_token, gone_token = (str(kept), 1), (str(gone), 1)
    batches = [
        ("orders", '[{"n": 1}]', None, None),
        ("orders", '[{"n": 2}]', kept_token, None),
        ("orders", '[{"n": 3}]', gone_token, None),
        ("orders", '[{"n": 4}]', (str(kept), 2), None),  # an older token_version than the client's
        ("nowhere", '[{"n": 5}]', kept_token, None),
        ("nowhere", '[{"n": 6}]', gone_token, None),
    ]
    with app.app_context(), db.connect() as conn:
        outcomes, copies = messages.publish_many(conn, batches)
    P, N, R = messages.PUBLISHED, messages.NO_TOPIC, messages.REVOKED
    assert (outcomes, copies) == ([P, P, R, R, N, R], 2)
    assert sorted(n for _, n, _ in stored(database_url)) == [1, 2]


@pytest.mark.parametrize(
    ("error", "known"),
    [
        (psycopg.errors.LockNotAvailable("NOWAIT"), True),
        (psycopg.errors.UntranslatableCharacter("\\u0000 in jsonb"), True),
        (psycopg.errors.QueryCanceled("statement timeout"), True),
        (KeyError("a bug before the statement ran"), True),
        (psycopg.OperationalError("server closed the connection unexpectedly"), False),
        (psycopg.InterfaceError("the connection is lost"), False),
        (psycopg.errors.AdminShutdown("terminating connection due to administrator command"), False),
        (psycopg.errors.ConnectionFailure("connection failure"), False),
    ],
)
def test_only_a_lost_connection_leaves_a_failed_statements_outcome_unknown(error, known):
    assert messages.outcome_known(error) is known
