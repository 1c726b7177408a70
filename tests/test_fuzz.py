"""Fuzzing with schemathesis against the app's own OpenAPI document (issue 5, scenario 7).

Every operation of /openapi.json gets schema-valid (positive) and schema-violating (negative)
requests, from the document's examples, schemathesis' coverage phase and a bounded number of
Hypothesis examples with a fixed seed; every response must be no 5xx and must match what the
document says of it: an explicitly documented status code, content type, headers and body schema.
It runs twice, each against the document that app serves: with auth off (the default; the
document says nothing of tokens), and with auth on and the bearer token of a `*` client; with
auth on, a request without a token (401) and one with a token lacking the scope (403) are
validated the same way for each operation.

The requests go to the test apps in-process (WSGI), over the session's database, where each
operation starts from a truncated database with a topic, two subscriptions (a message delivered,
one dead-lettered, one available) and a client. Hooks aim some schema-valid path ids and bodies at
those objects, so that positive cases reach the handlers and not only their 404s.
"""

import contextlib
import os
import re
import secrets
import uuid
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode, checks
from schemathesis.openapi.checks import RejectedPositiveData

from pubsub import clients, create_app, db, idempotency, messages, subscriptions, topics
from pubsub.errors import AlreadyExists, NotFound
from tests.auth_support import bearer, new_client, token_request

SEED = 20240607
# Hypothesis examples per operation and run, after the document's examples and the coverage phase
# (about 30 s of CPU for the whole module); FUZZ_MAX_EXAMPLES=100 digs deeper locally.
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "5"))
TOPIC = "orders"
SUBSCRIPTION = "email-sender"  # max_delivery_attempts=1: a nack dead-letters
FILTERED = "br-only"  # a second subscription with a filter, so publishing evaluates one
# The objects of the current test that aimed cases name; set by the `world` fixture.
TARGETS: dict = {}

AUTH_SECRET_KEY = secrets.token_hex(32)
AUTH_OFF = {"AUTH_ENABLED": False}
AUTH_ON = {"AUTH_ENABLED": True, "AUTH_SECRET_KEY": AUTH_SECRET_KEY}


def load_document(settings: dict) -> schemathesis.BaseSchema:
    """The document that an app with these settings serves (auth on adds the tokens' security and
    their 401 and 403). Built by the factory's app, no database needed for that;
    test_each_fuzzed_app_serves_its_fuzzed_document checks that the apps under test serve the same.
    Loaded at import rather than through schemathesis.pytest.from_fixture, which (in 4.32.5) sets
    the test node's `_nodeid`, an attribute pytest 9.2 no longer has."""
    document = schemathesis.openapi.from_wsgi("/openapi.json", create_app({"TESTING": True, **settings}))
    document.config.seed = SEED
    document.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    return document


schema = load_document(AUTH_OFF)
auth_schema = load_document(AUTH_ON)


def explicitly_documented_status(ctx, response, case):
    """flask-smorest documents a `default` error response on every operation, which makes
    status_code_conformance accept any status: here a status must be listed by its own code.
    Requests that schemathesis sends with another method (405, or 200 to OPTIONS) are judged by
    unsupported_method and allow_header_conformance instead."""
    if case.method.upper() != case.operation.method.upper():
        return None
    documented = case.operation.definition.raw["responses"]
    status = str(response.status_code)
    if status not in documented and f"{status[0]}XX" not in documented:
        raise AssertionError(
            f"Status {status} is documented only by `default`; "
            f"{case.operation.label} lists {', '.join(sorted(documented))}"
        )
    return None


# Every response check schemathesis has, but: ignored_auth with auth off (that document declares
# no security), use_after_free and ensure_resource_availability (stateful runs only),
# object_level_authorization (needs several identities; the scope matrix is test_auth_scopes.py)
# and max_response_time (timings on a shared 2-core machine are noise).
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    explicitly_documented_status,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
    checks.positive_data_acceptance,
    checks.missing_required_header,
    checks.unsupported_method,
    checks.allow_header_conformance,
]

# Fixed examples: schemathesis seeds each operation's test from SEED (an explicit seed wins over
# derandomize, which still pins the examples should the seed go), and no example database
# replays failures from an earlier run.
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        # `world` is deliberately shared by an operation's examples: ensure_world() re-creates
        # before each example what an earlier one deleted.
        HealthCheck.function_scoped_fixture,
    ],
)


