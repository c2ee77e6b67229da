"""Compare two ``metrics.json`` files (``recsys evaluate --compare A.json B.json``)."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, TextIO

from recsys.evaluation.report import METRIC_LABELS, SCHEMA_VERSION, ReportError
from recsys.metrics.accumulator import METRICS

# Rows compared besides METRICS: (label, how to read the value out of a model entry).
_EXTRA = {
    "gap_closed": lambda entry: entry.get("gap_closed"),
    "ece": lambda entry: (entry.get("calibration") or {}).get("ece"),
}


class ComparisonRow(NamedTuple):
    """One model's metric in two reports; ``diff`` is ``b - a`` when both exist; ``a_ci`` and
    ``b_ci`` each report's own ``(low, high)`` interval, where it has one."""

    model: str
    metric: str
    a: float | None
    b: float | None
    diff: float | None
    a_ci: tuple[float, float] | None = None
    b_ci: tuple[float, float] | None = None


def load_metrics(path: str | os.PathLike) -> dict:
    """Read a ``metrics.json`` written by ``write_report``.

    Raises:
        ReportError: a missing or unreadable file, invalid JSON, or a schema version this code
            does not know.
    """
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} line {err.lineno}: not valid JSON ({err.msg}), expected a metrics.json") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: cannot be read ({getattr(err, 'strerror', None) or err}), expected a metrics.json") from None
    if not isinstance(document, dict) or document.get("schema_version") != SCHEMA_VERSION:
        found = document.get("schema_version") if isinstance(document, dict) else type(document).__name__
        raise ReportError(f"{path}: field 'schema_version' has {found!r}, expected {SCHEMA_VERSION}")
    if not isinstance(document.get("models"), dict):
        raise ReportError(f"{path}: field 'models' is missing, expected an object of models")
    return document


def _metric_value(entry: Mapping | None, metric: str):
    if entry is None:
        return None
    if metric in _EXTRA:
        return _EXTRA[metric](entry)
    return ((entry.get("metrics") or {}).get(metric) or {}).get("value")


def _metric_interval(entry: Mapping | None, metric: str) -> tuple[float, float] | None:
    if entry is None or metric in _EXTRA:
        return None
    found = (entry.get("metrics") or {}).get(metric) or {}
    low, high = _number(found.get("ci_low")), _number(found.get("ci_high"))
    return None if low is None or high is None else (low, high)


def compare_metrics(a: Mapping, b: Mapping) -> list[ComparisonRow]:
    """Differences per model and metric between two report dicts.

    Args:
        a: the baseline report (``metrics.json`` content).
        b: the report compared with it.

    Returns:
        Rows for every model in either report (a's order, then b's new models) and every
        metric of METRICS plus ``gap_closed`` and ``ece``; a value is None where a report lacks
        it, and rows missing from both are left out.

    Raises:
        ReportError: a dict without ``models``.
    """
    for label, doc in (("a", a), ("b", b)):
        if not isinstance(doc.get("models"), Mapping):
            raise ReportError(f"report {label} lacks 'models', expected a metrics.json document")
    rows = []
    for name, name_a, name_b in _pairs(a["models"], b["models"]):
        entry_a, entry_b = a["models"].get(name_a), b["models"].get(name_b)
        for metric in (*METRICS, *_EXTRA):
            value_a, value_b = _number(_metric_value(entry_a, metric)), _number(_metric_value(entry_b, metric))
            if value_a is None and value_b is None:
                continue
            diff = value_b - value_a if value_a is not None and value_b is not None else None
            rows.append(ComparisonRow(name, metric, value_a, value_b, diff,
                                      _metric_interval(entry_a, metric), _metric_interval(entry_b, metric)))
    return rows


