"""Reading a run's stored recommendations straight from the table, apart from recsys's readers."""

from __future__ import annotations

import pandas as pd
from sqlalchemy import select

from recsys.columns import NEWS_ID, RANK, SCORE, USER_ID
from recsys.store import schema as s


def run_rows(engine, run_id) -> pd.DataFrame:
    """The ``recommendations`` rows of ``run_id`` as (user_id, rank, news_id, score), by user then rank."""
    rec = s.recommendations.c
    with engine.connect() as conn:
        rows = conn.execute(
            select(rec.user_id, rec.rank, rec.news_id, rec.score).where(rec.run_id == run_id).order_by(rec.user_id, rec.rank)
        ).all()
    return pd.DataFrame(rows, columns=[USER_ID, RANK, NEWS_ID, SCORE])
