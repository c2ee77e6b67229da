"""The offline evaluation report: ``metrics.json`` and a self-contained ``report.html``.

The pipeline streams impressions into an ``ImpressionMetrics`` accumulator, calls
``build_result`` with the header facts, optionally adds ``beyond_accuracy(...)`` for the latest
nightly run, and hands the dict to ``write_report``. The dict (``metrics.json`` is this dict
plus ``"schema_version": 1``)::

    {"header": {"generated_at": ISO-8601 UTC str, "data_window": str | None,
                "behaviors_file": str | None, "behaviors_sha256": str | None,
                "num_impressions": int,
                "num_labelled_impressions": int, "num_unlabelled": int, "num_scored": int,
                "num_single_class": int, "num_candidates": int, "num_clicked": int,
                "ignored_history_entries": int | None,   # History ids naming no known article
                "model_versions": [str, ...], "encoders": {name: description},
                "side_features_at": str | None,   # where popularity and age were read
                "trained_on_the_file": [str, ...],  # versions whose training window holds the file
                "labelled_impressions_in_store": int | None,  # the file's impressions stored with labels
                "warnings": [str, ...],   # figures not held-out, no label, only single-class impressions
                "bootstrap": {"unit", "num_resamples", "breakdown_resamples", "confidence",
                              "seed", "pooled_auc", "min_units"}},
     "models": {name: {                         # in evaluation order; the first is the reference
         "kind": "model" | "baseline" | "oracle" | "ablation",
         "metrics": {metric: {"value", "ci_low", "ci_high"}},   # metric in METRICS
         "diff_to_first": {metric: value},
         "diff_to_first_ci": {metric: {"ci_low", "ci_high"}},  # paired bootstrap
         # An interval resting on fewer than bootstrap.min_units users is None, and its dict
         # adds "num_units" (ImpressionMetrics.result).
         "gap_closed": float | None,     # (AUC - 0.5) / (oracle AUC - 0.5), per-impression AUC
         "probabilistic": bool | None,   # every score in [0, 1]: log loss and calibration apply;
                                         # None: no labelled impression, so no score was seen
         "tied_impressions": int,        # impressions where the model tied two candidates
         "calibration": {"strategy", "num_bins", "bins": [{"lower", "upper", "count",
                         "mean_predicted", "fraction_positive"}], "ece"} | None,
         "breakdowns": {scheme: {group: {"num_impressions", "num_scored", "num_candidates",
                                         "num_clicked", "metrics": {metric: {...}}}}}}},
     "beyond_accuracy": {"run_id", "model_version", "as_of",   # which nightly run (recsys evaluate)
                         "model_version_evaluated",   # is its version one of model_versions
                         "num_users", "num_recommendations", "catalogue_size",
                         "num_distinct_items", "coverage", "intra_list_diversity",
                         "gini_simpson_diversity", "novelty", "mean_popularity_percentile",
                         "new_since"} | None}

Values are None where a metric is undefined. Every number the HTML shows is in this dict.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from recsys import release
from recsys.atomic import atomic_open
from recsys.columns import NEWS_ID, RANK, USER_ID
from recsys.errors import RecsysError
from recsys.metrics.accumulator import HIGHER_IS_BETTER, METRICS, ImpressionMetrics

SCHEMA_VERSION = 1
KINDS = ("model", "ablation", "baseline", "oracle")
METRIC_LABELS = {
    "impression_auc": "AUC per impression",
    "mrr": "MRR",
    "ndcg@5": "nDCG@5",
    "ndcg@10": "nDCG@10",
    "pooled_auc": "AUC pooled",
    "log_loss": "Log loss",
}
METRIC_UNITS = {m: "0-1, higher is better" for m in METRICS} | {"log_loss": "nats, lower is better"}
# Breakdown plots show at most this many groups (the largest; the table lists all).
_MAX_PLOTTED_GROUPS = 20
# A tick label longer than this is cut (with "…"): a category may have 128 characters, and a
# label that long leaves the chart no width, so matplotlib drops its layout and cuts every label.
_MAX_TICK_LABEL = 40


class ReportError(RecsysError):
    """A result dict or metrics file that does not have the report's shape."""


