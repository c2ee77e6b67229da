"""Store fixtures shared by every test area: ``db_url`` (SQLite and PostgreSQL) and ``engine``.

PostgreSQL: one database per session, ``recsys_test_<uuid8>``, created on the server of
``RECSYS_TEST_PG_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``) and
dropped at the end; every test starts from an empty ``public`` schema. When the server is
unreachable the PostgreSQL cases skip, except with ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from tests.ray_lock import ray_tests_lock

# pytest-xdist runs its workers side by side on the machine's cores: each worker's BLAS, OpenMP,
# TensorFlow and onnxruntime pools get its share of them (recsys.threads.default_threads reads
# LOKY_MAX_CPU_COUNT; child processes inherit it). With every pool at every core, two workers'
# spinning threads fought over 2 cores: numpy's eigh of a 1024 x 1024 covariance took 2.1 s
# instead of 0.35 s.
# Pools sized before any recsys code runs (numpy's, at its import) read the variables.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "LOKY_MAX_CPU_COUNT" not in os.environ:
    _share = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _var in ("LOKY_MAX_CPU_COUNT", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[_var] = _share

PG_SERVER_URL = os.environ.get("RECSYS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _admin_engine() -> sa.Engine:
    url = make_url(PG_SERVER_URL)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """URL of a PostgreSQL database private to this test session (dropped at the end)."""
    admin = _admin_engine()
    name = f"recsys_test_{uuid.uuid4().hex[:8]}"
    shown = admin.url.render_as_string(hide_password=True)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        reason = f"PostgreSQL unreachable at {shown}: {str(exc.orig).strip().splitlines()[0]}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: PostgreSQL tests must run, not skip)")
        pytest.skip(reason)
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        _drop_database(admin, name)


@pytest.fixture
def icu_engine(pg_database_url) -> Iterator[sa.Engine]:
    """A migrated store in a PostgreSQL database of its own with an ICU en-US collation, as
    production clusters are often created: it orders "n1" before "N1" and skips "-" and "_"
    (this server's own databases order by code point). Dropped after the test."""
    from recsys.store.database import open_store

    admin = _admin_engine()
    name = f"recsys_test_icu_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' "
                             "LOCALE 'C.UTF-8'"))
    try:
        engine = open_store(admin.url.set(database=name).render_as_string(hide_password=False))
        try:
            yield engine
        finally:
            engine.dispose()
    finally:
        _drop_database(admin, name)


def _drop_database(admin: sa.Engine, name: str) -> None:
    """Drop the test database ``name`` (its lingering connections closed first) and dispose of
    ``admin``."""
    with admin.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"), {"name": name})
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


def _reset_pg(url: str, *, keep_migrated: bool) -> None:
    """Drop and recreate the public schema; or, when ``keep_migrated`` and the schema is
    exactly the migrated store, just empty its tables (much faster than migrating again)."""
    from recsys.store.database import head_revision
    from recsys.store.schema import metadata

    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            # Connections a previous test left open (pools, killed subprocesses) would block us.
            conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ))
            tables = set(sa.inspect(conn).get_table_names())
            at_head = False
            if keep_migrated and tables == set(metadata.tables) | {"alembic_version"}:
                at_head = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == [head_revision()]
            if at_head:
                names = ", ".join(f'"{t}"' for t in metadata.tables)
                conn.execute(sa.text(f"TRUNCATE TABLE {names} RESTART IDENTITY CASCADE"))
                return
            conn.execute(sa.text("DROP SCHEMA IF EXISTS public CASCADE"))
            conn.execute(sa.text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def _migrated_sqlite_template(tmp_path_factory) -> Path:
    """A SQLite store migrated once per session; ``engine`` copies it instead of migrating."""
    from recsys.store.database import open_store

    path = tmp_path_factory.mktemp("sqlite_template") / "store.db"
    engine = open_store(f"sqlite:///{path}")
    engine.dispose()  # the last connection to close checkpoints the WAL into the file
    return path


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    ]
)
def db_url(request, tmp_path) -> str:
    """URL of an empty database (no tables): a SQLite file, or a clean PostgreSQL schema.

    When the test also uses ``engine``, the database may instead already hold the migrated,
    empty store (a copied template, or truncated tables), which ``engine`` then opens.
    """
    wants_store = "engine" in request.fixturenames
    if request.param == "sqlite":
        path = tmp_path / "store.db"
        if wants_store:
            shutil.copyfile(request.getfixturevalue("_migrated_sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("pg_database_url")
    _reset_pg(url, keep_migrated=wants_store)
    return url


@pytest.fixture
def engine(db_url) -> Iterator[sa.Engine]:
    """The store at ``db_url``, migrated to the latest revision and empty."""
    from recsys.store.database import open_store

    store = open_store(db_url)
    try:
        yield store
    finally:
        store.dispose()


@pytest.fixture(autouse=True)
def _one_ray_test_at_a_time(request) -> Iterator[None]:
    """Tests marked ``ray`` run one at a time on this machine (across pytest-xdist workers and
    concurrent sessions): test_kill's Ray test kills every RayShardActor process it sees, which
    took down the actors of a Ray test running beside it."""
    if request.node.get_closest_marker("ray") is None:
        yield
        return
    with ray_tests_lock():
        yield

