"""Connecting to the store, SQLite settings, and migrations on both backends."""

from __future__ import annotations

import re
import threading
import time

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from recsys.errors import StoreError, StoreUnavailableError
from recsys.store import schema
from recsys.store.database import (
    SQLITE_BEGIN,
    alembic_config,
    create_engine_for,
    current_revision,
    head_revision,
    is_in_memory_sqlite,
    mask_url,
    open_store,
    refuse_in_memory_sqlite,
    upgrade,
)
from tests.lost_connection import connection_lost_at, lose_connection
from tests.sockets import needs_linux, port_that_never_answers


def test_sqlite_connections_use_wal_foreign_keys_and_a_busy_timeout(tmp_path):
    engine = create_engine_for(f"sqlite:///{tmp_path / 'a.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    engine.dispose()


def test_sqlite_transactions_roll_back_ddl_and_dml(tmp_path):
    # pysqlite on its own would autocommit the CREATE TABLE; the begin hook makes it transactional.
    engine = create_engine_for(f"sqlite:///{tmp_path / 'a.db'}")
    with pytest.raises(RuntimeError, match="abort"):
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
            raise RuntimeError("abort")
    assert "t" not in sa.inspect(engine).get_table_names()
    engine.dispose()


def test_sqlite_immediate_begin_takes_the_write_lock(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    first, second = create_engine_for(url), create_engine_for(url)
    with first.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    with first.connect() as holder:
        holder.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
        with holder.begin():
            with second.connect() as other:
                other.exec_driver_sql("PRAGMA busy_timeout = 50")
                other.commit()  # the PRAGMA autobegan a (deferred, lock-free) transaction
                other.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
                with pytest.raises(sa.exc.OperationalError, match="locked"):
                    other.begin()
    first.dispose()
    second.dispose()


def test_unknown_begin_mode_is_refused(tmp_path):
    engine = create_engine_for(f"sqlite:///{tmp_path / 'a.db'}")
    with engine.connect() as conn:
        conn.execution_options(**{SQLITE_BEGIN: "LATER"})
        with pytest.raises(StoreError, match="recsys_sqlite_begin has 'LATER', expected DEFERRED, IMMEDIATE or EXCLUSIVE"):
            conn.begin()
    engine.dispose()


def test_unreachable_postgres_names_the_url_with_the_password_masked():
    with pytest.raises(StoreError, match=r"cannot reach the store at postgresql\+psycopg://bob:\*\*\*@127\.0\.0\.1:1/shop") as info:
        create_engine_for("postgresql://bob:s3cret@127.0.0.1:1/shop")
    assert "s3cret" not in str(info.value)


@needs_linux
def test_postgres_server_that_never_answers_fails_within_the_connect_timeout(monkeypatch):
    # As behind a firewall that drops packets: libpq alone waited until TCP gave up (minutes).
    import recsys.store.database as database

    monkeypatch.setattr(database, "PG_CONNECT_TIMEOUT_S", 2)  # libpq's smallest
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    with port_that_never_answers() as port:
        started = time.monotonic()
        with pytest.raises(StoreError, match=f"cannot reach the store at postgresql\\+psycopg://u:\\*\\*\\*@127.0.0.1:{port}/db: .*timeout"):
            create_engine_for(f"postgresql://u:pw@127.0.0.1:{port}/db")
        assert time.monotonic() - started < 8


def test_malformed_url_is_a_store_error():
    with pytest.raises(StoreError, match="'not a url' is not a valid SQLAlchemy URL"):
        create_engine_for("not a url")


def test_sqlite_file_in_a_missing_folder_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match=r"cannot reach the store at sqlite:///.*/nowhere/a\.db"):
        create_engine_for(f"sqlite:///{tmp_path / 'nowhere' / 'a.db'}")


def test_open_store_creates_the_sqlite_folder(tmp_path):
    engine = open_store(f"sqlite:///{tmp_path / 'deep' / 'er' / 'store.db'}")
    assert (tmp_path / "deep" / "er" / "store.db").exists()
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_mask_url_hides_only_the_password():
    assert mask_url("postgresql+psycopg://u:pw@h:5432/db") == "postgresql+psycopg://u:***@h:5432/db"
    assert mask_url("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.postgres
def test_postgres_urls_use_psycopg3(pg_database_url):
    plain = pg_database_url.replace("postgresql+psycopg://", "postgresql://")
    engine = create_engine_for(plain)
    assert engine.dialect.driver == "psycopg"
    engine.dispose()


# --- migrations (both backends) -------------------------------------------------------------


def test_empty_database_has_no_revision_then_open_store_migrates_to_head(db_url):
    bare = create_engine_for(db_url)
    assert current_revision(bare) is None
    bare.dispose()
    engine = open_store(db_url)
    assert current_revision(engine) == head_revision()
    assert set(schema.metadata.tables) <= set(sa.inspect(engine).get_table_names())
    engine.dispose()
    # A second open finds the store at head and changes nothing.
    again = open_store(db_url)
    assert current_revision(again) == head_revision()
    again.dispose()


def test_open_store_without_create_refuses_an_empty_database_and_leaves_it_empty(db_url):
    # A read-only command on a mistyped --db must not turn a stranger's database into a store.
    bare = create_engine_for(db_url)  # SQLite: creates the empty file
    assert current_revision(bare) is None
    with pytest.raises(StoreError, match="holds no recsys tables: nothing was ingested there"):
        open_store(db_url, create=False)
    assert current_revision(bare) is None
    assert sa.inspect(bare).get_table_names() == []
    bare.dispose()
    # Once created, the same call opens it.
    open_store(db_url).dispose()
    engine = open_store(db_url, create=False)
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_open_store_without_create_refuses_a_missing_sqlite_file_and_creates_nothing(tmp_path):
    path = tmp_path / "typo" / "store.db"
    with pytest.raises(StoreError, match=f"no store at {path}: the file does not exist"):
        open_store(f"sqlite:///{path}", create=False)
    assert not (tmp_path / "typo").exists()


def test_migrated_database_matches_schema_py(engine):
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    assert diffs == []


def test_migrations_downgrade_to_base_and_upgrade_again(engine):
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert current_revision(engine) is None
    assert not set(schema.metadata.tables) & set(sa.inspect(engine).get_table_names())
    upgrade(engine)
    assert current_revision(engine) == head_revision()


def test_a_0001_store_with_data_upgrades_to_head_and_keeps_its_rows(db_url):
    bare = create_engine_for(db_url)
    upgrade(bare, "0001")
    assert "ix_impression_items_news" in {ix["name"] for ix in sa.inspect(bare).get_indexes("impression_items")}
    with bare.begin() as conn:
        conn.execute(schema.impression_items.insert(), [
            {"impression_pk": 1, "position": p, "news_id": f"N{p}", "label": p % 2} for p in range(3)
        ])
        conn.execute(schema.clicks.insert(), [{"user_id": "U1", "news_id": "N1", "history_pos": 0, "clicked_at": None}])
    bare.dispose()
    engine = open_store(db_url)  # migrates 0001 -> head
    assert current_revision(engine) == head_revision()
    inspector = sa.inspect(engine)
    assert not {ix["name"] for ix in inspector.get_indexes("impression_items")}
    assert not {ix["name"] for ix in inspector.get_indexes("clicks")}
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.impression_items)).scalar() == 3
        assert conn.execute(sa.select(schema.clicks.c.news_id)).scalars().all() == ["N1"]
    engine.dispose()


