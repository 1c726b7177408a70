"""Topics, and publishing to them."""

import io
import re
from collections.abc import Sequence
from urllib.parse import parse_qsl

import marshmallow as ma
import orjson
from flask import Flask, current_app, request
from flask.views import MethodView
from werkzeug.http import HTTP_STATUS_CODES

from pubsub import auth, db, idempotency, messages, topics
from pubsub.auth import require_scope
from pubsub.blueprints import (
    Blueprint,
    NoContent,
    answer_error,
    checked_array,
    document_prefer,
    json_object,
    load_json_array,
    representation,
    wants_representation,
)
from pubsub.clients import TokenRef
from pubsub.errors import ValidationFailed
from pubsub.grouping import GroupCommit
from pubsub.observability import ROUTE_KEY
from pubsub.schemas import (
    EXTENSION,
    ID,
    MAX_PUBLISH_BATCH,
    PUBLISH_BODY,
    ErrorSchema,
    PaginationSchema,
    PublishQuerySchema,
    ReceiptListSchema,
    TopicCreateSchema,
    TopicListSchema,
    TopicSchema,
)

blp = Blueprint("topics", __name__, url_prefix="/topics", description="Topics and publishing")

# Path parameters are named `id`, as in fastpubsub's OpenAPI, so clients generated from it
# keep working and the Prometheus `path` label reads /topics/{id}.


@blp.route("")
class Topics(MethodView):
    @require_scope("topics", "create")
    @blp.arguments(TopicCreateSchema())
    @blp.response(201, TopicSchema)
    @blp.alt_response(409, schema=ErrorSchema, description="Topic already exists")
    def post(self, data):
        """Create a topic."""
        with db.begin() as conn:
            return topics.create_topic(conn, data["id"])

    @require_scope("topics", "read")
    @blp.arguments(PaginationSchema(), location="query")
    @blp.response(200, TopicListSchema)
    def get(self, page):
        """List topics, ordered by id."""
        with db.begin() as conn:
            return {"data": topics.list_topics(conn, page["offset"], page["limit"])}


@blp.route("/<id>")
class Topic(MethodView):
    @require_scope("topics", "read")
    @blp.response(200, TopicSchema)
    @blp.alt_response(404, schema=ErrorSchema, description="Topic not found")
    def get(self, id):
        """Get a topic."""
        with db.begin() as conn:
            return topics.get_topic(conn, id)

    @require_scope("topics", "delete")
    @blp.response(204)
    @blp.alt_response(404, schema=ErrorSchema, description="Topic not found")
    def delete(self, id):
        """Delete a topic with its subscriptions and their messages."""
        with db.begin() as conn:
            topics.delete_topic(conn, id)


# --- Idempotent publish (an extension): the Idempotency-Key header -------------------------------

IDEMPOTENCY_KEY_ENVIRON = "HTTP_IDEMPOTENCY_KEY"
# Letters, digits and -._~:+/= (UUIDs, ULIDs, base64 and hex fit), bare or as the structured-field
# string of the IETF httpapi draft ("..."); the quotes are not part of the key.
KEY_CHARACTERS = r"[A-Za-z0-9._~:+/=-]{1,255}"
IDEMPOTENCY_KEY = re.compile(f'{KEY_CHARACTERS}|"({KEY_CHARACTERS})"')
IDEMPOTENCY_KEY_PATTERN = f'^({KEY_CHARACTERS}|"{KEY_CHARACTERS}")$'
IDEMPOTENCY_KEY_HEADER = {
    "in": "header",
    "name": "Idempotency-Key",
    "required": False,
    "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN, "example": '"8e03978e-40d5-43e8-bc93"'},
    "description": "IETF httpapi Idempotency-Key: a repeat of a publish with this key to the same"
    " topic within PUBLISH_IDEMPOTENCY_SECONDS (a day) stores nothing and gets the first one's"
    " answer, with the same message ids (Idempotent-Replayed: true); with another body it is a 422."
    " 1-255 characters of A-Z a-z 0-9 - . _ ~ : + / =, bare or in double quotes."
    f" {EXTENSION}",
    "x-pubsub-extension": True,
}
REPLAYED = {"Idempotent-Replayed": "true"}
REPLAYED_HEADER = {
    "Idempotent-Replayed": {
        "description": f"true: the answer of an earlier publish with the same Idempotency-Key. {EXTENSION}",
        "schema": {"type": "string", "enum": ["true"]},
        "x-pubsub-extension": True,
    }
}


def document_idempotency_key(view):
    """Document the Idempotency-Key header, which the view reads itself (as document_prefer)."""
    apidoc = getattr(view, "_apidoc", {})
    arguments = apidoc.get("arguments", {})
    parameters = [*arguments.get("parameters", []), IDEMPOTENCY_KEY_HEADER]
    view._apidoc = {**apidoc, "arguments": {**arguments, "parameters": parameters}}
    return view


