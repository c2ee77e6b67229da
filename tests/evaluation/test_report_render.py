"""write_report: metrics.json holds every number of report.html; the page is self-contained."""

import base64
import copy
import io
import json
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest
from PIL import Image

from recsys.evaluation import report as report_module
from recsys.evaluation.report import SCHEMA_VERSION, ReportError, write_report
from report_data import make_accumulator

DATA_TABLES = ("metrics-table", "diff-table", "calibration-table", "beyond-table")


class _Page(HTMLParser):
    """Collects image sources, table ids, and the text of data cells (not name cells)."""

    def __init__(self):
        super().__init__()
        self.images, self.tables, self.cells = [], [], []
        self._table = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "table":
            self._table = attrs.get("id", "")
            self.tables.append(self._table)
        elif tag == "td" and self._table and (self._table in DATA_TABLES or self._table.startswith("breakdown-")):
            self._cell = [] if "name" not in (attrs.get("class") or "") else None

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _numbers(document):
    """Every numeric leaf of the JSON document."""
    if isinstance(document, dict):
        for value in document.values():
            yield from _numbers(value)
    elif isinstance(document, list):
        for value in document:
            yield from _numbers(value)
    elif isinstance(document, (int, float)) and not isinstance(document, bool):
        yield document


def _renderings(value):
    shown = {f"{value:.4f}", f"{value:+.4f}", f"{value:.3f}", f"{value:.1f}", f"{100 * value:.1f}", f"{100 * value:.0f}"}
    if isinstance(value, int):
        shown |= {str(value), f"{value:,}"}
    return shown


@pytest.fixture(scope="module")
def written(tmp_path_factory, synthetic_result):
    out = tmp_path_factory.mktemp("report") / "nested" / "out"
    json_path, html_path = write_report(synthetic_result, out)
    return synthetic_result, json_path, html_path


def test_files_are_written_without_leftovers(written):
    _, json_path, html_path = written
    assert json_path.name == "metrics.json" and html_path.name == "report.html"
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["metrics.json", "report.html"]


def test_metrics_json_is_the_result_with_a_schema_version(written):
    result, json_path, _ = written

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    document = json.loads(json_path.read_text(), parse_constant=reject)
    assert document["schema_version"] == SCHEMA_VERSION
    assert {k: v for k, v in document.items() if k != "schema_version"} == json.loads(json.dumps(result))


def test_every_number_in_the_tables_is_in_metrics_json(written):
    _, json_path, html_path = written
    page = _Page()
    page.feed(html_path.read_text())
    allowed = set()
    for value in _numbers(json.loads(json_path.read_text())):
        allowed |= _renderings(value)
    tokens = [t for cell in page.cells for t in re.findall(r"[+-]?\d[\d,]*(?:\.\d+)?", cell)]
    assert len(tokens) > 300
    missing = sorted({t for t in tokens if t not in allowed})
    assert missing == []


def test_tables_and_plots_are_present_and_self_contained(written):
    _, _, html_path = written
    page = _Page()
    text = html_path.read_text()
    page.feed(text)
    assert {"header-table", "metrics-table", "diff-table", "calibration-table", "beyond-table"} <= set(page.tables)
    assert {"breakdown-category", "breakdown-has_image", "breakdown-history_length"} <= set(page.tables)
    assert len(page.images) == 5  # metrics, reliability, one per breakdown scheme
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.format == "PNG" and image.width > 100 and image.height > 100
    assert "http://" not in text and "https://" not in text


def test_metrics_table_is_sorted_best_first(written):
    result, _, html_path = written
    rows = re.findall(r'<tr(?: class="reference")?>\s*<td class="name">([^<]+)</td><td class="name">(model|ablation|baseline|oracle)', html_path.read_text())
    shown = [name for name, _ in rows[: len(result["models"])]]
    by_auc = sorted(result["models"], key=lambda m: -result["models"][m]["metrics"]["impression_auc"]["value"])
    assert shown == by_auc


