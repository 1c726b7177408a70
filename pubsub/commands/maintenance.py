"""Cleanup jobs, meant for cron: each prints what it did."""

import click
from flask import current_app
from flask.cli import with_appcontext

from pubsub import db, messages


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
    with db.begin() as conn:
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
    with db.begin() as conn:
        released, dead = messages.release_stuck(conn, lock_timeout)
    after = "past their ack deadline" + (f" or locked over {lock_timeout}s" if lock_timeout else "")
    click.echo(f"released {released} stuck messages, moved {dead} to the DLQ ({after})")
