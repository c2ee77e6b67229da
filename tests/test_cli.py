"""The `recsys` command end to end on a tiny generated world, plus its error paths.

Commands run in-process through ``recsys.cli.main`` (the console script's own entry), so
TensorFlow loads once. Numbers are checked against the input files and scikit-learn.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from recsys.cli import main

pytestmark = pytest.mark.slow


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def read_tsv(path: Path) -> list[list[str]]:
    return [line.rstrip("\n").split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from recsys.data.sample import generate_sample

    out = tmp_path_factory.mktemp("world") / "sample"
    generate_sample(out, num_users=160, num_news=240, num_impressions=700, seed=3)
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ws")


def test_pipeline_end_to_end(world: Path, workspace: Path, capsys):
    ws = ["--workspace", str(workspace)]
    news = read_tsv(world / "news.tsv")
    train_rows = read_tsv(world / "behaviors_train.tsv")

    code, out, err = run(capsys, *ws, "ingest", "--news", str(world / "news.tsv"), "--behaviors",
                         str(world / "behaviors_train.tsv"), "--images", str(world / "images"))
    assert code == 0, err
    code, out, _ = run(capsys, *ws, "stats", "--json")
    assert code == 0
    stats = json.loads(out)
    items = [tok for row in train_rows for tok in row[4].split()]
    assert stats["news"] == len(news)
    assert stats["news_with_image"] == len(list((world / "images").iterdir()))
    assert stats["impressions"] == len(train_rows)
    assert stats["users"] == len({row[1] for row in train_rows})
    assert stats["impression_items"] == len(items)
    assert stats["labelled_items"] == len(items)
    assert stats["quarantined"] == 0
    history_pairs = {(row[1], n) for row in train_rows for n in row[3].split()}
    click_pairs = {(row[1], tok[:-2]) for row in train_rows for tok in row[4].split() if tok.endswith("-1")}
    assert stats["clicks"] == len(history_pairs | click_pairs)

    code, out, err = run(capsys, *ws, "train", "--epochs", "2")
    assert code == 0, err
    trained = json.loads(out)
    assert trained["current"] is True
    assert 0.0 <= trained["metrics"]["val_auc"] <= 1.0  # learning itself is tested in tests/models

    code, out, err = run(capsys, *ws, "index", "build")
    assert code == 0, err
    assert json.loads(out)["items"] == len(news)

    check_similar_share_topic_or_style(world, workspace)
    probe = news[0][0]
    code, out, err = run(capsys, *ws, "similar", "--news", probe, "--k", "5", "--json")
    assert code == 0, err
    similar = json.loads(out)
    assert [r["rank"] for r in similar] == [1, 2, 3, 4, 5]
    assert set(similar[0]) == {"rank", "news_id", "title", "category", "score"}
    assert probe not in {r["news_id"] for r in similar}
    scores = [r["score"] for r in similar]
    assert scores == sorted(scores, reverse=True)
    code, _, err = run(capsys, *ws, "similar", "--news", probe, "--k", "-3")
    assert (code, err.strip()) == (1, "error: --k is -3, expected at least 1")
    code, out, err = run(capsys, *ws, "similar", "--news", probe, "--k", "5")  # the table
    assert code == 0, err
    assert [n for n in re.findall(r"\bN\d+\b", out) if n != probe] == [r["news_id"] for r in similar]

    code, out, err = run(capsys, *ws, "nightly", "--k", "5", "--workers", "1", "--export", str(workspace / "export"))
    assert code == 0, err
    summary = json.loads(out)
    # Every user of the 5-day training window is active in the default 7-day window.
    assert summary["run"]["counts"]["users"] == len({row[1] for row in train_rows})
    assert summary["run"]["status"] == "complete"
    # The run exported again (after a failed --export, say): the same file, byte for byte.
    run_id = summary["run"]["run_id"]
    code, out, err = run(capsys, *ws, "export", "--out", str(workspace / "again"), "--run", str(run_id))
    assert (code, out.strip()) == (0, str(workspace / "again" / f"recommendations-run-{run_id}.parquet")), err
    import pyarrow.parquet as pq

    assert pq.read_table(out.strip()).equals(pq.read_table(summary["export"]))
    code, out, err = run(capsys, *ws, "export", "--out", str(workspace / "again"), "--run", "999")
    assert code == 1 and "999" in err, err

    user = train_rows[0][1]
    code, out, err = run(capsys, *ws, "recommend", "--user", user, "--json")
    assert code == 0, err
    recs = json.loads(out)
    assert 1 <= len(recs) <= 5
    assert set(recs[0]) == {"rank", "news_id", "title", "category", "score"}
    assert len({r["news_id"] for r in recs}) == len(recs)
    clicked = {n for row in train_rows if row[1] == user for n in row[3].split()}
    assert not clicked & {r["news_id"] for r in recs}
    # More than the night stored: the stored list, and a note on stderr (it said nothing).
    code, out, err = run(capsys, *ws, "recommend", "--user", user, "--json", "--k", "50")
    assert (code, json.loads(out)) == (0, recs)
    assert err == (f"note: run {run_id} holds {len(recs)} articles for user {user!r}, fewer than --k 50: a night "
                   "stores at most its own k (nightly.k) per user, fewer when fewer articles are eligible\n")
    assert run(capsys, *ws, "recommend", "--user", user, "--json", "--k", str(len(recs)))[2] == ""
    assert run(capsys, *ws, "recommend", "--user", user, "--json")[1:] == (out, "")  # 5 of the default 10: no note
    assert run(capsys, *ws, "recommend", "--user", user, "--k", "0")[:3:2] == (1, "error: --k is 0, expected at least 1\n")

    code, _, err = run(capsys, *ws, "recommend", "--user", "U_nobody")
    assert code == 1
    assert "U_nobody" in err

    # Predictions for the unlabelled test file: one line per impression, in file order.
    unlabelled = read_tsv(world / "behaviors_test_unlabelled.tsv")
    pred = workspace / "prediction.txt"
    code, out, err = run(capsys, *ws, "predict", "--behaviors", str(world / "behaviors_test_unlabelled.tsv"), "--out", str(pred))
    assert code == 0, err
    lines = pred.read_text().splitlines()
    assert len(lines) == len(unlabelled)
    for line, row in zip(lines, unlabelled):
        m = re.fullmatch(r"(\d+) \[([0-9,]+)\]", line)
        assert m, line
        assert m.group(1) == row[0]
        ranks = [int(x) for x in m.group(2).split(",")]
        assert sorted(ranks) == list(range(1, len(row[4].split()) + 1))
    # By default popularity is read no later than one second after the last ingested show, age at
    # each impression's time (the scores themselves: tests/test_scoring.py).
    last_show = max(datetime.strptime(row[2], "%m/%d/%Y %I:%M:%S %p") for row in train_rows)  # MIND's time format
    end = (np.datetime64(last_show, "s") + np.timedelta64(1, "s")).astype(str)
    exposure = "; file exposure (earlier shows in the file) after the store's end"
    default_reading = f"popularity at impression time, at most the store's end {end}; age at impression time" + exposure
    assert json.loads(out)["side_features_at"] == default_reading

    # --features-at store-end / impression: the same impressions, both features read at the end / at each impression.
    # --no-file-exposure: what the nightly job can serve (tomorrow's shows are unknown tonight).
    for mode, reading in (("store-end", f"impression time, at most the store's end {end}{exposure}"),
                          ("impression", f"impression time{exposure}"),
                          ("popularity-at-end", default_reading.replace(exposure, "; file exposure off"))):
        other = workspace / f"prediction-{mode}.txt"
        code, out, err = run(capsys, *ws, "predict", "--behaviors", str(world / "behaviors_test_unlabelled.tsv"), "--out",
                             str(other), "--features-at", mode, *(["--no-file-exposure"] if mode == "popularity-at-end" else []))
        assert code == 0, err
        assert json.loads(out)["side_features_at"] == reading
        assert [x.split()[0] for x in other.read_text().splitlines()] == [x.split()[0] for x in lines]
    code, out, err = run(capsys, *ws, "predict", "--behaviors", str(world / "behaviors_test_unlabelled.tsv"), "--out",
                         str(workspace / "never.txt"), "--features-at", "tomorrow")
    assert code == 1
    assert "--features-at is 'tomorrow', expected one of ['popularity-at-end', 'impression', 'store-end']" in err, err
    assert not (workspace / "never.txt").exists()
    # Given empty, it is checked, not taken for the default (the option is None when not given).
    code, out, err = run(capsys, *ws, "evaluate", "--behaviors", str(world / "behaviors_test.tsv"), "--out",
                         str(workspace / "never"), "--features-at", "")
    assert (code, out) == (1, "") and "--features-at is '', expected one of" in err, err
    assert not (workspace / "never").exists()

    # The default model reads title + abstract vectors; served title-only ones it refuses with
    # the settings to change, and writes nothing.
    titles_only = workspace / "titles-only.toml"
    titles_only.write_text("[encoders]\nuse_abstract = false\ntext_max_length = 48\n")
    refused = workspace / "refused.txt"
    code, out, err = run(capsys, *ws, "--config", str(titles_only), "predict", "--behaviors",
                         str(world / "behaviors_test_unlabelled.tsv"), "--out", str(refused))
    assert code == 1
    assert "built with text_encoder" in err and "'all-MiniLM-L6-v2-int8+abstract'" in err and "+len:128" in err, err
    assert "use_abstract and text_max_length" in err, err
    assert not refused.exists()

    # The report's per-impression AUC equals the one worked out from the prediction file.
    report_dir = workspace / "report"
    code, out, err = run(capsys, *ws, "evaluate", "--behaviors", str(world / "behaviors_test.tsv"), "--out", str(report_dir), "--baselines")
    assert code == 0, err
    result = json.loads(out)
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics["schema_version"] == 1
    assert metrics["header"]["side_features_at"] == default_reading
    assert metrics["header"]["behaviors_sha256"] == hashlib.sha256((world / "behaviors_test.tsv").read_bytes()).hexdigest()
    assert metrics["header"]["bootstrap"]["unit"] == "user"  # a reader's impressions are resampled together
    assert (report_dir / "report.html").stat().st_size > 10_000
    # Beyond accuracy: the nightly run's lists, streamed from the store, against its Parquet export.
    (exported,) = (workspace / "export").glob("*.parquet")
    exported = pd.read_parquet(exported)
    beyond = metrics["beyond_accuracy"]
    assert (beyond["num_users"], beyond["num_recommendations"]) == (exported["user_id"].nunique(), len(exported))
    assert beyond["num_distinct_items"] == exported["news_id"].nunique()
    # ... of which run and model: the nightly above, scored by the evaluated current version.
    assert (beyond["run_id"], beyond["model_version"], beyond["model_version_evaluated"]) == (run_id, trained["version"], True)
    assert f"Recommendation lists of the latest nightly run: run {run_id}, model version {trained['version']}" in (
        report_dir / "report.html").read_text()
    # The run's catalogue is the store's articles; those --news adds for scoring are no part of
    # it (counted, they lowered its coverage and raised its popularity bias).
    assert beyond["catalogue_size"] == stats["news"]
    news_plus = workspace / "news_plus.tsv"
    news_plus.write_text((world / "news.tsv").read_text() + "".join(
        f"NPLUS{i}\tnews\tsub\tAn article the store lacks {i}\t\thttps://x\t[]\t[]\n" for i in range(30)))
    code, _, err = run(capsys, *ws, "evaluate", "--behaviors", str(world / "behaviors_test.tsv"), "--news", str(news_plus),
                       "--out", str(workspace / "report-news"))
    assert code == 0, err
    assert json.loads((workspace / "report-news" / "metrics.json").read_text())["beyond_accuracy"] == beyond
    version = trained["version"]
    pred_file = Path(result["predictions"][version])
    labelled = read_tsv(world / "behaviors_test.tsv")
    aucs = []
    for line, row in zip(pred_file.read_text().splitlines(), labelled):
        ranks = np.array([int(x) for x in line.split(" [")[1].rstrip("]").split(",")])
        y = np.array([int(tok[-1]) for tok in row[4].split()])
        if 0 < y.sum() < len(y):
            aucs.append(roc_auc_score(y, 1.0 / ranks))
    name = next(n for n in metrics["models"] if version in n and metrics["models"][n]["kind"] == "model")
    assert metrics["models"][name]["metrics"]["impression_auc"]["value"] == pytest.approx(np.mean(aucs), abs=1e-9)
    kinds = {m["kind"] for m in metrics["models"].values()}
    assert kinds == {"model", "ablation", "baseline", "oracle"}
    oracle = next(m for m in metrics["models"].values() if m["kind"] == "oracle")
    assert oracle["gap_closed"] == pytest.approx(1.0)

    code, out, err = run(capsys, "evaluate", "--compare", str(report_dir / "metrics.json"), "--compare", str(report_dir / "metrics.json"))
    assert code == 0, err
    assert "impression_auc" in out or "AUC" in out

    # A candidate: published, not served, until `model use`; then rolled back. The encoders of a
    # real training's manifest are the ones `model use` reads from the config without TensorFlow.
    code, out, err = run(capsys, *ws, "train", "--epochs", "1", "--keep-current")
    assert code == 0, err
    candidate = json.loads(out)
    assert candidate["current"] is False
    code, out, err = run(capsys, *ws, "model", "list", "--json")
    assert code == 0, err
    listed = json.loads(out)  # the ablations that --baselines trained among them
    assert [r["version"] for r in listed if r["current"]] == [version] and listed[-1]["version"] == candidate["version"]
    assert (listed[-1]["current"], listed[-1]["index"], listed[-1]["val_auc"]) == (False, False, candidate["metrics"]["val_auc"])
    code, out, err = run(capsys, *ws, "model", "use", candidate["version"])
    assert code == 0, err
    assert json.loads(out) == {"current": candidate["version"], "previous": version, "changed": True,
                               "index": "missing, built by the next nightly or recsys index build"}
    code, out, err = run(capsys, *ws, "model", "use", version)
    assert code == 0, err
    assert json.loads(out) == {"current": version, "previous": candidate["version"], "changed": True, "index": "present"}


def test_bad_usage_exits_1(capsys, tmp_path: Path):
    code, _, err = run(capsys, "nosuch")
    assert code == 1
    assert "No such command" in err
    code, _, err = run(capsys, "--workspace", str(tmp_path), "train", "--epochs", "abc")
    assert code == 1


def test_predict_help_shows_the_prediction_line_literally(capsys):
    # Rich read "[r1,r2,...]" as a markup tag and printed "write `ImpressionID ` lines".
    code, out, _ = run(capsys, "predict", "--help")
    assert code == 0
    assert "write `ImpressionID [r1,r2,...]`" in " ".join(out.split())


def _commands(group, path=()):
    """(path, click command) of every command, groups included."""
    yield path, group
    for name, sub in getattr(group, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_every_help_shows_its_texts_verbatim_and_no_value_for_flags(capsys):
    import typer

    from recsys.cli import app

    for path, command in _commands(typer.main.get_command(app)):
        code, out, _ = run(capsys, *path, "--help")
        assert code == 0, path
        # Typer's Rich panel printed "--strict <bool>", "--help <bool>": as if flags took a value.
        assert "<bool>" not in out, path
        flags = [p.opts[0] for p in command.params if getattr(p, "is_flag", False)] + ["--help"]
        for flag in flags:
            assert re.search(rf"^\s+(-\w, )?{flag}\s{{2,}}\S", out, re.M), (path, flag, out)
        # Wrapping moves spaces and breaks at hyphens: compare without any whitespace.
        shown = re.sub(r"\s+", "", out)
        for param in command.params:
            assert re.sub(r"\s+", "", param.help or "") in shown, (path, param.name)


def test_no_help_shows_a_python_type_as_a_metavar(capsys):
    # `evaluate --help` showed "--compare <list[Path]>".
    import typer

    from recsys.cli import app

    for path, _ in _commands(typer.main.get_command(app)):
        code, out, _ = run(capsys, *path, "--help")
        assert code == 0, path
        assert not re.search(r"--[\w-]+ <[^>\s]*\[", out), (path, out)
    assert re.search(r"^\s+--compare <path>\s", run(capsys, "evaluate", "--help")[1], re.M)


def test_missing_input_file_exits_1_naming_it(capsys, tmp_path: Path):
    code, _, err = run(capsys, "--workspace", str(tmp_path), "ingest", "--news", str(tmp_path / "nope.tsv"))
    assert code == 1
    assert "nope.tsv" in err and "no such file" in err
    assert "Traceback" not in err
    code, _, err = run(capsys, "--workspace", str(tmp_path), "ingest", "--news", str(tmp_path))  # a folder
    assert code == 1
    assert f"--news {tmp_path}: not a regular file" in err


@pytest.mark.parametrize("db_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
@pytest.mark.parametrize("given", [["--news", "{tmp}/nope.tsv"], ["--behaviors", "{tmp}/nope.tsv"],
                                   ["--news", "{tmp}/news.tsv", "--images", "{tmp}/nope"],
                                   ["--behaviors", "{tmp}/news.tsv", "--source", " "]])
def test_ingest_of_bad_inputs_creates_no_store(capsys, tmp_path: Path, db_url: str, given):
    # The store was created (a new recsys.db, or recsys tables in an empty database) before the
    # inputs were checked: `stats` then answered zeros instead of "no store".
    import sqlalchemy as sa

    (tmp_path / "news.tsv").write_text("N1\tnews\tworld\tA title\t\t\t[]\t[]\n", encoding="utf-8")
    ws = tmp_path / "ws"
    given = [arg.format(tmp=tmp_path) for arg in given]
    code, out, err = run(capsys, "--workspace", str(ws), "--db", db_url, "ingest", *given)
    assert (code, out) == (1, ""), err
    assert not ws.exists()
    other = sa.create_engine(db_url)
    with other.connect() as conn:
        assert sa.inspect(conn).get_table_names() == []
    other.dispose()


def test_ingest_of_a_missing_file_into_a_new_workspace_leaves_nothing(capsys, tmp_path: Path):
    ws = tmp_path / "ws"
    code, out, err = run(capsys, "--workspace", str(ws), "ingest", "--news", str(tmp_path / "nope.tsv"))
    assert (code, out) == (1, "") and "nope.tsv" in err, err
    assert not ws.exists()


@pytest.mark.parametrize("command", [["stats"], ["model", "list"], ["recommend", "--user", "U1"]])
def test_a_reading_command_creates_no_workspace_for_a_store_it_cannot_open(capsys, tmp_path: Path, command):
    # `recsys --workspace /typo stats` refused the missing store but left an empty /typo folder.
    typo = tmp_path / "typo"
    code, out, err = run(capsys, "--workspace", str(typo), *command)
    assert (code, out) == (1, "") and f"no store at {typo / 'recsys.db'}" in err, err
    assert not typo.exists()


def test_ctrl_c_exits_2_saying_interrupted(capsys, tmp_path: Path, monkeypatch):
    import recsys.store.stats

    def interrupted(_engine):
        raise KeyboardInterrupt

    monkeypatch.setattr(recsys.store.stats, "store_stats", interrupted)
    assert run(capsys, "--workspace", str(tmp_path), "db", "upgrade")[0] == 0
    code, _, err = run(capsys, "--workspace", str(tmp_path), "stats")
    assert (code, err.strip().splitlines()[-1]) == (2, "interrupted")


def test_config_typo_exits_1_naming_the_key(capsys, tmp_path: Path):
    (tmp_path / "recsys.toml").write_text("[nightly]\nkk = 3\n")
    code, _, err = run(capsys, "--workspace", str(tmp_path), "nightly")
    assert code == 1
    assert "nightly.kk" in err


@pytest.mark.parametrize(
    "command",
    [
        ["stats"],
        ["recommend", "--user", "U1"],
        ["similar", "--news", "N1"],
        ["ingest", "--news", "news.tsv"],
        ["db", "upgrade"],
        ["evaluate", "--compare", "a.json", "--compare", "b.json"],
        ["predict", "--behaviors", "behaviors.tsv", "--out", "prediction.txt"],
        ["model", "list"],
        ["model", "use", "v1"],
        ["demo"],  # it made the workspace folder first
    ],
)
def test_every_command_refuses_a_config_typo_before_creating_the_store(capsys, tmp_path: Path, command):
    # These commands read no config key, yet a typo must not pass silently (docs/configuration.md).
    workspace = tmp_path / "ws"
    config = tmp_path / "recsys.toml"
    config.write_text("[nightly]\nkk = 3\n")
    code, out, err = run(capsys, "--workspace", str(workspace), "--config", str(config), *command)
    assert (code, out) == (1, "")
    assert "unknown key 'nightly.kk'" in err, err
    assert not workspace.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["stats"],
        ["recommend", "--user", "U1"],
        ["similar", "--news", "N1"],
        ["export", "--out", "{tmp}"],
        ["train"],
        ["index", "build"],
        ["model", "list"],
        ["model", "use", "v1"],
    ],
)
def test_reading_commands_refuse_a_missing_store_instead_of_creating_one(capsys, tmp_path: Path, command):
    # A mistyped --db used to create a new empty store, and recommend then answered "unknown user".
    typo = tmp_path / "stroe.db"
    command = [arg.format(tmp=tmp_path) for arg in command]
    code, out, err = run(capsys, "--workspace", str(tmp_path / "ws"), "--db", f"sqlite:///{typo}", *command)
    assert (code, out) == (1, "")
    assert f"error: no store at {typo}: the file does not exist" in err, err
    assert not typo.exists()


def test_nightly_creates_the_store_of_a_new_workspace(capsys, tmp_path: Path, world: Path):
    # Like ingest, it writes data in: no "no store" refusal; it ingests, then needs a model.
    ws = tmp_path / "ws"
    code, _, err = run(capsys, "--workspace", str(ws), "nightly", "--news", str(world / "news.tsv"),
                       "--behaviors", str(world / "behaviors_train.tsv"))
    # Named: from a scheduler's temporary folder a relative --db opens (here creates) another store.
    assert code == 1 and f"no current model version in the store at sqlite:///{ws / 'recsys.db'}: run `recsys train` first" in err, err
    code, out, _ = run(capsys, "--workspace", str(ws), "stats", "--json")
    assert code == 0 and json.loads(out)["impressions"] == len((world / "behaviors_train.tsv").read_text().splitlines())


def test_train_on_empty_store_exits_1(capsys, tmp_path: Path):
    assert run(capsys, "--workspace", str(tmp_path), "db", "upgrade")[0] == 0
    code, _, err = run(capsys, "--workspace", str(tmp_path), "train")
    assert code == 1
    assert "the store holds no labelled impressions: run `recsys ingest --behaviors behaviors.tsv` first" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "error: --seed: config key 'model.seed' is -1, expected an integer from 0 to 4294967295"),
        (["--seed", "4294967296"], "error: --seed: config key 'model.seed' is 4294967296, expected an integer from 0 to 4294967295"),
        (["--epochs", "0"], "error: --epochs: config key 'model.epochs' is 0, expected a positive number"),
        (["--fusion", "sum"], "error: --fusion: config key 'model.fusion' is 'sum', expected one of concat, weighted_sum, gated"),
        (["--since", "0001-01-01T00:00:00+01:00"], "error: --since '0001-01-01T00:00:00+01:00' is outside the calendar in UTC"),
        (["--until", "9999-12-31T23:00:00-02:00"], "error: --until '9999-12-31T23:00:00-02:00' is outside the calendar in UTC"),
    ],
)
def test_bad_train_options_exit_1_naming_the_option_and_value(capsys, tmp_path: Path, args, message):
    # Exit code 2 before for the seeds (NumPy's seeding) and the offsets (an OverflowError).
    assert run(capsys, "--workspace", str(tmp_path), "db", "upgrade")[0] == 0
    code, out, err = run(capsys, "--workspace", str(tmp_path), "train", *args)
    assert (code, out) == (1, "")
    assert err.startswith(message), err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("learning_rate = nan", "error: {toml}: config key 'model.learning_rate' is nan, expected a finite number above 0"),
        ("embedding_dim = 30", "error: {toml}: config key 'model.embedding_dim' is 30, expected a multiple of 4"),
        ("valid_days = 1e12", "error: {toml}: config key 'model.valid_days' is 1000000000000.0, expected a number of days above 0"),
        ("feature_clock_hours = 1e300", "error: {toml}: config key 'model.feature_clock_hours' is 1e+300, expected 0 (off)"),
        # The file sets only embedding_dim, which the message named unquoted: the file went unnamed.
        ("embedding_dim = 16", "error: {toml}: config key 'model.anchor_dim' is 16, expected 0 or more with anchor_dim x "
                               "modalities (32) below 'model.embedding_dim' (16)"),
    ],
)
def test_bad_training_config_exits_1_before_the_store_is_opened(capsys, tmp_path: Path, setting, message):
    (tmp_path / "recsys.toml").write_text(f"[model]\n{setting}\n")
    code, _, err = run(capsys, "--workspace", str(tmp_path), "train")
    assert code == 1
    assert err.startswith(message.format(toml=tmp_path / "recsys.toml")), err
    assert not (tmp_path / "recsys.db").exists()


def test_nightly_with_fewer_candidates_than_k_exits_1_before_the_store_is_opened(capsys, tmp_path: Path):
    # Refused by the ranking before, after the ingest and the encoding of new articles.
    code, out, err = run(capsys, "--workspace", str(tmp_path), "nightly", "--candidates", "5", "--k", "10")
    assert (code, out) == (1, "")
    assert err.startswith("error: --k, --candidates: config key 'nightly.k' is 10, expected at most "
                          "'nightly.num_candidates' (5)"), err
    assert not (tmp_path / "recsys.db").exists()


def test_nightly_candidates_below_the_files_k_names_the_file_and_the_flag(capsys, tmp_path: Path):
    # It said "--candidates: config key 'nightly.k' is 50, ..." without the file the 50 came from.
    toml = tmp_path / "k50.toml"
    toml.write_text("[nightly]\nk = 50\n")
    code, out, err = run(capsys, "--workspace", str(tmp_path / "ws"), "--config", str(toml), "nightly", "--candidates", "20")
    assert (code, out) == (1, "")
    assert err.startswith(f"error: {toml}: --candidates: config key 'nightly.k' is 50, expected at most "
                          "'nightly.num_candidates' (20)"), err
    assert not (tmp_path / "ws").exists()


def test_nightly_ray_address_flag_without_the_ray_engine_exits_1_before_the_store_is_opened(capsys, tmp_path: Path):
    # The local engine never read it: a job meant for a cluster ranked on this machine, exit 0.
    code, out, err = run(capsys, "--workspace", str(tmp_path), "nightly", "--ray-address", "10.0.0.1:6379")
    assert (code, out) == (1, "")
    assert err.strip() == ("error: --ray-address 10.0.0.1:6379 goes with the ray engine, but nightly.engine is "
                           "'local': add --engine ray (or leave --ray-address out)"), err
    assert not (tmp_path / "recsys.db").exists()


@pytest.mark.parametrize(("value", "message"), [
    ("", "--ray-address is '', expected a Ray cluster address (leave the option out for the default)"),
    ("   ", "--ray-address is '   ', expected a Ray cluster address (leave the option out for the default)"),
    (" auto", "--ray-address: config key 'nightly.ray_address' is ' auto', expected a Ray cluster address without "
              "white space around it"),
])
def test_nightly_blank_or_padded_ray_address_exits_1_before_the_store_is_opened(capsys, tmp_path: Path, value, message):
    # "   " reached ray.init ("internal error: ValueError: Invalid address format", exit 2) after the
    # night's ingest and index; "" silently started a local Ray instance instead of the cluster meant.
    code, out, err = run(capsys, "--workspace", str(tmp_path), "nightly", "--engine", "ray", "--ray-address", value)
    assert (code, out) == (1, "")
    assert err.startswith(f"error: {message}"), err
    assert not (tmp_path / "recsys.db").exists()


def test_nightly_blank_ray_address_in_the_config_file_exits_1_naming_the_file(capsys, tmp_path: Path):
    (tmp_path / "recsys.toml").write_text('[nightly]\nengine = "ray"\nray_address = "   "\n')
    code, out, err = run(capsys, "--workspace", str(tmp_path), "nightly")
    assert (code, out) == (1, "")
    assert err.startswith(f"error: {tmp_path / 'recsys.toml'}: config key 'nightly.ray_address' is '   ', "), err
    assert not (tmp_path / "recsys.db").exists()


def test_internal_error_exits_2_without_traceback(capsys, tmp_path: Path, monkeypatch):
    import recsys.store.stats as stats_module

    def broken(engine):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(stats_module, "store_stats", broken)
    assert run(capsys, "--workspace", str(tmp_path), "db", "upgrade")[0] == 0
    code, _, err = run(capsys, "--workspace", str(tmp_path), "stats")
    assert code == 2
    assert "disk on fire" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["-v", "--verbose"])
def test_only_the_global_verbose_flag_logs_tracebacks(capsys, caplog, tmp_path: Path, value):
    # Any argument "-v" counted: `recommend --user -v` (a user id) printed a traceback.
    ws = ["--workspace", str(tmp_path)]
    code, out, err = run(capsys, *ws, "recommend", "--user", value)
    assert (code, out) == (1, "") and err.startswith("error: no store at "), err
    assert not [record for record in caplog.records if record.exc_info]
    code, out, err = run(capsys, *ws, value, "recommend", "--user", "U1")
    assert (code, out) == (1, "") and err.startswith("error: no store at "), err
    assert [record.msg for record in caplog.records if record.exc_info] == ["failed"]


def check_similar_share_topic_or_style(world: Path, workspace: Path) -> None:
    """Neighbours in the item-embedding space share the hidden topic (only in the title) or
    cover style (only in the picture) far more often than chance."""
    from recsys.data.sample import read_world
    from recsys.pipelines.index import run_similar
    from recsys.config import Workspace
    from recsys.store.database import open_store

    truth = read_world(world)
    topic = dict(zip(truth.news_ids.tolist(), truth.news_topic.tolist()))
    style = dict(zip(truth.news_ids.tolist(), truth.news_style.tolist()))
    has_image = dict(zip(truth.news_ids.tolist(), (truth.news_image > 0).tolist()))
    ws = Workspace(workspace)
    engine = open_store(ws.default_db_url)
    probes = [n for n in truth.news_ids.tolist() if has_image[n]][:60]
    shared = total = 0
    for probe in probes:
        for row in run_similar(engine, ws, news_id=probe, k=5):
            other = row["news_id"]
            total += 1
            shared += topic[other] == topic[probe] or (has_image[other] and style[other] == style[probe])
    # Chance: a random other article shares the topic or (if pictured) the style.
    ids = truth.news_ids.tolist()
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(ids), size=(20_000, 2))
    chance = np.mean([
        topic[ids[a]] == topic[ids[b]] or (has_image[ids[a]] and has_image[ids[b]] and style[ids[a]] == style[ids[b]])
        for a, b in pairs if a != b
    ])
    observed = shared / total
    assert observed > chance + 0.25, (observed, chance)


def test_the_readme_lists_every_command_with_every_option():
    import typer

    from recsys.cli import app

    commands = {" ".join(path): command for path, command in _commands(typer.main.get_command(app))
                if path and not getattr(command, "commands", None)}  # groups list their commands
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## The command line", 1)[1].split("```", 2)[1]
    # Each "recsys <command> ..." line with its indented continuation lines.
    usage: dict[str, str] = {}
    name = None
    for line in block.splitlines():
        if line.startswith("recsys "):
            words = line.split()
            name = " ".join(words[1:3]) if " ".join(words[1:3]) in commands else words[1]
        usage[name] = usage.get(name, "") + " " + line
    for name, command in commands.items():
        assert name in usage, f"README lists no 'recsys {name}'"
        for param in command.params:
            if param.opts[0].startswith("--"):
                assert param.opts[0] in usage[name], f"README's 'recsys {name}' lacks {param.opts[0]}"


def test_faiss_loader_lines_only_with_verbose(capsys, tmp_path: Path):
    # The CLI and the nightly's helper process both set logging up through configure_logging.
    import logging

    loader = logging.getLogger("faiss.loader")
    try:
        run(capsys, "--workspace", str(tmp_path), "stats")
        assert loader.level == logging.WARNING  # six INFO lines a job about SIMD builds
        run(capsys, "--workspace", str(tmp_path), "--verbose", "stats")
        assert loader.level == logging.NOTSET  # the root logger's DEBUG
    finally:
        loader.setLevel(logging.NOTSET)


@pytest.mark.parametrize("command", [
    ["ingest", "--behaviors", "{behaviors}", "--images", "{images}"],
    ["nightly", "--behaviors", "{behaviors}", "--images", "{images}"],
    ["predict", "--behaviors", "{behaviors}", "--out", "{tmp}/prediction.txt", "--images", "{images}"],
    ["evaluate", "--behaviors", "{behaviors}", "--out", "{tmp}/report", "--images", "{images}"],
])
def test_images_without_news_are_refused_not_ignored(capsys, tmp_path: Path, command):
    # Covers are read only for the articles of a news.tsv: the folder was ignored without a word.
    (tmp_path / "images").mkdir()
    behaviors = tmp_path / "behaviors.tsv"
    behaviors.write_text("1\tU1\t11/15/2019 8:00:00 AM\t\tN1-1 N2-0\n")
    args = [a.format(behaviors=behaviors, images=tmp_path / "images", tmp=tmp_path) for a in command]
    assert run(capsys, "--workspace", str(tmp_path / "ws"), "db", "upgrade")[0] == 0  # predict and evaluate need one
    code, out, err = run(capsys, "--workspace", str(tmp_path / "ws"), *args)
    assert (code, out) == (1, "")
    assert err.strip() == (f"error: {command[0]} --images {tmp_path / 'images'} goes with --news: covers are read only "
                           "for the articles of a news.tsv, so without one they would be ignored")
    assert not (tmp_path / "prediction.txt").exists() and not (tmp_path / "report").exists()


@pytest.mark.parametrize("command", ["ingest", "nightly"])
def test_source_without_behaviors_is_refused_before_the_store_is_opened(capsys, tmp_path: Path, world: Path, command):
    # `ingest --news news.tsv --source night-1` ignored --source without a word, exit 0.
    ws = tmp_path / "ws"
    code, out, err = run(capsys, "--workspace", str(ws), command, "--news", str(world / "news.tsv"),
                         "--source", "night-1")
    assert (code, out) == (1, "")
    assert err.strip() == (f"error: {command} --source 'night-1' goes with --behaviors: it names the impressions of a "
                           "behaviors file, so without one it would be ignored")
    assert not ws.exists()


@pytest.mark.parametrize(("extra", "named"), [
    (["--behaviors", "b.tsv", "--out", "zz"], "--behaviors, --out"),
    (["--models", "v1", "--baselines"], "--models, --baselines"),
    (["--features-at", "impression"], "--features-at"),
    (["--features-at", "popularity-at-end"], "--features-at"),  # the default, but given: ignored without a word
    (["--no-file-exposure"], "--no-file-exposure"),
])
def test_compare_refuses_the_scoring_options_it_would_ignore(capsys, tmp_path: Path, extra, named):
    code, out, err = run(capsys, "--workspace", str(tmp_path), "evaluate", "--compare", "a.json", "--compare", "b.json", *extra)
    assert (code, out) == (1, "")
    assert err.strip() == (f"error: evaluate --compare reads two metrics.json files; {named} go with scoring a "
                           "behaviors file, not with --compare")
    assert not (tmp_path / "zz").exists()


def test_allow_different_data_without_compare_is_refused(capsys, tmp_path: Path):
    behaviors = tmp_path / "behaviors.tsv"
    behaviors.write_text("1\tU1\t11/15/2019 8:00:00 AM\t\tN1-1 N2-0\n")
    code, out, err = run(capsys, "--workspace", str(tmp_path), "evaluate", "--behaviors", str(behaviors), "--out",
                         str(tmp_path / "report"), "--allow-different-data")
    assert (code, out) == (1, "")
    assert err.strip() == "error: evaluate --allow-different-data goes with --compare A.json --compare B.json"
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("command", [["stats"], ["recommend", "--user", "U1"], ["nightly"]])
def test_a_workspace_or_config_path_of_the_wrong_kind_exits_1(capsys, tmp_path: Path, command):
    # Both exited 2 ("internal error: FileExistsError / IsADirectoryError"): an operator's typo.
    afile = tmp_path / "afile"
    afile.write_text("")
    code, out, err = run(capsys, "--workspace", str(afile), *command)
    assert (code, out, err.strip()) == (1, "", f"error: workspace {afile} is a file, expected a folder")
    code, out, err = run(capsys, "--workspace", str(tmp_path / "ws"), "--config", str(tmp_path), *command)
    assert (code, out, err.strip()) == (1, "", f"error: config file {tmp_path} is a folder, expected a TOML file")
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("command", [["stats"], ["nightly"], ["db", "upgrade"]])
def test_a_config_link_to_nothing_exits_1_naming_the_link_and_its_target(capsys, tmp_path: Path, command):
    # The workspace's recsys.toml pointing at a file that is gone was read as no file: defaults.
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "recsys.toml").symlink_to("/etc/recsys-missing/recsys.toml")
    code, out, err = run(capsys, "--workspace", str(workspace), *command)
    assert (code, out) == (1, ""), err
    assert err.strip() == (f"error: config file {workspace / 'recsys.toml'} is a symbolic link to "
                           "/etc/recsys-missing/recsys.toml, which cannot be read: No such file or directory")
    code, out, err = run(capsys, "--workspace", str(workspace), "--config", str(workspace / "recsys.toml"), *command)
    assert (code, out) == (1, ""), err
    assert "is a symbolic link to /etc/recsys-missing/recsys.toml" in err
    assert sorted(p.name for p in workspace.iterdir()) == ["recsys.toml"]  # no store was created


@pytest.mark.parametrize(("option", "expected"), [("--db", "a SQLAlchemy URL"), ("--workspace", "a folder"),
                                                  ("--config", "a TOML file")])
def test_an_empty_global_option_exits_1(capsys, tmp_path: Path, monkeypatch, option, expected):
    # A script's unset variable (--db "$STORE"): --db fell through to RECSYS_DB, --workspace and
    # --config to the working directory, which then got a store.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECSYS_DB", f"sqlite:///{tmp_path / 'other.db'}")
    code, out, err = run(capsys, option, "", "ingest", "--news", "news.tsv")
    assert (code, out, err.strip()) == (1, "", f"error: {option} is '', expected {expected} (leave the option out for "
                                                "the default)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("option", "command", "expected"), [
    ("--model", ["index", "build", "--model"], "a model version (see `recsys model list`)"),
    ("--model", ["similar", "--news", "N1", "--model"], "a model version (see `recsys model list`)"),
    ("--model", ["predict", "--behaviors", "{tmp}/behaviors.tsv", "--out", "{tmp}/p.txt", "--model"],
     "a model version (see `recsys model list`)"),
    ("--source", ["train", "--source"], "the source of a behaviors file"),
])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_model_or_source_exits_1(capsys, tmp_path: Path, option, command, expected, value):
    # `index build --model "$UNSET"` rebuilt the current version's index and exited 0.
    ws = ["--workspace", str(tmp_path / "ws")]
    assert run(capsys, *ws, "db", "upgrade")[0] == 0
    command = [arg.format(tmp=tmp_path) for arg in command]
    code, out, err = run(capsys, *ws, *command, value)
    assert (code, out, err.strip()) == (1, "", f"error: {option} is {value!r}, expected {expected} (leave the option "
                                                "out for the default)")


@pytest.mark.parametrize("command", [["ingest", "--behaviors"], ["nightly", "--behaviors"]])
@pytest.mark.parametrize("value", ["", "   "])
def test_a_blank_ingest_source_exits_1_and_stores_nothing(capsys, tmp_path: Path, world: Path, command, value):
    # "   " was stored as a source name (and nightly took "" as a failed ingest, exit 3).
    ws = ["--workspace", str(tmp_path / "ws")]
    assert run(capsys, *ws, "db", "upgrade")[0] == 0
    code, out, err = run(capsys, *ws, *command, str(world / "behaviors_train.tsv"), "--source", value)
    assert (code, out, err.strip()) == (1, "", f"error: --source {value!r} is blank, expected a name of 1 to 255 "
                                                "characters")
    assert json.loads(run(capsys, *ws, "stats", "--json")[1])["impressions"] == 0


@pytest.mark.parametrize("value", [" night-1", "night-1 ", "night-1\t"])
def test_an_ingest_source_with_white_space_at_an_end_exits_1(capsys, tmp_path: Path, world: Path, value):
    # ' night-1' was stored as given, and `train --source night-1` then found no impressions.
    ws = ["--workspace", str(tmp_path / "ws")]
    code, out, err = run(capsys, *ws, "ingest", "--behaviors", str(world / "behaviors_train.tsv"), "--source", value)
    assert (code, out, err.strip()) == (1, "", f"error: --source {value!r} starts or ends with white space, expected a "
                                                "name without it")
    assert not (tmp_path / "ws").exists()


def test_a_blank_workspace_variable_exits_1(capsys, tmp_path: Path, monkeypatch):
    # RECSYS_WORKSPACE=" " made a folder named " " in the working directory.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECSYS_WORKSPACE", " ")
    code, out, err = run(capsys, "ingest", "--news", str(tmp_path / "nope.tsv"))
    assert (code, out, err.strip()) == (1, "", "error: RECSYS_WORKSPACE is ' ', expected a folder (unset it for the "
                                                "default)")
    assert list(tmp_path.iterdir()) == []


def test_a_blank_store_variable_exits_1_naming_it(capsys, tmp_path: Path, monkeypatch):
    # It said "store URL '   ' is not a valid SQLAlchemy URL", naming neither RECSYS_DB nor --db.
    monkeypatch.setenv("RECSYS_DB", "   ")
    code, out, err = run(capsys, "--workspace", str(tmp_path / "ws"), "stats")
    assert (code, out, err.strip()) == (1, "", "error: RECSYS_DB is '   ', expected a SQLAlchemy URL (unset it for the "
                                                "default)")
    assert list(tmp_path.iterdir()) == []
    # Not read when --db is given.
    assert run(capsys, "--workspace", str(tmp_path / "ws"), "--db", f"sqlite:///{tmp_path}/s.db", "db", "upgrade")[0] == 0
    assert (tmp_path / "s.db").is_file()


@pytest.mark.parametrize(("name", "expected"), [("RECSYS_DB", "a SQLAlchemy URL"), ("RECSYS_WORKSPACE", "a folder")])
def test_an_empty_store_or_workspace_variable_exits_1_and_stores_nothing(capsys, tmp_path: Path, world: Path,
                                                                          monkeypatch, name, expected):
    # RECSYS_DB= (an Airflow template that rendered empty) meant the default: the night's ingest
    # went to a new SQLite file in the workspace instead of PostgreSQL, and exited 0.
    monkeypatch.chdir(tmp_path)
    other = "RECSYS_WORKSPACE" if name == "RECSYS_DB" else "RECSYS_DB"
    monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, "")
    ws = ["--workspace", str(tmp_path / "ws")] if name == "RECSYS_DB" else []
    code, out, err = run(capsys, *ws, "ingest", "--news", str(world / "news_train.tsv"))
    assert (code, out, err.strip()) == (1, "", f"error: {name} is '', expected {expected} (unset it for the default)")
    assert list(tmp_path.iterdir()) == []
    # The option, when given, wins over the variable, empty or not.
    flag = ["--db", f"sqlite:///{tmp_path}/s.db"] if name == "RECSYS_DB" else ["--workspace", str(tmp_path / "ws")]
    assert run(capsys, *ws, *flag, "db", "upgrade")[0] == 0


@pytest.mark.parametrize(("name", "value"), [
    ("--workspace", "{tmp}/w\udcff"), ("--db", "sqlite:///{tmp}/s\udcff.db"),
    ("RECSYS_WORKSPACE", "{tmp}/w\udcff"), ("RECSYS_DB", "sqlite:///{tmp}/s\udcff.db"),
])
@pytest.mark.parametrize("command", [["stats", "--json"], ["ingest", "--news", "{world}/news.tsv"]])
def test_a_workspace_or_store_that_is_not_utf8_exits_1_before_anything_is_created(capsys, tmp_path: Path, world: Path,
                                                                                    monkeypatch, name, value, command):
    # RECSYS_WORKSPACE=$'/tmp/x/w\xff' recsys stats: "internal error: UnicodeEncodeError" (exit 2) from the
    # store's URL; ingest had made the folder first.
    monkeypatch.chdir(tmp_path)
    value = value.format(tmp=tmp_path)  # "\udcff": how Python hands over the byte 0xff
    command = [arg.format(world=world) for arg in command]
    if name.startswith("--"):
        args = [name, value, *command]
    else:
        monkeypatch.setenv(name, value)
        args = command
    code, out, err = run(capsys, *args)
    shown = repr(value.encode("utf-8", "surrogateescape"))
    assert (code, out, err.strip()) == (1, "", f"error: {name} {shown}: not valid UTF-8")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("workspace", [["--workspace", "ws"], []])
def test_a_relative_workspace_under_a_folder_that_is_not_utf8_exits_1_before_anything_is_created(
        capsys, tmp_path: Path, world: Path, monkeypatch, workspace):
    # The options were UTF-8, but the default store's URL holds the absolute path: exit 2 after
    # ingest had made the folder.
    monkeypatch.delenv("RECSYS_WORKSPACE", raising=False)
    monkeypatch.delenv("RECSYS_DB", raising=False)
    here = tmp_path / "bad\udcff"  # the byte 0xff, as Python hands it over
    here.mkdir()
    monkeypatch.chdir(here)
    code, out, err = run(capsys, *workspace, "ingest", "--news", str(world / "news.tsv"))
    folder = here / ("ws" if workspace else "workspace")
    assert (code, out, err.strip()) == (1, "", f"error: workspace {str(folder).encode('utf-8', 'surrogateescape')!r}: "
                                               "not valid UTF-8")
    assert list(here.iterdir()) == []


@pytest.mark.parametrize(("url", "shown", "sync"), [
    ("postgresql+psycopg_async://u:secret@127.0.0.1:5432/x", "postgresql+psycopg_async://u:***@127.0.0.1:5432/x",
     "postgresql+psycopg://"),
    ("sqlite+aiosqlite:///{tmp}/store.db", "sqlite+aiosqlite:///{tmp}/store.db", "sqlite:///"),
])
@pytest.mark.parametrize("command", [["stats"], ["ingest", "--news", "{world}/news.tsv"]])
def test_an_asyncio_store_driver_exits_1_naming_the_sync_one(capsys, tmp_path: Path, world: Path, url, shown, sync,
                                                             command):
    # psycopg_async failed at connect with "internal error: ImportError ... greenlet" (exit 2).
    url, shown = url.format(tmp=tmp_path), shown.format(tmp=tmp_path)
    command = [arg.format(world=world) for arg in command]
    code, out, err = run(capsys, "--workspace", str(tmp_path / "ws"), "--db", url, *command)
    driver = url.partition(":")[0]
    assert (code, out, err.strip()) == (1, "", f"error: store URL {shown!r} names the asyncio driver {driver!r}, which "
                                                f"recsys cannot use: use a synchronous one, e.g. {sync}...")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_run_id_beyond_64_bits(capsys, tmp_path: Path):
    # An OverflowError (SQLite) or a driver error with the SQL (PostgreSQL): exit 2.
    ws = ["--workspace", str(tmp_path / "ws")]
    assert run(capsys, *ws, "db", "upgrade")[0] == 0
    code, out, err = run(capsys, *ws, "export", "--out", str(tmp_path), "--run", "100000000000000000000")
    assert (code, out, err.strip()) == (1, "", "error: --run 100000000000000000000: expected a run id from 1 to "
                                                "9223372036854775807 (see the runs of `recsys nightly`)")
    code, out, err = run(capsys, *ws, "export", "--out", str(tmp_path), "--run", "9223372036854775807")
    assert (code, out, err.strip()) == (1, "", "error: run 9223372036854775807 does not exist")


@pytest.mark.parametrize("command", [["recommend", "--user"], ["similar", "--news"]])
def test_an_id_that_is_not_utf8_exits_1(capsys, tmp_path: Path, command):
    # Exit 2 before ("internal error: UnicodeEncodeError ... surrogates not allowed").
    value = b"U10\xff20".decode("utf-8", "surrogateescape")  # how Python hands over such an argument
    code, out, err = run(capsys, "--workspace", str(tmp_path), *command, value)
    assert (code, out, err.strip()) == (1, "", f"error: {command[1]} b'U10\\xff20': not valid UTF-8")


@pytest.mark.parametrize("command", [["recommend", "--user", "U1"], ["similar", "--news", "N1"]])
@pytest.mark.parametrize("k", ["0", "-3"])
def test_a_k_below_1_exits_1_naming_the_option(capsys, tmp_path: Path, command, k):
    # The message said "k is 0, expected at least 1": no option of that name.
    ws = ["--workspace", str(tmp_path)]
    assert run(capsys, *ws, "db", "upgrade")[0] == 0
    code, out, err = run(capsys, *ws, *command, "--k", k)
    assert (code, out, err.strip()) == (1, "", f"error: --k is {k}, expected at least 1")


_NOT_UTF8 = b"x\xff".decode("utf-8", "surrogateescape")  # how Python hands over such an argument


@pytest.mark.parametrize(("option", "command"), [
    ("--source", ["train", "--source"]),
    ("--model", ["index", "build", "--model"]),
    ("--model", ["similar", "--news", "N1", "--model"]),
    ("--model", ["predict", "--behaviors", "{tmp}/behaviors.tsv", "--out", "{tmp}/p.txt", "--model"]),
    ("--models", ["evaluate", "--behaviors", "{tmp}/behaviors.tsv", "--out", "{tmp}/report", "--models"]),
    ("--ray-address", ["nightly", "--engine", "ray", "--ray-address"]),
    ("--source", ["nightly", "--behaviors", "{tmp}/behaviors.tsv", "--source"]),
    ("--source", ["ingest", "--news", "{tmp}/news.tsv", "--behaviors", "{tmp}/behaviors.tsv", "--source"]),
])
def test_an_option_that_is_not_utf8_exits_1_and_stores_nothing(capsys, tmp_path: Path, world: Path, option, command):
    # Exit 2 before ("internal error: UnicodeEncodeError ... surrogates not allowed"); ingest had
    # committed the news file before the bad --source failed.
    for name in ("news.tsv", "behaviors.tsv"):
        shutil.copy(world / ("behaviors_train.tsv" if name == "behaviors.tsv" else name), tmp_path / name)
    ws = ["--workspace", str(tmp_path / "ws")]
    assert run(capsys, *ws, "db", "upgrade")[0] == 0
    before = json.loads(run(capsys, *ws, "stats", "--json")[1])
    command = [arg.format(tmp=tmp_path) for arg in command]
    code, out, err = run(capsys, *ws, *command, _NOT_UTF8)
    assert (code, out, err.strip()) == (1, "", f"error: {option} b'x\\xff': not valid UTF-8")
    assert json.loads(run(capsys, *ws, "stats", "--json")[1]) == before


@pytest.mark.parametrize("option", ["--news", "--behaviors"])
def test_ingest_of_a_file_whose_name_is_not_utf8_exits_1_naming_it(capsys, tmp_path: Path, world: Path, option):
    # `ingest --behaviors "odd/$(printf 'b\xff').tsv"`: exit 2 (UnicodeEncodeError) from the path
    # the store records the file by, after the other file was committed.
    odd = tmp_path / b"b\xff.tsv".decode("utf-8", "surrogateescape")
    shutil.copy(world / ("news.tsv" if option == "--news" else "behaviors_train.tsv"), odd)
    other = ["--behaviors", str(world / "behaviors_train.tsv")] if option == "--news" else ["--news", str(world / "news.tsv")]
    ws = tmp_path / "ws"
    code, out, err = run(capsys, "--workspace", str(ws), "ingest", option, str(odd), *other)
    assert (code, out) == (1, ""), err
    assert err.strip() == (f"error: {option} {bytes(tmp_path)!r}"[:-1] + "/b\\xff.tsv': its path is not valid UTF-8 "
                           "(the store records files by path): rename it"), err
    assert not ws.exists()


def test_similar_with_no_other_article_says_so_on_stderr(capsys, tmp_path: Path, monkeypatch):
    import recsys.pipelines.index

    monkeypatch.setattr(recsys.pipelines.index, "run_similar", lambda *_a, **_k: [])  # an index of one article
    assert run(capsys, "--workspace", str(tmp_path), "db", "upgrade")[0] == 0
    code, out, err = run(capsys, "--workspace", str(tmp_path), "similar", "--news", "N1", "--json")
    assert (code, json.loads(out)) == (0, [])
    assert "note: the index holds no article other than 'N1'" in err


def test_similar_runs_faiss_on_the_configured_threads(capsys, tmp_path: Path, monkeypatch):
    # It loaded the index on every core whatever [runtime] threads said (a shared host).
    import recsys.pipelines.index

    seen = []
    from types import SimpleNamespace

    monkeypatch.setattr(recsys.pipelines.index, "get_version", lambda *_a, **_k: SimpleNamespace(version="v1"))
    monkeypatch.setattr(recsys.pipelines.index, "load_index", lambda mv, num_threads=None, **_: seen.append(num_threads) or {})
    assert run(capsys, "--workspace", str(tmp_path), "db", "upgrade")[0] == 0
    (tmp_path / "recsys.toml").write_text("[runtime]\nthreads = 1\n")
    code, _, err = run(capsys, "--workspace", str(tmp_path), "similar", "--news", "N1")
    assert (code, seen) == (1, [1]) and "news id 'N1' is not in the index" in err


def test_a_config_given_as_a_pipe_is_read_once(capsys, tmp_path: Path, monkeypatch):
    # `--config <(cat recsys.toml)`: the store check read the pipe, and the command's own read of
    # the config then found it empty and ran on the defaults without a word.
    import os
    from types import SimpleNamespace

    import recsys.pipelines.index

    seen = []
    monkeypatch.setattr(recsys.pipelines.index, "get_version", lambda *_a, **_k: SimpleNamespace(version="v1"))
    monkeypatch.setattr(recsys.pipelines.index, "load_index", lambda mv, num_threads=None, **_: seen.append(num_threads) or {})
    assert run(capsys, "--workspace", str(tmp_path), "db", "upgrade")[0] == 0
    read, write = os.pipe()
    try:
        os.write(write, b"[runtime]\nthreads = 1\n")
        os.close(write)
        code, _, err = run(capsys, "--workspace", str(tmp_path), "--config", f"/dev/fd/{read}", "similar", "--news", "N1")
    finally:
        os.close(read)
    assert (code, seen) == (1, [1]) and "news id 'N1' is not in the index" in err, err


def _stop_after_ingest(monkeypatch) -> None:
    import recsys.errors
    import recsys.pipelines.train

    def stop(*args, **kwargs):
        raise recsys.errors.RecsysError("stopped after the ingest")

    monkeypatch.setattr(recsys.pipelines.train, "run_train", stop)


def _sample_files(world: Path, folder: Path, *names: str) -> Path:
    """A new folder holding copies of some of the world's files."""
    folder.mkdir()
    for name in names:
        shutil.copy(world / name, folder / name)
    return folder