def test_backend_is_agg_after_writing(written):
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"


def test_importing_the_package_starts_no_plotting():
    code = "import sys, recsys.evaluation, recsys.metrics; print('matplotlib' in sys.modules, 'jinja2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_minimal_result_renders(tmp_path):
    # One non-probabilistic model, no breakdowns, no oracle, no nightly run.
    from recsys.evaluation.report import build_result
    from recsys.metrics.accumulator import ImpressionMetrics

    acc = ImpressionMetrics(["popularity"], num_resamples=50)
    acc.add([1, 0, 0], {"popularity": [3.0, 1.0, 2.0]})
    acc.add([0, 1], {"popularity": [5.0, 1.0]})
    _, html_path = write_report(build_result(acc), tmp_path)
    text = html_path.read_text()
    assert "calibration does not apply" in text and "No breakdowns were requested" in text
    assert "No nightly run was given" in text and 'id="diff-table"' not in text


def test_a_failed_render_writes_nothing(tmp_path, monkeypatch, synthetic_result):
    def broken(document):
        raise RuntimeError("template exploded")

    monkeypatch.setattr(report_module, "render_html", broken)
    with pytest.raises(RuntimeError, match="template exploded"):
        write_report(synthetic_result, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("header"), "result lacks 'header'"),
        (lambda r: r.update(models={}), r"result\['models'\] is empty"),
        (lambda r: r["models"]["v1"].pop("metrics"), r"result\['models'\]\['v1'\] lacks 'metrics'"),
        (lambda r: r["models"]["v1"].update(kind="champion"), r"\['kind'\] is 'champion', expected one of"),
        (lambda r: r["models"]["v1"]["metrics"].pop("mrr"), r"\['metrics'\] lacks \['mrr'\]"),
    ],
)
def test_malformed_results_are_rejected(tmp_path, change, message, synthetic_result):
    result = copy.deepcopy(synthetic_result)
    change(result)
    with pytest.raises(ReportError, match=message):
        write_report(result, tmp_path)


def test_make_accumulator_is_deterministic():
    assert make_accumulator(30).result() == make_accumulator(30).result()


def test_header_describes_structured_encoders(tmp_path, synthetic_result):
    result = copy.deepcopy(synthetic_result)
    result["header"]["encoders"] = {"text": {"name": "all-MiniLM-L6-v2", "dim": 384}, "image": {"name": "mobilenet_v1"}}
    _, html_path = write_report(result, tmp_path)
    assert "text: name=all-MiniLM-L6-v2, dim=384; image: name=mobilenet_v1" in html_path.read_text()


def test_header_says_where_side_features_were_read(tmp_path, synthetic_result):
    result = copy.deepcopy(synthetic_result)
    result["header"]["side_features_at"] = ("popularity at impression time, at most the store's end 2019-11-15T00:00:01; "
                                            "age at impression time")
    _, html_path = write_report(result, tmp_path)
    assert ("<th class=\"name\">Where side features (popularity, age) were read</th><td class=\"name\">"
            "popularity at impression time, at most the store&#39;s end 2019-11-15T00:00:01; age at impression time</td>"
            ) in html_path.read_text()


@pytest.mark.parametrize(("unit", "said"), [
    ("user", "percentile bootstrap over users (all impressions of a user move together"),
    ("impression", "percentile bootstrap over impressions (all candidates of an impression move together)"),
])
def test_the_notes_name_the_bootstrap_unit_the_header_names(tmp_path, synthetic_result, unit, said):
    # The notes said "over impressions" under a header (and a computation) over users.
    result = copy.deepcopy(synthetic_result)
    result["header"]["bootstrap"]["unit"] = unit
    _, html_path = write_report(result, tmp_path)
    text = html_path.read_text()
    assert f"percentile bootstrap over {unit}s," in text  # the header
    assert said in text
    other = "impressions" if unit == "user" else "users"
    assert f"bootstrap over {other}" not in text


