"""Comparing two metrics.json files."""

import copy
import io
import json

import pytest

from recsys.evaluation.compare import (
    compare_files,
    compare_metrics,
    data_differences,
    format_comparison,
    load_metrics,
    print_comparison,
)
from recsys.evaluation.report import ReportError, write_report


@pytest.fixture(scope="module")
def two_reports(tmp_path_factory, synthetic_result):
    first = tmp_path_factory.mktemp("a")
    second = tmp_path_factory.mktemp("b")
    changed = copy.deepcopy(synthetic_result)
    changed["models"]["v2"]["metrics"]["mrr"]["value"] += 0.01
    changed["models"]["v3"] = copy.deepcopy(changed["models"].pop("text_only"))
    write_report(synthetic_result, first)
    write_report(changed, second)
    return load_metrics(first / "metrics.json"), load_metrics(second / "metrics.json")


def test_rows_hold_both_values_and_the_difference(two_reports):
    a, b = two_reports
    rows = {(r.model, r.metric): r for r in compare_metrics(a, b)}
    mrr = rows["v2", "mrr"]
    assert mrr.a == a["models"]["v2"]["metrics"]["mrr"]["value"]
    assert mrr.diff == pytest.approx(0.01)
    assert rows["v1", "pooled_auc"].diff == 0.0
    assert rows["text_only", "mrr"].b is None and rows["text_only", "mrr"].diff is None
    assert rows["v3", "mrr"].a is None
    assert rows["v2", "gap_closed"].a == a["models"]["v2"]["gap_closed"]
    assert rows["v2", "ece"].a == a["models"]["v2"]["calibration"]["ece"]
    assert ("popularity", "log_loss") not in rows  # undefined in both
    models = list(dict.fromkeys(r.model for r in compare_metrics(a, b)))
    assert models == ["v2", "v1", "text_only", "random", "popularity", "oracle", "v3"]


def test_printed_table(two_reports):
    a, b = two_reports
    rows = [r for r in compare_metrics(a, b) if r.model == "v2" and r.metric in ("mrr", "ndcg@5")]
    out = io.StringIO()
    print_comparison(rows, a_label="old", b_label="new", file=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["model", "metric", "old", "new", "new", "-", "old"]
    assert lines[2].split()[:2] == ["v2", "MRR"] and lines[2].split()[-1] == "+0.0100"
    assert lines[3].split()[-1] == "+0.0000"
    assert format_comparison([]).splitlines()[0].startswith("model")


def test_missing_values_print_as_dashes(two_reports):
    a, b = two_reports
    rows = [r for r in compare_metrics(a, b) if r.model == "v3" and r.metric == "mrr"]
    low, high = rows[0].b_ci
    assert format_comparison(rows).splitlines()[2].split()[-5:] == ["-", f"{rows[0].b:.4f}", f"[{low:.4f},", f"{high:.4f}]", "-"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "line 1: not valid JSON"),
        (json.dumps({"schema_version": 2, "models": {}}), "field 'schema_version' has 2, expected 1"),
        (json.dumps([1, 2]), "field 'schema_version' has 'list', expected 1"),
        (json.dumps({"schema_version": 1}), "field 'models' is missing"),
    ],
)
def test_bad_metrics_files_are_rejected(tmp_path, content, message):
    path = tmp_path / "metrics.json"
    path.write_text(content)
    with pytest.raises(ReportError, match=message):
        load_metrics(path)


def test_a_missing_metrics_file_is_a_report_error_naming_it(tmp_path):
    with pytest.raises(ReportError, match=rf"{tmp_path / 'nope.json'}: cannot be read \(No such file or directory\)"):
        load_metrics(tmp_path / "nope.json")


def test_compare_needs_models():
    with pytest.raises(ReportError, match="report a lacks 'models'"):
        compare_metrics({}, {"models": {}})


def test_compare_files_names_the_files(tmp_path, two_reports):
    a, b = two_reports
    for name, document in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(document))
    text = compare_files(tmp_path / "a.json", tmp_path / "b.json")
    lines = text.splitlines()
    described = f"(MINDsmall_dev/behaviors.tsv, {a['header']['num_impressions']} impressions)"
    assert lines[0] == f"A: {tmp_path / 'a.json'} {described}" and lines[1] == f"B: {tmp_path / 'b.json'} {described}"
    assert lines[3].split()[:4] == ["model", "metric", "A", "B"]
    assert any(line.split()[:2] == ["v2", "MRR"] and line.endswith("+0.0100") for line in lines)


