"""The bulk writer's reads by pairs of columns, on both backends, against a filter in Python."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from recsys.store import schema
from recsys.store.bulk import bulk_writer
from recsys.store.ingest import ingest

from .conftest import T0


@pytest.mark.parametrize("chunk", [None, 2])
def test_select_pairs_in_returns_exactly_the_rows_of_those_pairs(engine, small_world, quarantine_dir, chunk):
    ingest(engine, news_path=small_world["news"], behaviors_path=small_world["behaviors"], quarantine_dir=quarantine_dir)
    imp = schema.impressions
    query = sa.select(imp.c.impression_id, imp.c.user_id, imp.c.time)
    with engine.connect() as conn:
        every = [tuple(r) for r in conn.execute(query)]
        writer = bulk_writer(conn)
        if chunk is not None:
            writer._chunk = chunk  # several round trips
        # Two stored pairs, a stored user at another time, a stored time for another user, nobody.
        pairs = [("U1", T0), ("U3", T0 - timedelta(hours=2)), ("U1", T0 + timedelta(hours=1)), ("U2", T0), ("U9", T0)]
        got = sorted(writer.select_pairs_in(query, (imp.c.user_id, imp.c.time), pairs))
    assert got == sorted(r for r in every if (r[1], r[2]) in set(pairs))
    assert [r[0] for r in got] == [1, 4]