def test_demo_creates_the_store_of_a_new_workspace(capsys, tmp_path: Path, world: Path, monkeypatch):
    # `make demo` on a fresh clone stopped at once with "no store at ..." when reading commands
    # stopped creating stores; the demo ingests first, so it creates it. Stopped after the ingest.
    _stop_after_ingest(monkeypatch)
    ws = tmp_path / "ws"
    for _ in range(2):  # a second demo of the same world in the same workspace is not refused
        code, _, err = run(capsys, "--workspace", str(ws), "demo", "--sample", str(world))
        assert code == 1 and err.strip().endswith("error: stopped after the ingest"), err
    code, out, _ = run(capsys, "--workspace", str(ws), "stats", "--json")
    assert code == 0 and json.loads(out)["impressions"] == len((world / "behaviors_train.tsv").read_text().splitlines())
    # The articles published by the end of training, not the test window's (its nightly recommended those).
    assert json.loads(out)["news"] == len(read_tsv(world / "news_train.tsv")) < len(read_tsv(world / "news.tsv"))


@pytest.mark.parametrize("db_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
@pytest.mark.parametrize("other", ["behaviors", "news"])
def test_demo_refuses_a_store_with_other_data(capsys, tmp_path: Path, world: Path, monkeypatch, db_url: str, other: str):
    # It ingested the sample into whatever store it was given (an exported RECSYS_DB: production),
    # trained on the mixture and made its model current. Now refused before it writes anything.
    _stop_after_ingest(monkeypatch)
    ws = ["--workspace", str(tmp_path / "ws"), "--db", db_url]
    if other == "behaviors":  # another file's impressions (source "sample/behaviors_test")
        given = ["--news", str(world / "news.tsv"), "--behaviors", str(world / "behaviors_test.tsv")]
        said = "already holds impressions of another behaviors file (source 'sample/behaviors_test')"
    else:  # an article the sample does not have
        news = tmp_path / "news.tsv"
        news.write_text("N999999\tnews\tworld\tA real article\t\t\t[]\t[]\n", encoding="utf-8")
        given = ["--news", str(news)]
        said = f"already holds articles that are not in {world / 'news.tsv'} (first N999999)"
    assert run(capsys, *ws, "ingest", *given)[0] == 0
    before = json.loads(run(capsys, *ws, "stats", "--json")[1])
    code, out, err = run(capsys, *ws, "demo", "--sample", str(world))
    assert code == 1 and said in err and "Give it a workspace of its own" in err, err
    assert json.loads(run(capsys, *ws, "stats", "--json")[1]) == before


@pytest.mark.parametrize("db_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_demo_refuses_another_applications_database_before_adding_tables(capsys, tmp_path: Path, world: Path,
                                                                         monkeypatch, db_url: str):
    # The store check ran after open_store, which had already added recsys's tables to the database.
    import sqlalchemy as sa

    _stop_after_ingest(monkeypatch)
    other = sa.create_engine(db_url)
    with other.begin() as conn:
        conn.execute(sa.text("CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER)"))
        conn.execute(sa.text("INSERT INTO orders VALUES (1, 30)"))
    code, out, err = run(capsys, "--workspace", str(tmp_path / "ws"), "--db", db_url, "demo", "--sample", str(world))
    assert code == 1 and "holds tables of another application (orders) and no recsys store" in err, err
    with other.connect() as conn:
        assert sa.inspect(conn).get_table_names() == ["orders"]
        assert conn.execute(sa.text("SELECT id, total FROM orders")).all() == [(1, 30)]
        if db_url.startswith("sqlite"):  # not switched to WAL either, as the store's connections do
            assert conn.execute(sa.text("PRAGMA journal_mode")).scalar_one() == "delete"
    other.dispose()


@pytest.mark.parametrize("name", ["store.db", "odd #1.db"])  # "#": the check opens the file by URI
def test_demos_database_check_leaves_an_unreadable_file_to_the_stores_message(capsys, tmp_path: Path, world: Path,
                                                                             monkeypatch, name: str):
    # Read without the store's engine, a file that is no database raised DatabaseError: exit 2.
    _stop_after_ingest(monkeypatch)
    garbage = tmp_path / name
    garbage.write_bytes(b"not a database" * 100)
    code, _, err = run(capsys, "--workspace", str(tmp_path / "ws"), "--db", f"sqlite:///{garbage}", "demo",
                       "--sample", str(world))
    assert code == 1 and "cannot reach the store at sqlite:///" in err and "file is not a database" in err, err
    assert garbage.read_bytes() == b"not a database" * 100


def test_demo_of_an_earlier_store_with_the_later_articles_says_so(capsys, tmp_path: Path, world: Path, monkeypatch,
                                                                    caplog):
    # A workspace an earlier demo filled from news.tsv keeps the test window's articles (ingest
    # only adds): not refused, but said, since its nightly still recommends them.
    _stop_after_ingest(monkeypatch)
    ws = ["--workspace", str(tmp_path / "ws")]
    assert run(capsys, *ws, "ingest", "--news", str(world / "news.tsv"), "--behaviors",
               str(world / "behaviors_train.tsv"))[0] == 0
    later = len(read_tsv(world / "news.tsv")) - len(read_tsv(world / "news_train.tsv"))
    with caplog.at_level("WARNING", logger="recsys.demo"):
        code, _, err = run(capsys, *ws, "demo", "--sample", str(world))
    assert code == 1 and err.strip().endswith("error: stopped after the ingest"), err
    assert f"the store holds {later} articles of {world / 'news.tsv'} that {world / 'news_train.tsv'} does not" in caplog.text


def test_demo_runs_again_on_a_sample_whose_news_file_has_a_bom(capsys, tmp_path: Path, world: Path, monkeypatch):
    # Its store check read the first id as '\ufeffN...', which ingest does not: the second run was refused.
    _stop_after_ingest(monkeypatch)
    folder = _sample_files(world, tmp_path / "bom", "behaviors_train.tsv", "behaviors_test.tsv")
    (folder / "news.tsv").write_bytes(b"\xef\xbb\xbf" + (world / "news.tsv").read_bytes())
    for _ in range(2):
        code, _, err = run(capsys, "--workspace", str(tmp_path / "ws"), "demo", "--sample", str(folder))
        assert code == 1 and err.strip().endswith("error: stopped after the ingest"), err


def test_demo_checks_the_sample_folder_before_it_starts(capsys, tmp_path: Path, world: Path, monkeypatch):
    # A folder without its test file was found out at step 7, after three trainings and a nightly
    # run; one without images/ (a MIND download) stopped at the ingest.
    _stop_after_ingest(monkeypatch)
    folder = _sample_files(world, tmp_path / "mind", "news.tsv", "behaviors_train.tsv")
    code, out, err = run(capsys, "--workspace", str(tmp_path / "ws"), "demo", "--sample", str(folder))
    assert (code, out) == (1, "") and f"error: --sample {folder}: no behaviors_test.tsv there" in err, err
    assert not (tmp_path / "ws" / "recsys.db").exists()
    shutil.copy(world / "behaviors_test.tsv", folder / "behaviors_test.tsv")
    code, _, err = run(capsys, "--workspace", str(tmp_path / "ws"), "demo", "--sample", str(folder))
    assert code == 1 and err.strip().endswith("error: stopped after the ingest"), err
    stats = json.loads(run(capsys, "--workspace", str(tmp_path / "ws"), "stats", "--json")[1])
    assert stats["news_with_image"] == 0 and stats["impressions"] > 0
    assert stats["news"] == len(read_tsv(folder / "news.tsv"))  # no news_train.tsv: the one news file


def _register_versions(workspace: Path, names: list[str], encoders: tuple[dict, dict] | None = None) -> None:
    """Versions registered as a training publishes them (the last one current), with a model
    config but no weights: enough for `model list` and `model use`, which load no model."""
    from recsys.config import load_config
    from recsys.pipelines.features import configured_encoder_infos
    from recsys.store.database import open_store
    from recsys.versions import BUNDLE_MODEL_FILES, publish_version, staging_dir

    text, image = encoders or configured_encoder_infos(load_config(None))
    engine = open_store(f"sqlite:///{workspace / 'recsys.db'}")
    try:
        for i, name in enumerate(names):
            staged = staging_dir(workspace / "models", name)
            (staged / "model").mkdir()
            (staged / "model" / "config.json").write_text('{"embedding_dim": 8, "side_features": {}}')
            for file in BUNDLE_MODEL_FILES:  # empty zip archives: what `model use` and `model list` read of them
                zipfile.ZipFile(staged / "model" / file, "w").close()
            publish_version(engine, workspace / "models", name, staged, {
                "version": name, "text_encoder": text, "image_encoder": image, "modalities": "text,image",
                "fusion": "gated", "metrics": {"val_auc": 0.6 + i / 100},
                "training_window": {"since": "2019-11-09T00:00:00", "until": f"2019-11-1{i}T00:00:00"}})
    finally:
        engine.dispose()


def test_model_list_and_use(capsys, tmp_path: Path, monkeypatch):
    ws = ["--workspace", str(tmp_path)]
    assert run(capsys, *ws, "db", "upgrade")[0] == 0
    code, out, err = run(capsys, *ws, "model", "list", "--json")
    assert (code, json.loads(out)) == (0, []), err
    _register_versions(tmp_path, ["v1", "v2", "v3"])
    from recsys.index import FaissIndex

    FaissIndex.build(np.array(["N1", "N2"]), np.eye(2, 4, dtype=np.float32), num_threads=1).save(
        tmp_path / "models" / "v2" / "index")
    code, out, err = run(capsys, *ws, "model", "list", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["version"], r["current"], r["status"], r["index"], r["val_auc"], r["until"]) for r in rows] == [
        ("v1", False, "ok", False, 0.6, "2019-11-10T00:00:00"), ("v2", False, "ok", True, 0.61, "2019-11-11T00:00:00"),
        ("v3", True, "ok", False, 0.62, "2019-11-12T00:00:00")]

    code, out, err = run(capsys, *ws, "model", "use", "v1")
    assert code == 0, err
    assert json.loads(out) == {"current": "v1", "previous": "v3", "changed": True,
                               "index": "missing, built by the next nightly or recsys index build"}
    code, out, err = run(capsys, *ws, "model", "use", "v1")
    assert code == 0 and json.loads(out)["changed"] is False, err
    assert "note: model version 'v1' is already current: nothing changed" in err
    code, out, err = run(capsys, *ws, "model", "use", "v2")
    assert code == 0 and json.loads(out) == {"current": "v2", "previous": "v1", "changed": True, "index": "present"}, err

    code, out, err = run(capsys, *ws, "model", "use", "v9")
    assert (code, out) == (1, "")
    assert err.strip() == "error: model version 'v9' does not exist; known versions: v1, v2, v3 (see `recsys model list`)"
    # The default configuration reads title + abstract vectors; a title-only one does not serve these versions.
    titles_only = tmp_path / "titles-only.toml"
    titles_only.write_text("[encoders]\nuse_abstract = false\n")
    code, out, err = run(capsys, *ws, "--config", str(titles_only), "model", "use", "v3")
    assert (code, out) == (1, "")
    assert err.startswith("error: model version v3 was built with text_encoder"), err
    assert "use_abstract and text_max_length" in err
    # A damaged version: refused, yet listed (table and JSON) with the reason.
    (tmp_path / "models" / "v1" / "manifest.json").write_text("{")
    code, out, err = run(capsys, *ws, "model", "use", "v1")
    assert (code, out) == (1, "")
    assert f"{tmp_path / 'models' / 'v1' / 'manifest.json'}: the manifest of model version 'v1' cannot be read" in err
    # Rich lays tables out in 80 columns outside a terminal: the cells wrapped ("damag" / "ed").
    code, out, err = run(capsys, *ws, "model", "list")
    assert code == 0 and re.findall(r"\bv\d\b", out) == ["v1", "v2", "v3"], err
    assert max(len(line) for line in out.splitlines()) > 80 and len(out.splitlines()) == 8
    assert "damaged" in out and "note: " in err and "model version 'v1' cannot be read" in err
    code, out, _ = run(capsys, *ws, "model", "list", "--json")
    assert [(r["version"], r["current"], r["status"]) for r in json.loads(out)] == [
        ("v1", False, "damaged"), ("v2", True, "ok"), ("v3", False, "ok")]
    # A truncated Keras file: refused (exit 1, naming it) and listed as damaged, not left to the nightly.
    truncated = tmp_path / "models" / "v3" / "model" / "scorer.keras"
    truncated.write_bytes(b"PK")
    code, out, err = run(capsys, *ws, "model", "use", "v3")
    assert (code, out) == (1, "") and err.startswith(f"error: {truncated}: the file is there (2 bytes) but is not a .keras"), err
    code, out, err = run(capsys, *ws, "model", "list", "--json")
    rows = json.loads(out)
    assert [r["status"] for r in rows] == ["damaged", "ok", "damaged"] and str(truncated) in rows[2]["problem"], err


