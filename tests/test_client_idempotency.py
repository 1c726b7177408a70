"""The Python client's idempotent publish: publish(..., idempotency_key=...) and the Publisher's
key per batch make a publish whose answer was lost safe to send again. Against the real server
(`flask pubsub serve`) and a scripted one that loses answers on demand (tests/test_client.py)."""

import threading
from collections.abc import Callable, Iterator

import pytest
from pubsub_client import Client, Publisher, ValidationError
from pubsub_client.errors import ConnectionFailedError

from tests.test_client import RECEIPT, UNAVAILABLE, WAIT, Script, drain, start_server
from tests.test_serve import wait_until_live

pytestmark = pytest.mark.slow

IN_PROGRESS = (409, {"Retry-After": "0"}, {"detail": "a publish with this Idempotency-Key is in progress"})


@pytest.fixture(scope="module")
def url(database_url, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port, context = start_server(database_url, log)
    with context as process:
        wait_until_live(process, port, log)
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def ps(url) -> Iterator[Client]:
    with Client(url) as client:
        client.create_topic("orders")
        client.create_subscription("sub", "orders")
        yield client


@pytest.fixture
def scripted() -> Iterator[Callable[..., Script]]:
    made = []

    def make(answers: list, **kwargs) -> Script:
        made.append(Script(answers, **kwargs))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_a_publish_repeated_with_its_key_returns_the_same_ids_and_stores_once(ps):
    ids = ps.publish("orders", [{"n": 1}, {"n": 2}], idempotency_key="batch-1")
    assert ps.publish("orders", [{"n": 1}, {"n": 2}], idempotency_key="batch-1") == ids
    assert [m.id for m in drain(ps, "sub")] == ids


def test_a_key_reused_with_another_body_raises_the_servers_422(ps):
    ps.publish("orders", [{"n": 1}], idempotency_key="batch-1")
    with pytest.raises(ValidationError) as caught:
        ps.publish("orders", [{"n": 2}], idempotency_key="batch-1")
    assert caught.value.status == 422 and "different body" in caught.value.detail


def test_a_key_names_one_request_so_over_1000_payloads_are_refused(ps):
    with pytest.raises(ValueError, match="one request"):
        ps.publish("orders", [{"n": n} for n in range(1001)], idempotency_key="batch-1")


def test_a_keyed_publish_whose_answer_is_lost_is_sent_again_with_the_same_key_and_body(scripted):
    server = scripted([None, UNAVAILABLE, IN_PROGRESS, RECEIPT])
    with Client(server.url) as client:
        assert client.publish("orders", [{"n": 1}], idempotency_key="batch-1") == ["m1"]
    assert len(server.requests) == 4
    assert {r[2]["Idempotency-Key"] for r in server.requests} == {'"batch-1"'}
    assert {r[3] for r in server.requests} == {b'[{"n":1}]'}


def test_a_keyed_publish_out_of_retries_says_it_may_be_stored(scripted):
    server = scripted([RECEIPT, None, None, None])
    with Client(server.url, max_retries=2) as client:
        client.publish("orders", [{"n": 0}])  # opens the connection that the next one reuses
        with pytest.raises(ConnectionFailedError) as caught:
            client.publish("orders", [{"n": 1}], idempotency_key="batch-1")
    assert caught.value.maybe_stored
    assert len(server.requests) == 4


def test_a_keyed_publish_refused_is_not_retried(scripted):
    server = scripted([(422, {}, {"detail": "Validation error"}), RECEIPT])
    with Client(server.url) as client, pytest.raises(ValidationError):
        client.publish("orders", [{"n": 1}], idempotency_key="bad key")
    assert len(server.requests) == 1


def test_the_publisher_sends_each_batch_with_a_key_of_its_own_and_resends_a_lost_one(scripted):
    receipts = (201, {}, {"data": [{"id": f"m{n}", "subscriptions": 1} for n in range(2)]})
    server = scripted([None, receipts, receipts])
    with Client(server.url) as client, Publisher(client, "orders", max_batch_messages=2) as publisher:
        futures = [publisher.publish({"n": n}) for n in range(4)]
        assert [f.result(WAIT) for f in futures] == ["m0", "m1", "m0", "m1"]
    keys = [r[2]["Idempotency-Key"] for r in server.requests]
    assert len(keys) == 3 and keys[0] == keys[1] != keys[2]


def test_a_publisher_without_keys_never_sends_a_batch_twice(scripted):
    server = scripted([None, RECEIPT])
    with Client(server.url) as client, Publisher(client, "orders", idempotency_keys=False) as publisher:
        future = publisher.publish({"n": 1})
        with pytest.raises(ConnectionFailedError) as caught:
            future.result(WAIT)
    assert caught.value.maybe_stored
    assert len(server.requests) == 1 and "Idempotency-Key" not in server.requests[0][2]


def test_the_publisher_stores_each_message_once_on_the_real_server(ps):
    with Publisher(ps, "orders", max_batch_messages=10) as publisher:
        futures = [publisher.publish({"n": n}) for n in range(50)]
    ids = [f.result(0) for f in futures]
    assert sorted(m.id for m in drain(ps, "sub")) == sorted(ids)


def test_concurrent_repeats_through_the_client_store_once(ps):
    results: list[list[str]] = []

    def publish() -> None:
        results.append(ps.publish("orders", [{"n": 1}], idempotency_key="batch-1"))

    threads = [threading.Thread(target=publish) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert len(results) == 8 and len({tuple(r) for r in results}) == 1
    assert [m.id for m in drain(ps, "sub")] == results[0]


def test_a_server_error_on_a_keyed_publish_is_retried(scripted):
    server = scripted([UNAVAILABLE, RECEIPT])
    with Client(server.url) as client:
        assert client.publish("orders", [{"n": 1}], idempotency_key="k") == ["m1"]
    assert len(server.requests) == 2
