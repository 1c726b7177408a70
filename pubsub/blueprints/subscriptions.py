"""Subscriptions: their lifecycle, consuming, acks, nacks, the DLQ and metrics."""

from flask.views import MethodView

from pubsub import db, messages, subscriptions
from pubsub.auth import require_scope
from pubsub.blueprints import Blueprint, load_json_array, message_id
from pubsub.encoding import json_response, message_json
from pubsub.schemas import (
    MAX_BATCH_IDS,
    MESSAGE_IDS_BODY,
    ConsumeQuerySchema,
    ErrorSchema,
    MessageListSchema,
    PaginationSchema,
    SubscriptionCreateSchema,
    SubscriptionListSchema,
    SubscriptionMetricsSchema,
    SubscriptionSchema,
)

blp = Blueprint(
    "subscriptions", __name__, url_prefix="/subscriptions", description="Subscriptions, consuming and the DLQ"
)

NOT_FOUND = {"schema": ErrorSchema, "description": "Subscription not found"}


def document_ids_body(func):
    """Document a bare JSON array of message ids (read by load_message_ids)."""
    func = blp.doc(
        requestBody={"required": True, "content": {"application/json": {"schema": MESSAGE_IDS_BODY}}}
    )(func)
    func = blp.alt_response(400, schema=ErrorSchema, description="Malformed JSON")(func)
    func = blp.alt_response(415, schema=ErrorSchema, description="Body is not application/json")(func)
    return blp.alt_response(422, schema=ErrorSchema, description="Not an array of at most 1000 UUIDs")(func)


def load_message_ids() -> list:
    return load_json_array(MAX_BATCH_IDS, message_id)[0]


@blp.route("")
class Subscriptions(MethodView):
    @require_scope("subscriptions", "create")
    @blp.arguments(SubscriptionCreateSchema)
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
            )

    @require_scope("subscriptions", "read")
    @blp.arguments(PaginationSchema, location="query")
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


@blp.route("/<id>/messages")
class SubscriptionMessages(MethodView):
    @require_scope("subscriptions", "consume")
    @blp.arguments(ConsumeQuerySchema, location="query")
    @blp.response(200, MessageListSchema)
    @blp.alt_response(404, **NOT_FOUND)
    def get(self, query, id):
        """Consume: lock up to batch_size available messages for this consumer."""
        with db.connect() as conn:
            rows = messages.consume(conn, id, query["consumer_id"], query["batch_size"])
        # Hot path: built directly, the payloads passed through as PostgreSQL rendered them.
        return json_response({"data": [message_json(row, id) for row in rows]})


@blp.route("/<id>/acks")
class Acks(MethodView):
    @require_scope("subscriptions", "consume")
    @document_ids_body
    @blp.response(204)
    @blp.alt_response(404, **NOT_FOUND)
    def post(self, id):
        """Acknowledge delivered messages; ids not delivered to this subscription are ignored."""
        ids = load_message_ids()
        with db.connect() as conn:
            messages.ack(conn, id, ids)


@blp.route("/<id>/nacks")
class Nacks(MethodView):
    @require_scope("subscriptions", "consume")
    @document_ids_body
    @blp.response(204)
    @blp.alt_response(404, **NOT_FOUND)
    def post(self, id):
        """Negatively acknowledge: retry after backoff, or dead-letter when attempts are used up."""
        ids = load_message_ids()
        with db.connect() as conn:
            messages.nack(conn, id, ids)


@blp.route("/<id>/dlq")
class DeadLetters(MethodView):
    @require_scope("subscriptions", "consume", "read")
    @blp.arguments(PaginationSchema, location="query")
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
