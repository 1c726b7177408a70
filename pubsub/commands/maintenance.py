"""Cleanup jobs, meant for cron: each prints what it did."""

import click
from flask import current_app
from flask.cli import with_appcontext

from pubsub import db, idempotency, messages


@click.command("cleanup-acked")
@click.option(
    "--older-than",
    type=click.IntRange(min=0),
    default=None,
    help="Seconds (default: CLEANUP_ACKED_MESSAGES_OLDER_THAN_SECONDS).",
)
@with_appcontext
def cleanup_acked(older_than: int | None) -> None:
    """Delete acked messages older than the retention."""
    if older_than is None:
        older_than = current_app.config["CLEANUP_ACKED_MESSAGES_OLDER_THAN_SECONDS"]
    with db.begin() as conn, db.statement_timeout_lifted(conn):  # one statement over every old acked message
        count = messages.delete_acked(conn, older_than)
    click.echo(f"deleted {count} acked messages older than {older_than}s")


@click.command("cleanup-stuck")
@click.option(
    "--lock-timeout",
    type=click.IntRange(min=1),
    default=None,
    help="Also release messages locked longer than this many seconds, even if their deadline was extended.",
)
@with_appcontext
def cleanup_stuck(lock_timeout: int | None) -> None:
    """Release deliveries past their ack deadline; dead-letter those out of attempts.

    The next consume claims expired deliveries by itself; this keeps the metrics honest for
    subscriptions nobody consumes."""
    with db.begin() as conn, db.statement_timeout_lifted(conn):  # one statement over every expired delivery
        released, dead = messages.release_stuck(conn, lock_timeout)
    after = "past their ack deadline" + (f" or locked over {lock_timeout}s" if lock_timeout else "")
    click.echo(f"released {released} stuck messages, moved {dead} to the DLQ ({after})")


@click.command("cleanup-idempotency-keys")
@click.option(
    "--older-than",
    type=click.IntRange(min=0),
    default=None,
    help="Seconds (default: PUBLISH_IDEMPOTENCY_SECONDS).",
)
@with_appcontext
def cleanup_idempotency_keys(older_than: int | None) -> None:
    """Forget the Idempotency-Keys of publishes older than the window."""
    if older_than is None:
        older_than = current_app.config["PUBLISH_IDEMPOTENCY_SECONDS"]
    with db.begin() as conn:
        cutoff = idempotency.key_cutoff(conn, older_than)
    total = 0
    while True:  # a transaction per chunk: no long lock on a large backlog of keys
        with db.begin() as conn:
            count = idempotency.delete_publish_keys(conn, cutoff)
        total += count
        if count < idempotency.DELETE_CHUNK:
            break
    click.echo(f"deleted {total} idempotency keys older than {older_than}s")
