"""Every table, constraint and index; Alembic's autogenerate and the migration test read this.

Design notes (the performance issue holds these to numbers):

* ``subscription_messages`` is the claim path. It holds only what is still owed to a consumer:
  available, delivered (locked) and dead-lettered copies. Acking deletes the row, so the table
  stays as small as the backlog however long the service runs.
* Acks are remembered in ``acked_messages`` as one row per ack *statement* (subscription, time,
  how many), insert-only: no hot counter row that concurrent ackers would queue on, and the
  ``acked`` metric sums a few rows per ack call instead of scanning every message ever acked.
  ``cleanup-acked`` deletes rows older than the retention.
* Payloads are *copied* into each matching subscription rather than stored once and referenced.
  Fan-out is usually to a handful of subscriptions and payloads are small, while a shared table
  would need a join on every claim and a reference count or a garbage-collection pass on every
  ack (each copy is acked independently). Copies make ack a single-row delete and claim a
  single-table read. A message's copies share its id (the key is (id, subscription_id)), so a
  publish receipt names the id that every subscription delivers. Nothing indexes the payload:
  filters are evaluated once, at publish time.
* ``subscription_messages`` has no foreign key to ``subscriptions``: the per-row RI trigger and
  its row lock would run for every message published. Publish instead takes one FOR KEY SHARE
  lock per matching subscription per statement, and deletes remove the messages in the same
  transaction as the subscription, so no orphan can be left behind.
"""

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Message states; small integers keep the claim index narrow.
AVAILABLE = 0
DELIVERED = 1
DLQ = 2
# Ordering keys: behind an earlier message with the same key, claimable once that one is acked or
# dead-lettered (migration 0008's triggers keep this state; nothing else writes it).
WAITING = 3

MIN_ACK_DEADLINE_SECONDS = 10
MAX_ACK_DEADLINE_SECONDS = 600

