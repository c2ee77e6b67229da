"""`recsys generate-sample`: write a MIND-format sample world."""

from __future__ import annotations

from pathlib import Path

from recsys.pipelines.inputs import check_output_folder
from recsys.progress import progress


def run_generate_sample(out: Path, *, users: int, news: int, impressions: int, seed: int) -> dict:
    from recsys.data.sample import default_test_impressions, generate_sample

    check_output_folder("--out", out)  # a file or a dangling link on the way: one line, before any work
    # generate_sample's progress units: articles, then the impressions of both windows.
    total = news + impressions + default_test_impressions(impressions)
    with progress("generating sample world", total=total) as advance:
        return generate_sample(Path(out), num_users=users, num_news=news, num_impressions=impressions, seed=seed, progress=advance)
