"""Connecting to the store and keeping its tables at the latest migration.

Any SQLAlchemy URL works; SQLite (the default, one file in the workspace) and PostgreSQL
(psycopg 3) are the two the project tests. Migrations ship inside the package, so no
``alembic.ini`` is needed at run time.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import URL, ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from recsys.errors import ReadOnlyStoreError, RunLockedError, StoreError, StoreUnavailableError

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Seconds a SQLite writer waits for another writer's lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 60
# Execution option: "IMMEDIATE" makes the next SQLite transaction take the write lock at
# BEGIN, so two writers queue on the busy timeout instead of failing when a read-then-write
# transaction tries to upgrade its lock.
SQLITE_BEGIN = "recsys_sqlite_begin"
# Keys of the PostgreSQL advisory locks that serialise short critical sections (SQLite
# serialises every write transaction begun IMMEDIATE): migrations, and publishing a model
# version (two trainings finishing at once must leave one current version).
_MIGRATION_LOCK_KEY = 0x7265637379730001
PUBLISH_LOCK_KEY = 0x7265637379730002
_VERSION_TABLE = "alembic_version"


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that takes SQLite's write lock at BEGIN (no effect on PostgreSQL).

    A read-then-write transaction that starts as a reader can fail at once with "database is
    locked" when another process writes first; taking the write lock up front makes
    concurrent writers queue on the busy timeout instead.
    """
    with engine.connect() as conn:
        conn.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
        with conn.begin():
            yield conn


@contextmanager
def serialized_transaction(engine: Engine, key: int) -> Iterator[Connection]:
    """A write transaction that no other one with the same ``key`` runs beside.

    PostgreSQL takes the advisory lock ``key`` until the transaction ends; SQLite already
    runs one write transaction at a time (``write_transaction``).
    """
    with write_transaction(engine) as conn:
        wait_for_transaction_lock(conn, key)
        yield conn


