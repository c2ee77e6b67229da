"""Alembic environment of the store.

recsys runs migrations itself (``recsys.store.database.upgrade``), passing an open connection
in ``config.attributes["connection"]``. From a terminal, give the URL with
``alembic -c <ini> -x url=sqlite:///path.db upgrade head``.
"""

from __future__ import annotations

from alembic import context

from recsys.store.schema import metadata

config = context.config
target_metadata = metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database URL: pass -x url=<SQLAlchemy URL>")
    return url


def run_migrations_offline() -> None:
    """Write the migration SQL for the URL's dialect instead of running it."""
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection) -> None:
    # SQLite cannot ALTER most things in place: batch mode copies the table instead.
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        # recsys engines emit BEGIN on SQLite too (see database.py), so DDL is transactional.
        transactional_ddl=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from recsys.store.database import create_engine_for

    engine = create_engine_for(_url())
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
