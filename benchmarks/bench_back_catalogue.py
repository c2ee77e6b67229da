"""How much of a nightly run recommends MIND's back catalogue (articles only listed in Histories).

MIND's behaviors list two kinds of articles: candidates shown in an impression, and older
articles that only appear in History columns (clicked before the log began). The nightly job
recommends fresh articles (``nightly.freshness_days``), so the back catalogue should rarely
appear. This reads the latest complete nightly run of a workspace (e.g. one ``recsys demo``
ran in) and the behaviors file it was trained on, and counts, from the file alone:

- recommendations of articles the file only lists in Histories (the back catalogue);
- recommendations of articles the file first shows more than ``--freshness-days`` before its end;
- distinct articles recommended.

Usage:
  .venv/bin/recsys --workspace /tmp/demo demo
  python benchmarks/bench_back_catalogue.py --workspace /tmp/demo [--tag before]

Prints the figures and writes benchmarks/results/back_catalogue.json (back_catalogue_<tag>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from recsys.config import Workspace, resolve_db_url
from recsys.data.mind import BehaviorRow, iter_behaviors
from recsys.store import schema

ROOT = Path(__file__).resolve().parent
DEFAULT_BEHAVIORS = ROOT.parent / "data" / "sample" / "behaviors_train.tsv"


def first_times(behaviors: Path) -> tuple[dict[str, datetime], dict[str, datetime]]:
    """(first show, first History listing) of every article in a behaviors file."""
    shown: dict[str, datetime] = {}
    listed: dict[str, datetime] = {}
    for row in iter_behaviors(behaviors):
        if not isinstance(row, BehaviorRow):  # a bad line: the ingest quarantined it too
            continue
        for n in row.history:
            listed[n] = min(listed.get(n, row.time), row.time)
        for n in row.news_ids:
            shown[n] = min(shown.get(n, row.time), row.time)
    return shown, listed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, required=True, help="a workspace a nightly run completed in")
    parser.add_argument("--db", default=None, help="store URL (default: the workspace's, or $RECSYS_DB)")
    parser.add_argument("--behaviors", type=Path, default=DEFAULT_BEHAVIORS, help="the behaviors file it was trained on")
    parser.add_argument("--freshness-days", type=float, default=3.0)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    shown, listed = first_times(args.behaviors)
    back = set(listed) - set(shown)
    stale_before = max(shown.values()) - timedelta(days=args.freshness_days)
    engine = sa.create_engine(resolve_db_url(args.db, Workspace(args.workspace)))
    runs, recs = schema.runs.c, schema.recommendations.c
    with engine.connect() as conn:
        run_id = conn.execute(sa.select(sa.func.max(runs.run_id)).where(runs.status == "complete")).scalar()
        if run_id is None:
            raise SystemExit(f"{args.workspace}: no complete nightly run")
        items = conn.execute(sa.select(recs.news_id).where(recs.run_id == run_id)).scalars().all()
    engine.dispose()
    figures = {
        "run_id": run_id,
        "recommendations": len(items),
        "back_catalogue": sum(n in back for n in items),
        "first_shown_before_freshness_cut": sum(n in shown and shown[n] < stale_before for n in items),
        "distinct_articles": len(set(items)),
        "back_catalogue_articles_in_file": len(back),
        "shown_articles_in_file": len(shown),
    }
    figures["back_catalogue_share"] = figures["back_catalogue"] / max(1, figures["recommendations"])
    for key, value in figures.items():
        print(f"{key:36s} {value:.3f}" if isinstance(value, float) else f"{key:36s} {value}")
    out = ROOT / "results" / (f"back_catalogue_{args.tag}.json" if args.tag else "back_catalogue.json")
    out.write_text(json.dumps({
        "benchmark": "back_catalogue", "args": {k: str(v) for k, v in vars(args).items()},
        "host": platform.node(), "figures": figures,
    }, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