def build_result(
    metrics: ImpressionMetrics,
    *,
    kinds: Mapping[str, str] | None = None,
    behaviors_file: str | os.PathLike | None = None,
    data_window: str | None = None,
    model_versions: Sequence[str] = (),
    encoders: Mapping[str, object] | None = None,
    generated_at: datetime | None = None,
    beyond_accuracy: Mapping | None = None,
    side_features_at: str | None = None,
    behaviors_sha256: str | None = None,
    ignored_history_entries: int | None = None,
    trained_on_the_file: Sequence[str] = (),
    labelled_impressions_in_store: int | None = None,
    warnings: Sequence[str] = (),
) -> dict:
    """The report dict (module docstring) from an accumulator and the header facts.

    Args:
        metrics: the accumulator, with every impression added.
        kinds: model name -> one of KINDS; models not named are "model". At most one oracle;
            with one, every row gets ``gap_closed``.
        behaviors_file: the evaluated file, for the header.
        data_window: the evaluated time window, as text (e.g. "2019-11-14 to 2019-11-15").
        model_versions: version ids of the evaluated models.
        encoders: encoder name -> description (e.g. dims) of the current model version.
        generated_at: report time (default: now, UTC).
        beyond_accuracy: the dict of ``beyond_accuracy`` for the latest nightly run, or None.
        side_features_at: where the models read popularity and age (e.g. "impression time").
        behaviors_sha256: hex sha256 of the evaluated file's bytes: ``--compare`` refuses two
            reports of different data.
        ignored_history_entries: History entries of the file that name no known article,
            left out of the readers' histories.
        trained_on_the_file: versions whose training window holds a time of the file: their
            figures are not held-out.
        labelled_impressions_in_store: how many of the file's impressions the store holds with
            their labels (their clicks reach the models' inputs: not held-out); None: not checked.
        warnings: what the reader must know before reading the figures (e.g. why they are
            not held-out); ``label_warning``'s, when the file has one, is added after them.

    Returns:
        The report dict.

    Raises:
        ReportError: an unknown model or kind in ``kinds``, or more than one oracle.
    """
    kinds = dict(kinds or {})
    unknown = sorted(set(kinds) - set(metrics.model_names))
    if unknown:
        raise ReportError(f"kinds names unknown models {unknown}, expected some of {list(metrics.model_names)}")
    bad = {k: v for k, v in kinds.items() if v not in KINDS}
    if bad:
        raise ReportError(f"kinds holds {bad}, expected each kind to be one of {list(KINDS)}")
    oracles = [name for name, kind in kinds.items() if kind == "oracle"]
    if len(oracles) > 1:
        raise ReportError(f"kinds marks {oracles} as oracle, expected at most one")

    raw = metrics.result()
    oracle_auc = raw["models"][oracles[0]]["metrics"]["impression_auc"]["value"] if oracles else None
    models = {}
    for name, entry in raw["models"].items():
        auc = entry["metrics"]["impression_auc"]["value"]
        gap = None
        if oracle_auc is not None and auc is not None and oracle_auc > 0.5:
            gap = (auc - 0.5) / (oracle_auc - 0.5)
        models[name] = {"kind": kinds.get(name, "model"), **entry, "gap_closed": gap}
    when = generated_at or datetime.now(timezone.utc)
    header = {
        "generated_at": when.isoformat(timespec="seconds"),
        # The code that computed it: two releases may break the baselines' ties or read features
        # differently, which `--compare` says.
        "recsys_release": release(),
        "data_window": data_window,
        "behaviors_file": None if behaviors_file is None else str(behaviors_file),
        "behaviors_sha256": behaviors_sha256,
        **{key: raw[key] for key in (
            "num_impressions", "num_labelled_impressions", "num_unlabelled", "num_scored",
            "num_single_class", "num_candidates", "num_clicked",
        )},
        "ignored_history_entries": ignored_history_entries,
        "model_versions": [str(v) for v in model_versions],
        "encoders": {str(k): v for k, v in (encoders or {}).items()},
        "side_features_at": side_features_at,
        "trained_on_the_file": [str(v) for v in trained_on_the_file],
        "labelled_impressions_in_store": labelled_impressions_in_store,
        "warnings": [str(w) for w in warnings],
        "bootstrap": raw["bootstrap"],
    }
    about_labels = label_warning(behaviors_file, raw["num_labelled_impressions"], raw["num_scored"])
    if about_labels:
        header["warnings"].append(about_labels)
    return {"header": header, "models": models, "beyond_accuracy": None if beyond_accuracy is None else dict(beyond_accuracy)}


