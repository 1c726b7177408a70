"""Every marshmallow schema: the public JSON contract in one place."""

import math
import re

import marshmallow as ma
from flask import current_app
from marshmallow import fields, validate

from pubsub.clients import SCOPES_PATTERN, normalize_scopes
from pubsub.errors import InvalidInput
from pubsub.messages import MAX_DELAY_SECONDS
from pubsub.tables import MAX_ACK_DEADLINE_SECONDS, MIN_ACK_DEADLINE_SECONDS

ID = r"[A-Za-z0-9._-]{1,128}"  # the id of a topic or a subscription
ID_PATTERN = f"^{ID}$"  # as documented (ECMA-262: $ is the very end)
# Checked with \Z: Python's $ also matches before a final newline, which let "orders\n" in.
ID_REGEX = re.compile(ID + r"\Z")
FILTER_MAX_KEYS = 32
FILTER_MAX_VALUES = 100
ORDERING_KEY_MAX_LENGTH = 256  # as a filter key: a top-level field name
MAX_BATCH_IDS = 1000
MAX_PUBLISH_BATCH = 1000
MAX_DELIVERY_ATTEMPTS = 1000
MAX_BACKOFF_SECONDS = 7 * 24 * 3600
MAX_WAIT_SECONDS = 20
UUID_PATTERN = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"

# Additions to the fastpubsub API are marked so in the OpenAPI document and its descriptions.
EXTENSION = "Extension to the fastpubsub API."


def extension(description: str) -> dict:
    """Field metadata for an addition to the fastpubsub API."""
    return {"description": f"{description} ({EXTENSION})", "x-pubsub-extension": True}


def resource_id(**kwargs) -> fields.String:
    return fields.String(
        required=True,
        validate=validate.Regexp(ID_REGEX, error="must be 1-128 characters of A-Z a-z 0-9 . _ -"),
        metadata={"pattern": ID_PATTERN, "example": "orders"},
        **kwargs,
    )


class ErrorSchema(ma.Schema):
    detail = fields.String(required=True, metadata={"description": "What went wrong"})
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={"description": "Validation messages by location.field (422 only)"},
    )


class PaginationSchema(ma.Schema):
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0, max=2**31 - 1))
    limit = fields.Integer(load_default=10, validate=validate.Range(min=1, max=100))


class TopicCreateSchema(ma.Schema):
    id = resource_id()


class TopicSchema(ma.Schema):
    id = fields.String()
    created_at = fields.DateTime()


class TopicListSchema(ma.Schema):
    data = fields.List(fields.Nested(TopicSchema))


def is_scalar(value) -> bool:
    if isinstance(value, bool | str):
        return True
    return isinstance(value, int | float) and not (isinstance(value, float) and not math.isfinite(value))


class FilterField(fields.Dict):
    """``{field: [allowed scalar values, ...]}``; ``{}`` or null means no filter."""

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        if len(value) > FILTER_MAX_KEYS:
            raise ma.ValidationError(f"a filter has at most {FILTER_MAX_KEYS} keys")
        for key, allowed in value.items():
            if not isinstance(allowed, list) or not allowed:
                raise ma.ValidationError(f"{key!r}: must be a non-empty array of allowed values")
            if len(allowed) > FILTER_MAX_VALUES:
                raise ma.ValidationError(f"{key!r}: at most {FILTER_MAX_VALUES} values")
            if not all(is_scalar(v) for v in allowed):
                raise ma.ValidationError(f"{key!r}: values must be strings, numbers or booleans")
        return value