def test_train_keep_current_publishes_without_serving(capsys, tmp_path: Path, monkeypatch):
    # Training itself is tested end to end above; here which flag reaches run_train.
    import recsys.pipelines.train

    seen = []
    monkeypatch.setattr(recsys.pipelines.train, "run_train",
                        lambda *a, make_current=True, **k: seen.append(make_current) or {"current": make_current})
    assert run(capsys, "--workspace", str(tmp_path), "db", "upgrade")[0] == 0
    for args in (["--keep-current"], []):
        code, out, err = run(capsys, "--workspace", str(tmp_path), "train", *args)
        assert code == 0, err
    assert seen == [False, True]


def test_model_list_and_use_load_no_tensorflow(tmp_path: Path):
    # Both answer in a second: the default image encoder's identity is known without TensorFlow.
    import subprocess
    import sys

    from recsys.cli import main as cli_main

    assert cli_main(["--workspace", str(tmp_path), "db", "upgrade"]) == 0
    _register_versions(tmp_path, ["v1", "v2"])
    script = ("import sys; from recsys.cli import main\n"
              f"codes = [main(['--workspace', {str(tmp_path)!r}, 'model', 'list']), "
              f"main(['--workspace', {str(tmp_path)!r}, 'model', 'use', 'v1'])]\n"
              "print(codes, 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.stdout.splitlines()[-1] == "[0, 0] False False", out.stderr


def test_model_list_shows_a_validation_auc_it_cannot_read_as_it_is():
    # A hand-edited manifest's "n/a" made the whole listing an internal error (exit 2).
    from recsys.cli import _auc_cell

    assert (_auc_cell(0.712345), _auc_cell(None), _auc_cell("n/a"), _auc_cell([1])) == ("0.7123", "-", "n/a", "[1]")


@pytest.mark.parametrize(("models", "message"), [
    (",", "--models ',' names no model version"),  # evaluated the current version instead
    ("v1, v1", "--models names v1 more than once"),  # collapsed to one row
])
def test_evaluate_refuses_a_models_list_that_names_nothing_or_a_version_twice(capsys, tmp_path: Path, models, message):
    behaviors = tmp_path / "behaviors.tsv"
    behaviors.write_text("1\tU1\t11/15/2019 8:00:00 AM\t\tN1-1 N2-0\n")
    code, out, err = run(capsys, "--workspace", str(tmp_path), "evaluate", "--behaviors", str(behaviors), "--out",
                         str(tmp_path / "report"), "--models", models)
    assert (code, out) == (1, "") and err.startswith(f"error: {message}"), err
    assert not (tmp_path / "report").exists()


@pytest.mark.postgres
def test_a_statement_the_server_cancels_names_the_store_on_stderr_and_in_the_failed_run(
        capsys, tmp_path: Path, world: Path, pg_database_url: str):
    # The line said "the store cancelled a statement" without saying which store (a job reads
    # several), and the failed ingest run's message kept the driver's text, its SQL and parameters.
    import uuid

    import sqlalchemy as sa

    from recsys.store.database import open_store, shown_store

    schema = f"refusal_{uuid.uuid4().hex[:8]}"
    # As operators write it: named as recsys connects to it, postgresql+psycopg://, in both places.
    url = f"{pg_database_url}?options=-csearch_path%3D{schema}%20-clock_timeout%3D300".replace(
        "postgresql+psycopg://", "postgresql://")
    admin = sa.create_engine(pg_database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        open_store(url, create=True).dispose()  # the tables, in the schema
        with admin.connect() as holder:
            holder.exec_driver_sql("BEGIN")  # the lock lasts until the end of this block
            holder.execute(sa.text(f'LOCK TABLE "{schema}".news IN ACCESS EXCLUSIVE MODE'))
            code, _, err = run(capsys, "--workspace", str(tmp_path / "ws"), "--db", url, "ingest",
                               "--news", str(world / "news.tsv"), "--behaviors", str(world / "behaviors_train.tsv"),
                               "--images", str(world / "images"))
        assert code == 1, err
        shown = shown_store(url)
        assert shown.startswith("postgresql+psycopg://")
        line = f"the store at {shown} cancelled a statement (canceling statement due to lock timeout)"
        assert err.strip().splitlines()[-1].startswith(f"error: {line}: raise the role's"), err
        with admin.connect() as conn:
            rows = conn.execute(sa.text(f'SELECT kind, status, message FROM "{schema}".runs')).all()
        assert [(kind, status) for kind, status, _ in rows] == [("ingest", "failed")]
        assert rows[0].message.startswith(line) and "INSERT" not in rows[0].message
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_commands_that_only_read_the_store_do_not_create_the_workspace(capsys, tmp_path: Path, world: Path,
                                                                         monkeypatch):
    # A web backend ran `recsys --db postgresql://... recommend` from a read-only root: "workspace
    # /app/workspace cannot be created: Read-only file system" (exit 1); from a writable folder it
    # left an empty ./workspace behind.
    store = ["--db", f"sqlite:///{tmp_path / 'store.db'}"]
    assert run(capsys, "--workspace", str(tmp_path / "ws"), *store, "ingest", "--news",
               str(world / "news_train.tsv"))[0] == 0
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.delenv("RECSYS_WORKSPACE", raising=False)
    assert json.loads(run(capsys, *store, "stats", "--json")[1])["news"] > 0
    assert run(capsys, *store, "model", "list", "--json")[:2] == (0, "[]\n")
    code, out, err = run(capsys, *store, "recommend", "--user", "U1")
    assert (code, out, err) == (1, "", "error: user 'U1' is unknown: not in the store and no recommendations\n")
    code, out, err = run(capsys, *store, "export", "--out", str(tmp_path / "exports"))
    assert (code, out) == (1, "") and err.startswith("error: "), err
    assert list(here.iterdir()) == []