def wait_for_transaction_lock(conn: Connection, key: int) -> None:
    """On PostgreSQL, take the advisory lock ``key`` until ``conn``'s transaction ends, waiting
    for any transaction that holds it; nothing on SQLite (one writer at a time already)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


# Seconds a migration on PostgreSQL waits for a table lock before it gives up (lock_timeout).
MIGRATION_LOCK_TIMEOUT_S = 10.0
_PG_LOCK_NOT_AVAILABLE = "55P03"
# What a write meets on a server whose disk is full, or on a read-only one (a hot standby,
# default_transaction_read_only): the operator's to fix.
_PG_DISK_FULL = "53100"
_PG_READ_ONLY = "25006"
_PG_NO_PRIVILEGE = "42501"  # insufficient_privilege: a role without a GRANT, or without TEMP
_PG_TIMEOUT = "57014"  # query_canceled: statement_timeout

# Seconds libpq waits for a PostgreSQL connection unless the URL (?connect_timeout=N) or
# PGCONNECT_TIMEOUT says otherwise; a server that is up answers in milliseconds.
PG_CONNECT_TIMEOUT_S = 10

# In a URL SQLAlchemy cannot parse, the password is taken to run from the first ':' not
# followed by '/' (so not the scheme's) to the last '@'; masking too much beats showing it.
_TEXT_PASSWORD = re.compile(r":(?!/)(.*)@")


def mask_url(url: str | URL) -> str:
    """The URL as text with its password replaced by ``***`` (safe for messages and logs).

    A URL that does not parse (a typo'd scheme separator, a port that is not a number) is
    shown as typed, with whatever stands where a password would stand masked.
    """
    try:
        parsed = make_url(url)
        if "password" in parsed.query:  # libpq takes ?password=... too
            parsed = parsed.update_query_dict({"password": "***"})
        return parsed.render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return _TEXT_PASSWORD.sub(":***@", str(url), count=1)


def shown_store(url: str | URL) -> str:
    """The store as a message names it: the URL recsys connects to (``postgresql://`` read as
    ``postgresql+psycopg://``) with its password masked, and a relative SQLite file also by
    its absolute path (a scheduler runs the job in a temporary folder: ``sqlite:///x.db`` there
    is another store than the operator's)."""
    try:
        parsed = _normalise(url)
    except StoreError:
        return mask_url(url)
    shown = mask_url(parsed)
    path = sqlite_file(parsed)
    return shown if path is None or path.is_absolute() else f"{shown} ({path.absolute()})"


def _normalise(url: str | URL) -> URL:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        raise StoreError(
            f"store URL {mask_url(url)!r} is not a valid SQLAlchemy URL ({exc}); expected "
            "dialect[+driver]://user:password@host[:port]/database or sqlite:///path/to/file.db"
        ) from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    try:
        is_async = parsed.get_dialect().is_async
    except (ArgumentError, ImportError):  # an unknown dialect or driver: create_engine_for names it
        is_async = False
    if is_async:
        # The store is used synchronously: an asyncio driver failed at connect (greenlet), exit 2.
        backend = parsed.get_backend_name()
        sync = {"postgresql": "postgresql+psycopg://", "sqlite": "sqlite:///"}.get(backend, f"{backend}://")
        raise StoreError(f"store URL {mask_url(parsed)!r} names the asyncio driver {parsed.drivername!r}, which recsys "
                         f"cannot use: use a synchronous one, e.g. {sync}...")
    return parsed


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    # Take BEGIN away from the sqlite3 module (it would skip it before SELECT and DDL), so
    # that transactions, transactional DDL and savepoints behave as on PostgreSQL.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA foreign_keys = ON")
        _use_wal(cursor)
        # In WAL mode NORMAL is corruption-safe; a power cut may lose the last commits only.
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


def _use_wal(cursor) -> None:
    """Put the database file in WAL mode, waiting out other connections doing the same.

    Switching the journal mode does not wait on the busy timeout: when several processes open a
    new store at once, all but one get "database is locked" at once. The mode is a property of
    the file, so a connection that finds it already set changes nothing; the others retry until
    the busy timeout has passed.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _sqlite_on_begin(conn: Connection) -> None:
    options = conn.get_execution_options()
    if options.get("isolation_level") == "AUTOCOMMIT":
        return
    mode = options.get(SQLITE_BEGIN, "DEFERRED")
    if mode not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
        raise StoreError(f"execution option {SQLITE_BEGIN} has {mode!r}, expected DEFERRED, IMMEDIATE or EXCLUSIVE")
    conn.exec_driver_sql(f"BEGIN {mode}")


# What a store that fails, rather than our code, raises: a lost connection, a full or read-only
# disk (StoreError), a locked SQLite file or a server timeout (OperationalError). Steps that may
# fail without failing the command (after its work is committed) catch these and nothing wider:
# an IntegrityError or a StatementError wrapping a TypeError is a bug, and must surface.
STORE_FAILURES = (StoreError, OperationalError)


def _on_error(dialect: str, shown: str, context: ExceptionContext) -> None:
    orig = context.original_exception
    if not isinstance(orig, Exception):
        # Ctrl-C or SIGTERM during a statement: SQLAlchemy marks it a disconnect (the connection
        # is left mid-statement and is dropped), but it is the interrupt that must go on up.
        return
    if context.is_pre_ping:
        # The pool found an idle connection dead (a server restart, a killed backend) and
        # replaces it: the command never sees it, unless the new connection fails too.
        return
    if context.is_disconnect:
        # Raised from the hook, SQLAlchemy still invalidates the connection and the pool.
        raise lost_connection(shown, orig) from orig
    if dialect == "postgresql" and context.connection is None and context.statement is None:
        # A connection that could not be opened (the server down or refusing connections): in
        # the middle of a command as at its start, not an internal error.
        raise StoreUnavailableError(f"cannot reach the store at {shown}: {first_line(orig)}") from orig
    error = _store_error(dialect, shown, orig)
    if error is not None:
        raise error from orig


def lost_connection(shown: str, orig: BaseException | None) -> StoreUnavailableError:
    """The error of a connection lost mid-command, one line naming the store (``shown``, the
    password masked) instead of the driver's text with the statement and its parameters."""
    return StoreUnavailableError(
        f"lost the connection to the store at {shown} ({first_line(orig) or type(orig).__name__}): what was "
        "committed is kept; run the command again once the store answers (a nightly run resumes where it stopped)"
    )


def first_line(orig: BaseException | None) -> str:
    """The first line of an error's text (SQLAlchemy's adds the SQL, its parameters and a link)."""
    text = str(orig).strip() if orig is not None else ""
    return text.splitlines()[0] if text else ""


def _store_error(dialect: str, shown: str, orig: BaseException | None) -> StoreError | None:
    """A store that cannot take a write (read-only, full disk) as one line; else None."""
    return _sqlite_store_error(shown, orig) if dialect == "sqlite" else _pg_store_error(shown, orig)


def _pg_store_error(shown: str, orig: BaseException | None) -> StoreError | None:
    """PostgreSQL's two errors that the operator fixes: the server's disk full (53100) and a
    read-only server or transaction (25006). Else None."""
    state = getattr(orig, "sqlstate", None)
    first = first_line(orig)
    if state == _PG_DISK_FULL:
        return StoreError(f"the store at {shown} cannot be written: the server's disk is full ({first})")
    if state == _PG_READ_ONLY:
        return ReadOnlyStoreError(f"the store at {shown} is read-only ({first}): recsys must be able to write to it")
    return None


def server_refusal(exc: BaseException, shown: str | None = None) -> str | None:
    """One line for a PostgreSQL error that escaped every command's own handling and is the
    operator's to fix, not a bug (the CLI's last resort: exit 1, not 2; a run's message): a
    missing privilege, a statement_timeout or lock_timeout. ``shown``: the store's masked URL,
    named in the line. Else None. Not raised from the engine's hook: a migration reads
    lock_not_available itself, and says what to do."""
    if not isinstance(exc, DBAPIError):
        return None
    state, first = getattr(exc.orig, "sqlstate", None), first_line(exc.orig)
    store = "the store" if shown is None else f"the store at {shown}"
    if state == _PG_NO_PRIVILEGE:
        return (f"{store} refused this role ({first}): grant it the privilege (docs/operations.md, "
                "\"PostgreSQL roles\")")
    if state in (_PG_TIMEOUT, _PG_LOCK_NOT_AVAILABLE):
        return (f"{store} cancelled a statement ({first}): raise the role's statement_timeout or lock_timeout, "
                "or run again once what holds the lock is done")
    return None


def failure_message(exc: BaseException, engine: Engine) -> str:
    """A failed run's ``runs.message``: the error's type and text ("Terminated" alone for a
    SIGTERM, not "Terminated: "), or for the server's refusals the CLI's one line (not the
    driver's SQL and parameters); at most 2000 characters."""
    refusal = server_refusal(exc, shown_store(engine.url))
    if refusal is not None:
        return refusal[:2000]
    text = str(exc)
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:2000]


def _sqlite_store_error(shown: str, orig: BaseException | None) -> StoreError | None:
    """The operator's to fix, so one line and not a traceback: a write to a read-only file, or to
    a file whose folder is read-only (WAL mode creates -wal and -shm files beside it); a full
    disk (nothing of the failed transaction is kept, the rest of the store is). Else None."""
    code = getattr(orig, "sqlite_errorcode", None)
    if not isinstance(orig, sqlite3.OperationalError) or code is None:
        return None
    if code & 0xFF == sqlite3.SQLITE_READONLY:
        return ReadOnlyStoreError(
            f"the store at {shown} is read-only ({orig}): recsys must be able to write the file "
            "and create its -wal and -shm files in the same folder"
        )
    if code & 0xFF == sqlite3.SQLITE_FULL:
        return StoreError(f"the store at {shown} cannot be written: its disk is full ({orig})")
    return None


def _sqlite_open_hint(url: URL) -> str:
    """Why a SQLite file may fail to open ("unable to open database file", "disk I/O error"),
    when its folder's file system says so: " (... is read-only)", " (... is full)", or ""."""
    path = sqlite_file(url)
    if path is None:
        return ""
    folder = next((f for f in path.parents if f.is_dir()), None)
    if folder is None:
        return ""
    try:
        status = os.statvfs(folder)
    except OSError:
        return ""
    if status.f_flag & os.ST_RDONLY:
        return f" (the file system of {folder} is read-only)"
    if status.f_bavail == 0:
        return f" (the disk of {folder} is full)"
    return ""


@contextmanager
def driver_errors(conn: Connection, statement: str, params=None) -> Iterator[None]:
    """Raise the driver's errors as SQLAlchemy raises them for its own statements (an
    ``IntegrityError`` for a broken key, and so on, naming the statement), for code that runs
    statements on the driver's cursor to skip SQLAlchemy's per-row work."""
    dbapi = conn.dialect.loaded_dbapi
    try:
        yield
    except dbapi.Error as exc:
        # The store's handle_error hook does not see these: a lost connection, a read-only or full
        # store are told as they are for SQLAlchemy's own statements.
        if not conn.invalidated and conn.dialect.is_disconnect(exc, conn.connection.dbapi_connection, None):
            conn.invalidate(exc)  # as SQLAlchemy does: the pool must not hand the dead connection out again
            raise lost_connection(shown_store(conn.engine.url), exc) from exc
        error = _store_error(conn.dialect.name, shown_store(conn.engine.url), exc)
        if error is not None:
            raise error from exc
        raise DBAPIError.instance(statement, params, exc, dbapi.Error) from exc


def create_engine_for(url: str) -> Engine:
    """An engine for the store at ``url``, checked by opening one connection.

    SQLite connections run in WAL mode with foreign keys on, ``synchronous=NORMAL`` and a
    busy timeout; ``postgresql://`` URLs use psycopg 3.

    Args:
        url: any SQLAlchemy URL, e.g. ``sqlite:///workspace/recsys.db`` or
            ``postgresql://user:pw@host:5432/recsys``.

    Returns:
        The engine (pooled connections).

    Raises:
        StoreError: the URL is malformed, its driver is missing, or the server or file cannot
            be reached; the message names the URL with its password masked.
    """
    parsed = _normalise(url)
    shown = shown_store(parsed)
    kwargs: dict = {}
    if parsed.get_backend_name() == "postgresql":
        kwargs["pool_pre_ping"] = True
        if "connect_timeout" not in parsed.query and "PGCONNECT_TIMEOUT" not in os.environ:
            # libpq waits for ever by default: a server behind a firewall that drops packets
            # would hang the nightly job (with its lock) until TCP gives up, minutes later.
            kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError) as exc:
        # One line: SQLAlchemy's message for a bad SQLite URL lists the valid forms on four more.
        reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise StoreError(f"cannot use the store at {shown}: {reason}") from exc
    if engine.dialect.name == "sqlite":
        check_sqlite_path(parsed)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
    if engine.dialect.name in ("sqlite", "postgresql"):
        event.listen(engine, "handle_error", lambda context: _on_error(engine.dialect.name, shown, context))
    try:
        with engine.connect():
            pass
    except StoreError:  # told by the handle_error hook (the server unreachable, a read-only file)
        engine.dispose()
        raise
    except DBAPIError as exc:
        engine.dispose()
        reason = first_line(exc.orig) if exc.orig is not None else str(exc)
        if engine.dialect.name == "sqlite" and reason in ("unable to open database file", "disk I/O error"):
            reason += _sqlite_open_hint(parsed)  # SQLite's words say neither read-only nor full
        raise StoreError(f"cannot reach the store at {shown}: {reason}") from exc
    return engine


def _quiet_alembic_import() -> None:
    # Importing alembic logs each of its plugins at INFO: under a CLI that logs at INFO that
    # would print on every command. Quieten that one logger unless the application set it.
    plugins_log = logging.getLogger("alembic.runtime.plugins")
    if plugins_log.level == logging.NOTSET:
        plugins_log.setLevel(logging.WARNING)


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic configuration of the shipped migrations (no ini file needed).

    Args:
        connection: an open connection the migration commands run on (``env.py`` takes it
            from ``config.attributes``); None for commands that only read the scripts.
    """
    _quiet_alembic_import()
    from alembic.config import Config

    config = Config()
    # ConfigParser interpolates '%': escape it in case the install path holds one.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration shipped with this version of recsys."""
    _quiet_alembic_import()
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise StoreError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def current_revision(engine: Engine) -> str | None:
    """The migration the store is at, or None for an empty (never migrated) database."""
    with engine.connect() as conn:
        return _revision_of(conn)


def _revision_of(conn: Connection) -> str | None:
    # Read alembic's table directly: a MigrationContext logs its set-up at INFO on every call,
    # and every command opens the store.
    if not sa.inspect(conn).has_table(_VERSION_TABLE):
        return None
    versions = conn.execute(sa.text(f"SELECT version_num FROM {_VERSION_TABLE}")).scalars().all()
    if len(versions) > 1:
        raise StoreError(f"the store has {len(versions)} migration heads ({', '.join(versions)}), expected one")
    return versions[0] if versions else None


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the store to ``revision`` in one transaction.

    Concurrent callers are serialised (an advisory lock on PostgreSQL, an immediate write
    lock on SQLite), so two commands starting at once cannot both create the tables.

    Raises:
        StoreError: the revision is empty or unknown, or older than the store's (this never
            downgrades), or the store is at a revision this version of recsys does not know,
            or the database holds tables that no migration created (e.g. made by hand), or a
            migration fails, or (PostgreSQL) waited ``MIGRATION_LOCK_TIMEOUT_S`` for a table
            that another session holds.
        RunLockedError: an ingest or nightly job holds its lock (``_refuse_under_a_running_job``).
    """
    _quiet_alembic_import()
    from alembic import command
    from alembic.util import CommandError

    shown = shown_store(engine.url)
    if not revision.strip():
        # Alembic fails on an empty revision with a bare AssertionError.
        raise StoreError(f"cannot migrate the store at {shown}: the target revision is empty, expected e.g. 'head'")
    try:
        with serialized_transaction(engine, _MIGRATION_LOCK_KEY) as conn:
            _refuse_unmanaged_tables(conn, shown)
            current = _revision_of(conn)
            _refuse_unknown_or_older(current, revision, shown)
            _refuse_under_a_running_job(conn, current, revision, shown)
            if conn.dialect.name == "postgresql":
                # A migration's ALTER TABLE waits for every open transaction on its table (a
                # nightly run's reads), and every later reader queues behind it: the product's
                # surfaces would hang with it. Give up instead; the transaction changes nothing.
                conn.execute(sa.text(f"SET LOCAL lock_timeout = '{round(MIGRATION_LOCK_TIMEOUT_S * 1000)}ms'"))
            command.upgrade(alembic_config(conn), revision)
    except CommandError as exc:
        raise StoreError(f"cannot migrate the store at {shown} to {revision!r}: {exc}") from exc
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == _PG_LOCK_NOT_AVAILABLE:
            raise StoreError(
                f"migrating the store at {shown} waited {MIGRATION_LOCK_TIMEOUT_S:g} s for a table another session is "
                "using (a nightly run, an ingest or a long query) and gave up; nothing was changed: run it again "
                "when that session has finished"
            ) from exc
        raise StoreError(f"migrating the store at {shown} failed: {exc.orig}") from exc


def _refuse_under_a_running_job(conn: Connection, current: str | None, target: str, shown: str) -> None:
    """Refuse to migrate while an ingest or nightly job holds its lock in the store.

    Started before an upgrade, such a job runs the previous release's code: its writes after the
    migration skip what the migration fills in (an upgrade audit saw 0006's ``first_listed_at``
    stay null for every article an older ingest stored after it). A new store, or one already at
    the target, has nothing to migrate. A lock is live by the rule ``acquire_lock`` takes one
    over by (``recsys.ranking.lock.stale_reason``).
    """
    if current is None or not sa.inspect(conn).has_table("locks"):
        return
    if current == (head_revision() if target == "head" else target):
        return
    # The locks' own rule, read here without taking a lock (imported here: the lock module sits
    # above the store's).
    from recsys.ranking.lock import DEFAULT_STALE_AFTER, LockState, stale_reason
    from recsys.store.schema import locks

    columns = {c["name"] for c in sa.inspect(conn).get_columns("locks")}
    picked = [locks.c[name] for name in ("name", "holder", "run_id", "acquired_at", "heartbeat_at") if name in columns]
    for row in conn.execute(sa.select(*picked)).mappings():
        state = LockState(row["name"], row["holder"], row.get("run_id"), row["acquired_at"], row.get("heartbeat_at"))
        if stale_reason(conn.engine, state) is not None:
            continue
        raise RunLockedError(
            f"cannot migrate the store at {shown} from {current!r} to {target!r}: lock {state.name!r} is held by "
            f"{state.holder} since {state.acquired_at:%Y-%m-%d %H:%M:%S} UTC, a job of the recsys that wrote the "
            "store, which would go on writing without what the migration adds; nothing was changed: run again when "
            f"it has finished (a killed job's lock counts as free {DEFAULT_STALE_AFTER} after its last sign of life, "
            "at once on this host)"
        )


def _refuse_unknown_or_older(current: str | None, target: str, shown: str) -> None:
    """Refuse a store written by a newer recsys, and a target older than the store: Alembic
    would report the first as an unknown revision without saying why, and silently skip the
    second (an operator who asked for a downgrade would believe it done)."""
    if current is None:
        return
    _quiet_alembic_import()
    from alembic.script import ScriptDirectory
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    scripts = ScriptDirectory.from_config(alembic_config())
    ancestry = [script.revision for script in scripts.walk_revisions()]  # newest first
    if current not in ancestry:
        raise StoreError(
            f"the store at {shown} is at migration {current!r}, which this version of "
            f"recsys does not know (newest here: {ancestry[0]!r}); upgrade recsys"
        )
    if target == "base":
        wanted = None
    else:
        try:
            wanted = scripts.get_revision(target)
        except (CommandError, RevisionError):
            return  # symbolic or relative targets ('head', '+1'): Alembic resolves or refuses them
        if wanted is None:
            return
        wanted = wanted.revision
    if wanted != current and (wanted is None or ancestry.index(wanted) > ancestry.index(current)):
        raise StoreError(
            f"the store at {shown} is at migration {current!r}, past {target!r}: "
            "`recsys db upgrade` does not downgrade"
        )


def _refuse_unmanaged_tables(conn: Connection, shown: str) -> None:
    if _revision_of(conn) is not None:
        return
    from recsys.store.schema import metadata

    present = set(sa.inspect(conn).get_table_names()) & set(metadata.tables)
    if present:
        raise StoreError(
            f"the store at {shown} has tables ({', '.join(sorted(present))}) but no migration "
            "version: it was not created by recsys migrations; use an empty database"
        )


def ensure_sqlite_folder(url: str) -> None:
    """Create the folder of a SQLite file URL when missing (nothing for other URLs).

    Raises:
        StoreError: the URL does not parse, its path is a folder or runs through a file, or the
            folder cannot be created.
    """
    path = sqlite_file(url)
    if path is None:
        return
    check_sqlite_path(url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the folder of the store at {mask_url(url)}: {exc}") from exc


def check_sqlite_path(url: str | URL) -> None:
    """Refuse a SQLite file URL whose path cannot be a file: a folder stands there
    (``sqlite:////tmp``), or a file stands where one of its folders should be
    (``sqlite:////etc/passwd/x.db``). The driver said only "unable to open database file", and
    creating the folder "[Errno 17] File exists".

    Raises:
        StoreError: naming the URL (password masked) and the path in the way.
    """
    path = sqlite_file(url)
    if path is None:
        return
    if path.is_dir():
        raise StoreError(f"the store at {mask_url(url)}: {path} is a folder, expected a SQLite file "
                         f"(such as {path / 'recsys.db'}); check --db / RECSYS_DB")
    for folder in path.parents:
        if folder.exists():
            if not folder.is_dir():
                raise StoreError(f"the store at {mask_url(url)}: {folder} is a file, expected a folder to hold "
                                 f"{path.relative_to(folder)}; check --db / RECSYS_DB")
            return


def foreign_tables(url: str) -> list[str]:
    """The tables of the database at ``url`` when it holds tables but no recsys store (another
    application's), sorted; ``[]`` for a recsys store, an empty database, a missing SQLite file
    and a database that cannot be read (``open_store`` then says why). Nothing is created or
    changed: a SQLite file is opened read-only, without the store's hooks (they turn it to WAL).
    """
    path = sqlite_file(url)
    if path is not None:
        if not path.is_file():
            return []
        engine = sa.create_engine("sqlite://", creator=lambda: sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True))
    else:
        try:
            engine = create_engine_for(url)
        except StoreError:
            return []
    try:
        with engine.connect() as conn:
            tables = sorted(sa.inspect(conn).get_table_names())
    except DBAPIError:  # not a database, unreadable: open_store names it
        return []
    finally:
        engine.dispose()
    return [] if _VERSION_TABLE in tables else tables


def sqlite_file(url: str | URL) -> Path | None:
    """The file of a SQLite file URL; None for other URLs, in-memory ones and ``file:`` URIs."""
    parsed = _normalise(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.database.startswith("file:"):
        return None
    return Path(parsed.database).expanduser()


def is_in_memory_sqlite(url: str | URL) -> bool:
    """Whether ``url`` names a SQLite database that lives only as long as its connection:
    ``sqlite://``, ``sqlite:///`` and ``:memory:``, a ``file:`` URI with no path or
    ``:memory:`` (``file:`` with no path is a temporary file, deleted on close), ``mode=memory``."""
    parsed = _normalise(url)
    if parsed.get_backend_name() != "sqlite":
        return False
    name = parsed.database or ""
    if name.startswith("file:"):
        name = name.removeprefix("file:").split("?", 1)[0]
    # mode=memory without uri=true is ignored by the driver (a file is kept), but it says
    # what the operator meant: refused too rather than guessed.
    return name in ("", ":memory:") or parsed.query.get("mode") == "memory"


def refuse_in_memory_sqlite(url: str, source: str | None = None) -> None:
    """Refuse a store that keeps nothing: every command runs in its own process, so what an
    in-memory SQLite database receives is gone when the command exits, yet it would exit 0
    (``RECSYS_DB="sqlite:///$UNSET_VAR"`` gives ``sqlite:///``).

    Args:
        source: where the URL came from (``--db``, ``RECSYS_DB``), named in the message.

    Raises:
        StoreError: the URL names an in-memory (or temporary) SQLite database.
    """
    if is_in_memory_sqlite(url):
        where = f"from {source}" if source else "check --db / RECSYS_DB"
        # As typed (mask_url would show ':memory:' as '%3Amemory%3A'), unless it holds a password.
        shown = url if _normalise(url).password is None else mask_url(url)
        raise StoreError(
            f"store URL {shown!r} ({where}) is an in-memory SQLite database, which keeps nothing once the "
            "command ends; give a file (sqlite:///path/to/store.db) or a PostgreSQL URL"
        )


def _refuse_missing_sqlite_file(url: str) -> None:
    # Connecting would create the file (and the WAL files beside it); check first.
    check_sqlite_path(url)
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise StoreError(
            f"no store at {path}: the file does not exist (check --db / RECSYS_DB and --workspace, "
            "or run `recsys ingest` first)"
        )


def open_store(url: str, *, create: bool = True, source: str | None = None) -> Engine:
    """Connect to the store and bring its tables to the latest migration.

    Commands that need the store call this. Those that write data in (ingest, nightly) pass
    ``create=True``: a SQLite file and its folder are created when missing, an empty database
    gets the tables. The others pass ``create=False``: they only read what was ingested, so a
    missing SQLite file or a database without recsys tables is almost always a mistyped
    ``--db``, and answering "unknown user" from a new empty store would hide it.

    Args:
        source: where ``url`` came from (``--db``, ``RECSYS_DB``), named in errors about it.

    Raises:
        StoreError: the store cannot be reached, it is missing or empty and ``create`` is
            False, it is at a revision this version of recsys does not know (written by a
            newer version).

    An in-memory SQLite URL is accepted here, for use within one process (a notebook, a test);
    the command line refuses it (``refuse_in_memory_sqlite``), and so do the nightly job's
    worker processes (``recsys.ranking.nightly.worker_url``).
    """
    if create:
        ensure_sqlite_folder(url)
    else:
        _refuse_missing_sqlite_file(url)
    engine = create_engine_for(url)
    current = current_revision(engine)
    if current == head_revision():
        return engine
    try:
        if current is None and not create:
            raise StoreError(
                f"the store at {shown_store(engine.url)} holds no recsys tables: nothing was ingested "
                f"there (check --db / RECSYS_DB, or run `recsys ingest` first)"
            )
        # Checked again under the lock by upgrade(); here so as not to wait on another writer first.
        _refuse_unknown_or_older(current, "head", shown_store(engine.url))
        try:
            upgrade(engine, "head")
        except ReadOnlyStoreError as exc:
            if current is None:
                raise
            # A store an older release wrote, opened where the migration cannot write (a
            # read-only user, file or replica): say why this command wanted to write.
            raise ReadOnlyStoreError(f"{exc}; the store is at revision {current}, older than this release's {head_revision()}: "
                             "run `recsys db upgrade` as a user that may change its tables, or read it with the "
                             "release that wrote it") from exc
    except BaseException:
        engine.dispose()
        raise
    return engine