class SubscriptionCreateSchema(ma.Schema):
    id = resource_id()
    topic_id = resource_id()
    filter = FilterField(
        keys=fields.String(validate=validate.Length(min=1, max=256)),
        allow_none=True,
        load_default=None,
        metadata={
            "example": {"country": ["BR", "US"]},
            "maxProperties": FILTER_MAX_KEYS,
            "additionalProperties": {
                "type": "array",
                "minItems": 1,
                "maxItems": FILTER_MAX_VALUES,
                "items": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]},
            },
        },
    )
    # At least 1, as in fastpubsub, which answers 0 with a 422 (flask-smorest documents the range).
    max_delivery_attempts = fields.Integer(
        strict=True, allow_none=True, validate=validate.Range(min=1, max=MAX_DELIVERY_ATTEMPTS)
    )
    backoff_min_seconds = fields.Integer(
        strict=True, allow_none=True, validate=validate.Range(min=1, max=MAX_BACKOFF_SECONDS)
    )
    backoff_max_seconds = fields.Integer(
        strict=True, allow_none=True, validate=validate.Range(min=1, max=MAX_BACKOFF_SECONDS)
    )
    ack_deadline_seconds = fields.Integer(
        strict=True,
        allow_none=True,
        validate=validate.Range(min=MIN_ACK_DEADLINE_SECONDS, max=MAX_ACK_DEADLINE_SECONDS),
        metadata=extension(
            "Seconds a consumer has to ack a delivery before the next consume may claim it again"
            " (default: CLEANUP_STUCK_MESSAGES_LOCK_TIMEOUT_SECONDS, within 10-600)"
        ),
    )
    ordering_key = fields.String(
        allow_none=True,
        load_default=None,
        validate=validate.Length(min=1, max=ORDERING_KEY_MAX_LENGTH),
        metadata=extension(
            "A top-level payload field: messages with the same value in it are delivered one at a"
            " time, in publish order, each once the one before is acked or dead-lettered; messages"
            " without it are unordered. Fixed at creation"
        ),
    )

    @ma.post_load
    def apply_defaults(self, data, partial=None, **kwargs):
        config = current_app.config
        for field, setting in (
            ("max_delivery_attempts", "SUBSCRIPTION_MAX_ATTEMPTS"),
            ("backoff_min_seconds", "SUBSCRIPTION_BACKOFF_MIN_SECONDS"),
            ("backoff_max_seconds", "SUBSCRIPTION_BACKOFF_MAX_SECONDS"),
        ):
            if data.get(field) is None and (field in data or not partial):  # partial: only those sent
                data[field] = config[setting]
        if data.get("ack_deadline_seconds") is None and ("ack_deadline_seconds" in data or not partial):
            data["ack_deadline_seconds"] = default_ack_deadline(config)
        if partial and not {"backoff_min_seconds", "backoff_max_seconds"} <= data.keys():
            return data  # the other bound is the stored one: subscriptions.update_subscription checks
        if data["backoff_min_seconds"] > data["backoff_max_seconds"]:
            raise ma.ValidationError("must not exceed backoff_max_seconds", field_name="backoff_min_seconds")
        return data


def default_ack_deadline(config) -> int:
    """The lock timeout cleanup-stuck used before deadlines existed, within the allowed range."""
    timeout = config["CLEANUP_STUCK_MESSAGES_LOCK_TIMEOUT_SECONDS"]
    return min(MAX_ACK_DEADLINE_SECONDS, max(MIN_ACK_DEADLINE_SECONDS, timeout))


class SubscriptionSchema(ma.Schema):
    id = fields.String()
    topic_id = fields.String()
    filter = fields.Dict(allow_none=True)
    max_delivery_attempts = fields.Integer()
    backoff_min_seconds = fields.Integer()
    backoff_max_seconds = fields.Integer()
    created_at = fields.DateTime()
    ack_deadline_seconds = fields.Integer(metadata=extension("Seconds a consumer has to ack a delivery"))
    ordering_key = fields.String(
        allow_none=True, metadata=extension("The payload field that orders messages, or null for none")
    )


class SubscriptionListSchema(ma.Schema):
    data = fields.List(fields.Nested(SubscriptionSchema))


class ConsumeQuerySchema(ma.Schema):
    consumer_id = fields.String(
        required=True,
        validate=[
            validate.Length(min=1, max=128),
            validate.Regexp(r"^[^\x00]*$", error="must not contain NUL characters"),
        ],
    )
    batch_size = fields.Integer(load_default=10, validate=validate.Range(min=1, max=100))
    wait_seconds = fields.Integer(
        load_default=0,
        validate=validate.Range(min=0, max=MAX_WAIT_SECONDS),
        metadata=extension(
            "Long poll: with nothing to deliver, wait up to this many seconds for messages"
            " and answer as soon as some arrive (an empty list when the wait ends)"
        ),
    )


