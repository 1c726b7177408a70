"""blueprints.subscriptions.DirectConsume: a consume whose query string its view has loaded
before, answered without Flask's request machinery, and every other request left to the view,
with the same answers either way, auth off and on.

As in tests/test_direct_publish.py, each request goes to two apps on the same database: the app
as built, and one whose direct paths are taken out. The two consume from two subscriptions of
one topic, which hold copies of the same messages under the same ids, so their answers must be
the same but for the subscription's id: status, headers (but the request id) and body. The
cache of query strings is the process's, shared by both apps, so each test uses consumer ids of
its own and sends each query to the app as built first.
"""

import threading
import time
import uuid

import pytest

from tests.auth_support import bearer
from tests.conftest import ApiHelper
from tests.test_direct_publish import AUTH, REVOCATIONS, Routed, counting_anew, issue, routed_pair
from tests.test_observability import sample

ROUTE = "/subscriptions/{id}/messages"


@pytest.fixture(scope="module")
def apps(make_app) -> tuple[Routed, Routed]:
    return routed_pair(make_app)


@pytest.fixture
def direct(apps) -> Routed:
    return counting_anew(apps[0])


@pytest.fixture
def flask_only(apps) -> Routed:
    return counting_anew(apps[1])


@pytest.fixture
def orders(direct) -> ApiHelper:
    """Topic `orders` with subscriptions `a` (for the app as built) and `b` (for the other)."""
    api = ApiHelper(direct.client)
    api.create_topic("orders")
    api.create_subscription("a", "orders")
    api.create_subscription("b", "orders")
    direct.reached_flask = 0
    return api


def answer(routed: Routed, subscription_id: str, query: str, method: str = "GET", **request) -> tuple:
    """The answer to a consume, with the subscription's id in its body made neutral."""
    status, headers, body = routed.answer(
        f"/subscriptions/{subscription_id}/messages?{query}", method=method, **request
    )
    return status, headers, body.replace(f'"subscription_id":"{subscription_id}"'.encode(), b'"sub":"*"')


def both(direct: Routed, flask_only: Routed, query: str, times: int = 2, **request) -> list[tuple]:
    """Ask both apps `times` times, the app as built first each time; the answers must match."""
    answers = []
    for _ in range(times):
        expected = answer(direct, "a", query, **request)
        assert answer(flask_only, "b", query, **request) == expected
        answers.append(expected)
    return answers


def consumer() -> str:
    return f"c-{uuid.uuid4().hex[:12]}"


QUERIES = {
    "a batch": "consumer_id={}&batch_size=2",
    "the default batch": "consumer_id={}",
    "a long poll with messages there": "consumer_id={}&batch_size=2&wait_seconds=5",
    "parameters in another order": "batch_size=2&consumer_id={}",
    "an unknown parameter (ignored)": "consumer_id={}&colour=red",
}


@pytest.mark.parametrize("query", QUERIES.values(), ids=QUERIES)
def test_a_repeated_consume_skips_flask_and_gets_the_same_answer(orders, direct, flask_only, query):
    orders.publish("orders", [{"n": n} for n in range(30)])
    first, second = both(direct, flask_only, query.format(consumer()))
    assert first[0] == second[0] == "200 OK"
    assert first[2] != second[2]  # the next messages, the same on both sides
    assert first[1].keys() == second[1].keys() == {"Content-Type", "Content-Length"}
    assert first[1]["Content-Type"] == "application/json"
    assert (direct.reached_flask, flask_only.reached_flask) == (1, 2)


def test_direct_consumes_lease_each_message_once_in_order(orders, direct):
    orders.publish("orders", [{"n": n} for n in range(20)])
    query = {"consumer_id": consumer(), "batch_size": 3}
    seen = []
    while batch := direct.client.get("/subscriptions/a/messages", query_string=query).json["data"]:
        seen += [message["payload"]["n"] for message in batch]
    assert seen == list(range(20))
    assert direct.reached_flask == 1


def test_a_missing_subscription_gets_the_same_404_on_either_path(orders, direct, flask_only):
    query = f"consumer_id={consumer()}"
    both(direct, flask_only, query, times=1)  # loads the query string
    direct.reached_flask = 0
    expected = answer(flask_only, "missing", query)
    assert answer(direct, "missing", query) == expected
    assert expected[0] == "404 NOT FOUND" and b"Subscription not found" in expected[2]
    assert direct.reached_flask == 0


BAD_QUERIES = {
    "no consumer id": "batch_size=2",
    "a batch too large": "consumer_id={}&batch_size=101",
    "a wait too long": "consumer_id={}&wait_seconds=21",
    "a NUL character": "consumer_id=a%00{}",
}


@pytest.mark.parametrize("query", BAD_QUERIES.values(), ids=BAD_QUERIES)
def test_a_query_that_does_not_load_always_goes_to_flask(orders, direct, flask_only, query):
    first, second = both(direct, flask_only, query.format(consumer()))
    assert first == second and first[0].startswith("422"), first
    assert direct.reached_flask == 2


def test_other_requests_on_the_path_go_to_flask(orders, direct, flask_only):
    query = f"consumer_id={consumer()}"
    both(direct, flask_only, query, times=1)
    direct.reached_flask = 0
    for method in ("POST", "HEAD", "DELETE"):
        assert answer(direct, "a", query, method=method) == answer(flask_only, "b", query, method=method)
    answer(direct, "a/", query)  # Werkzeug redirects it
    assert direct.reached_flask == 4


