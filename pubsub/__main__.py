"""`pubsub ...` (or `python -m pubsub ...`): the `flask pubsub` commands and `flask db`, from any directory.

The console script that `pip install -e .` (and `make install`) puts beside `flask`, for cron, systemd
and shells outside the checkout: `pubsub serve`, `pubsub cleanup-acked`, `pubsub db upgrade`. The app
comes from create_app() as in wsgi.py, whatever the working directory and FLASK_APP say; the
migrations and wsgi.py are found beside the package, so the install must be editable (a checkout).
"""

import os
import sys

import click
from flask import Flask
from flask.cli import ScriptInfo
from flask_migrate.cli import db as migrations

from pubsub import MIGRATIONS_DIR, create_app
from pubsub.commands import cli
from pubsub.commands.server import PROJECT_ROOT
from pubsub.settings import ConfigError


def load_app() -> Flask:
    try:
        return create_app()
    except ConfigError as error:
        sys.exit(f"pubsub: {error}")


class PubSubScript(click.Group):
    """The `pubsub` group of `flask`, with `db` beside it, bound to create_app()."""

    def make_context(self, info_name, args, parent=None, **extra):
        # with_appcontext loads the app from the ScriptInfo in the context, as under `flask`.
        extra.setdefault("obj", ScriptInfo(create_app=load_app, set_debug_flag=False))
        return super().make_context(info_name, args, parent=parent, **extra)


script = PubSubScript(
    "pubsub",
    help=f"{cli.help} The commands of `flask pubsub`, and `db` (`flask db`), from any directory.",
    commands={**cli.commands, "db": migrations},
)


def main() -> None:
    # A non-editable install copies the package alone: gunicorn's wsgi.py and the migrations stay behind.
    if not (os.path.isfile(os.path.join(PROJECT_ROOT, "wsgi.py")) and os.path.isdir(MIGRATIONS_DIR)):
        sys.exit(f"pubsub: no checkout around {PROJECT_ROOT}: install it with `pip install -e <checkout>`")
    script.main(prog_name="pubsub")


if __name__ == "__main__":
    main()
