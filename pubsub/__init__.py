"""pubsub: a publish/subscribe messaging service, a Flask REST API over PostgreSQL."""

import os
from typing import Any

from flask import Flask
from flask_migrate import Migrate
from flask_smorest import Api

from pubsub import auth, encoding, errors, observability, settings
from pubsub.schemas import ErrorSchema

API_DESCRIPTION = """Publish JSON messages to topics; every subscription receives its own
filtered copy; consumers pull batches and ack or nack them; retries back off exponentially and
failures end in a dead-letter queue. Wire-compatible with fastpubsub."""


MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "migrations")


class PubSubApi(Api):
    # Every error, documented or raised, is {"detail": ...}; the handlers live in errors.py.
    ERROR_SCHEMA = ErrorSchema

    def _register_error_handlers(self):
        errors.register_error_handlers(self._app)


def create_app(overrides: dict[str, Any] | None = None) -> Flask:
    # PUBSUB_INSTANCE_PATH moves instance/ (config.py, the embedded database) elsewhere.
    instance_path = os.environ.get("PUBSUB_INSTANCE_PATH")
    app = Flask(__name__, instance_path=os.path.abspath(instance_path) if instance_path else None)
    settings.load_config(app, overrides)
    app.config.update(
        API_TITLE="pubsub",
        API_VERSION="1.0.0",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL="/static/swagger-ui/",
        OPENAPI_REDOC_PATH="redoc",
        OPENAPI_REDOC_URL="/static/redoc/redoc.standalone.js",
        API_SPEC_OPTIONS={"info": {"description": API_DESCRIPTION}},
    )
    # env.py uses our engine and tables.metadata, so Flask-Migrate needs no Flask-SQLAlchemy.
    Migrate(directory=MIGRATIONS_DIR).init_app(app)
    encoding.init_app(app)
    from pubsub.blueprints import clients, health, oauth, subscriptions, topics

    # Inside the request observer, so that direct publishes and consumes get a request id and
    # are counted.
    app.wsgi_app = subscriptions.DirectConsume(app, topics.DirectPublish(app, app.wsgi_app))
    observability.init_app(app)
    api = PubSubApi(app)
    auth.init_app(app, api)

    for module in (topics, subscriptions, clients, oauth, health):
        api.register_blueprint(module.blp)

    from pubsub.blueprints import console

    console.init_app(app)  # a plain blueprint: no part of the API or its OpenAPI document

    from pubsub.commands import cli

    app.cli.add_command(cli)
    return app