class NackQuerySchema(ma.Schema):
    delay_seconds = fields.Integer(
        validate=validate.Range(min=0, max=MAX_BACKOFF_SECONDS),
        metadata=extension("Retry after this many seconds instead of the backoff (0: at once)"),
    )
    dead_letter = fields.Boolean(
        truthy={"true"},
        falsy={"false"},
        load_default=False,
        metadata=extension(
            "true: send the messages to the DLQ at once instead of retrying them, whatever attempts"
            " are left (not with delay_seconds)"
        ),
    )

    @ma.validates_schema
    def dead_letter_has_no_delay(self, data, **kwargs):
        if data.get("dead_letter") and data.get("delay_seconds") is not None:
            raise ma.ValidationError("a dead letter is not retried: leave out delay_seconds", "dead_letter")


class PublishQuerySchema(ma.Schema):
    """Delayed delivery: at most one of the two."""

    delay_seconds = fields.Integer(
        validate=validate.Range(min=0, max=MAX_DELAY_SECONDS),
        metadata=extension(
            f"Delayed delivery: the messages become claimable this many seconds from now"
            f" (0 to {MAX_DELAY_SECONDS}, 7 days), by the database's clock"
        ),
    )
    deliver_at = fields.AwareDateTime(
        format="iso",
        error_messages={
            "invalid": "must be an RFC 3339 time with a timezone, e.g. 2026-12-06T21:00:00Z"
            " (a + in the offset must be sent as %2B)",
            "invalid_awareness": "must have a timezone (Z or an offset such as %2B02:00)",
        },
        metadata=extension(
            "Delayed delivery: the messages become claimable at this RFC 3339 time, by the"
            " database's clock (a time past means now; at most 7 days ahead, else 422)"
        ),
    )

    @ma.pre_load
    def accept_lower_case(self, data, **kwargs):
        """RFC 3339 allows t and z (Python's parser takes T and Z only)."""
        if isinstance(data.get("deliver_at"), str):
            data = {**data, "deliver_at": data["deliver_at"].upper()}
        return data

    @ma.validates_schema
    def check_one_delay(self, data, **kwargs):
        if "delay_seconds" in data and "deliver_at" in data:
            raise ma.ValidationError("give delay_seconds or deliver_at, not both", field_name="deliver_at")


class ExtendQuerySchema(ma.Schema):
    seconds = fields.Integer(
        validate=validate.Range(min=1, max=MAX_ACK_DEADLINE_SECONDS),
        metadata={"description": "New deadline: now plus this many seconds (default: the subscription's)"},
    )


class MessageSchema(ma.Schema):
    id = fields.UUID(metadata={"description": "The published message's id, the same in every subscription"})
    subscription_id = fields.String()
    payload = fields.Dict(metadata={"description": "The JSON object as published"})
    delivery_attempts = fields.Integer()
    created_at = fields.DateTime()
    ack_id = fields.String(
        metadata=extension(
            "Lease token of this delivery: acks, nacks and extensions that send it act only while"
            " this delivery is the current one (absent from DLQ listings)"
        )
    )


class MessageListSchema(ma.Schema):
    data = fields.List(fields.Nested(MessageSchema))


class SubscriptionMetricsSchema(ma.Schema):
    subscription_id = fields.String()
    available = fields.Integer(metadata={"description": "Ready now or waiting out a backoff"})
    delayed = fields.Integer(
        metadata=extension("Published with a delay that is not over yet (not counted as available)")
    )
    delivered = fields.Integer(metadata={"description": "Locked by a consumer, not yet acked"})
    acked = fields.Integer(metadata={"description": "Acked and not yet cleaned up"})
    dlq = fields.Integer(metadata={"description": "Dead letters"})
    waiting = fields.Integer(
        metadata=extension("Behind an earlier message with the same ordering key (not counted as available)")
    )


class OutcomeSchema(ma.Schema):
    id = fields.String(metadata={"description": "The message id or ack_id, as sent"})
    status = fields.String(
        metadata={
            "description": "What happened: acked, nacked or extended; stale (that delivery is no longer"
            " the current one); not_found (no such message in the subscription)",
            "enum": ["acked", "nacked", "extended", "stale", "not_found"],
        }
    )


class OutcomeListSchema(ma.Schema):
    data = fields.List(fields.Nested(OutcomeSchema))


class ReceiptSchema(ma.Schema):
    id = fields.UUID(metadata={"description": "The message's id, as every subscription will deliver it"})
    subscriptions = fields.Integer(metadata={"description": "How many subscriptions got a copy"})


