"""Subscriptions: their lifecycle, consuming, acks, nacks, the DLQ and metrics."""

import re
import select
import socket
import time

import orjson
from flask import Flask, Response, current_app, request
from flask.views import MethodView
from werkzeug.http import HTTP_STATUS_CODES

from pubsub import auth, db, listener, messages, observability, operations, slots, subscriptions
from pubsub.auth import require_scope
from pubsub.blueprints import (
    Blueprint,
    answer_error,
    cached_query,
    document_prefer,
    load_json_array,
    message_id,
    message_ref,
    read_json_body,
    representation,
    wants_representation,
)
from pubsub.encoding import json_response, message_json
from pubsub.observability import ROUTE_KEY
from pubsub.schemas import (
    EXTENSION,
    ID,
    MAX_BATCH_IDS,
    MESSAGE_IDS_BODY,
    ConsumeQuerySchema,
    CountSchema,
    ErrorSchema,
    ExtendQuerySchema,
    MessageListSchema,
    NackQuerySchema,
    OutcomeListSchema,
    PaginationSchema,
    PurgeQuerySchema,
    RedriveQuerySchema,
    SubscriptionCreateSchema,
    SubscriptionListSchema,
    SubscriptionMetricsSchema,
    SubscriptionSchema,
    SubscriptionUpdateSchema,
)

blp = Blueprint(
    "subscriptions", __name__, url_prefix="/subscriptions", description="Subscriptions, consuming and the DLQ"
)

NOT_FOUND = {"schema": ErrorSchema, "description": "Subscription not found"}
# On a long poll answered at once because LONG_POLL_MAX_WAITERS consumers already wait here.
DECLINED_HEADER = "Pubsub-Long-Poll"
DECLINED_DOC = {
    DECLINED_HEADER: {
        "description": "`declined` on a long poll answered at once, empty, because this server process"
        f" already has LONG_POLL_MAX_WAITERS consumers waiting: pause before asking again. {EXTENSION}",
        "schema": {"type": "string", "enum": ["declined"]},
    }
}


def document_ids_body(func, outcomes: bool = False):
    """Document a bare JSON array of message ids (read by load_message_ids), or of message ids
    and ack_ids with per-item outcomes on request (read by load_message_refs)."""
    doc = {"requestBody": {"required": True, "content": {"application/json": {"schema": MESSAGE_IDS_BODY}}}}
    if outcomes:
        func = document_prefer(func)
        func = blp.alt_response(
            200,
            schema=OutcomeListSchema,
            description="With `Prefer: return=representation`: each item's outcome, in request order."
            f" {EXTENSION}",
        )(func)
    else:
        doc["requestBody"]["content"]["application/json"]["schema"] = {
            **MESSAGE_IDS_BODY,
            "items": {"type": "string", "format": "uuid"},
        }
    func = blp.doc(**doc)(func)
    func = blp.alt_response(400, schema=ErrorSchema, description="Malformed JSON")(func)
    func = blp.alt_response(415, schema=ErrorSchema, description="Body is not application/json")(func)
    return blp.alt_response(422, schema=ErrorSchema, description="Not an array of at most 1000 ids")(func)


def document_refs_body(func):
    return document_ids_body(func, outcomes=True)


def load_message_ids() -> list:
    return load_json_array(MAX_BATCH_IDS, message_id)[0]


def load_message_refs() -> list:
    return load_json_array(MAX_BATCH_IDS, message_ref)[0]


def settled(outcomes: list[int], done: str):
    """204, or with `Prefer: return=representation` each item's outcome, in request order."""
    if not wants_representation():
        return None
    names = {messages.DONE: done, messages.STALE: "stale", messages.NOT_FOUND: "not_found"}
    sent = read_json_body()[0]  # each item as the caller spelled it (the body is cached)
    items = [{"id": item, "status": names[outcome]} for item, outcome in zip(sent, outcomes, strict=True)]
    return representation({"data": items})


def consume(subscription_id: str, query: dict) -> list:
    token = auth.revocation_token()  # checked by the claim itself
    observability.CLAIMS.inc()
    with db.connect() as conn:
        return messages.consume(conn, subscription_id, query["consumer_id"], query["batch_size"], token)