# --- the objects fuzzed requests may hit -----------------------------------------------------


@pytest.fixture
def world(app, api) -> Iterator[dict]:
    """TOPIC with SUBSCRIPTION (one message delivered, one dead, one available) and FILTERED, and
    a client; TARGETS names them for the hooks."""
    api.create_topic(TOPIC)
    api.create_subscription(SUBSCRIPTION, TOPIC, max_delivery_attempts=1)
    api.create_subscription(FILTERED, TOPIC, filter={"country": ["BR"]})
    api.publish(TOPIC, [{"n": 1, "country": "BR"}, {"n": 2}, {"n": 3}])
    dead, delivered = (m["id"] for m in api.consume(SUBSCRIPTION, "fuzz-setup", batch_size=2))
    api.nack(SUBSCRIPTION, [dead])
    client_id, _ = new_client(app, "topics:read", name="fuzz-target")
    TARGETS.clear()
    TARGETS.update(topics=TOPIC, subscriptions=SUBSCRIPTION, clients=client_id, messages=[delivered, dead])
    yield TARGETS
    TARGETS.clear()


def ensure_world(app) -> None:
    """Re-create what an earlier example deleted, and publish one more message to consume."""
    with app.app_context(), db.begin() as conn:
        # ON CONFLICT DO NOTHING: AlreadyExists leaves the transaction usable.
        with contextlib.suppress(AlreadyExists):
            topics.create_topic(conn, TOPIC)
        with contextlib.suppress(AlreadyExists):
            subscriptions.create_subscription(conn, SUBSCRIPTION, TOPIC, None, 1, 5, 300, 60)
        try:
            clients.get_client(conn, uuid.UUID(TARGETS["clients"]))
        except NotFound:
            TARGETS["clients"] = str(clients.create_client(conn, "fuzz-target", "topics:read")[0])
        messages.publish(conn, TOPIC, '[{"n": 0}]')


def negative_at(case, location: str) -> bool:
    """Whether schemathesis made this part of the case invalid ("path", "body": its
    ParameterLocation is a str enum)."""
    return case.meta is not None and case.meta.is_negative_at(location)


def aim(case):
    """The case pointed at the world's objects where its data there is schema-valid."""
    path = case.operation.path
    if "id" in (case.path_parameters or {}) and not negative_at(case, "path"):
        case.path_parameters["id"] = TARGETS[path.split("/")[1]]
    if not negative_at(case, "body"):
        if path.endswith(("/acks", "/nacks", "/reprocess")) and isinstance(case.body, list):
            known = TARGETS["messages"]  # replacing the first ids keeps the body within maxItems
            case.body = [*known, *case.body[len(known) :]]
        elif path == "/subscriptions" and isinstance(case.body, dict):
            case.body["topic_id"] = TOPIC
    return case


def filter_failure(context, failure, case, response) -> bool:
    """Drop a "schema-valid request rejected" failure only for a rule that OpenAPI 3.0 cannot state
    (a rule that it can state belongs in the document)."""
    return not (isinstance(failure, RejectedPositiveData) and states_inexpressible_rule(case, response))


def states_inexpressible_rule(case, response) -> bool:
    # The token endpoint of a server without AUTH_SECRET_KEY (the auth-off app) has no tokens to
    # give, whatever the request. With auth on, the document's tokenUrl names the endpoint, and
    # schemathesis excuses its 400s itself: credentials are not the document's to promise.
    if case.operation.path == "/oauth/token" and response.status_code == 400:
        return response.json()["detail"].startswith("tokens are not available")
    if response.status_code != 422:
        return False
    detail, errors = response.json()["detail"], response.json().get("errors", {})
    # Across fields: backoff_min_seconds <= backoff_max_seconds (null meaning the setting).
    if errors == {"json.backoff_min_seconds": ["must not exceed backoff_max_seconds"]}:
        return True
    # The same in a PATCH, against the stored bound when only one is sent.
    if case.method.upper() == "PATCH" and len(errors) == 1:
        [(location, [message])] = errors.items()
        if location in ("json.backoff_min_seconds", "json.backoff_max_seconds") and message.startswith(
            ("must not exceed backoff_max_seconds (", "must not be less than backoff_min_seconds (")
        ):
            return True
    # Between parameters: a nack with dead_letter=true takes no delay_seconds.
    if errors == {"query.dead_letter": ["a dead letter is not retried: leave out delay_seconds"]}:
        return True
    # Delayed delivery: delay_seconds or deliver_at, not both (OpenAPI 3.0 cannot make parameters
    # exclusive), and a deliver_at at most 7 days after the database's now() (a moving bound).
    if errors in (
        {"query.deliver_at": ["give delay_seconds or deliver_at, not both"]},
        {"query.deliver_at": [messages.DELAY_TOO_LONG]},
    ):
        return case.operation.path == "/topics/{id}/messages"
    # A filter key of 1-256 characters: OpenAPI 3.0 has no propertyNames.
    if errors and all(re.fullmatch(r"json\.filter\..*\.key", location) for location in errors):
        return True
    # PostgreSQL's jsonb cannot store U+0000, anywhere in a published object (SPEC: a 422).
    publishing = case.operation.path == "/topics/{id}/messages"
    # An Idempotency-Key that an earlier example used with another body: a rule across requests.
    if publishing and detail == idempotency.KEY_REUSED:
        return True
    return publishing and detail.startswith("invalid data:") and contains_nul(case.body)