def test_compare_files_says_where_each_report_read_side_features(tmp_path, two_reports):
    a, b = copy.deepcopy(two_reports[0]), copy.deepcopy(two_reports[1])
    a["header"]["side_features_at"] = "impression time"
    b["header"]["side_features_at"] = ("popularity at impression time, at most the store's end 2019-11-15T00:00:01; "
                                       "age at impression time")
    for name, document in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(document))
    lines = compare_files(tmp_path / "a.json", tmp_path / "b.json").splitlines()
    n = a["header"]["num_impressions"]
    assert lines[0] == f"A: {tmp_path / 'a.json'} (MINDsmall_dev/behaviors.tsv, {n} impressions; side features: impression time)"
    assert lines[1] == (f"B: {tmp_path / 'b.json'} (MINDsmall_dev/behaviors.tsv, {n} impressions; side features: popularity at "
                        "impression time, at most the store's end 2019-11-15T00:00:01; age at impression time)")


def _write(tmp_path, a, b):
    for name, document in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(document))
    return tmp_path / "a.json", tmp_path / "b.json"


def test_reports_of_different_behaviors_files_are_refused_unless_allowed(tmp_path, two_reports):
    a, b = copy.deepcopy(two_reports[0]), copy.deepcopy(two_reports[1])
    a["header"]["behaviors_sha256"], b["header"]["behaviors_sha256"] = "ab" * 32, "cd" * 32
    path_a, path_b = _write(tmp_path, a, b)
    with pytest.raises(ReportError, match=r"computed on different impressions \(behaviors files with sha256 abababababab and cdcdcdcdcdcd\)"):
        compare_files(path_a, path_b)
    lines = compare_files(path_a, path_b, allow_different_data=True).splitlines()
    assert lines[0] == "WARNING: different impressions (behaviors files with sha256 abababababab and cdcdcdcdcdcd)"
    assert lines[1].startswith("A: ")
    # The same file under another name compares; the counts do not matter then.
    b["header"]["behaviors_sha256"], b["header"]["behaviors_file"] = "ab" * 32, "elsewhere/behaviors.tsv"
    b["header"]["num_clicked"] += 1
    path_a, path_b = _write(tmp_path, a, b)
    assert compare_files(path_a, path_b).startswith("A: ")


def test_older_reports_without_the_sha256_compare_their_counts(tmp_path, two_reports):
    a, b = copy.deepcopy(two_reports[0]), copy.deepcopy(two_reports[1])
    for document in (a, b):
        document["header"].pop("behaviors_sha256", None)
    b["header"]["num_impressions"] += 5
    b["header"]["num_candidates"] += 50
    n, c = a["header"]["num_impressions"], a["header"]["num_candidates"]
    with pytest.raises(ReportError, match=f"num_impressions {n} and {n + 5}; num_candidates {c} and {c + 50}"):
        compare_files(*_write(tmp_path, a, b))
    b["header"].update({key: a["header"][key] for key in ("num_impressions", "num_candidates")})
    assert compare_files(*_write(tmp_path, a, b)).startswith("A: ")


def test_a_sha256_in_one_report_only_compares_the_counts(tmp_path, two_reports):
    # A newer report beside an older one: the counts decide, and they are equal.
    a, b = copy.deepcopy(two_reports[0]), copy.deepcopy(two_reports[1])
    a["header"]["behaviors_sha256"] = "ab" * 32
    b["header"].pop("behaviors_sha256", None)
    assert data_differences(a, b) == [] and data_differences(b, a) == []
    assert compare_files(*_write(tmp_path, a, b)).startswith("A: ")


def test_the_cli_refuses_different_data_with_exit_1(tmp_path, two_reports, capsys):
    from recsys.cli import main

    a, b = copy.deepcopy(two_reports[0]), copy.deepcopy(two_reports[1])
    b["header"]["num_clicked"] += 1
    path_a, path_b = _write(tmp_path, a, b)
    assert main(["evaluate", "--compare", str(path_a), "--compare", str(path_b)]) == 1
    assert "computed on different impressions (num_clicked" in capsys.readouterr().err
    assert main(["evaluate", "--compare", str(path_a), "--compare", str(path_b), "--allow-different-data"]) == 0
    assert capsys.readouterr().out.startswith("WARNING: different impressions")