def test_0006_fills_first_listed_at_from_the_first_seen_times_no_stored_show_explains(db_url):
    """An article first seen before any stored show of it was first seen in a History, and one a
    stored History lists was listed then: the earlier becomes its first_listed_at, which a later
    recount of the shows keeps."""
    from datetime import datetime, timedelta

    t0 = datetime(2019, 11, 14, 9, 0, 0)
    bare = create_engine_for(db_url)
    upgrade(bare, "0005")
    with bare.begin() as conn:
        article = dict(category="news", subcategory="x", title="t", abstract="", url="", title_entities="[]",
                       abstract_entities="[]", image_status="missing", content_hash="0" * 64, updated_at=t0)
        conn.execute(schema.news.insert(), [
            {**article, "news_id": "LISTED", "first_seen_at": t0 - timedelta(days=2)},  # shown later, listed first
            {**article, "news_id": "SHOWN", "first_seen_at": t0},  # its first show
            {**article, "news_id": "ONLY_LISTED", "first_seen_at": t0 - timedelta(hours=5)},
            {**article, "news_id": "UNSEEN", "first_seen_at": None},
        ])
        conn.execute(schema.users.insert(), [{"user_id": "U1", "first_seen_at": t0, "last_seen_at": t0,
                                              "history_at": t0 + timedelta(hours=1)}])
        conn.execute(schema.clicks.insert(), [{"user_id": "U1", "news_id": "SHOWN", "history_pos": 0, "clicked_at": None}])
        conn.execute(schema.impressions.insert(), [{"id": 1, "source": "s", "impression_id": 1, "user_id": "U1", "time": t0}])
        conn.execute(schema.impression_items.insert(), [
            {"impression_pk": 1, "position": 0, "news_id": "LISTED", "label": 0},
            {"impression_pk": 1, "position": 1, "news_id": "SHOWN", "label": 1},
        ])
    bare.dispose()
    engine = open_store(db_url)  # migrates 0005 -> head
    with engine.connect() as conn:
        listed = dict(conn.execute(sa.select(schema.news.c.news_id, schema.news.c.first_listed_at)).tuples().all())
    # SHOWN: first seen at its show, and listed since in U1's stored History.
    assert listed == {"LISTED": t0 - timedelta(days=2), "SHOWN": t0 + timedelta(hours=1),
                      "ONLY_LISTED": t0 - timedelta(hours=5), "UNSEEN": None}
    engine.dispose()