def client_gone(environ: dict) -> bool:
    """Whether the client has closed its connection: a long poll it gave up on, whose claim
    would lease messages to no one until their ack deadline."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        # Readable with nothing to read: the other end has closed (a pipelined request is data).
        return sock.recv(1, socket.MSG_PEEK) == b""
    except ValueError:  # a TLS socket cannot peek
        return False
    except OSError:  # reset
        return True


def consume_waiting(subscription_id: str, query: dict, environ: dict) -> list | None:
    """Long poll: claim, then again each time the listener wakes this consume, until messages
    come or the wait is over; None when this process has as many waiters as it allows. While
    waiting it holds no database connection and no work slot."""
    deadline = time.monotonic() + query["wait_seconds"]
    waits = listener.get_listener(current_app)
    waiter = waits.join(subscription_id, query["batch_size"])
    if waiter is None:
        return None
    observability.LONG_POLL_WAITING.inc()
    try:
        claim = waiter.claim_first
        if not claim:
            db.run_all_pending()  # the revocation check that the skipped claim would have made
        while True:
            if claim:
                granted = waits.claiming(waiter)
                rows = consume(subscription_id, query)
                waits.claimed(waiter, len(rows), granted)
                if rows:
                    return rows
                if not waits.park(waiter):
                    continue  # woken meanwhile, or messages pending: claim again now
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            with slots.slot_released():
                claim = waiter.event.wait(remaining)
            if waits.releasing:
                return []  # the server is stopping: the consumer asks again, elsewhere or later
            if claim and client_gone(environ):
                return []  # its wake-up goes to another waiter (listener.leave)
    finally:
        waits.leave(waiter)
        observability.LONG_POLL_WAITING.dec()


def consume_answer(subscription_id: str, query: dict, environ: dict) -> tuple[bytes, list[tuple[str, str]]]:
    """A consume's JSON body and its headers beyond the content's, for the view and
    DirectConsume alike."""
    rows = consume_waiting(subscription_id, query, environ) if query["wait_seconds"] else None
    declined = rows is None and query["wait_seconds"] > 0
    if rows is None:
        rows = consume(subscription_id, query)
    # Hot path: built directly, the payloads passed through as PostgreSQL rendered them.
    body = orjson.dumps({"data": [message_json(row, subscription_id) for row in rows]})
    if declined and not rows:
        observability.LONG_POLL_DECLINED.inc()
        return body, [(DECLINED_HEADER, "declined")]
    return body, []


# One instance, so that DirectConsume finds the view's loads of a query string (cached_query).
CONSUME_QUERY = ConsumeQuerySchema()


@blp.route("")
class Subscriptions(MethodView):
    @require_scope("subscriptions", "create")
    @blp.arguments(SubscriptionCreateSchema())
    @blp.response(201, SubscriptionSchema)
    @blp.alt_response(404, schema=ErrorSchema, description="Topic not found")
    @blp.alt_response(409, schema=ErrorSchema, description="Subscription already exists")
    def post(self, data):
        """Create a subscription of a topic, with an optional filter and retry policy."""
        with db.begin() as conn:
            return subscriptions.create_subscription(
                conn,
                data["id"],
                data["topic_id"],
                data["filter"],
                data["max_delivery_attempts"],
                data["backoff_min_seconds"],
                data["backoff_max_seconds"],
                data["ack_deadline_seconds"],
                data.get("ordering_key"),
            )

    @require_scope("subscriptions", "read")
    @blp.arguments(PaginationSchema(), location="query")
    @blp.response(200, SubscriptionListSchema)
    def get(self, page):
        """List subscriptions, ordered by id."""
        with db.begin() as conn:
            return {"data": subscriptions.list_subscriptions(conn, page["offset"], page["limit"])}


@blp.route("/<id>")
class Subscription(MethodView):
    @require_scope("subscriptions", "read")
    @blp.response(200, SubscriptionSchema)
    @blp.alt_response(404, **NOT_FOUND)
    def get(self, id):
        """Get a subscription."""
        with db.begin() as conn:
            return subscriptions.get_subscription(conn, id)

    @require_scope("subscriptions", "delete")
    @blp.response(204)
    @blp.alt_response(404, **NOT_FOUND)
    def delete(self, id):
        """Delete a subscription and its messages."""
        with db.begin() as conn:
            subscriptions.delete_subscription(conn, id)

    @require_scope("subscriptions", "update")
    @blp.arguments(SubscriptionUpdateSchema(partial=True))
    @blp.response(200, SubscriptionSchema)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.alt_response(415, schema=ErrorSchema, description="Body is not application/json")
    @blp.doc(**{"x-pubsub-extension": True})
    def patch(self, changes, id):
        """Change the filter, retry policy or ack deadline. Extension to the fastpubsub API."""
        read_json_body()  # no body, or one not declared as JSON, is no change of nothing: 400, 415
        with db.begin() as conn:
            return subscriptions.update_subscription(conn, id, changes)


@blp.route("/<id>/messages")
class SubscriptionMessages(MethodView):
    @require_scope("subscriptions", "consume")
    @blp.arguments(CONSUME_QUERY, location="query")
    @blp.response(200, MessageListSchema, headers=DECLINED_DOC)
    @blp.alt_response(404, **NOT_FOUND)
    def get(self, query, id):
        """Consume: lease up to batch_size available messages to this consumer."""
        body, headers = consume_answer(id, query, request.environ)
        return Response(body, mimetype="application/json", headers=headers)


@blp.route("/<id>/acks")
class Acks(MethodView):
    @require_scope("subscriptions", "consume")
    @document_refs_body
    @blp.response(204)
    @blp.alt_response(404, **NOT_FOUND)
    def post(self, id):
        """Acknowledge delivered messages; ids not delivered to this subscription are ignored."""
        refs = load_message_refs()
        token = auth.revocation_token()  # checked by the statement itself
        if not wants_representation() and all(lease is None for _, lease in refs):
            with db.connect() as conn:  # fastpubsub's form, the hot path: no outcomes to compute
                messages.ack_current(conn, id, [message for message, _ in refs], token)
            return None
        with db.connect() as conn:
            outcomes = messages.ack(conn, id, refs, token)
        return settled(outcomes, "acked")


@blp.route("/<id>/nacks")
class Nacks(MethodView):
    @require_scope("subscriptions", "consume")
    @blp.arguments(NackQuerySchema(), location="query")
    @document_refs_body
    @blp.response(204)
    @blp.alt_response(404, **NOT_FOUND)
    def post(self, query, id):
        """Negatively acknowledge: retry after backoff, or dead-letter when attempts are used up."""
        refs = load_message_refs()
        token = auth.revocation_token()  # checked by the statement itself
        with db.connect() as conn:
            if query["dead_letter"]:
                outcomes = messages.dead_letter(conn, id, refs, token)
            else:
                outcomes = messages.nack(conn, id, refs, query.get("delay_seconds"), token)
        return settled(outcomes, "nacked")


@blp.route("/<id>/extend")
class Extend(MethodView):
    @require_scope("subscriptions", "consume")
    @blp.arguments(ExtendQuerySchema(), location="query")
    @document_refs_body
    @blp.response(204)
    @blp.alt_response(404, **NOT_FOUND)
    def post(self, query, id):
        """Move the ack deadline of delivered messages to now + seconds. Extension to the fastpubsub API."""
        refs = load_message_refs()
        token = auth.revocation_token()  # checked by the statement itself
        with db.connect() as conn:
            outcomes = messages.extend(conn, id, refs, query.get("seconds"), token)
        return settled(outcomes, "extended")


@blp.route("/<id>/dlq")
class DeadLetters(MethodView):
    # Dead letters carry payloads: reading them is consuming's right, not monitoring's.
    @require_scope("subscriptions", "consume")
    @blp.arguments(PaginationSchema(), location="query")
    @blp.response(200, MessageListSchema)
    @blp.alt_response(404, **NOT_FOUND)
    def get(self, page, id):
        """List dead letters, oldest first, in a stable order."""
        with db.connect() as conn:
            rows = messages.list_dlq(conn, id, page["offset"], page["limit"])
        return json_response({"data": [message_json(row, id) for row in rows]})


@blp.route("/<id>/dlq/reprocess")
class Reprocess(MethodView):
    @require_scope("subscriptions", "consume")
    @document_ids_body
    @blp.response(204)
    @blp.alt_response(404, **NOT_FOUND)
    def post(self, id):
        """Move dead letters back to the queue with their attempts reset."""
        ids = load_message_ids()
        with db.connect() as conn:
            messages.reprocess(conn, id, ids)


@blp.route("/<id>/metrics")
class Metrics(MethodView):
    @require_scope("subscriptions", "consume", "read")
    @blp.response(200, SubscriptionMetricsSchema)
    @blp.alt_response(404, **NOT_FOUND)
    def get(self, id):
        """Count the subscription's messages by state."""
        with db.connect() as conn:
            return subscriptions.get_metrics(conn, id)