def test_reports_of_two_versions_pair_their_models(two_reports):
    """Each report holds its own version of the evaluated model and of an ablation: their rows
    pair (the documented way to compare a refit version with the default), other rows do not."""
    a, b = copy.deepcopy(two_reports[0]), copy.deepcopy(two_reports[1])
    for doc, version in ((a, "v20261201-000000-aaaaaa"), (b, "v20261202-000000-bbbbbb")):
        doc["models"] = {(f"text+image ({version})" if n == "v2" else n): e for n, e in doc["models"].items()}
    b["models"][f"text+image (v20261202-000000-bbbbbb)"]["metrics"]["impression_auc"]["value"] += 0.02
    rows = {(r.model, r.metric): r for r in compare_metrics(a, b)}
    paired = rows["text+image (v20261201-000000-aaaaaa -> v20261202-000000-bbbbbb)", "impression_auc"]
    assert paired.a == a["models"]["text+image (v20261201-000000-aaaaaa)"]["metrics"]["impression_auc"]["value"]
    assert paired.diff == pytest.approx(0.02)
    assert not any(name.startswith("text+image (v2026120") and "->" not in name for name, _ in rows)
    assert rows["text_only", "mrr"].b is None and rows["v3", "mrr"].a is None  # other names, not paired
    # Two entries of one role in a report: ambiguous, so nothing is paired.
    b["models"]["text+image (v20261203-000000-cccccc)"] = b["models"]["text+image (v20261202-000000-bbbbbb)"]
    assert not any("->" in r.model for r in compare_metrics(a, b))


def test_the_evaluated_models_of_two_reports_pair_whatever_they_read(two_reports):
    # Two versions trained with other --modalities, evaluated apart: every row of each showed
    # the other's value as '-', and no difference at all.
    a, b = copy.deepcopy(two_reports[0]), copy.deepcopy(two_reports[1])
    first, second = "text+image (v20261201-000000-aaaaaa)", "text only (v20261202-000000-bbbbbb)"
    a["models"] = {(first if n == "v2" else n): e for n, e in a["models"].items()}
    b["models"] = {(second if n == "v2" else n): e for n, e in b["models"].items()}
    b["models"][second]["metrics"]["impression_auc"]["value"] -= 0.03
    assert a["models"][first]["kind"] == b["models"][second]["kind"] == "model"
    rows = {(r.model, r.metric): r for r in compare_metrics(a, b)}
    paired = rows[f"{first} -> {second}", "impression_auc"]
    assert (paired.a, paired.b) == (a["models"][first]["metrics"]["impression_auc"]["value"],
                                    b["models"][second]["metrics"]["impression_auc"]["value"])
    assert paired.diff == pytest.approx(-0.03)
    assert not any(name in (first, second) for name, _ in rows)
    # Two other evaluated models in one report: which pairs is ambiguous, so none does.
    b["models"]["image only (v20261203-000000-cccccc)"] = copy.deepcopy(b["models"][second])
    assert not any("->" in r.model for r in compare_metrics(a, b))
    # ... unless one of them has the same role: then that one pairs, by role.
    b["models"]["text+image (v20261203-000000-cccccc)"] = b["models"].pop("image only (v20261203-000000-cccccc)")
    assert {r.model for r in compare_metrics(a, b) if "->" in r.model} == {
        "text+image (v20261201-000000-aaaaaa -> v20261203-000000-cccccc)"}


def test_two_entries_of_one_role_in_a_are_not_paired(two_reports):
    # The mirror of the ambiguous case above: A holds two versions of the evaluated model, B one.
    # Neither of A's is "the one entry of that role", and two evaluated models are left in A:
    # nothing pairs, every row keeps its own name.
    a, b = copy.deepcopy(two_reports[0]), copy.deepcopy(two_reports[1])
    first, second, third = (f"text+image (v2026120{i}-000000-{c * 6})" for i, c in ((1, "a"), (2, "b"), (3, "c")))
    a["models"] = {(first if n == "v2" else n): e for n, e in a["models"].items()}
    a["models"][second] = copy.deepcopy(a["models"][first])
    b["models"] = {(third if n == "v2" else n): e for n, e in b["models"].items()}
    rows = compare_metrics(a, b)
    assert not any("->" in r.model for r in rows)
    assert {r.model for r in rows} >= {first, second, third}
    assert all(r.diff is None for r in rows if r.model in (first, second, third))


def test_a_hand_edited_value_that_is_not_a_number_reads_as_missing(two_reports):
    a, b = copy.deepcopy(two_reports[0]), two_reports[1]
    a["models"]["v2"]["metrics"]["mrr"]["value"] = "0.5"
    rows = {(r.model, r.metric): r for r in compare_metrics(a, b)}
    assert rows["v2", "mrr"].a is None and rows["v2", "mrr"].diff is None
    assert "v2" in format_comparison(list(rows.values()))