class _DiffCells(HTMLParser):
    """(class, text) of every data cell of the difference table."""

    def __init__(self):
        super().__init__()
        self.cells, self._in_diff, self._cell = [], False, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._in_diff = attrs.get("id") == "diff-table"
        elif tag == "td" and self._in_diff and "name" not in (attrs.get("class") or ""):
            self._cell = [attrs.get("class") or ""]

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append((self._cell[0], "".join(self._cell[1:]).strip()))
            self._cell = None
        elif tag == "table":
            self._in_diff = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _diff_cells(html: str) -> list[tuple[str, str]]:
    parser = _DiffCells()
    parser.feed(html)
    return parser.cells


def test_one_reader_gives_no_interval_and_no_coloured_difference(tmp_path):
    # One user's 40 impressions: the old report showed "+0.0161 [+0.0161, +0.0161]", coloured.
    import numpy as np

    from recsys.evaluation.report import build_result
    from recsys.metrics.accumulator import ImpressionMetrics

    rng = np.random.default_rng(3)
    acc = ImpressionMetrics(["a", "b"], num_resamples=50, cluster_unit="user")
    for _ in range(40):
        p = rng.random(8)
        labels = (rng.random(8) < p).astype(int)
        acc.add(labels, {"a": rng.random(8), "b": p}, cluster="U1")
    _, html_path = write_report(build_result(acc), tmp_path)
    html = html_path.read_text()
    cells = _diff_cells(html)
    assert cells and all(cls == "" for cls, _ in cells)
    assert all(text.endswith("[too few users for an interval]") for _, text in cells if text != "n/a")
    assert "A value resting on fewer than 10 users gets no interval" in html


def test_a_metric_resting_on_too_few_units_says_so_in_its_cell(tmp_path, synthetic_result):
    result = copy.deepcopy(synthetic_result)
    result["header"]["bootstrap"]["unit"] = "user"
    result["models"]["v2"]["metrics"]["mrr"] = {"value": 0.3125, "ci_low": None, "ci_high": None, "num_units": 3}
    _, html_path = write_report(result, tmp_path)
    page = _Page()
    page.feed(html_path.read_text())
    assert "0.3125 [too few users for an interval]" in [cell.strip() for cell in page.cells]


def test_a_nan_beyond_accuracy_value_is_written_as_null(tmp_path, synthetic_result):
    result = copy.deepcopy(synthetic_result)
    result["beyond_accuracy"]["novelty"] = float("nan")
    json_path, _ = write_report(result, tmp_path)
    assert json.loads(json_path.read_text())["beyond_accuracy"]["novelty"] is None


def test_a_difference_is_coloured_only_when_its_interval_excludes_zero(tmp_path, synthetic_result):
    from recsys.metrics.accumulator import HIGHER_IS_BETTER, METRICS

    result = copy.deepcopy(synthetic_result)
    # The hunter's cell: worse by the sign, but the interval covers 0.
    result["models"]["v1"]["diff_to_first"]["mrr"] = -0.0094
    result["models"]["v1"]["diff_to_first_ci"]["mrr"] = {"ci_low": -0.0205, "ci_high": 0.0011}
    _, html_path = write_report(result, tmp_path)
    cells = _diff_cells(html_path.read_text())
    assert ("", "-0.0094 [-0.0205, +0.0011]") in cells
    seen = set()
    for i, (cls, text) in enumerate(cells):
        metric = METRICS[i % len(METRICS)]
        found = re.fullmatch(r"[+-]\d\.\d{4} \[([+-]\d\.\d{4}), ([+-]\d\.\d{4})\]", text)
        if not found:
            continue
        low, high = float(found.group(1)), float(found.group(2))
        if low <= 0 <= high:
            expected = ""
        else:
            expected = "better" if (low > 0) == HIGHER_IS_BETTER[metric] else "worse"
        assert cls == expected, (metric, text)
        seen.add(expected)
    assert seen == {"", "better", "worse"}  # the synthetic report has all three kinds of cell


