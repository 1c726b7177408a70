"""The WSGI entry point: gunicorn serves wsgi:app, and `flask` finds it unaided."""

import sys

from pubsub import create_app
from pubsub.settings import ConfigError

try:
    app = create_app()
except ConfigError as error:
    sys.exit(f"pubsub: {error}")