topics = sa.Table(
    "topics",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

subscriptions = sa.Table(
    "subscriptions",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column(
        "topic_id",
        sa.Text,
        sa.ForeignKey("topics.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    # Stored as given ({} and null both mean "no filter") so it can be echoed back verbatim.
    sa.Column("filter", JSONB(none_as_null=True), nullable=True),
    sa.Column("max_delivery_attempts", sa.Integer, nullable=False),
    sa.Column("backoff_min_seconds", sa.Integer, nullable=False),
    sa.Column("backoff_max_seconds", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    # How long a consumer has to ack a delivery before it is claimable again (an extension).
    sa.Column("ack_deadline_seconds", sa.Integer, nullable=False),
    # Until then some process has long-poll consumers waiting on this subscription, so publishes
    # NOTIFY it. Kept off otherwise: a NOTIFY serializes the instance's notifying commits.
    sa.Column("notify_until", sa.DateTime(timezone=True), nullable=True),
    # Ordering keys (an extension): the top-level payload field whose value orders this
    # subscription's messages; NULL for none. Fixed at creation.
    sa.Column("ordering_key", sa.Text, nullable=True),
    sa.CheckConstraint("backoff_min_seconds <= backoff_max_seconds", name="backoff_range"),
    sa.CheckConstraint(
        f"ack_deadline_seconds BETWEEN {MIN_ACK_DEADLINE_SECONDS} AND {MAX_ACK_DEADLINE_SECONDS}",
        name="ack_deadline_range",
    ),
)

subscription_messages = sa.Table(
    "subscription_messages",
    metadata,
    sa.Column("subscription_id", sa.Text, nullable=False),
    # One id per published message, shared by its copies in every subscription.
    sa.Column("id", UUID(as_uuid=True), nullable=False),
    # Publish order, for ties in available_at and a stable total order in DLQ listings.
    sa.Column("seq", sa.BigInteger, sa.Identity(always=True), nullable=False),
    sa.Column("payload", JSONB, nullable=False),
    sa.Column("state", sa.SmallInteger, nullable=False, server_default=sa.text(str(AVAILABLE))),
    sa.Column("delivery_attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    # When the row is next claimable: for an available message, when its backoff ends; for a
    # delivered one, its ack deadline (an expired lease is claimed again by the next consume);
    # for a dead letter, when it died.
    sa.Column("available_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("locked_by", sa.Text, nullable=True),
    sa.Column("locked_at", sa.DateTime(timezone=True), nullable=True),
    # Numbers the deliveries of this copy: a lease token (ack_id) names one, so an ack from a
    # consumer whose lease expired cannot settle the message's next delivery.
    sa.Column("lease", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    # In a subscription with an ordering key, the MD5 of the key field's JSON value, as a uuid
    # (fixed width, whatever the value's size); NULL for messages without the field and in
    # unordered subscriptions.
    sa.Column("ordering_key", UUID(as_uuid=True), nullable=True),
    sa.CheckConstraint(f"state IN ({AVAILABLE}, {DELIVERED}, {DLQ}, {WAITING})", name="state"),
    # Led by id, so that it serves lookups by id (which name both columns) and nothing else: led
    # by subscription_id, it could serve a claim too, read the whole backlog and sort it, and did
    # whenever the statistics estimated the subscription at one row (migration 0006).
    sa.PrimaryKeyConstraint("id", "subscription_id"),
    # Claim: WHERE subscription_id = ? AND state IN (0, 1) AND available_at <= now()
    # ORDER BY available_at, seq. Also serves the metrics counts and the DLQ listing.
    sa.Index("ix_subscription_messages_claim", "subscription_id", "state", "available_at", "seq"),
    # cleanup-stuck finds expired locks across all subscriptions without scanning the backlog.
    # Only delivered messages have a lock time. Keyed on that rather than on `state`, so that no
    # claim (whose conditions name the state, never locked_at) can take it for a short cut when
    # the statistics of `state` lag (migration 0005).
    sa.Index(
        "ix_subscription_messages_locked_at",
        "locked_at",
        postgresql_where=sa.text("locked_at IS NOT NULL"),
    ),
    # Ordering keys: a key's head (available or delivered) and the messages waiting behind it, in
    # publish order, for the triggers that make the next one claimable. Only keyed messages enter.
    # Led by the key (an MD5), not the subscription: no claim can take it (see the primary key).
    sa.Index(
        "ix_subscription_messages_ordering",
        "ordering_key",
        "subscription_id",
        "state",
        "seq",
        postgresql_where=sa.text("ordering_key IS NOT NULL"),
    ),
)

acked_messages = sa.Table(
    "acked_messages",
    metadata,
    # One row per ack statement; rows are never addressed one by one, so no primary key.
    sa.Column("subscription_id", sa.Text, nullable=False),
    sa.Column("acked_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("count", sa.Integer, nullable=False),
    # count is included so that the acked metric is an index-only scan, whatever the plan.
    sa.Index(
        "ix_acked_messages_subscription_id_acked_at",
        "subscription_id",
        "acked_at",
        postgresql_include=["count"],
    ),
    # cleanup-acked deletes by age across all subscriptions.
    sa.Index("ix_acked_messages_acked_at", "acked_at"),
)

clients = sa.Table(
    "clients",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=sa.func.gen_random_uuid()),
    sa.Column("name", sa.Text, nullable=False),
    # Space-separated, as in tokens: "*", "topics:read", "topics:publish:orders", ...
    sa.Column("scopes", sa.Text, nullable=False),
    # SHA-256 of the secret. Secrets are 256 random bits made by the server, so a slow KDF adds
    # no protection and would make the token endpoint a CPU sink.
    sa.Column("secret_hash", sa.Text, nullable=False),
    sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.true()),
    # In every token; bumped by each update, which invalidates the tokens issued before.
    sa.Column("token_version", sa.Integer, nullable=False, server_default=sa.text("1")),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

publish_keys = sa.Table(
    "publish_keys",
    metadata,
    # A publish sent with an Idempotency-Key (an extension): its key, per topic, and its answer,
    # written in the publish's own transaction, so that a repeat finds both the messages and the
    # record or neither. No foreign key to topics, which would make every TRUNCATE of topics name
    # this table too: a record older than its topic (deleted and created again since) counts as
    # expired (idempotency.claim_publish_key), and the cleanup deletes it after the window.
    sa.Column("topic_id", sa.Text, nullable=False),
    sa.Column("key", sa.Text, nullable=False),
    # SHA-256 of the request body: a repeat with another body is refused (422).
    sa.Column("body_hash", sa.LargeBinary, nullable=False),
    # The receipts of the first publish, in request order: each message's id and how many
    # subscriptions got a copy.
    sa.Column("message_ids", ARRAY(UUID(as_uuid=True)), nullable=False, server_default=sa.text("'{}'")),
    sa.Column("subscriptions", ARRAY(sa.Integer), nullable=False, server_default=sa.text("'{}'")),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.PrimaryKeyConstraint("topic_id", "key"),
    # cleanup-idempotency-keys reads only the records it deletes.
    sa.Index("ix_publish_keys_created_at", "created_at"),
)
