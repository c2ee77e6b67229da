"""A clean night writes only the job's own log lines to stderr, which cron mails every night."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

# One shard for two workers (shard_size above the active users): the pool starts one actor.
SETTINGS = dict(shard_size=1000, k=10, num_candidates=40, active_days=7, freshness_days=3, keep_runs=3, rerank=True)

SCRIPT = textwrap.dedent("""
    import logging, sys
    from recsys.progress import configure_logging
    from recsys.store.database import create_engine_for
    from recsys.ranking.nightly import run_nightly

    if __name__ == "__main__":
        configure_logging(logging.INFO)  # as the CLI does
        url, model_dir, index_dir, engine_name = sys.argv[1:5]
        summary = run_nightly(create_engine_for(url), model_dir=model_dir, index_dir=index_dir,
                              engine_name=engine_name, num_workers=2, **{settings})
        print(summary["status"])
""").replace("{settings}", repr(SETTINGS))

OWN_LINE = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+Z (INFO|WARNING) recsys[\w.]*: .*")


def _night(store_url, world, tmp_path, engine_name: str) -> list[str]:
    script = tmp_path / "night.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}  # as `recsys` sets it
    done = subprocess.run([sys.executable, str(script), store_url, str(world.model_dir), str(world.index_dir), engine_name],
                          capture_output=True, text=True, env=env, timeout=600)
    assert (done.returncode, done.stdout) == (0, "complete\n"), done.stderr[-3000:]
    return done.stderr.splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the engine, not the store, is under test
def test_a_local_night_writes_only_its_own_log_lines(world_store, store_url, world, tmp_path):
    # A worker's TensorFlow wrote 7 lines, one of them "E0000 ... failed call to cuInit": a grep
    # for ERROR fired on every clean night.
    lines = _night(store_url, world, tmp_path, "local")
    assert [line for line in lines if not OWN_LINE.fullmatch(line)] == []


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_ray_night_leaves_out_ray_datas_progress_and_idle_actors(world_store, store_url, world, tmp_path):
    # Ray Data logged a dozen INFO lines a night, and with fewer shards than workers warned of the
    # pool's idle minimum. (The actors' own stderr does not reach the driver's: log_to_driver is off.)
    lines = _night(store_url, world, tmp_path, "ray")
    others = [line for line in lines if not OWN_LINE.fullmatch(line)]
    assert not [line for line in others if re.search(r"\bINFO\b|UserWarning", line)], others