def test_no_migration_runs_while_a_job_of_the_previous_release_holds_its_lock(db_url):
    """An ingest started before an upgrade went on writing after a new command migrated the store
    under it: 0006's first_listed_at stayed null for every article it stored. The migration waits
    for the job; a lock whose holder is gone does not hold it up."""
    import os
    from datetime import timedelta

    from recsys.clock import utc_now
    from recsys.errors import RunLockedError
    from recsys.ranking.lock import DEFAULT_STALE_AFTER, this_host

    bare = create_engine_for(db_url)
    upgrade(bare, "0005")
    now = utc_now()
    with bare.begin() as conn:
        conn.execute(schema.locks.insert(), [{"name": "ingest", "holder": "oldhost:3868", "acquired_at": now,
                                              "heartbeat_at": now}])
    with pytest.raises(RunLockedError, match=r"^cannot migrate the store at .* from '0005' to 'head': lock 'ingest' is "
                                             r"held by oldhost:3868 since .* UTC, a job of the recsys that wrote the "
                                             r"store, which would go on writing without what the migration adds; "
                                             r"nothing was changed"):
        open_store(db_url)
    assert current_revision(bare) == "0005"
    # Its last sign of life older than the stale time: migrated.
    with bare.begin() as conn:
        old = now - DEFAULT_STALE_AFTER - timedelta(minutes=1)
        conn.execute(schema.locks.update().values(acquired_at=old, heartbeat_at=old))
        # A fresh lock of this host whose process is gone does not hold it up either.
        conn.execute(schema.locks.insert(), [{"name": "nightly", "holder": f"{this_host()}:{2**22 + 17}",
                                              "acquired_at": now, "heartbeat_at": now}])
    open_store(db_url).dispose()
    assert current_revision(bare) == head_revision()
    # A store at the head has nothing to migrate: `db upgrade` after installing a release, while
    # a job runs, is a no-op, not an error.
    with bare.begin() as conn:
        conn.execute(schema.locks.insert(), [{"name": "mine", "holder": f"{this_host()}:{os.getpid()}",
                                              "acquired_at": now, "heartbeat_at": now}])
    upgrade(bare, "head")
    upgrade(bare, head_revision())
    bare.dispose()


def test_a_store_from_before_the_locks_heartbeat_is_not_migrated_under_a_live_job(db_url):
    # 0001-0002 have no heartbeat_at: the holder's liveness comes from its pid on this host.
    import os

    from recsys.clock import utc_now
    from recsys.errors import RunLockedError
    from recsys.ranking.lock import this_host

    bare = create_engine_for(db_url)
    upgrade(bare, "0002")
    with bare.begin() as conn:
        conn.execute(sa.text("INSERT INTO locks (name, holder, run_id, acquired_at) VALUES (:n, :h, NULL, :t)"),
                     {"n": "nightly", "h": f"{this_host()}:{os.getpid()}", "t": utc_now()})
    with pytest.raises(RunLockedError, match=r"from '0002' to 'head': lock 'nightly' is held by "):
        upgrade(bare, "head")
    assert current_revision(bare) == "0002"
    with bare.begin() as conn:
        conn.execute(sa.text("DELETE FROM locks"))
    upgrade(bare, "head")
    assert current_revision(bare) == head_revision()
    bare.dispose()