def _unlabelled_accumulator():
    from recsys.metrics.accumulator import ImpressionMetrics

    acc = ImpressionMetrics(["a", "most popular"], num_resamples=20)
    acc.add([-1, -1, -1], {"a": [0.3, 0.1, 0.2], "most popular": [3.0, 1.0, 2.0]})
    acc.add([-1, -1], {"a": [0.5, 0.1], "most popular": [5.0, 1.0]})
    return acc


def _single_class_accumulator():
    from recsys.metrics.accumulator import ImpressionMetrics

    acc = ImpressionMetrics(["a"], num_resamples=20)
    acc.add([0, 0, 0], {"a": [0.3, 0.1, 0.2]})
    acc.add([1, 1], {"a": [0.5, 0.1]})
    return acc


def _banner(html: str) -> str:
    found = re.search(r'<div class="banner" id="warnings" role="alert">(.*?)</div>', html, re.S)
    return "" if found is None else found.group(1)


def test_a_not_held_out_file_is_said_in_metrics_json_and_at_the_top_of_the_page(tmp_path):
    # The warning was only in the CLI's summary: the report read as held-out figures.
    from recsys.evaluation.report import build_result

    said = "behaviors.tsv: its impressions (...) lie in the training window of model version v1 (...): these figures are not held-out"
    result = build_result(make_accumulator(60), behaviors_file="behaviors.tsv", trained_on_the_file=["v1"], warnings=[said])
    json_path, html_path = write_report(result, tmp_path)
    header = json.loads(json_path.read_text())["header"]
    assert header["trained_on_the_file"] == ["v1"] and header["warnings"] == [said]
    html = html_path.read_text()
    assert said in _banner(html)
    assert html.index('id="warnings"') < html.index('id="header"')  # before any figure


@pytest.mark.parametrize(("accumulator", "said"), [
    (_unlabelled_accumulator, "test.tsv has no labelled impression: every metric is n/a"),
    (_single_class_accumulator, "test.tsv: none of its 2 labelled impressions has both a clicked and a skipped candidate"),
])
def test_an_unlabelled_or_single_class_file_is_said_at_the_top_of_the_page(tmp_path, accumulator, said):
    from recsys.evaluation.report import build_result

    json_path, html_path = write_report(build_result(accumulator(), behaviors_file="test.tsv"), tmp_path)
    warnings = json.loads(json_path.read_text())["header"]["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith(said)
    assert said in _banner(html_path.read_text())


def test_a_held_out_labelled_file_has_no_banner(written):
    _, json_path, html_path = written
    assert json.loads(json_path.read_text())["header"]["warnings"] == []
    assert 'id="warnings"' not in html_path.read_text()


def test_an_unlabelled_file_explains_its_empty_sections(tmp_path):
    # It said "No model produced probabilities", "No breakdowns were requested", drew an empty
    # chart, and called a click count probabilistic.
    from recsys.evaluation.report import build_result
    from recsys.metrics.accumulator import ImpressionMetrics

    acc = ImpressionMetrics(["a", "most popular"], item_groups=("category",), num_resamples=20)
    acc.add([-1, -1, -1], {"a": [0.3, 0.1, 0.2], "most popular": [3.0, 1.0, 2.0]}, item_groups={"category": ["x", "y", "x"]})
    json_path, html_path = write_report(build_result(acc), tmp_path)
    models = json.loads(json_path.read_text())["models"]
    assert models["most popular"]["probabilistic"] is None and models["a"]["probabilistic"] is None
    html = html_path.read_text()
    assert "calibration does not apply" not in html and "No breakdowns were requested" not in html
    assert "The file has no labelled impression: calibration cannot be measured." in html
    assert "The file has no labelled impression: there is nothing to break down." in html
    assert 'id="plot-metrics"' not in html
    page = _Page()
    page.feed(html)
    assert page.images == []