def test_the_a_and_b_lines_carry_each_reports_warnings(tmp_path, synthetic_result):
    # A report of a file a version trained on, or of an unlabelled file, read as any other.
    held_out, trained_on, unlabelled = (copy.deepcopy(synthetic_result) for _ in range(3))
    trained_on["header"]["trained_on_the_file"] = ["v1"]
    unlabelled["header"].update(num_labelled_impressions=0, num_scored=0)
    paths = {}
    for name, result in (("held_out", held_out), ("trained_on", trained_on), ("unlabelled", unlabelled)):
        write_report(result, tmp_path / name)
        paths[name] = tmp_path / name / "metrics.json"
    lines = compare_files(paths["held_out"], paths["trained_on"]).splitlines()
    a_line, b_line = next(l for l in lines if l.startswith("A: ")), next(l for l in lines if l.startswith("B: "))
    assert "WARNING" not in a_line
    assert b_line.endswith("; WARNING: NOT HELD-OUT, the file lies in the training window of v1")
    in_store = copy.deepcopy(held_out)
    in_store["header"]["labelled_impressions_in_store"] = 12
    write_report(in_store, tmp_path / "in_store")
    b_line = next(l for l in compare_files(paths["held_out"], tmp_path / "in_store" / "metrics.json").splitlines()
                  if l.startswith("B: "))
    assert b_line.endswith("; WARNING: NOT HELD-OUT, the store held 12 of the file's impressions with their clicks")
    text = compare_files(paths["unlabelled"], paths["held_out"], allow_different_data=True)
    a_line = next(l for l in text.splitlines() if l.startswith("A: "))
    assert a_line.endswith("; WARNING: UNLABELLED file, every metric is n/a")


def test_all_single_class_impressions_are_warned_of_on_the_a_and_b_lines(tmp_path, two_reports):
    # Labelled, but no impression holds both a click and a skip: the per-impression metrics are n/a.
    a, b = copy.deepcopy(two_reports[0]), copy.deepcopy(two_reports[1])
    for document in (a, b):
        document["header"].update(num_labelled_impressions=5, num_scored=0)
    lines = compare_files(*_write(tmp_path, a, b)).splitlines()
    for prefix in ("A: ", "B: "):
        line = next(l for l in lines if l.startswith(prefix))
        assert line.endswith("; WARNING: ALL SINGLE-CLASS impressions, the per-impression metrics are n/a")


def test_two_reports_both_not_held_out_are_not_warned_of_as_one(tmp_path, two_reports):
    # Both files lie in a training window (of other versions): each line says so, and no
    # "only A is not held-out" follows, since both are not.
    a, b = copy.deepcopy(two_reports[0]), copy.deepcopy(two_reports[1])
    a["header"]["trained_on_the_file"], b["header"]["trained_on_the_file"] = ["v1"], ["v2"]
    lines = compare_files(*_write(tmp_path, a, b)).splitlines()
    assert lines[0].endswith("; WARNING: NOT HELD-OUT, the file lies in the training window of v1")
    assert lines[1].endswith("; WARNING: NOT HELD-OUT, the file lies in the training window of v2")
    assert lines[2] == ""
    assert not any("is not held-out" in line for line in lines)


def _line(text: str, model: str, metric: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(model + " ") and f"  {metric}  " in line)


def test_each_value_shows_its_reports_interval_and_the_difference_is_called_unpaired(tmp_path, two_reports):
    # Only B - A was printed: nothing told how uncertain A and B were, nor that B - A is unpaired.
    a, b = two_reports
    text = compare_files(*_write(tmp_path, a, b))
    mrr_a, mrr_b = a["models"]["v2"]["metrics"]["mrr"], b["models"]["v2"]["metrics"]["mrr"]
    line = _line(text, "v2", "MRR")
    assert f"{mrr_a['value']:.4f} [{mrr_a['ci_low']:.4f}, {mrr_a['ci_high']:.4f}]" in line
    assert f"{mrr_b['value']:.4f} [{mrr_b['ci_low']:.4f}, {mrr_b['ci_high']:.4f}]" in line
    assert line.endswith("+0.0100")
    assert "B - A compares two reports, so it is unpaired" in text
    assert "evaluate both versions in one report (recsys evaluate --models A,B)" in text


