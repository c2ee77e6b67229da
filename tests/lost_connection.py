"""A store connection lost in the middle of a command, for tests, without stopping a server.

PostgreSQL: the server itself ends the connection's backend (``pg_terminate_backend``, as an
administrator, a failover or a restart does), and psycopg then fails on the dead connection.
SQLite: the driver's connection is closed under SQLAlchemy, and sqlite3 raises "Cannot operate
on a closed database.". Either way SQLAlchemy's own disconnect detection (the dialect's
``is_disconnect``) sees it, as it would see a real outage.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url


@contextmanager
def connection_lost_at(statement: str, *, skip: int = 0, times: int = 1) -> Iterator[list[str]]:
    """Lose the connection of every store engine in this process just before statements that
    match ``statement`` (a regular expression, searched case-insensitively in the SQL, ``.``
    matching line ends too): the first ``skip`` matches run, the next ``times`` meet a dead
    connection, later ones run.

    Yields:
        The statements that met a dead connection, to check that the cut happened.
    """
    pattern = re.compile(statement, re.IGNORECASE | re.DOTALL)
    matched = 0
    cut: list[str] = []

    def before_cursor_execute(conn, cursor, sql, parameters, context, executemany):
        nonlocal matched
        if not pattern.search(sql):
            return
        matched += 1
        if skip < matched <= skip + times:
            cut.append(sql)
            lose_connection(conn)

    event.listen(Engine, "before_cursor_execute", before_cursor_execute)
    try:
        yield cut
    finally:
        event.remove(Engine, "before_cursor_execute", before_cursor_execute)


def lose_connection(conn) -> None:
    """Lose the store connection ``conn`` (a SQLAlchemy ``Connection``) now, as above."""
    dbapi_connection = conn.connection.dbapi_connection
    if conn.dialect.name == "sqlite":
        dbapi_connection.close()
        return
    import psycopg

    url = make_url(conn.engine.url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as admin:
        # The timeout makes the call wait until the backend has exited.
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", (dbapi_connection.info.backend_pid,))
