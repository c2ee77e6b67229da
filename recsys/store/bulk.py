"""Bulk writes per backend, inside the caller's transaction: sqlite3's executemany of
statements compiled once, and PostgreSQL's COPY. Used by the ingest and the nightly's shards.

SQLAlchemy's per-row parameter processing costs more than the database's own insert at
millions of rows, so rows go to the driver's cursor as plain tuples.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite

from recsys.errors import StoreError
from recsys.store.database import driver_errors

# Largest IN list sent at once: SQLite allows 32766 bound parameters, PostgreSQL 65535.
_IN_CHUNK = 5000


def _chunks(values: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def bulk_writer(conn: Connection) -> BulkWriter:
    if conn.dialect.name == "postgresql":
        return _PostgresWriter(conn)
    if conn.dialect.name == "sqlite":
        return _SQLiteWriter(conn)
    raise StoreError(f"bulk writes support SQLite and PostgreSQL stores, not {conn.dialect.name}")


class BulkWriter(ABC):
    """Bulk writes inside the caller's transaction; rows are tuples in ``columns`` order.

    ``upsert`` INSERTs rows and on a ``key`` conflict applies ``update(excluded, table.c)``
    (a dict column -> expression) where ``where(excluded, table.c)`` holds, or does nothing
    when ``update`` is None. ``update`` UPDATEs the rows whose ``key`` matches, setting
    ``values(src)`` where ``where(src, table.c)`` holds; ``src[column]`` stands for the given
    row's values. Rows must not repeat a key (PostgreSQL refuses to touch a row twice).
    """

    def __init__(self, conn: Connection):
        self.conn = conn

    @staticmethod
    def _upsert_statement(stmt, table: Table, key: Sequence[str], update: Callable | None, where: Callable | None):
        if update is None:
            return stmt.on_conflict_do_nothing(index_elements=list(key))
        return stmt.on_conflict_do_update(
            index_elements=list(key),
            set_=update(stmt.excluded, table.c),
            where=where(stmt.excluded, table.c) if where is not None else None,
        )

    @abstractmethod
    def upsert(self, table: Table, columns: Sequence[str], rows: list[tuple], *, key: Sequence[str],
               update: Callable | None = None, where: Callable | None = None) -> None:
        """INSERT ... ON CONFLICT (see the class docstring)."""

    @abstractmethod
    def insert(self, table: Table, columns: Sequence[str], rows: list[tuple]) -> None:
        """Plain INSERT of rows that conflict with nothing."""

    @abstractmethod
    def update(self, table: Table, key: str, columns: Sequence[str], rows: list[tuple], *,
               values: Callable, where: Callable | None = None) -> None:
        """UPDATE by ``key`` (see the class docstring)."""

    def _in(self, column, values: Sequence):
        """``column IN values``; PostgreSQL overrides it with one array parameter."""
        return column.in_(values)

    _chunk = _IN_CHUNK

    @property
    def in_chunk(self) -> int:
        """The most values ``select_in`` sends in one statement."""
        return self._chunk

    def select_in(self, query, column, values: Iterable) -> list[tuple]:
        """Rows of ``query`` where ``column`` is among ``values`` (in chunks)."""
        values = list(values)
        out: list[tuple] = []
        for chunk in _chunks(values, self._chunk):
            out.extend(self.conn.execute(query.where(self._in(column, chunk))).tuples().all())
        return out

    def select_pairs_in(self, query, columns: Sequence, pairs: Iterable[tuple]) -> list[tuple]:
        """Rows of ``query`` whose two ``columns`` are one of ``pairs`` (in chunks): one probe of
        an index on both per pair, where ``select_in`` on either column reads every row sharing
        that value (all of a day's impressions on a log with coarse times)."""
        out: list[tuple] = []
        for chunk in _chunks(list(pairs), self._chunk // 2):
            out.extend(self.conn.execute(query.where(sa.tuple_(*columns).in_(chunk))).tuples().all())
        return out

    def delete_in(self, table: Table, column, values: Sequence, *conditions) -> None:
        for chunk in _chunks(list(values), self._chunk):
            self.conn.execute(sa.delete(table).where(self._in(column, chunk), *conditions))

    def update_in(self, table: Table, column, values: Sequence, *conditions, **assignments) -> None:
        for chunk in _chunks(list(values), self._chunk):
            self.conn.execute(sa.update(table).where(self._in(column, chunk), *conditions).values(**assignments))


class _SQLiteWriter(BulkWriter):
    """Compiles each statement once and hands the rows to sqlite3's executemany.

    SQLAlchemy's per-row parameter processing costs more than SQLite's insert itself at
    millions of rows, so the only conversion done here is SQLAlchemy's own DateTime format
    (kept identical so that reads through SQLAlchemy and string comparisons still work).
    """

    def _executemany(self, stmt, table: Table, columns: Sequence[str], rows: list[tuple], names: dict[str, str],
                     column_keys: list[str] | None = None) -> None:
        """``names`` maps each bound parameter name of ``stmt`` to its column in ``columns``."""
        dialect = self.conn.dialect
        compiled = stmt.compile(dialect=dialect, column_keys=column_keys)
        order = [columns.index(names[p]) for p in compiled.positiontup]
        converters = [(k, self._converter(table.c[columns[i]].type)) for k, i in enumerate(order)]
        converters = [(k, f) for k, f in converters if f is not None]
        if order != list(range(len(columns))):
            rows = [[r[i] for i in order] for r in rows]
        elif converters:
            rows = [list(r) for r in rows]
        for k, convert in converters:
            for r in rows:
                r[k] = convert(r[k])
        # The DBAPI cursor directly: SQLAlchemy insists on tuples, sqlite3 takes the lists.
        cursor = self.conn.connection.driver_connection.cursor()
        try:
            with driver_errors(self.conn, compiled.string):
                cursor.executemany(compiled.string, rows)
        finally:
            cursor.close()

    def _converter(self, type_) -> Callable | None:
        if isinstance(type_, sa.DateTime):
            # Exactly SQLAlchemy's SQLite storage format ("2019-11-11 09:05:58.000000"),
            # written by the C isoformat instead of a Python %-format per value.
            return _sqlite_datetime
        return type_.dialect_impl(self.conn.dialect).bind_processor(self.conn.dialect)

    def upsert(self, table, columns, rows, *, key, update=None, where=None) -> None:
        if rows:
            stmt = self._upsert_statement(sqlite.insert(table), table, key, update, where)
            self._executemany(stmt, table, columns, rows, {c: c for c in columns}, list(columns))

    def insert(self, table, columns, rows) -> None:
        if rows:
            self._executemany(sa.insert(table), table, columns, rows, {c: c for c in columns}, list(columns))

    def update(self, table, key, columns, rows, *, values, where=None) -> None:
        if not rows:
            return
        src = {c: sa.bindparam(f"b_{c}", type_=table.c[c].type) for c in columns}
        stmt = sa.update(table).where(table.c[key] == src[key]).values(values(src))
        if where is not None:
            stmt = stmt.where(where(src, table.c))
        self._executemany(stmt, table, columns, rows, {f"b_{c}": c for c in columns})


class _PostgresWriter(BulkWriter):
    """COPY into a temporary staging table, then one set-based INSERT/UPDATE from it.

    COPY moves rows about ten times faster than executemany; impression items, which
    conflict with nothing once their impression's old items are deleted, are copied
    straight into their table.
    """

    # One array parameter instead of thousands of IN-list parameters: far less to parse and plan.
    _chunk = 100_000

    def _in(self, column, values: Sequence):
        return column == sa.any_(sa.bindparam(None, list(values), type_=postgresql.ARRAY(column.type)))

    def select_pairs_in(self, query, columns: Sequence, pairs: Iterable[tuple]) -> list[tuple]:
        # Two array parameters unnested side by side, as ``_in`` sends one.
        out: list[tuple] = []
        for chunk in _chunks(list(pairs), self._chunk):
            arrays = [sa.bindparam(None, [p[i] for p in chunk], type_=postgresql.ARRAY(c.type)) for i, c in enumerate(columns)]
            wanted = sa.func.unnest(*arrays).table_valued(*(f"v{i}" for i in range(len(columns)))).render_derived()
            out.extend(self.conn.execute(query.where(sa.tuple_(*columns).in_(sa.select(*wanted.c)))).tuples().all())
        return out

    def _stage(self, table: Table, columns: Sequence[str], rows: list[tuple]) -> Table:
        quote = self.conn.dialect.identifier_preparer.quote
        # The name depends on the columns: a pooled connection keeps its temp tables.
        digest = hashlib.sha1(",".join(columns).encode()).hexdigest()[:10]
        name = f"recsys_stage_{table.name}_{digest}"
        stage = Table(name, sa.MetaData(), *(sa.Column(c, table.c[c].type) for c in columns))
        ddl = ", ".join(f"{quote(c)} {table.c[c].type.compile(dialect=self.conn.dialect)}" for c in columns)
        self.conn.exec_driver_sql(f"CREATE TEMPORARY TABLE IF NOT EXISTS {name} ({ddl})")
        self.conn.exec_driver_sql(f"TRUNCATE {name}")
        self._copy(name, columns, rows)
        return stage

    def _copy(self, table_name: str, columns: Sequence[str], rows: list[tuple]) -> None:
        quote = self.conn.dialect.identifier_preparer.quote
        cols = ", ".join(quote(c) for c in columns)
        driver_conn = self.conn.connection.driver_connection
        sql = f"COPY {quote(table_name)} ({cols}) FROM STDIN"
        with driver_errors(self.conn, sql), driver_conn.cursor() as cursor, cursor.copy(sql) as copy:
            for row in rows:
                copy.write_row(row)

    def upsert(self, table, columns, rows, *, key, update=None, where=None) -> None:
        if not rows:
            return
        stage = self._stage(table, columns, rows)
        stmt = postgresql.insert(table).from_select(list(columns), sa.select(*(stage.c[c] for c in columns)))
        self.conn.execute(self._upsert_statement(stmt, table, key, update, where))

    def insert(self, table, columns, rows) -> None:
        if rows:
            self._copy(table.name, columns, rows)

    def update(self, table, key, columns, rows, *, values, where=None) -> None:
        if not rows:
            return
        stage = self._stage(table, columns, rows)
        src = {c: stage.c[c] for c in columns}
        stmt = sa.update(table).where(table.c[key] == stage.c[key]).values(values(src))
        if where is not None:
            stmt = stmt.where(where(src, table.c))
        self.conn.execute(stmt)


def _sqlite_datetime(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(" ", "microseconds")