def label_warning(behaviors_file, num_labelled_impressions: int, num_scored: int) -> str | None:
    """Why every figure, or every per-impression figure, is n/a; None when the file has scored impressions."""
    where = "the file" if behaviors_file is None else str(behaviors_file)
    if num_labelled_impressions == 0:  # a MIND test file: nothing to measure
        return (f"{where} has no labelled impression: every metric is n/a; the prediction files are written "
                "(recsys predict writes one without a report)")
    if num_scored == 0:  # labelled, but no impression has both a click and a skip
        return (f"{where}: none of its {num_labelled_impressions} labelled impressions has both a clicked and a "
                "skipped candidate, so the per-impression metrics are n/a (single-class impressions have no AUC and "
                "recsys leaves them out of every mean; the MIND scorer prints NaN for them: docs/evaluation.md, "
                "Averaging)")
    return None


def beyond_accuracy(
    recs: pd.DataFrame | Iterable[pd.DataFrame],
    item_category: Mapping | pd.Series,
    item_first_seen: Mapping | pd.Series,
    item_popularity: Mapping | pd.Series,
    catalogue_size: int,
    new_since,
) -> dict:
    """Coverage, diversity, novelty and popularity bias of one run's recommendation lists.

    Args:
        recs: one row per recommendation, columns ``user_id``, ``rank``, ``news_id``; or chunks
            of such rows, every user's list in one chunk (``repository.iter_run_recommendations``
            streams a run so), so that a run of a million users is never held at once.
        item_category: news id -> category (items without one count as category "unknown").
        item_first_seen: news id -> first time the article was shown or published (NaT or
            missing: never shown before, so new).
        item_popularity: news id -> popularity (e.g. clicks in the training window); missing
            items count as 0.
        catalogue_size: articles that could have been recommended (at least the number of
            distinct recommended articles and of items with a popularity).
        new_since: an article first seen at or after this time counts as new.

    Returns:
        ``{"num_users", "num_recommendations", "catalogue_size", "num_distinct_items",
        "coverage", "intra_list_diversity", "gini_simpson_diversity", "novelty",
        "mean_popularity_percentile", "new_since"}``: coverage is the share of the catalogue
        recommended at least once; intra-list diversity the mean over lists of distinct
        categories / list length; Gini-Simpson the mean of ``1 - sum_c share_c**2``; novelty the
        share of recommendations that are new articles; the popularity percentile of an item is
        ``100 * (#catalogue items less popular + half the equally popular) / catalogue_size``
        (unpopular 0, the catalogue's mean 50), averaged over recommendations.

    Raises:
        ReportError: missing columns, no rows, a user's list split over two chunks, a negative
            popularity, or a catalogue smaller than what it must hold.
    """
    popularity = pd.Series(item_popularity, dtype=np.float64)
    if (popularity < 0).any() or popularity.isna().any():
        bad = popularity[(popularity < 0) | popularity.isna()]
        raise ReportError(f"item_popularity of {bad.index[0]!r} is {bad.iloc[0]}, expected a number >= 0")
    if catalogue_size < len(popularity):
        raise ReportError(f"catalogue_size is {catalogue_size}, expected at least {len(popularity)} "
                          "(the distinct recommended articles and the articles with a popularity)")
    category_of = pd.Series(item_category, dtype=object)
    seen = pd.Series(item_first_seen)
    # Text times may mix formats ("2019-11-14", "2019-11-14 23:00"); datetimes pass through.
    seen = pd.to_datetime(seen, utc=True, format="mixed") if seen.dtype == object else pd.to_datetime(seen, utc=True)
    since = pd.Timestamp(new_since)
    since = since.tz_localize("UTC") if since.tzinfo is None else since.tz_convert("UTC")
    known = np.sort(popularity.to_numpy())  # catalogue items without a popularity are 0
    num_zero_fill = catalogue_size - len(known)

    num_users = num_recs = 0
    sums = dict.fromkeys(("diversity", "gini_simpson", "new", "percentile"), 0.0)
    distinct_items: set = set()
    last_user = None
    for chunk in [recs] if isinstance(recs, pd.DataFrame) else recs:
        missing = [c for c in (USER_ID, RANK, NEWS_ID) if c not in chunk.columns]
        if missing:
            raise ReportError(f"recommendations lack columns {missing}, expected {[USER_ID, RANK, NEWS_ID]}")
        if chunk.empty:
            continue
        users = chunk[USER_ID].to_numpy()
        if last_user is not None and (users == last_user).any():
            raise ReportError(f"user {last_user!r}'s recommendations are split over two chunks, expected one chunk per list")
        last_user = users[-1]
        news = chunk[NEWS_ID]
        distinct_items.update(news.unique().tolist())
        categories = news.map(category_of).fillna("unknown")
        frame = pd.DataFrame({USER_ID: users, "category": categories.to_numpy()})
        list_length = frame.groupby(USER_ID).size()
        per_category = frame.groupby([USER_ID, "category"]).size()
        distinct = per_category.groupby(level=0).size()
        share_sq = (per_category / list_length.reindex(per_category.index.get_level_values(0)).to_numpy()) ** 2
        num_users += len(list_length)
        num_recs += len(chunk)
        sums["diversity"] += float((distinct / list_length.reindex(distinct.index)).sum())
        sums["gini_simpson"] += float((1.0 - share_sq.groupby(level=0).sum()).sum())
        first_seen = seen.reindex(news.to_numpy())  # keeps the datetime dtype; missing items are NaT
        sums["new"] += float((first_seen.isna().to_numpy() | (first_seen >= since).to_numpy()).sum())
        # Percentiles use midranks over the catalogue.
        values = news.map(popularity).fillna(0.0).to_numpy(dtype=np.float64)
        below = np.searchsorted(known, values, side="left") + np.where(values > 0, num_zero_fill, 0)
        equal = np.searchsorted(known, values, side="right") - np.searchsorted(known, values, side="left")
        equal = equal + np.where(values == 0, num_zero_fill, 0)
        sums["percentile"] += float((100.0 * (below + 0.5 * equal) / catalogue_size).sum())
    if num_recs == 0:
        raise ReportError("recommendations are empty, expected at least one row")
    num_distinct = len(distinct_items)
    if catalogue_size < num_distinct:
        raise ReportError(
            f"catalogue_size is {catalogue_size}, expected at least {max(num_distinct, len(popularity))} "
            "(the distinct recommended articles and the articles with a popularity)"
        )
    return {
        "num_users": num_users,
        "num_recommendations": num_recs,
        "catalogue_size": int(catalogue_size),
        "num_distinct_items": num_distinct,
        "coverage": num_distinct / catalogue_size,
        "intra_list_diversity": sums["diversity"] / num_users,
        "gini_simpson_diversity": sums["gini_simpson"] / num_users,
        "novelty": sums["new"] / num_recs,
        "mean_popularity_percentile": sums["percentile"] / num_recs,
        "new_since": since.isoformat(),
    }