def contains_nul(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(contains_nul(key) or contains_nul(item) for key, item in value.items())
    return isinstance(value, list) and any(contains_nul(item) for item in value)


def flatmap_case(context, case):
    """Half of the generated cases aimed at the world's objects (Hypothesis draws which)."""
    return st.booleans().map(lambda aimed: aim(case) if aimed else case)


for document in (schema, auth_schema):
    document.hook(filter_failure)
    document.hook(flatmap_case)


# --- the two runs ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fuzz_auth_app(make_app):
    return make_app(**AUTH_ON)


@pytest.fixture
def tokens(fuzz_auth_app, world) -> dict:
    """Bearer headers of an admin (`*`) and of a client whose only scope names no real object."""
    test_client = fuzz_auth_app.test_client()
    headers = {}
    for name, scopes in (("admin", "*"), ("nobody", "topics:read:no-such-topic")):
        response = token_request(test_client, *new_client(fuzz_auth_app, scopes, name=f"fuzz-{name}"))
        assert response.status_code == 201, response.json
        headers[name] = bearer(response.json["access_token"])
    return headers


def test_each_fuzzed_app_serves_its_fuzzed_document(app, fuzz_auth_app):
    for fuzzed, document in ((app, schema), (fuzz_auth_app, auth_schema)):
        assert fuzzed.test_client().get("/openapi.json").json == document.raw_schema


LIMITED_FIELDS = ("max_delivery_attempts", "backoff_min_seconds", "backoff_max_seconds")


@pytest.mark.parametrize("field", LIMITED_FIELDS)
@pytest.mark.parametrize(("value", "status"), [(0, 422), (1, 201)])
def test_the_document_and_the_app_start_delivery_limits_at_one(app, world, field, value, status):
    """fastpubsub's limits: the document says minimum 1, so the fuzzer's positive cases stay at 1
    or more and its negative ones try 0; the app refuses 0, checked here whatever the fuzzer draws."""
    create = schema.raw_schema["components"]["schemas"]["SubscriptionCreate"]
    assert create["properties"][field]["minimum"] == 1
    body = {
        "id": "limited",
        "topic_id": TOPIC,
        "backoff_min_seconds": 1,
        "backoff_max_seconds": 1,
        field: value,
    }
    case = schema["/subscriptions"]["POST"].Case(body=body, media_type="application/json")
    response = case.call_and_validate(app=app, checks=CHECKS)
    assert response.status_code == status, response.text


@schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_with_auth_off(case, app, world):
    ensure_world(app)
    case.call_and_validate(app=app, checks=CHECKS)


@auth_schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_with_auth_on(case, fuzz_auth_app, world, tokens):
    ensure_world(fuzz_auth_app)
    case.call_and_validate(app=fuzz_auth_app, headers=tokens["admin"], checks=[*CHECKS, checks.ignored_auth])
    # The same request refused, as documented: with a token lacking the scope (403), with none (401).
    case.call_and_validate(app=fuzz_auth_app, headers=tokens["nobody"], checks=CHECKS)
    case.headers.pop("Authorization", None)  # schemathesis may have generated one
    case.call_and_validate(app=fuzz_auth_app, checks=CHECKS)