# A consume whose query string its view has loaded before, with a token that allows it when
# auth is on: DirectConsume answers it as the view would.
DIRECT_PATH = re.compile(f"/subscriptions/({ID})/messages")
CONSUME_ACTIONS = ("consume",)
OK = f"200 {HTTP_STATUS_CODES[200].upper()}"  # as Werkzeug spells it


class DirectConsume:
    """WSGI middleware: answers a consume without Flask's request context, routing and response
    objects, which cost a long-poll consumer's renewal more than the rest of it (README,
    "Long poll"): with a thousand consumers waiting and nothing published, renewals are most of
    the server's CPU. Only a query string that the view has loaded before is taken (a consumer
    asks with the same one every time), so its validation is the view's own. Every other
    request, and every consume it has any doubt about (a new query string, a token that is
    missing, invalid or short of the scope), goes to Flask untouched. With auth on it makes the
    view's checks (auth.authorize), and the claim checks revocation, as it does for the view.
    Errors raised while consuming are answered by the app's own handlers (answer_error)."""

    def __init__(self, app: Flask, wsgi_app):
        self.app = app
        self.wsgi_app = wsgi_app
        self.rule = None  # the view's URL rule, for the request metrics

    def __call__(self, environ, start_response):
        plain = self.plain_consume(environ)
        if plain is None:
            return self.wsgi_app(environ, start_response)
        subscription_id, query = plain
        with self.app.app_context():
            check = None
            if self.app.config["AUTH_ENABLED"]:
                try:
                    authorization = environ.get("HTTP_AUTHORIZATION", "")
                    token = auth.authorize(authorization, "subscriptions", CONSUME_ACTIONS, subscription_id)
                except Exception:
                    return self.wsgi_app(environ, start_response)  # the view answers 401 or 403
                check = db.before_next_transaction(auth.RevocationCheck(token))
            if self.rule is None:
                self.rule = next(self.app.url_map.iter_rules("subscriptions.SubscriptionMessages"))
            environ[ROUTE_KEY] = self.rule
            try:
                try:
                    body, headers = consume_answer(subscription_id, query, environ)
                finally:
                    if check is not None:
                        db.run_pending(check)  # a revoked token is a 401, whatever else went wrong
            except Exception as error:
                return answer_error(self.app, environ, start_response, error)
        content = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        start_response(OK, [*content, *headers])
        return [body]

    @staticmethod
    def plain_consume(environ) -> tuple[str, dict] | None:
        """The subscription id and loaded query of a consume it can answer, or None for Flask."""
        if environ.get("REQUEST_METHOD") != "GET":
            return None
        path = DIRECT_PATH.fullmatch(environ.get("PATH_INFO", ""))
        if path is None:
            return None
        query = cached_query(CONSUME_QUERY, environ.get("QUERY_STRING", ""))
        return None if query is None else (path[1], query)