def test_gap_closed_is_a_percentage_as_in_the_html_report(tmp_path, two_reports, synthetic_result):
    a, b = copy.deepcopy(two_reports[0]), copy.deepcopy(two_reports[1])
    b["models"]["v2"]["gap_closed"] = a["models"]["v2"]["gap_closed"] + 0.012
    line = _line(compare_files(*_write(tmp_path, a, b)), "v2", "Gap closed")
    shown = f"{100 * a['models']['v2']['gap_closed']:.1f} %"
    assert shown in line and line.endswith("+1.2 pp")
    _, html_path = write_report(synthetic_result, tmp_path / "html")
    assert f"<td>{shown}</td>" in html_path.read_text()  # the HTML's gap closed cell, same text


@pytest.mark.parametrize(("change", "said"), [
    (lambda a, b: b["header"].update(side_features_at="store end 2019-11-15T00:00:01"),
     "WARNING: side features read differently (store end included): A not recorded; B store end 2019-11-15T00:00:01"),
    (lambda a, b: (a["header"].update(trained_on_the_file=[]), b["header"].update(trained_on_the_file=["v9"])),
     "WARNING: only B is not held-out (the file lies in the training window of v9)"),
    (lambda a, b: b["models"].pop("oracle"),
     "WARNING: only A has an oracle row: gap closed exists in one report only"),
    (lambda a, b: (a["header"].update(labelled_impressions_in_store=37), b["header"].update(labelled_impressions_in_store=0)),
     "WARNING: only A is not held-out (its store held 37 of the file's impressions with their clicks)"),
])
def test_reports_computed_differently_on_the_same_file_are_warned_of(tmp_path, two_reports, change, said):
    # Only the behaviors file's sha256 was checked: these passed without a word.
    a, b = copy.deepcopy(two_reports[0]), copy.deepcopy(two_reports[1])
    assert "WARNING" not in compare_files(*_write(tmp_path, a, b))
    change(a, b)
    lines = compare_files(*_write(tmp_path, a, b)).splitlines()
    assert lines[2] == said and lines[0].startswith("A: ") and lines[1].startswith("B: ")


def test_the_html_header_shows_the_behaviors_sha256(tmp_path, synthetic_result):
    result = copy.deepcopy(synthetic_result)
    result["header"]["behaviors_sha256"] = "ab" * 32
    _, html_path = write_report(result, tmp_path)
    assert f"<code>{'ab' * 32}</code>" in html_path.read_text()


def test_the_html_report_names_the_release_that_computed_it(tmp_path, synthetic_result):
    from recsys import release

    _, html_path = write_report(synthetic_result, tmp_path / "now")
    assert f" by recsys <code>{release()}</code> (report schema" in html_path.read_text()
    older = copy.deepcopy(synthetic_result)
    del older["header"]["recsys_release"]  # a metrics.json written before the header recorded it
    _, html_path = write_report(older, tmp_path / "older")
    assert " by recsys " not in html_path.read_text()


def test_a_report_from_before_the_files_exposure_reads_as_one_that_did_not_read_it(tmp_path, two_reports):
    # An upgrade audit compared a report of an older release ("popularity at ...") with one of
    # this release that read no exposure either ("...; file exposure: no version has a
    # calibration"): "WARNING: side features read differently", about nothing.
    a, b = copy.deepcopy(two_reports[0]), copy.deepcopy(two_reports[1])
    reading = "popularity at the store's end 2019-11-15T00:00:01; age at impression time"
    for ending, warned in (("; file exposure: no version has a calibration", False), ("; file exposure off", False),
                           ("; file exposure (earlier shows in the file) after the store's end", True)):
        a["header"]["side_features_at"], b["header"]["side_features_at"] = reading, reading + ending
        text = compare_files(*_write(tmp_path, a, b))
        assert ("WARNING: side features read differently" in text) is warned, ending


def test_reports_of_different_releases_say_so(tmp_path, two_reports):
    # The random baseline moved by 0.003 AUC between two releases with nothing to say why.
    a, b = copy.deepcopy(two_reports[0]), copy.deepcopy(two_reports[1])
    assert a["header"]["recsys_release"] == b["header"]["recsys_release"]  # written by this code
    assert "different releases" not in compare_files(*_write(tmp_path, a, b))
    del a["header"]["recsys_release"]  # a report written before the header recorded it
    b["header"]["recsys_release"] = "0.1.0+abc"
    lines = compare_files(*_write(tmp_path, a, b)).splitlines()
    assert lines[-1] == ("Note: computed by different releases of recsys (A not recorded, B 0.1.0+abc): the baselines' "
                         "tie orders and the metrics' code may differ too")