def test_a_migration_never_waits_long_on_a_table_a_reader_holds(db_url, monkeypatch):
    """A nightly run's open read transaction on ``runs``: on PostgreSQL 0004's ALTER TABLE waited
    for it for ever (and queued every later reader behind it); now it gives up after the lock
    timeout with nothing changed. SQLite's WAL readers never block the migration."""
    from recsys.store import database

    monkeypatch.setattr(database, "MIGRATION_LOCK_TIMEOUT_S", 0.5)
    bare = create_engine_for(db_url)
    upgrade(bare, "0003")
    reader = create_engine_for(db_url)
    with reader.connect() as conn:
        conn.execute(sa.select(schema.runs.c.run_id)).all()  # the transaction stays open
        if bare.dialect.name == "postgresql":
            started = time.monotonic()
            with pytest.raises(StoreError, match=r"^migrating the store at .* waited 0.5 s for a table another session "
                                                 r"is using \(a nightly run, an ingest or a long query\) and gave up; "
                                                 r"nothing was changed"):
                upgrade(bare, "head")
            assert time.monotonic() - started < 5
            assert current_revision(bare) == "0003"
            assert "holder" not in {c["name"] for c in sa.inspect(bare).get_columns("runs")}
        else:
            upgrade(bare, "head")
    upgrade(bare, "head")  # the reader is gone
    assert current_revision(bare) == head_revision()
    assert "holder" in {c["name"] for c in sa.inspect(bare).get_columns("runs")}
    reader.dispose()
    bare.dispose()


def test_store_at_an_unknown_revision_is_refused(engine, db_url):
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'f00dcafe'"))
    with pytest.raises(StoreError, match="at migration 'f00dcafe', which this version of recsys does not know"):
        open_store(db_url)


def test_upgrade_to_an_unknown_revision_is_a_store_error(db_url):
    engine = create_engine_for(db_url)
    with pytest.raises(StoreError, match="cannot migrate the store at .* to 'nope'"):
        upgrade(engine, "nope")
    engine.dispose()


def test_tables_not_made_by_migrations_are_refused(db_url):
    engine = create_engine_for(db_url)
    schema.metadata.create_all(engine)
    with pytest.raises(StoreError, match=r"has tables \(.*news.*\) but no migration version"):
        upgrade(engine)
    engine.dispose()


def test_concurrent_open_store_calls_both_succeed(db_url):
    errors: list[BaseException] = []
    engines: list[sa.Engine] = []

    def open_it() -> None:
        try:
            engines.append(open_store(db_url))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(6)]  # a new file: all race to set WAL
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(current_revision(e) == head_revision() for e in engines)
    for e in engines:
        e.dispose()


# --- what an operator meets: bad URLs, bad revisions, read-only files -------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql//bob:s3cret@db.internal/shop", "postgresql//bob:***@db.internal/shop"),  # no ':' after the scheme
        ("postgresql://bob:s3cret@db.internal:54x2/shop", "postgresql://bob:***@db.internal:54x2/shop"),  # port typo
    ],
)
def test_unparseable_url_is_a_store_error_that_hides_the_password(url, shown):
    with pytest.raises(StoreError, match="is not a valid SQLAlchemy URL") as info:
        create_engine_for(url)
    assert shown in str(info.value)
    assert "s3cret" not in str(info.value)


def test_bad_sqlite_url_is_one_line_without_the_password():
    with pytest.raises(StoreError, match="Invalid SQLite URL") as info:
        create_engine_for("sqlite://bob:s3cret@/store.db")
    assert "\n" not in str(info.value)
    assert "s3cret" not in str(info.value)


def test_upgrade_to_an_empty_revision_is_a_store_error(db_url):
    engine = create_engine_for(db_url)
    with pytest.raises(StoreError, match="the target revision is empty"):
        upgrade(engine, " ")
    engine.dispose()


@pytest.mark.parametrize("target", ["0002", "base"])
def test_upgrade_to_an_older_revision_is_refused_not_skipped(engine, target):
    with pytest.raises(StoreError, match=rf"at migration '{head_revision()}', past '{target}': .* does not downgrade"):
        upgrade(engine, target)
    assert current_revision(engine) == head_revision()


def test_upgrade_of_a_store_at_an_unknown_revision_says_it_is_newer(engine):
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'f00dcafe'"))
    with pytest.raises(StoreError, match="at migration 'f00dcafe', which this version of recsys does not know"):
        upgrade(engine)


def test_db_upgrade_creates_the_sqlite_folder_as_other_commands_do(tmp_path, capsys):
    from recsys.cli import main

    path = tmp_path / "new" / "store.db"
    code = main(["--workspace", str(tmp_path / "ws"), "--db", f"sqlite:///{path}", "db", "upgrade"])
    assert (code, capsys.readouterr().out.strip()) == (0, f"store at revision {head_revision()}")
    assert path.exists()


def test_sqlite_folder_that_cannot_be_created_is_a_store_error(tmp_path):
    (tmp_path / "blocker").write_text("a file where the store's folder should be")
    with pytest.raises(StoreError, match=r"the store at sqlite:///.*/blocker/sub/store\.db: .*/blocker is a file, "
                                         r"expected a folder to hold sub/store\.db"):
        open_store(f"sqlite:///{tmp_path / 'blocker' / 'sub' / 'store.db'}")