# Operators' bulk operations (pubsub.operations), each answering how many messages it moved or
# removed. Extensions to the fastpubsub API.
EXTENSION_DOC = {"x-pubsub-extension": True}


def chunk_rows() -> int:
    return current_app.config["OPERATIONS_CHUNK_ROWS"]


def load_optional_ids() -> list | None:
    """A JSON array of message ids, or None when the request has no body at all."""
    if not request.content_length and not request.get_data(cache=True):
        return None
    return load_message_ids()


@blp.route("/<id>/dlq/redrive")
class Redrive(MethodView):
    @require_scope("subscriptions", "consume")
    @blp.arguments(RedriveQuerySchema(), location="query")
    @blp.response(200, CountSchema)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.doc(**EXTENSION_DOC)
    def post(self, query, id):
        """Move dead letters back to the queue, attempts reset. Extension to the fastpubsub API."""
        with db.connect() as conn:  # autocommit: each chunk commits on its own
            return {"count": operations.redrive_dlq(conn, id, chunk_rows(), query.get("limit"))}


@blp.route("/<id>/dlq")
class DeadLetterPurge(MethodView):
    @require_scope("subscriptions", "delete")
    @blp.response(200, CountSchema)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.alt_response(400, schema=ErrorSchema, description="Malformed JSON")
    @blp.alt_response(415, schema=ErrorSchema, description="A body that is not application/json")
    @blp.alt_response(422, schema=ErrorSchema, description="Not an array of at most 1000 ids")
    @blp.doc(
        requestBody={
            "required": False,
            "description": "The ids of the dead letters to delete; without a body, all of them.",
            "content": {
                "application/json": {
                    "schema": {**MESSAGE_IDS_BODY, "items": {"type": "string", "format": "uuid"}}
                }
            },
        },
        **EXTENSION_DOC,
    )
    def delete(self, id):
        """Delete dead letters: all, or the ids in the body. Extension to the fastpubsub API."""
        ids = load_optional_ids()
        with db.connect() as conn:  # autocommit: each chunk commits on its own
            return {"count": operations.purge_dlq(conn, id, chunk_rows(), ids)}


@blp.route("/<id>/purge")
class Purge(MethodView):
    @require_scope("subscriptions", "delete")
    @blp.arguments(PurgeQuerySchema(), location="query")
    @blp.response(200, CountSchema)
    @blp.alt_response(404, **NOT_FOUND)
    @blp.doc(**EXTENSION_DOC)
    def post(self, query, id):
        """Delete the backlog, or what was published before a time. Extension to the fastpubsub API."""
        with db.connect() as conn:  # autocommit: each chunk commits on its own
            return {"count": operations.purge_backlog(conn, id, chunk_rows(), query.get("before"))}