def _check_result(result: Mapping) -> None:
    for key in ("header", "models"):
        if key not in result:
            raise ReportError(f"result lacks '{key}', expected keys 'header', 'models' and 'beyond_accuracy'")
    if not isinstance(result["models"], Mapping) or not result["models"]:
        raise ReportError("result['models'] is empty, expected at least one model")
    for name, entry in result["models"].items():
        for key in ("kind", "metrics", "diff_to_first", "gap_closed", "calibration", "breakdowns"):
            if key not in entry:
                raise ReportError(f"result['models']['{name}'] lacks '{key}'")
        if entry["kind"] not in KINDS:
            raise ReportError(f"result['models']['{name}']['kind'] is {entry['kind']!r}, expected one of {list(KINDS)}")
        absent = [m for m in METRICS if m not in entry["metrics"]]
        if absent:
            raise ReportError(f"result['models']['{name}']['metrics'] lacks {absent}")


def _plain(value):
    """JSON-ready copy: numpy scalars to Python, NaN/inf to None, tuples to lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (datetime, pd.Timestamp)):
        return value.isoformat()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _write_all_atomic(files: Mapping[Path, bytes]) -> None:
    """Write every file to its temporary name, then replace them: a write that fails (a full
    disk) replaces none, so an old report.html never sits beside a new metrics.json. Only the
    renames, which write no data, come after the first replacement."""
    with ExitStack() as stack:
        for path, data in files.items():
            out = stack.enter_context(atomic_open(path, "wb"))
            out.write(data)
            out.flush()
            os.fsync(out.fileno())


def write_report(result: Mapping, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``report.html`` into ``out_dir`` (created if missing). Both
    are written whole before either replaces the one an earlier report left: a failed write
    leaves the earlier pair as it was.

    Args:
        result: the report dict (module docstring), e.g. from ``build_result``.
        out_dir: destination folder.

    Returns:
        ``(metrics_json_path, html_path)``.

    Raises:
        ReportError: the dict lacks a required part.
    """
    _check_result(result)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {"schema_version": SCHEMA_VERSION, **_plain(result)}
    document.setdefault("beyond_accuracy", None)
    html = render_html(document)
    json_path, html_path = out_dir / "metrics.json", out_dir / "report.html"
    # The page is replaced first: metrics.json, which names the report's prediction files
    # (``earlier_prediction_files``), last.
    _write_all_atomic({json_path: (json.dumps(document, indent=2, allow_nan=False) + "\n").encode("utf-8"),
                       html_path: html.encode("utf-8")})
    return json_path, html_path