@pytest.mark.parametrize("command", [["stats"], ["db", "upgrade"], ["nightly"]])
def test_a_sqlite_path_that_is_a_folder_or_runs_through_a_file_exits_1_saying_so(tmp_path, capsys, command):
    # The driver's "unable to open database file" and mkdir's "[Errno 17] File exists" before.
    from recsys.cli import main

    (tmp_path / "afile").write_text("")
    for path, problem in [(tmp_path, f"{tmp_path} is a folder, expected a SQLite file (such as {tmp_path}/recsys.db)"),
                          (tmp_path / "afile" / "x.db", f"{tmp_path}/afile is a file, expected a folder to hold x.db")]:
        code = main(["--workspace", str(tmp_path / "ws"), "--db", f"sqlite:///{path}", *command])
        out, err = capsys.readouterr()
        assert (code, out, err.strip()) == (1, "", f"error: the store at sqlite:///{path}: {problem}; check --db / "
                                                   "RECSYS_DB")
    assert (tmp_path / "afile").read_text() == "" and not (tmp_path / "recsys.db").exists()


def test_writing_to_a_read_only_sqlite_store_is_a_store_error(tmp_path):
    path = tmp_path / "store.db"
    open_store(f"sqlite:///{path}").dispose()
    # mode=ro stands for a file or folder without write permission (tests may run as root).
    engine = create_engine_for(f"sqlite:///file:{path}?mode=ro&uri=true")
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.news)).scalar() == 0  # reads work
    with pytest.raises(StoreError, match=r"the store at sqlite:///file.*store\.db\?mode=ro&uri=true is read-only \(attempt to write a readonly database\)"):
        with engine.begin() as conn:
            conn.execute(schema.locks.insert().values(name="nightly", holder="h:1", acquired_at=sa.func.now()))
    engine.dispose()


def _full_after(engine, pages: int = 0) -> None:
    """Each new connection of ``engine`` may grow the file by ``pages`` pages only: SQLite then
    says "database or disk is full" (SQLITE_FULL), as on a full disk."""

    @sa.event.listens_for(engine, "connect")
    def limit(dbapi_connection, _record):
        size = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
        dbapi_connection.execute(f"PRAGMA max_page_count = {size + pages}")


def test_writing_to_a_full_sqlite_store_is_a_store_error_naming_it(tmp_path):
    path = tmp_path / "store.db"
    open_store(f"sqlite:///{path}").dispose()
    engine = create_engine_for(f"sqlite:///{path}")
    engine.dispose()  # the connection opened to check the store had no limit
    _full_after(engine)
    with pytest.raises(StoreError, match=rf"^the store at sqlite:///{path} cannot be written: its disk is full "
                                         r"\(database or disk is full\)$"):
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE filler AS WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 "
                                 "FROM n WHERE i < 100) SELECT randomblob(1000) AS x FROM n"))
    assert "filler" not in sa.inspect(engine).get_table_names()
    engine.dispose()


def test_a_full_sqlite_store_met_by_a_statement_on_the_drivers_cursor_is_a_store_error(tmp_path):
    """Bulk writes run on the driver's cursor (``driver_errors``), which the store's error hook
    does not see: the ingest of a full store was an internal error."""
    import sqlite3

    from recsys.store.database import driver_errors

    path = tmp_path / "store.db"
    engine = open_store(f"sqlite:///{path}")
    with engine.connect() as conn, pytest.raises(StoreError, match=rf"^the store at sqlite:///{path} cannot be "
                                                                   "written: its disk is full"):
        error = sqlite3.OperationalError("database or disk is full")
        error.sqlite_errorcode, error.sqlite_errorname = sqlite3.SQLITE_FULL, "SQLITE_FULL"
        with driver_errors(conn, "INSERT INTO news ..."):
            raise error
    engine.dispose()


