"""gunicorn settings that are not API_* command-line flags (see commands/server.py)."""

from prometheus_client import multiprocess

worker_class = "gthread"
# Workers stay up through a slow database; gunicorn restarts one only if it truly hangs.
timeout = 60
graceful_timeout = 20
accesslog = None


def child_exit(server, worker):
    # Without this, a replaced worker's gauges would be summed into /metrics forever.
    multiprocess.mark_process_dead(worker.pid)