def render_html(document: Mapping) -> str:
    """The report page for a checked, JSON-ready report dict."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("recsys.evaluation", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _format_number
    env.filters["count"] = _format_count
    env.filters["pct"] = _format_percent
    unit = (document["header"].get("bootstrap") or {}).get("unit", "impression")
    env.filters["interval"] = functools.partial(_format_interval, unit=unit)
    env.filters["signed_interval"] = functools.partial(_format_signed_interval, unit=unit)
    env.filters["describe"] = _describe
    return env.get_template("report.html.j2").render(**_context(document))


def _describe(value) -> str:
    """A header value as text: mappings as ``key=value`` pairs, lists comma-separated."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_describe(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_describe(v) for v in value)
    return str(value)


def _format_number(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _format_count(value) -> str:
    return "n/a" if value is None else f"{value:,}"


def _format_percent(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100.0 * value:.{digits}f} %"


def _format_interval(entry: Mapping | None, digits: int = 4, *, unit: str = "impression") -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    text = f"{entry['value']:.{digits}f}"
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        text += f" [{entry['ci_low']:.{digits}f}, {entry['ci_high']:.{digits}f}]"
    elif entry.get("num_units") is not None:
        text += f" [too few {unit}s for an interval]"
    return text


def _format_signed_interval(value, ci: Mapping | None, digits: int = 4, *, unit: str = "impression") -> str:
    if value is None:
        return "n/a"
    text = f"{value:+.{digits}f}"
    if ci and ci.get("ci_low") is not None and ci.get("ci_high") is not None:
        text += f" [{ci['ci_low']:+.{digits}f}, {ci['ci_high']:+.{digits}f}]"
    elif ci and ci.get("num_units") is not None:
        text += f" [too few {unit}s for an interval]"
    return text


def _sort_key(entry: tuple[str, Mapping]):
    value = entry[1]["metrics"]["impression_auc"]["value"]
    return (value is None, -(value or 0.0))


def _context(document: Mapping) -> dict:
    models = document["models"]
    first = next(iter(models))
    ordered = sorted(models.items(), key=_sort_key)
    # One colour per model in every plot, fixed by evaluation order.
    colors = {name: f"C{i % 10}" for i, name in enumerate(models)}
    schemes = []
    scheme_names = list(dict.fromkeys(s for entry in models.values() for s in entry["breakdowns"]))
    for scheme in scheme_names:
        groups = list(dict.fromkeys(g for entry in models.values() for g in entry["breakdowns"].get(scheme, {})))
        if not groups:
            continue
        counts = next(entry["breakdowns"][scheme] for entry in models.values() if entry["breakdowns"].get(scheme))
        schemes.append({
            "name": scheme,
            "groups": groups,
            "counts": counts,
            "plot": _plot_breakdown(scheme, groups, ordered, colors),
        })
    calibrated = [(name, entry) for name, entry in ordered if entry.get("calibration")]
    return {
        "header": document["header"],
        "first_model": first,
        "models": ordered,
        "diff_models": [(name, entry) for name, entry in ordered if name != first],
        "metrics": METRICS,
        "metric_labels": METRIC_LABELS,
        "metric_units": METRIC_UNITS,
        "higher_is_better": HIGHER_IS_BETTER,
        "has_oracle": any(entry["kind"] == "oracle" for entry in models.values()),
        "calibrated": calibrated,
        "schemes": schemes,
        "beyond": document.get("beyond_accuracy"),
        "labelled": bool(document["header"].get("num_labelled_impressions", 1)),
        "plots": {
            # An unlabelled file has no value to draw: no empty chart.
            "metrics": _plot_metrics(ordered, colors, document["header"].get("bootstrap", {}).get("confidence", 0.95))
            if any(entry["metrics"][m]["value"] is not None for _, entry in ordered for m in METRICS) else None,
            "reliability": _plot_reliability(calibrated, colors) if calibrated else None,
        },
        "schema_version": document["schema_version"],
    }


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")  # set here, not at import: importing the package must not switch backends
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png_data_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _errors(entries: list[Mapping]) -> np.ndarray:
    """(2, k) asymmetric error bar lengths; NaN where an interval is missing (matplotlib draws no
    bar and no caps there: a zero length drew the zero-width bar that looks certain)."""
    lows, highs = [], []
    for e in entries:
        value = e.get("value")
        ok = value is not None and e.get("ci_low") is not None and e.get("ci_high") is not None
        lows.append(max(value - e["ci_low"], 0.0) if ok else np.nan)
        highs.append(max(e["ci_high"] - value, 0.0) if ok else np.nan)
    return np.array([lows, highs])


def _grouped_bars(
    ax, labels: list[str], series: list[tuple[str, list[Mapping]]], colors: Mapping[str, str], *, horizontal: bool = False
) -> None:
    positions = np.arange(len(labels))
    width = 0.8 / max(len(series), 1)
    for i, (name, entries) in enumerate(series):
        values = [e.get("value") if e and e.get("value") is not None else np.nan for e in entries]
        offset = positions - 0.4 + width * (i + 0.5)
        errors = _errors([e or {} for e in entries])
        if horizontal:
            ax.barh(offset, values, height=width, xerr=errors, label=name, capsize=2, color=colors[name])
        else:
            ax.bar(offset, values, width=width, yerr=errors, label=name, capsize=2, color=colors[name])
    labels = [_tick_label(label) for label in labels]
    if horizontal:
        ax.set_yticks(positions, labels)
        ax.invert_yaxis()
    else:
        ax.set_xticks(positions, labels)


def _tick_label(label: str) -> str:
    return label if len(label) <= _MAX_TICK_LABEL else label[: _MAX_TICK_LABEL - 1] + "…"


def _legend_below(figure, axes, num_entries: int, *, max_columns: int = 3) -> None:
    """One legend for the figure, below the axes: inside an axes it covered bars, and model
    names of ~40 characters pushed it past the figure's left edge."""
    handles, labels = axes.get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(num_entries, max_columns), fontsize="small")