def _number(value):
    """A metric value, or None for anything that is not a number (a hand-edited file)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _role(name: str, entry) -> tuple:
    """What a model entry stands for across reports: its kind and its name without the version
    (``text+image (v2026...)`` is the evaluated model of its report, whichever version)."""
    kind = entry.get("kind") if isinstance(entry, Mapping) else None
    return kind, _VERSION_SUFFIX.sub("", name)


_VERSION_SUFFIX = re.compile(r" \(v[^()]*\)$")


def _pairs(models_a: Mapping, models_b: Mapping) -> list[tuple[str, str | None, str | None]]:
    """``(row name, name in a, name in b)``: the same name in both reports, and otherwise the one
    entry of a role that only a has with the one entry of that role that only b has (two
    reports of two versions: ``text+image (v1 -> v2)``), then the one evaluated model left in
    each (``text+image (v1) -> text only (v2)``); a's order, then b's new entries."""
    only_a = [n for n in models_a if n not in models_b]
    only_b = [n for n in models_b if n not in models_a]
    roles_a = [_role(n, models_a[n]) for n in only_a]
    roles_b = [_role(n, models_b[n]) for n in only_b]
    partner = {}
    for name, role in zip(only_a, roles_a):
        if roles_a.count(role) == 1 and roles_b.count(role) == 1:
            partner[name] = only_b[roles_b.index(role)]
    # Then the one evaluated model left in each report, whatever it reads (two versions trained
    # with other --modalities, evaluated apart): unpaired, every row of both showed no difference.
    left_a = [n for n, (kind, _) in zip(only_a, roles_a) if kind == "model" and n not in partner]
    left_b = [n for n, (kind, _) in zip(only_b, roles_b) if kind == "model" and n not in partner.values()]
    if len(left_a) == 1 and len(left_b) == 1:
        partner[left_a[0]] = left_b[0]
    paired_b = set(partner.values())
    out = []
    for name in models_a:
        if name in models_b:
            out.append((name, name, name))
        elif name in partner:
            version_b = _VERSION_SUFFIX.search(partner[name])
            if _role(name, models_a[name]) != _role(partner[name], models_b[partner[name]]):
                row = f"{name} -> {partner[name]}"  # two roles: both named
            elif version_b and name.endswith(")"):
                row = f"{name[:-1]} -> {version_b.group(0)[2:]}"
            else:
                row = name
            out.append((row, name, partner[name]))
        else:
            out.append((name, name, None))
    out += [(name, None, name) for name in models_b if name not in models_a and name not in paired_b]
    return out


def format_comparison(rows: list[ComparisonRow], *, a_label: str = "A", b_label: str = "B") -> str:
    """A plain-text table of ``compare_metrics`` rows: each value with its report's interval in
    brackets; gap closed in % (its difference in percentage points), as the HTML report shows it."""
    labels = {**METRIC_LABELS, "gap_closed": "Gap closed", "ece": "ECE"}

    def show(value, metric: str, ci=None, signed: bool = False) -> str:
        if value is None:
            return "-"
        if metric == "gap_closed":
            return f"{100 * value:+.1f} pp" if signed else f"{100 * value:.1f} %"
        text = f"{value:+.4f}" if signed else f"{value:.4f}"
        return text + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")

    table = [("model", "metric", a_label, b_label, f"{b_label} - {a_label}")]
    table += [(r.model, labels.get(r.metric, r.metric), show(r.a, r.metric, r.a_ci), show(r.b, r.metric, r.b_ci),
               show(r.diff, r.metric, signed=True)) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines = []
    for i, row in enumerate(table):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), *(c.rjust(w) for c, w in zip(row[2:], widths[2:]))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_comparison(
    rows: list[ComparisonRow], *, a_label: str = "A", b_label: str = "B", file: TextIO | None = None
) -> None:
    """Print ``format_comparison`` to ``file`` (default stdout)."""
    print(format_comparison(rows, a_label=a_label, b_label=b_label), file=file or sys.stdout)


# Header facts that identify the evaluated impressions when a report lacks the file's sha256.
_SET_COUNTS = ("num_impressions", "num_labelled_impressions", "num_candidates", "num_clicked")


def data_differences(a: Mapping, b: Mapping) -> list[str]:
    """How the impressions two reports were computed on differ; empty when they are the same.

    The file's sha256 decides when both headers have it (reports since it was recorded);
    otherwise the impression, candidate and click counts do.
    """
    head_a, head_b = a.get("header") or {}, b.get("header") or {}
    sha_a, sha_b = head_a.get("behaviors_sha256"), head_b.get("behaviors_sha256")
    if sha_a and sha_b:
        return [] if sha_a == sha_b else [f"behaviors files with sha256 {sha_a[:12]} and {sha_b[:12]}"]
    return [f"{key} {head_a.get(key)} and {head_b.get(key)}" for key in _SET_COUNTS if head_a.get(key) != head_b.get(key)]


def compare_files(a: str | os.PathLike, b: str | os.PathLike, *, allow_different_data: bool = False) -> str:
    """The comparison table of two ``metrics.json`` files, headed by which file is A and B.

    Two reports of different impressions differ by their data as much as by their models,
    so they are refused unless ``allow_different_data``; the table is then headed by a warning.

    Raises:
        ReportError: as ``load_metrics``, or the reports were computed on different impressions.
    """
    doc_a, doc_b = load_metrics(a), load_metrics(b)
    differences = data_differences(doc_a, doc_b)
    if differences and not allow_different_data:
        raise ReportError(
            f"{a} and {b} were computed on different impressions ({'; '.join(differences)}): their differences "
            "mix the data with the models. Evaluate both models on the same behaviors file "
            "(or pass --allow-different-data)"
        )
    rows = compare_metrics(doc_a, doc_b)
    warning = f"WARNING: different impressions ({'; '.join(differences)})\n" if differences else ""
    settings = "".join(f"WARNING: {text}\n" for text in setting_differences(doc_a, doc_b))
    note = release_note(doc_a, doc_b)
    return (f"{warning}A: {_describe(a, doc_a)}\nB: {_describe(b, doc_b)}\n{settings}\n" + format_comparison(rows)
            + "\n\n" + _UNPAIRED + (f"\n{note}" if note else ""))


# B - A of two reports has no interval of its own: each report resampled its own users.
_UNPAIRED = ("Note: brackets hold each report's own interval. B - A compares two reports, so it is unpaired: "
             "their intervals may overlap while a paired difference is clear, or the reverse. For a paired "
             "interval of the difference, evaluate both versions in one report (recsys evaluate --models A,B).")


def setting_differences(a: Mapping, b: Mapping) -> list[str]:
    """How two reports of the same impressions were computed differently, beyond the models:
    where side features were read (which includes the store's end), whether the file was
    held-out, and whether an oracle row sets the gap closed. Empty when alike."""
    head_a, head_b = a.get("header") or {}, b.get("header") or {}
    out = []
    side_a, side_b = head_a.get("side_features_at"), head_b.get("side_features_at")
    if _read_exposure(side_a) != _read_exposure(side_b):
        out.append(f"side features read differently (store end included): A {side_a or 'not recorded'}; "
                   f"B {side_b or 'not recorded'}")
    if "trained_on_the_file" in head_a and "trained_on_the_file" in head_b:
        trained_a, trained_b = head_a["trained_on_the_file"] or [], head_b["trained_on_the_file"] or []
        if bool(trained_a) != bool(trained_b):
            which, versions = ("A", trained_a) if trained_a else ("B", trained_b)
            out.append(f"only {which} is not held-out (the file lies in the training window of {', '.join(versions)})")
    stored_a, stored_b = head_a.get("labelled_impressions_in_store"), head_b.get("labelled_impressions_in_store")
    if bool(stored_a) != bool(stored_b) and None not in (stored_a, stored_b):
        which, count = ("A", stored_a) if stored_a else ("B", stored_b)
        out.append(f"only {which} is not held-out (its store held {count} of the file's impressions with their clicks)")
    oracle_a, oracle_b = (any(isinstance(e, Mapping) and e.get("kind") == "oracle" for e in doc["models"].values())
                          for doc in (a, b))
    if oracle_a != oracle_b:
        out.append(f"only {'A' if oracle_a else 'B'} has an oracle row: gap closed exists in one report only")
    return out


# Endings of side_features_at that say the file's exposure was not read: the same reading as a
# report written before recsys could read it, whose text has no such ending.
_EXPOSURE_NOT_READ = ("; file exposure off", "; file exposure: no version has a calibration")


def _read_exposure(reading: str | None) -> str | None:
    """``side_features_at`` without an ending that says the file's exposure was not read."""
    for ending in _EXPOSURE_NOT_READ:
        if reading is not None and reading.endswith(ending):
            return reading[: -len(ending)]
    return reading


def release_note(a: Mapping, b: Mapping) -> str | None:
    """A note when two reports were computed by different code (``header.recsys_release``)."""
    release_a, release_b = ((doc.get("header") or {}).get("recsys_release") for doc in (a, b))
    if release_a == release_b:
        return None
    return (f"Note: computed by different releases of recsys (A {release_a or 'not recorded'}, B "
            f"{release_b or 'not recorded'}): the baselines' tie orders and the metrics' code may differ too")


def _describe(path: str | os.PathLike, document: Mapping) -> str:
    header = document.get("header") or {}
    facts = []
    if header.get("behaviors_file"):
        facts.append(f"{header['behaviors_file']}, {header.get('num_impressions')} impressions")
    # Reports written before the header recorded it lack side_features_at.
    if header.get("side_features_at"):
        facts.append(f"side features: {header['side_features_at']}")
    return f"{Path(path)}" + (f" ({'; '.join(facts)})" if facts else "") + "".join(f"; {w}" for w in _warnings(header))


def _warnings(header: Mapping) -> list[str]:
    """What makes a report's figures not what they seem, in capitals on its A or B line (the
    counts also tell it for reports written before the header carried ``trained_on_the_file``)."""
    out = []
    if header.get("trained_on_the_file"):
        out.append(f"WARNING: NOT HELD-OUT, the file lies in the training window of {', '.join(header['trained_on_the_file'])}")
    if header.get("labelled_impressions_in_store"):
        out.append(f"WARNING: NOT HELD-OUT, the store held {header['labelled_impressions_in_store']} of the file's "
                   "impressions with their clicks")
    if header.get("num_labelled_impressions") == 0:
        out.append("WARNING: UNLABELLED file, every metric is n/a")
    elif header.get("num_labelled_impressions") and header.get("num_scored") == 0:
        out.append("WARNING: ALL SINGLE-CLASS impressions, the per-impression metrics are n/a")
    return out
