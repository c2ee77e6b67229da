"""recsys.ranking: the nightly batch ranking job.

``nightly.run_nightly`` ranks every active user shard by shard (``candidates.rank_users``)
on an engine (``engines.run_local`` / ``engines.run_ray``), under a store lock (``lock``),
and switches readers to the new run atomically (``runs``); ``export`` writes a run as
Parquet. Nothing here imports TensorFlow until a worker loads the model.
"""

from recsys.ranking.export import export_run
from recsys.ranking.lock import acquire_lock, read_lock, release_lock
from recsys.ranking.nightly import run_nightly
from recsys.ranking.runs import latest_run, prune_runs, recommendations_for_user, run_summary

__all__ = [
    "acquire_lock", "export_run", "latest_run", "prune_runs", "read_lock", "recommendations_for_user",
    "release_lock", "run_nightly", "run_summary",
]