def _shown_in_plots(rows: list[tuple[str, Mapping]]) -> list[tuple[str, Mapping]]:
    """Rows drawn in the reliability diagram and log-loss panel: baselines left out (they stay
    in the tables), as the random baseline's ECE of ~0.4 set the axes and left the models in a
    corner; all rows when there are only baselines."""
    return [(name, entry) for name, entry in rows if entry.get("kind") != "baseline"] or rows


def _plot_metrics(ordered: list[tuple[str, Mapping]], colors: Mapping[str, str], confidence: float) -> str:
    return _png_data_uri(_metrics_figure(ordered, colors, confidence))


def _metrics_figure(ordered: list[tuple[str, Mapping]], colors: Mapping[str, str], confidence: float):
    ranking = [m for m in METRICS if m != "log_loss"]
    losses = [(name, entry) for name, entry in _shown_in_plots(ordered) if entry["metrics"]["log_loss"]["value"] is not None]
    figure = _figure(11 if losses else 9, 4.2 + 0.25 * math.ceil(len(ordered) / 3))
    axes = figure.subplots(1, 2, width_ratios=[4, 1]) if losses else [figure.subplots()]
    # Two-line labels: one-line ones ("AUC per impression") overlapped their neighbours.
    _grouped_bars(axes[0], [METRIC_LABELS[m].replace(" ", "\n", 1) for m in ranking],
                  [(name, [entry["metrics"][m] for m in ranking]) for name, entry in ordered], colors)
    axes[0].set_ylabel("score (0-1, higher is better)")
    axes[0].set_ylim(0, 1)
    axes[0].set_title(f"Metrics with {100 * confidence:.0f}% bootstrap intervals")
    _legend_below(figure, axes[0], len(ordered))
    if losses:
        _grouped_bars(axes[1], ["Log loss"], [(name, [entry["metrics"]["log_loss"]]) for name, entry in losses], colors)
        axes[1].set_ylabel("nats (lower is better)")
        if len(losses) < sum(entry["metrics"]["log_loss"]["value"] is not None for _, entry in ordered):
            axes[1].set_title("baselines: see table", fontsize="small")
    return figure