def idempotency_key(value: str) -> str:
    """The key of an Idempotency-Key header's value, or a 422 naming what is wrong."""
    match = IDEMPOTENCY_KEY.fullmatch(value.strip())
    if match is None:
        problem = "must be 1-255 characters of A-Z a-z 0-9 - . _ ~ : + / =, bare or in double quotes"
        raise ValidationFailed({"headers.Idempotency-Key": [problem]})
    return match[1] or match[0]


def publish_keyed(topic_id: str, raw: bytes, delay: messages.Delay):
    """A publish with an Idempotency-Key: its own path, one transaction for the key's record and
    the messages. With auth on, the token's revocation is the transaction's first statement, so a
    repeat is refused as the first publish would be."""
    key = idempotency_key(request.environ[IDEMPOTENCY_KEY_ENVIRON])
    window = current_app.config["PUBLISH_IDEMPOTENCY_SECONDS"]
    with db.begin() as conn:
        receipts, replayed = idempotency.publish_once(conn, topic_id, key, raw, window, delay)
    headers = REPLAYED if replayed else {}
    if not wants_representation():
        return NoContent(status=204, headers=headers)
    response = representation({"data": [{"id": i, "subscriptions": n} for i, n in receipts]}, 201)
    response.headers.update(headers)
    return response


@blp.route("/<id>/messages")
class TopicMessages(MethodView):
    @require_scope("topics", "publish")
    @blp.arguments(PublishQuerySchema, location="query")
    @blp.doc(requestBody={"required": True, "content": {"application/json": {"schema": PUBLISH_BODY}}})
    @document_prefer
    @document_idempotency_key
    @blp.response(204, headers=REPLAYED_HEADER)
    @blp.alt_response(
        201,
        schema=ReceiptListSchema,
        headers=REPLAYED_HEADER,
        description=f"With `Prefer: return=representation`: each message's id and how many"
        f" subscriptions got a copy, in request order. {EXTENSION}",
    )
    @blp.alt_response(400, schema=ErrorSchema, description="Malformed JSON")
    @blp.alt_response(404, schema=ErrorSchema, description="Topic not found")
    @blp.alt_response(413, schema=ErrorSchema, description="Body larger than API_MAX_BODY_BYTES")
    @blp.alt_response(415, schema=ErrorSchema, description="Body is not application/json")
    @blp.alt_response(
        409,
        schema=ErrorSchema,
        description="A publish with the same Idempotency-Key is in progress or was just forgotten:"
        f" retry after Retry-After. {EXTENSION}",
    )
    @blp.alt_response(
        422,
        schema=ErrorSchema,
        description="Not an array of at most 1000 objects; a bad delay_seconds or deliver_at, both,"
        " or a deliver_at more than 7 days ahead; an invalid Idempotency-Key, or one used before"
        " with another body or delay",
    )
    def post(self, query, id):
        """Publish a batch of up to 1000 JSON objects; each matching subscription gets a copy."""
        # Validated here, stored from the raw text: PostgreSQL parses it once, verbatim.
        _, raw = load_json_array(MAX_PUBLISH_BATCH, json_object)
        delay = publish_delay(query)
        if IDEMPOTENCY_KEY_ENVIRON in request.environ:
            return publish_keyed(id, raw, delay)
        token = auth.revocation_token()  # checked by the publish statement itself
        if not wants_representation():
            publish_grouped(id, raw.decode(), token, delay)
            return None
        with db.connect() as conn:
            receipts = messages.publish_with_receipts(conn, id, raw.decode(), token, delay)
        return representation({"data": [{"id": i, "subscriptions": n} for i, n in receipts]}, 201)


# Publishes share statements and commits with the ones running beside them in this process, up
# to this many requests or bytes of JSON per statement; a larger body runs alone.
PUBLISH_GROUP_MAX_REQUESTS = 64
PUBLISH_GROUP_MAX_BYTES = 256 * 1024


def publish_delay(query: dict) -> messages.Delay:
    """A publish's delay as the statement takes it: seconds, a due time in RFC 3339, or None."""
    if "deliver_at" in query:
        return query["deliver_at"].isoformat()
    return query.get("delay_seconds")


def publish_grouped(
    topic_id: str, payloads: str, token: TokenRef | None, delay: messages.Delay = None
) -> None:
    """Publish one request's batch, in a statement shared with concurrent publishes, if its token
    (None: auth off) is still current; with a delay, claimable only from then on."""
    group = current_app.extensions.get("pubsub_publish_group")
    if group is None:
        group = current_app.extensions.setdefault(
            "pubsub_publish_group",
            GroupCommit(
                publish_group,
                publish_alone,
                messages.retry_group_alone,
                PUBLISH_GROUP_MAX_REQUESTS,
                PUBLISH_GROUP_MAX_BYTES,
                messages.group_queue_error,
            ),
        )
    db.run_all_pending()  # the statement may run on another request's connection
    messages.ensure_published(group.run((topic_id, payloads, token, delay), len(payloads)))


def publish_group(batches: Sequence[messages.Batch]) -> list[int]:
    with db.connect() as conn:
        return messages.publish_many(conn, batches, wait=False)[0]