@pytest.mark.parametrize(("reason", "flag", "free", "hint"), [
    ("unable to open database file", "ST_RDONLY", 100, "the file system of {folder} is read-only"),
    ("disk I/O error", None, 0, "the disk of {folder} is full"),
    ("unable to open database file", None, 100, None),
])
def test_a_sqlite_store_that_cannot_be_opened_says_if_its_disk_is_read_only_or_full(tmp_path, monkeypatch, reason,
                                                                                      flag, free, hint):
    # SQLite says only "unable to open database file" (WAL mode cannot create -shm on a
    # read-only mount) or "disk I/O error" (a full one).
    import os
    import sqlite3

    path = tmp_path / "store" / "recsys.db"
    path.parent.mkdir()
    real_statvfs = os.statvfs

    def statvfs(folder):
        status = real_statvfs(folder)
        if os.path.samefile(folder, path.parent):
            return os.statvfs_result((status.f_bsize, status.f_frsize, status.f_blocks, free, free, status.f_files,
                                      status.f_ffree, status.f_favail, getattr(os, flag) if flag else 0,
                                      status.f_namemax))
        return status

    def refuse(*args, **kwargs):
        raise sqlite3.OperationalError(reason)

    monkeypatch.setattr(os, "statvfs", statvfs)
    monkeypatch.setattr(sqlite3.dbapi2, "connect", refuse)  # what SQLAlchemy calls
    with pytest.raises(StoreError) as info:
        create_engine_for(f"sqlite:///{path}")
    expected = f"cannot reach the store at sqlite:///{path}: {reason}"
    assert str(info.value) == (expected if hint is None else f"{expected} ({hint.format(folder=path.parent)})")


IN_MEMORY_URLS = [
    "sqlite://",
    "sqlite:///",  # what RECSYS_DB="sqlite:///$UNSET_VAR" gives
    "sqlite:///:memory:",
    "sqlite+pysqlite:///:memory:",
    "sqlite:///file::memory:?cache=shared&uri=true",
    "sqlite:///file:shared?mode=memory&cache=shared&uri=true",
    "sqlite:///file:?uri=true",  # a temporary file, deleted on close
]


@pytest.mark.parametrize("url", IN_MEMORY_URLS)
def test_refuse_in_memory_sqlite_names_where_the_url_came_from(url):
    # A command would take the data and exit 0; the next command finds nothing.
    with pytest.raises(StoreError, match=r"\(check --db / RECSYS_DB\) is an in-memory SQLite database, which keeps nothing"):
        refuse_in_memory_sqlite(url)
    with pytest.raises(StoreError, match=r"\(from RECSYS_DB\) is an in-memory"):
        refuse_in_memory_sqlite(url, "RECSYS_DB")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_open_store_keeps_an_in_memory_database_within_the_process(url):
    # In one process (a notebook, a test suite of the product's users) it is a working store;
    # refusing it in open_store broke that. A second connection sees the migrated tables.
    engine = open_store(url)
    try:
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head_revision()
            assert conn.execute(sa.select(sa.func.count()).select_from(schema.news)).scalar() == 0
    finally:
        engine.dispose()


def test_the_nightly_refuses_an_in_memory_store_before_it_creates_a_run(tmp_path):
    # Its workers and its index helper open the store by URL: each would get an empty database.
    from recsys.ranking.nightly import run_nightly

    engine = open_store("sqlite://")
    try:
        with pytest.raises(StoreError, match=r"in-memory SQLite database: the nightly job's worker and helper processes"):
            run_nightly(engine, model_dir=tmp_path / "model", index_dir=tmp_path / "index", num_workers=0)
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(schema.runs)).scalar() == 0
        # The whole job refuses it before its ingest, not at the index refresh after it.
        from recsys.config import Workspace, load_config
        from recsys.pipelines.nightly import run_nightly_job

        with pytest.raises(StoreError, match=r"in-memory SQLite database: the nightly job's worker and helper processes"):
            run_nightly_job(engine, Workspace(tmp_path / "ws").ensure(), load_config(None, {}),
                            behaviors=tmp_path / "not-read.tsv")
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(schema.impressions)).scalar() == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize("url", ["sqlite:///store.db", "sqlite:///file:store.db?uri=true", "sqlite:///file:store.db?mode=ro&uri=true",
                                 "postgresql://u@h/db"])
def test_file_and_server_urls_are_not_in_memory(url):
    assert not is_in_memory_sqlite(url)


@pytest.mark.parametrize("command", [["ingest", "--news", "news.tsv"], ["nightly"], ["db", "upgrade"], ["stats"]])
@pytest.mark.parametrize("by_flag", [True, False])
def test_every_command_refuses_an_in_memory_store_naming_where_the_url_came_from(tmp_path, capsys, monkeypatch, command, by_flag):
    from recsys.cli import main

    (tmp_path / "news.tsv").write_text("")
    monkeypatch.chdir(tmp_path)
    if by_flag:
        args = ["--db", "sqlite://"]
    else:
        monkeypatch.setenv("RECSYS_DB", "sqlite:///")
        args = []
    code = main(["--workspace", str(tmp_path / "ws"), *args, *command])
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"(from {'--db' if by_flag else 'RECSYS_DB'}) is an in-memory SQLite database, which keeps nothing" in err


# --- a PostgreSQL store that cannot take a write ----------------------------------------------