class ReceiptListSchema(ma.Schema):
    data = fields.List(fields.Nested(ReceiptSchema))


class StatusSchema(ma.Schema):
    status = fields.String()


# Bodies that are bare JSON arrays. marshmallow schemas describe objects, so these are checked
# by blueprints.load_json_array and documented with the OpenAPI fragments below.
MESSAGE_IDS_BODY = {
    "type": "array",
    "items": {
        "anyOf": [
            {"type": "string", "format": "uuid", "description": "A message id: its current delivery"},
            {
                "type": "string",
                "pattern": f"^{UUID_PATTERN}:[0-9]{{1,9}}$",
                "description": f"An ack_id: that delivery only ({EXTENSION})",
            },
        ]
    },
    "maxItems": MAX_BATCH_IDS,
}
PUBLISH_BODY = {
    "type": "array",
    "items": {"type": "object", "additionalProperties": True},
    "maxItems": MAX_PUBLISH_BATCH,
    "example": [{"event": "user.created", "country": "BR"}],
}


class StrictBoolean(fields.Boolean):
    """true or false, as documented: not 0, 1, "off" or the other spellings marshmallow accepts
    (its truthy/falsy sets cannot exclude 1 and 0, which equal True and False)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


def valid_scopes(value: str) -> None:
    try:
        normalize_scopes(value)
    except InvalidInput as error:
        raise ma.ValidationError(error.detail.removeprefix("scopes: ")) from None


class ClientCreateSchema(ma.Schema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=255))
    scopes = fields.String(
        required=True,
        validate=valid_scopes,
        metadata={
            "description": "Space-separated scopes",
            "example": "topics:publish:orders",
            "pattern": SCOPES_PATTERN,
        },
    )
    is_active = StrictBoolean(load_default=True)


class ClientUpdateSchema(ma.Schema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=255))
    scopes = fields.String(required=True, validate=valid_scopes, metadata={"pattern": SCOPES_PATTERN})
    is_active = StrictBoolean(required=True)


class ClientSchema(ma.Schema):
    id = fields.UUID()
    name = fields.String()
    scopes = fields.String()
    is_active = fields.Boolean()
    token_version = fields.Integer()
    created_at = fields.DateTime()
    updated_at = fields.DateTime()


class ClientListSchema(ma.Schema):
    data = fields.List(fields.Nested(ClientSchema))


class ClientSecretSchema(ma.Schema):
    id = fields.UUID()
    secret = fields.String(metadata={"description": "Shown once: only its digest is stored"})


class TokenRequestSchema(ma.Schema):
    client_id = fields.String(required=True)
    client_secret = fields.String(required=True)
    grant_type = fields.String(metadata={"description": "client_credentials (form requests)"})


class TokenSchema(ma.Schema):
    access_token = fields.String()
    token_type = fields.String(metadata={"example": "Bearer"})
    expires_in = fields.Integer(metadata={"description": "Seconds"})
    scope = fields.String()


class SubscriptionUpdateSchema(SubscriptionCreateSchema):
    """PATCH: creation's fields and checks, each optional (load it with partial=True); null sets
    the default again, as at creation. A subscription keeps its id and its topic."""

    class Meta:
        exclude = ("id", "topic_id", "ordering_key")

    @ma.pre_load
    def refuse_fixed_fields(self, data, **kwargs):
        if isinstance(data, dict):
            for field in ("id", "topic_id", "ordering_key"):
                if field in data:
                    raise ma.ValidationError(
                        "cannot change: create a new subscription instead", field_name=field
                    )
        return data


class RedriveQuerySchema(ma.Schema):
    limit = fields.Integer(
        validate=validate.Range(min=1, max=2**31 - 1),
        metadata=extension(
            "Redrive only this many dead letters, the first in the DLQ's order (default: all)"
        ),
    )


class PurgeQuerySchema(ma.Schema):
    before = fields.AwareDateTime(
        format="iso",
        metadata=extension(
            "Purge only the messages published before this time (RFC 3339, with its offset; default:"
            " all of the backlog)"
        ),
    )


class CountSchema(ma.Schema):
    count = fields.Integer(
        metadata=extension("How many messages the operation moved or removed"), required=True
    )