def publish_alone(batch: messages.Batch) -> int:
    with db.connect() as conn:
        return messages.publish_many(conn, [batch])[0][0]


# A publish that is plainly valid, sent without Prefer, with a token that allows it when auth is
# on: the view would store its body as is and answer 204. Its topic id is one topics can have, so
# it needs no URL decoding. Its query string is empty, or a valid delay and nothing else.
DIRECT_PATH = re.compile(f"/topics/({ID})/messages")
DIRECT_LENGTH = re.compile(r"[0-9]{1,12}")
NO_CONTENT = f"204 {HTTP_STATUS_CODES[204].upper()}"  # as Werkzeug spells it
PUBLISH_ACTIONS = ("publish",)
PUBLISH_QUERY = PublishQuerySchema()
NOT_DIRECT = object()  # a query string that the view reads


class DirectPublish:
    """WSGI middleware: answers the plain publish without Flask's request context, routing and
    response objects, which cost about 40 % of a one-message publish (bench/README.md). Every
    other request, and every publish it has any doubt about (a token that is missing, invalid or
    short of the scope included), goes to Flask, with the body it read put back, so the view and
    its error handlers answer exactly as they would have. With auth on it makes the view's checks
    (auth.authorize), and the publish statement checks revocation, as it does for the view.
    Errors raised while publishing (a revoked token among them) are answered by the app's own
    handlers, never by running the view again: by then the messages may be stored."""

    def __init__(self, app: Flask, wsgi_app):
        self.app = app
        self.wsgi_app = wsgi_app
        self.rule = None  # the view's URL rule, for the request metrics

    def __call__(self, environ, start_response):
        publish = self.plain_publish(environ)
        if publish is None:
            return self.wsgi_app(environ, start_response)
        with self.app.app_context():
            batch = self.read_batch(environ, *publish)
            if batch is not None:
                return self.publish(environ, start_response, batch)
        return self.wsgi_app(environ, start_response)

    def plain_publish(self, environ) -> tuple[str, int, messages.Delay] | None:
        """The topic id, body size and delay of what looks like a plain publish, or None for
        Flask."""
        if (
            environ.get("REQUEST_METHOD") != "POST"
            or "HTTP_PREFER" in environ
            or IDEMPOTENCY_KEY_ENVIRON in environ
            or environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower() != "application/json"
        ):
            return None
        path = DIRECT_PATH.fullmatch(environ.get("PATH_INFO", ""))
        length = DIRECT_LENGTH.fullmatch(environ.get("CONTENT_LENGTH", ""))
        limit = self.app.config["MAX_CONTENT_LENGTH"]
        if path is None or length is None:
            return None
        size = int(length[0])
        if limit is not None and size > limit:
            return None
        query = environ.get("QUERY_STRING")
        delay = direct_delay(query) if query else None
        if delay is NOT_DIRECT:
            return None
        return path[1], size, delay

    def read_batch(self, environ, topic_id: str, size: int, delay: messages.Delay) -> messages.Batch | None:
        """The publish's batch, once its token (with auth on) and body pass the view's checks, or
        None for Flask. In the app's context."""
        token = None
        if self.app.config["AUTH_ENABLED"]:
            try:
                authorization = environ.get("HTTP_AUTHORIZATION", "")
                token = auth.authorize(authorization, "topics", PUBLISH_ACTIONS, topic_id)
            except Exception:
                return None  # the view answers 401 or 403, or whatever it would; nothing read yet
        try:
            raw = environ["wsgi.input"].read(size)
        except OSError:
            return None  # Flask meets the same broken stream, and answers it as usual
        if len(raw) == size and is_plain_batch(raw):
            return topic_id, raw.decode(), token, delay
        environ["wsgi.input"] = io.BytesIO(raw)
        return None

    def publish(self, environ, start_response, batch: messages.Batch):
        if self.rule is None:
            self.rule = next(self.app.url_map.iter_rules("topics.TopicMessages"))
        environ[ROUTE_KEY] = self.rule
        try:
            publish_grouped(*batch)
        except Exception as error:
            return answer_error(self.app, environ, start_response, error)
        start_response(NO_CONTENT, [])
        return []


def direct_delay(query_string: str):
    """The delay a query string asks for, or NOT_DIRECT when the view is to read it (anything
    else in it, a name twice, or a value that the view answers with a 422)."""
    try:
        pairs = parse_qsl(query_string, keep_blank_values=True, strict_parsing=True, errors="strict")
        names = {name for name, _ in pairs}
        if len(names) != len(pairs) or not names <= PUBLISH_QUERY.fields.keys():
            return NOT_DIRECT
        return publish_delay(PUBLISH_QUERY.load(dict(pairs)))
    except (ValueError, ma.ValidationError):  # UnicodeDecodeError is a ValueError
        return NOT_DIRECT


def is_plain_batch(raw: bytes) -> bool:
    """Whether the view would accept the body as it is (the same checks)."""
    try:
        checked_array(orjson.loads(raw), MAX_PUBLISH_BATCH, json_object)
    except (orjson.JSONDecodeError, ValidationFailed):
        return False
    return True