def _read_only(url: str) -> str:
    """``url`` whose sessions are read-only, as on a hot standby."""
    return url + ("&" if "?" in url else "?") + "options=-c%20default_transaction_read_only%3Don"


@pytest.mark.postgres
def test_writing_to_a_read_only_postgres_store_is_a_store_error_naming_it(pg_database_url):
    # An internal error (exit 2) with psycopg's traceback before.
    from recsys.store.database import driver_errors

    engine = create_engine_for(_read_only(pg_database_url))
    shown = re.escape(mask_url(engine.url))
    message = (rf"^the store at {shown} is read-only \(cannot execute CREATE TABLE in a read-only transaction\): "
               "recsys must be able to write to it$")
    with pytest.raises(StoreError, match=message):
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE filler (i int)"))
    with engine.connect() as conn, pytest.raises(StoreError, match=message):  # bulk writes: the driver's cursor
        with driver_errors(conn, "CREATE TABLE filler (i int)"):
            conn.connection.driver_connection.cursor().execute("CREATE TABLE filler (i int)")
    engine.dispose()


@pytest.mark.postgres
def test_a_postgres_server_whose_disk_is_full_is_a_store_error_naming_the_store(pg_database_url):
    # The server's own error with SQLSTATE 53100 (disk_full), as a full data directory raises it.
    from recsys.store.database import driver_errors

    engine = create_engine_for(pg_database_url)
    shown = re.escape(mask_url(engine.url))
    full = ("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = 'disk_full', "
            "MESSAGE = 'could not extend file \"base/1/2\": No space left on device'; END $$")
    message = rf"^the store at {shown} cannot be written: the server's disk is full \(could not extend file"
    with pytest.raises(StoreError, match=message):
        with engine.begin() as conn:
            conn.execute(sa.text(full))
    with engine.connect() as conn, pytest.raises(StoreError, match=message):
        with driver_errors(conn, full):
            conn.connection.driver_connection.cursor().execute(full)
    # Any other error is the driver's, as before.
    with pytest.raises(sa.exc.DBAPIError, match="division by zero"):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1 / 0"))
    engine.dispose()


def _lost(engine) -> str:
    """The message of a lost connection to ``engine``'s store, as a regular expression."""
    return (rf"^lost the connection to the store at {re.escape(mask_url(engine.url))} \([^)\n]+\): what was committed "
            r"is kept; run the command again once the store answers \(a nightly run resumes where it stopped\)$")


def test_a_connection_lost_mid_command_is_one_line_naming_the_store_and_the_next_one_is_fresh(engine):
    # It was an internal error (exit 2) with the statement, its parameters and SQLAlchemy's
    # link, while the same outage at start-up was a clean "cannot reach the store".
    with connection_lost_at("SELECT 2") as cut, pytest.raises(StoreUnavailableError, match=_lost(engine)) as lost:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            conn.execute(sa.text("SELECT 2"))
    assert cut and isinstance(lost.value.__cause__, engine.dialect.loaded_dbapi.Error)
    with connection_lost_at("INSERT INTO users"), pytest.raises(StoreUnavailableError, match=_lost(engine)):
        with engine.begin() as conn:  # in a write transaction, which is rolled back
            conn.execute(sa.insert(schema.users).values(user_id="U1"))
    with engine.connect() as conn:  # the pool dropped the dead connection
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.users)).scalar() == 0


def test_a_connection_lost_under_a_statement_on_the_drivers_cursor_is_told_the_same(engine):
    from recsys.store.database import driver_errors

    with engine.connect() as conn:
        lose_connection(conn)
        with pytest.raises(StoreUnavailableError, match=_lost(engine)):
            with driver_errors(conn, "SELECT 1"):
                conn.connection.driver_connection.cursor().execute("SELECT 1")
        assert conn.invalidated  # not handed out again by the pool
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1


@pytest.mark.postgres
def test_a_postgres_connection_ended_while_idle_in_the_pool_is_replaced_unseen(pg_database_url):
    # The pool's pre-ping meets the dead connection first: it must replace it, not report it.
    engine = create_engine_for(pg_database_url)
    with engine.connect() as conn:
        first = conn.connection.dbapi_connection.info.backend_pid
        lose_connection(conn)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar() != first
    engine.dispose()


@pytest.mark.postgres
def test_a_postgres_server_that_cannot_be_reached_mid_command_is_told_as_at_start_up(pg_database_url, monkeypatch):
    import psycopg

    engine = create_engine_for(pg_database_url)
    engine.pool.dispose()  # the next statement opens a connection

    def refused(*args, **kwargs):
        raise psycopg.OperationalError("connection failed: the database system is shutting down\nmore")

    monkeypatch.setattr(engine.dialect, "connect", refused)
    message = rf"^cannot reach the store at {re.escape(mask_url(engine.url))}: connection failed: the database system is shutting down$"
    with pytest.raises(StoreUnavailableError, match=message):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    engine.dispose()