def test_a_direct_long_poll_is_woken_by_a_publish(orders, direct):
    query = {"consumer_id": consumer(), "wait_seconds": 10}
    orders.publish("orders", [{"n": 0}])
    assert direct.client.get("/subscriptions/a/messages", query_string=query).json["data"]  # loads it
    direct.reached_flask = 0
    threading.Timer(0.5, orders.publish, ("orders", [{"n": 1}])).start()
    started = time.monotonic()
    response = direct.client.get("/subscriptions/a/messages", query_string=query)
    assert [m["payload"] for m in response.json["data"]] == [{"n": 1}]
    assert time.monotonic() - started < 5
    assert direct.reached_flask == 0


def test_a_declined_long_poll_says_so_on_either_path(make_app, orders):
    direct, flask_only = routed_pair(make_app, LONG_POLL_MAX_WAITERS=1)
    # One consumer waits in each app (each has its listener): the next long poll is declined.
    waiting = [
        threading.Thread(target=routed.client.get, args=(f"/subscriptions/{sub}/messages?{query}",))
        for routed, sub, query in (
            (direct, "a", "consumer_id=w&wait_seconds=3"),
            (flask_only, "b", "consumer_id=w&wait_seconds=3"),
        )
    ]
    for thread in waiting:
        thread.start()
    time.sleep(0.5)
    direct.reached_flask = flask_only.reached_flask = 0
    first, second = both(direct, flask_only, f"consumer_id={consumer()}&wait_seconds=5")
    for thread in waiting:
        thread.join()
    assert first == second
    assert first[1]["Pubsub-Long-Poll"] == "declined" and first[2] == b'{"data":[]}'
    assert (direct.reached_flask, flask_only.reached_flask) == (1, 2)


def test_direct_consumes_get_a_request_id_and_are_counted_under_their_route(orders, direct):
    query = f"consumer_id={consumer()}"
    direct.client.get(f"/subscriptions/a/messages?{query}")
    before = direct.client.get("/metrics").get_data(as_text=True)
    response = direct.client.get(f"/subscriptions/a/messages?{query}", headers={"X-Request-ID": "trace-7"})
    assert (response.status_code, response.headers["X-Request-ID"]) == (200, "trace-7")
    assert direct.client.get(f"/subscriptions/missing/messages?{query}").status_code == 404
    after = direct.client.get("/metrics").get_data(as_text=True)

    def delta(status: str) -> float:
        labels = {"method": "GET", "path": ROUTE, "status": status}
        return sample(after, "http_requests_total", **labels) - sample(
            before, "http_requests_total", **labels
        )

    assert (delta("200"), delta("404")) == (1, 1)
    assert direct.reached_flask == 3  # the first consume and the two scrapes


# --- auth on ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_apps(make_app) -> tuple[Routed, Routed]:
    return routed_pair(make_app, **AUTH)


@pytest.fixture
def auth_direct(auth_apps, orders) -> Routed:
    return counting_anew(auth_apps[0])


@pytest.fixture
def auth_flask_only(auth_apps) -> Routed:
    return counting_anew(auth_apps[1])


# (what, scopes of the token or None for none, whether DirectConsume answers it, the status)
AUTH_CASES = [
    ("consume scope", "subscriptions:consume", True, "200 OK"),
    ("admin scope", "*", True, "200 OK"),
    ("both subscriptions' own scopes", "subscriptions:consume:a subscriptions:consume:b", True, "200 OK"),
    ("no token", None, False, "401 UNAUTHORIZED"),
    ("another subscription's scope", "subscriptions:consume:other", False, "403 FORBIDDEN"),
    ("read scope only", "subscriptions:read", False, "403 FORBIDDEN"),
]


@pytest.mark.parametrize(
    ("scopes", "answered_directly", "status"), [c[1:] for c in AUTH_CASES], ids=[c[0] for c in AUTH_CASES]
)
def test_with_auth_on_a_consume_gets_the_same_answer_on_either_path(
    orders, auth_direct, auth_flask_only, scopes, answered_directly, status
):
    orders.publish("orders", [{"n": n} for n in range(10)])
    app = auth_direct.client.application
    headers = bearer(issue(app, scopes)[1]) if scopes else {}
    query = f"consumer_id={consumer()}&batch_size=2"
    # The query string loads only behind the scope check: another client's consume loads it.
    both(auth_direct, auth_flask_only, query, times=1, headers=bearer(issue(app, "*")[1]))
    auth_direct.reached_flask = 0
    [expected] = both(auth_direct, auth_flask_only, query, times=1, headers=headers)
    assert expected[0] == status, expected
    assert auth_direct.reached_flask == (0 if answered_directly else 1)


@pytest.mark.parametrize("revocation", REVOCATIONS.values(), ids=REVOCATIONS)
@pytest.mark.parametrize("wait", [0, 2], ids=["poll", "long poll"])
def test_a_revoked_token_is_refused_at_the_next_direct_consume(
    orders, auth_direct, auth_flask_only, revocation, wait
):
    app = auth_direct.client.application
    client_id, issued = issue(app, "subscriptions:consume")
    query = f"consumer_id={consumer()}&wait_seconds={wait}"
    orders.publish("orders", [{"n": 1}])
    both(auth_direct, auth_flask_only, query, times=1, headers=bearer(issued))
    revocation(app, client_id)
    orders.publish("orders", [{"n": 2}])
    auth_direct.reached_flask = 0
    [expected] = both(auth_direct, auth_flask_only, query, times=1, headers=bearer(issued))
    assert expected[0] == "401 UNAUTHORIZED" and b"token has been revoked" in expected[2]
    assert expected[1]["WWW-Authenticate"] == "Bearer"
    assert auth_direct.reached_flask == 0  # the direct path refused it itself
    admin = bearer(issue(app, "*")[1])
    for subscription_id in ("a", "b"):  # and leased nothing to the revoked client
        metrics = auth_direct.client.get(f"/subscriptions/{subscription_id}/metrics", headers=admin).json
        assert (metrics["available"], metrics["delivered"]) == (1, 1), metrics
