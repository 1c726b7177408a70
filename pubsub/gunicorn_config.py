"""gunicorn settings that are not API_* command-line flags (see commands/server.py)."""

import os
import signal
import tempfile

from gunicorn.glogging import Logger
from prometheus_client import multiprocess

# gunicorn reads every name here that matches one of its settings, and `config` does: hence the alias.
from pubsub import config as _defaults
from pubsub.listener import SHARED_WAKES_ENV, SharedWakes

# gthread, serving a kept-alive connection's next request in the thread that answered the last one
# (pubsub/worker.py).
worker_class = "pubsub.worker.ThreadWorker"
# Workers stay up through a slow database; gunicorn restarts one only if it truly hangs.
timeout = 60
graceful_timeout = 20
accesslog = None
# gunicorn's control socket is one fixed path per user ($HOME/.gunicorn/gunicorn.ctl): a second
# server on the host would take it over, and nothing of ours uses it.
control_socket_disable = True


class NoAccessLogLogger(Logger):
    """gunicorn's logger without the access log, which the app does not keep (Prometheus counts
    requests): with logconfig_dict set, gunicorn would otherwise build the access-log fields of
    every request and hand them to a logger that drops them."""

    def access(self, resp, req, environ, request_time):
        pass


logger_class = NoAccessLogLogger

# gunicorn's own events (workers booting, exiting, timing out) in the app's format: with
# LOG_FORMAT=json, stderr stays one JSON object per line. `flask pubsub serve` passes both settings.
_level = os.environ.get("PUBSUB_LOG_LEVEL", _defaults.LOG_LEVEL).upper()
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": _level, "handlers": ["stderr"]},
    "loggers": {"gunicorn.error": {"level": _level, "handlers": [], "propagate": True}},
    "handlers": {
        "stderr": {
            "()": "pubsub.observability.log_handler",
            "fmt": os.environ.get("PUBSUB_LOG_FORMAT", _defaults.LOG_FORMAT),
        }
    },
}


def on_starting(server):
    # The workers' shared table of long-poll notifications (pubsub.listener.SharedWakes): made
    # here, before they fork, so that they all open the same file.
    fd, path = tempfile.mkstemp(prefix="pubsub-wakes-")
    os.close(fd)
    SharedWakes.create(path)
    os.environ[SHARED_WAKES_ENV] = path


def on_exit(server):
    path = os.environ.pop(SHARED_WAKES_ENV, None)
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def post_worker_init(worker):
    # Quick stops (SIGINT: Ctrl-C reaches every process of the terminal's group; SIGQUIT: what the
    # master sends on SIGINT) become graceful ones. gunicorn's gthread handle_quit shuts the thread
    # pool down inside the signal handler: when the signal lands while the main thread is in
    # pool.submit(), holding the pool's lock, the worker deadlocks until the master kills it
    # graceful_timeout later. handle_exit only flags the loop to stop: in-flight requests finish.
    signal.signal(signal.SIGINT, worker.handle_exit)
    signal.signal(signal.SIGQUIT, worker.handle_exit)


def child_exit(server, worker):
    # Without this, a replaced worker's gauges would be summed into /metrics forever.
    multiprocess.mark_process_dead(worker.pid)