def test_an_interrupt_during_a_statement_goes_on_up_as_itself(engine):
    # SQLAlchemy marks Ctrl-C or SIGTERM during a statement a disconnect: the hook made it a lost
    # connection (exit 1, "run again"), and after a nightly's switch a warning, the job going on.
    from recsys.interrupts import Terminated

    def interrupted(cursor, statement, parameters, context):
        if statement == "SELECT 2":
            raise Terminated

    sa.event.listen(engine, "do_execute", interrupted)
    try:
        with pytest.raises(Terminated):
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 2"))
    finally:
        sa.event.remove(engine, "do_execute", interrupted)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1


def test_a_password_given_in_the_query_is_masked_too():
    # libpq takes ?password=...: it was shown in clear on stderr and kept in runs.message.
    shown = mask_url("postgresql+psycopg://job@db.internal:5432/recsys?password=TopSecret9&sslmode=disable")
    assert "TopSecret9" not in shown and "password=%2A%2A%2A" in shown and "sslmode=disable" in shown


@pytest.mark.postgres
def test_a_statement_the_server_cancels_is_the_operators_to_fix_not_an_internal_error(pg_database_url):
    # statement_timeout (and lock_timeout, a missing GRANT) ended as exit 2 with the SQL dumped.
    from recsys.store.database import failure_message, server_refusal

    engine = create_engine_for(pg_database_url)
    try:
        with pytest.raises(sa.exc.DBAPIError) as cancelled:
            with engine.connect() as conn:
                conn.execute(sa.text("SET statement_timeout = 1"))
                conn.execute(sa.text("SELECT pg_sleep(1)"))
    finally:
        engine.dispose()
    assert server_refusal(cancelled.value) == (
        "the store cancelled a statement (canceling statement due to statement timeout): raise the role's "
        "statement_timeout or lock_timeout, or run again once what holds the lock is done")
    assert server_refusal(cancelled.value, "postgresql+psycopg://job@db/recsys").startswith(
        "the store at postgresql+psycopg://job@db/recsys cancelled a statement (canceling statement")
    # A failed run's message is that line, not the driver's text with its SQL.
    assert failure_message(cancelled.value, engine) == server_refusal(cancelled.value, mask_url(engine.url))
    assert failure_message(ValueError("bad"), engine) == "ValueError: bad"
    assert server_refusal(ValueError("x")) is None


def test_a_store_is_shown_as_recsys_connects_to_it(tmp_path, monkeypatch):
    # A relative SQLite URL under a scheduler's temporary folder opened another store than the
    # operator's; postgresql:// is connected to as postgresql+psycopg://.
    from recsys.store.database import shown_store

    monkeypatch.chdir(tmp_path)
    assert shown_store("sqlite:///x.db") == f"sqlite:///x.db ({tmp_path / 'x.db'})"
    assert shown_store(f"sqlite:///{tmp_path / 'x.db'}") == f"sqlite:///{tmp_path / 'x.db'}"
    assert shown_store("postgresql://u:pw@h:5432/db") == "postgresql+psycopg://u:***@h:5432/db"
    assert shown_store("postgresql//u:pw@h/db") == "postgresql//u:***@h/db"  # not a URL: as typed, masked


def test_an_older_store_that_cannot_be_migrated_here_names_its_revision_and_the_upgrade_command(db_url, capsys):
    """A reading command on a store an older release wrote migrates it first; where it may not
    write (a read-only user, a replica) it said only the database's refusal."""
    from recsys.cli import main

    url = db_url  # an empty database
    if url.startswith("sqlite:///"):
        read_only = f"sqlite:///file:{url.removeprefix('sqlite:///')}?mode=ro&uri=true"
    else:
        read_only = _read_only(url)
    bare = create_engine_for(url)
    upgrade(bare, "0005")
    bare.dispose()
    with pytest.raises(StoreError) as caught:
        open_store(read_only, create=False)
    message = str(caught.value)
    assert "read-only" in message or "readonly" in message, message
    assert message.endswith(f"; the store is at revision 0005, older than this release's {head_revision()}: run `recsys db "
                            "upgrade` as a user that may change its tables, or read it with the release that wrote it")
    assert main(["--db", read_only, "stats"]) == 1
    assert "run `recsys db upgrade` as a user that may change its tables" in capsys.readouterr().err
    check = create_engine_for(url)
    assert current_revision(check) == "0005"  # nothing changed
    check.dispose()