def _plot_reliability(calibrated: list[tuple[str, Mapping]], colors: Mapping[str, str]) -> str:
    return _png_data_uri(_reliability_figure(calibrated, colors))


def _reliability_figure(calibrated: list[tuple[str, Mapping]], colors: Mapping[str, str]):
    shown = _shown_in_plots(calibrated)
    figure = _figure(8, 5 + 0.25 * math.ceil((len(shown) + 1) / 2))
    ax = figure.subplots()
    top = 0.0
    for name, entry in shown:
        bins = [b for b in entry["calibration"]["bins"] if b["count"]]
        x = [b["mean_predicted"] for b in bins]
        y = [b["fraction_positive"] for b in bins]
        top = max([top, *x, *y])
        ax.plot(x, y, marker="o", color=colors[name], label=f"{name} (ECE {entry['calibration']['ece']:.4f})")
    top = min(1.0, top * 1.05) or 1.0
    ax.plot([0, top], [0, top], linestyle="--", color="grey", label="perfect calibration")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("mean predicted click probability")
    ax.set_ylabel("observed click rate")
    left_out = len(calibrated) - len(shown)
    ax.set_title("Reliability diagram" + (" (baselines: see the table)" if left_out else ""))
    _legend_below(figure, ax, len(shown) + 1, max_columns=2)  # labels carry the ECE: longer
    return figure


def _plot_breakdown(scheme: str, groups: list[str], ordered: list[tuple[str, Mapping]], colors: Mapping[str, str]) -> str:
    return _png_data_uri(_breakdown_figure(scheme, groups, ordered, colors))


def _breakdown_figure(scheme: str, groups: list[str], ordered: list[tuple[str, Mapping]], colors: Mapping[str, str]):
    shown = groups[:_MAX_PLOTTED_GROUPS]
    height = 1.2 + 0.35 * len(shown) * max(1, min(len(ordered), 4)) / 2 + 0.25 * math.ceil(len(ordered) / 3)
    figure = _figure(9, height)
    ax = figure.subplots()
    series = [
        (name, [entry["breakdowns"].get(scheme, {}).get(g, {}).get("metrics", {}).get("impression_auc") for g in shown])
        for name, entry in ordered
    ]
    _grouped_bars(ax, shown, series, colors, horizontal=True)
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUC per impression within the group (0-1, higher is better)")
    more = f" (largest {len(shown)} of {len(groups)})" if len(groups) > len(shown) else ""
    ax.set_title(f"AUC per impression by {scheme}{more}")
    _legend_below(figure, ax, len(ordered))
    return figure
