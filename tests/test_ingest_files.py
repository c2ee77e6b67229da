"""`recsys ingest` refuses a file of which no line could be loaded (the wrong file), keeping what
the other file loaded and quarantining the bad lines as usual; and one with more bad lines than
``ingest.max_bad_share`` allows, after storing its good ones."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from recsys.cli import main
from recsys.config import Workspace
from recsys.errors import RecsysError
from recsys.pipelines.ingest import NoGoodRowError, run_ingest
from recsys.store import schema as s
from tests.store.mind_files import behavior_line, news_line, write_lines


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from recsys.data.sample import generate_sample

    root = tmp_path_factory.mktemp("world")
    generate_sample(root, num_users=20, num_news=100, num_impressions=30, seed=5, image_size=32)
    return root


def _count(engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar()


def _ingest_runs(engine) -> list[tuple]:
    r = s.runs.c
    with engine.connect() as conn:
        return [(row.status, row.message) for row in conn.execute(select(r.status, r.message).where(r.kind == "ingest"))]


def test_swapped_news_and_behaviors_files_are_refused_naming_both(engine, world, tmp_path):
    # Lenient ingest quarantined every line of both and exited 0: nothing alerted the operator.
    ws = Workspace(tmp_path / "ws").ensure()
    news, behaviors = world / "behaviors_train.tsv", world / "news.tsv"
    num_behaviors = len(news.read_text().splitlines())
    num_news = len(behaviors.read_text().splitlines())
    with pytest.raises(NoGoodRowError) as raised:
        run_ingest(engine, ws, news=news, behaviors=behaviors, images=None)
    message = str(raised.value)
    assert message.startswith(f"--news {news}: every one of its {num_behaviors} lines was bad, nothing of it was stored "
                              f"(first: {news} line 1: field ")
    assert f"; --behaviors {behaviors}: every one of its {num_news} lines was bad" in message
    assert message.endswith("is it the right file (news.tsv and behaviors.tsv swapped?)")
    (quarantine,) = ws.quarantine_dir.iterdir()
    assert f"the lines are in {quarantine}" in message
    assert _count(engine, s.news) == _count(engine, s.impressions) == 0
    assert _count(engine, s.quarantine) == num_behaviors + num_news
    ((status, why),) = _ingest_runs(engine)
    assert status == "failed" and why.startswith("NoGoodRowError: --news")


def test_only_the_file_without_a_good_line_is_named_and_the_other_stays_stored(engine, world, tmp_path):
    ws = Workspace(tmp_path / "ws").ensure()
    wrong = tmp_path / "news-copy.tsv"  # a news file given as behaviors
    wrong.write_bytes((world / "news.tsv").read_bytes())
    with pytest.raises(NoGoodRowError, match=rf"^--behaviors {wrong}: every one of its \d+ lines was bad") as raised:
        run_ingest(engine, ws, news=world / "news.tsv", behaviors=wrong, images=None)
    assert "--news" not in str(raised.value)
    assert _count(engine, s.news) == 100 and _count(engine, s.impressions) == 0


def test_a_file_with_some_good_lines_is_loaded_and_its_bad_lines_quarantined(engine, world, tmp_path):
    ws = Workspace(tmp_path / "ws").ensure()
    lines = (world / "behaviors_train.tsv").read_text().splitlines()
    mixed = tmp_path / "behaviors.tsv"
    mixed.write_text("\n".join([*lines[:5], "not\ta behaviors line"]) + "\n")
    # One bad line in six is more than the default ingest.max_bad_share: only the all-bad rule here.
    summary = run_ingest(engine, ws, news=world / "news.tsv", behaviors=mixed, images=None, max_bad_share=1.0)
    assert (summary["impressions"], summary["num_bad_rows"]) == (5, 1)
    assert summary["bad_rows_by_file"] == {str(mixed.resolve()): 1}
    assert summary["first_bad_row"][str(mixed.resolve())].startswith(f"{mixed} line 6: ")
    assert [status for status, _ in _ingest_runs(engine)] == ["complete"]


def test_a_file_already_stored_under_another_source_is_not_refused_as_bad(engine, world, tmp_path, caplog):
    # Its good lines are all held under the first source: none is stored again, and a bad
    # line beside them must not make the file read as one without a good line.
    ws = Workspace(tmp_path / "ws").ensure()
    lines = (world / "behaviors_train.tsv").read_text().splitlines()
    first = tmp_path / "night1" / "behaviors.tsv"
    again = tmp_path / "night2" / "behaviors.tsv"
    for path, extra in ((first, []), (again, ["not\ta behaviors line"])):
        path.parent.mkdir()
        path.write_text("\n".join([*lines[:5], *extra]) + "\n")
    run_ingest(engine, ws, news=world / "news.tsv", behaviors=first, images=None)
    summary = run_ingest(engine, ws, news=None, behaviors=again, images=None, max_bad_share=1.0)  # 1 bad of 6
    assert (summary["impressions"], summary["impressions_stored_elsewhere"], summary["num_bad_rows"]) == (0, 5, 1)
    assert _count(engine, s.impressions) == 5
    assert "5 impressions of this file were not stored under source 'night2/behaviors'" in caplog.text


def test_lines_written_twice_are_counted_and_said_once(engine, world, tmp_path, caplog):
    # Each of five lines written again under another id: stored once, the copies counted as
    # repeats (good lines, not bad rows) and said on the log.
    ws = Workspace(tmp_path / "ws").ensure()
    lines = (world / "behaviors_train.tsv").read_text().splitlines()[:5]
    path = tmp_path / "train" / "behaviors.tsv"
    path.parent.mkdir()
    again = [f"{int(imp_id) + 100}\t{rest}" for imp_id, rest in (line.split("\t", 1) for line in lines)]
    path.write_text("\n".join([*lines, *again, "not\ta behaviors line"]) + "\n")
    summary = run_ingest(engine, ws, news=world / "news.tsv", behaviors=path, images=None)
    assert (summary["impressions"], summary["impressions_repeated"], summary["num_bad_rows"]) == (5, 5, 1)
    assert _count(engine, s.impressions) == 5
    assert "5 impressions of this file were not stored: an earlier line of the file brought each of them" in caplog.text


def test_one_file_given_as_both_news_and_behaviors_is_refused_before_anything_is_written(engine, world, tmp_path):
    # It was read twice, its bad lines counted twice under one key ("4 lines" of a 2-line file)
    # and the behaviors reading reported with the news reading's reason.
    ws = Workspace(tmp_path / "ws").ensure()
    (tmp_path / "link.tsv").symlink_to(world / "news.tsv")
    for behaviors in (world / "news.tsv", tmp_path / "link.tsv"):
        with pytest.raises(RecsysError, match=rf"^--news and --behaviors are the same file {world / 'news.tsv'}: "
                                              "expected news.tsv and behaviors.tsv$"):
            run_ingest(engine, ws, news=world / "news.tsv", behaviors=behaviors, images=None)
    assert _count(engine, s.news) == _count(engine, s.quarantine) == 0
    assert _ingest_runs(engine) == [] and not ws.quarantine_dir.exists()


def test_another_file_under_the_same_default_source_is_counted_and_named_on_the_log(engine, world, tmp_path, caplog):
    # data/train/behaviors.tsv and data/other/train/behaviors.tsv both default to the source
    # 'train/behaviors': the second silently replaced the first's impressions with equal ids.
    ws = Workspace(tmp_path / "ws").ensure()
    first, second = tmp_path / "a" / "train", tmp_path / "b" / "train"
    for folder in (first, second):
        folder.mkdir(parents=True)
    lines = (world / "behaviors_train.tsv").read_text().splitlines()
    (first / "behaviors.tsv").write_text("\n".join(lines[:10]) + "\n")
    # The same ids, other users: another file, not a corrected copy of the first.
    other = ["\t".join([c if i != 1 else c + "x" for i, c in enumerate(line.split("\t"))]) for line in lines[:4]]
    (second / "behaviors.tsv").write_text("\n".join(other) + "\n")
    summary = run_ingest(engine, ws, news=world / "news.tsv", behaviors=first / "behaviors.tsv", images=None)
    assert (summary["source"], summary["impressions_changed"]) == ("train/behaviors", 0)
    again = run_ingest(engine, ws, news=None, behaviors=first / "behaviors.tsv", images=None)
    assert again["impressions_changed"] == 0 and "had another user or time" not in caplog.text
    replaced = run_ingest(engine, ws, news=None, behaviors=second / "behaviors.tsv", images=None)
    assert (replaced["source"], replaced["impressions"], replaced["impressions_changed"]) == ("train/behaviors", 4, 4)
    first_id = other[0].split("\t")[0]
    assert replaced["first_changed_impression"] == f"line 1 (impression id {first_id})"
    assert (f"4 impressions stored under source 'train/behaviors' had another user or time and were replaced by this "
            f"file's (first: line 1 (impression id {first_id}))") in caplog.text
    # The replaced lines' clicks were their users' only: each clicked (user, article) pair of
    # them that the file's other lines do not click is withdrawn.
    def clicked(lines):
        return {(c[1], n[:-2]) for c in (line.split("\t") for line in lines) for n in c[4].split() if n.endswith("-1")}
    withdrawn = len(clicked(lines[:4]) - clicked(lines[4:10]))
    assert withdrawn > 0 and replaced["clicks_withdrawn"] == withdrawn
    assert f"{withdrawn} clicks that only the replaced impressions gave are no longer stored with a click time" in caplog.text
    assert replaced["labels_dropped"] == 0 and "replaced by unlabelled lines" not in caplog.text
    # The first file again, its labels cut: every impression of it that had a click loses it.
    unlabelled = ["\t".join(c[:4] + [" ".join(n[:-2] for n in c[4].split())]) for c in (line.split("\t") for line in lines[:10])]
    (first / "behaviors.tsv").write_text("\n".join(lines[:10]) + "\n")
    run_ingest(engine, ws, news=None, behaviors=first / "behaviors.tsv", images=None)
    (first / "behaviors.tsv").write_text("\n".join(unlabelled) + "\n")
    dropped = run_ingest(engine, ws, news=None, behaviors=first / "behaviors.tsv", images=None)
    with_clicks = sum("-1" in line.split("\t")[4] for line in lines[:10])
    assert with_clicks > 0 and dropped["labels_dropped"] == with_clicks
    assert (f"{with_clicks} impressions with clicks stored under source 'train/behaviors' were replaced by unlabelled "
            f"lines of this file") in caplog.text
    assert _count(engine, s.impressions) == 10


def _late_night(world, tmp_path, *, bad: int):
    """A behaviors file of ten lines whose last ``bad`` show articles of a news file delivered
    late (N99990, ...; not in the world): those lines are quarantined. Returns it and that news file."""
    (tmp_path / "night").mkdir()
    lines = (world / "behaviors_train.tsv").read_text().splitlines()[: 10 - bad]
    late = [behavior_line(900 + i, "U_late", "11/15/2019 8:00:00 AM", [], [f"N9999{i}-1"]) for i in range(bad)]
    return (write_lines(tmp_path / "night" / "behaviors.tsv", [*lines, *late]),
            write_lines(tmp_path / "night" / "news.tsv", [news_line(f"N9999{i}") for i in range(bad)]))


def _ingest_runs_in_order(engine) -> list[tuple]:
    r = s.runs.c
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(select(r.status, r.counts).where(r.kind == "ingest").order_by(r.run_id))]


def test_a_file_with_more_bad_lines_than_max_bad_share_fails_after_its_good_lines_are_stored(engine, db_url, world,
                                                                                           tmp_path, capsys):
    # A behaviors file delivered before its news file: 249 of its 255 lines were quarantined, the
    # ingest exited 0 and the night served lists from the other 6, with only a warning.
    behaviors, late_news = _late_night(world, tmp_path, bad=3)
    cli = ["--workspace", str(tmp_path / "ws"), "--db", db_url, "ingest"]
    capsys.readouterr()
    code = main([*cli, "--news", str(world / "news.tsv"), "--behaviors", str(behaviors)])
    out, err = capsys.readouterr()
    assert (code, out) == (1, ""), err
    (quarantine,) = (tmp_path / "ws" / "quarantine").iterdir()
    assert err.strip().splitlines()[-1] == (
        f"error: --behaviors {behaviors}: 3 of its 10 lines were bad (30.0%, more than ingest.max_bad_share = 10%); "
        f"its 7 good lines were ingested (first bad: {behaviors} line 8: field 'impressions' has 'N99990', expected a news "
        f"id present in the store or in the news file); the lines are in {quarantine}: fix the file (or its news file) "
        "and ingest it again, or raise ingest.max_bad_share")
    # The batches are committed: the good lines and the news file stay, the run says what it did.
    assert (_count(engine, s.news), _count(engine, s.impressions), _count(engine, s.quarantine)) == (100, 7, 3)
    ((status, counts),) = _ingest_runs_in_order(engine)
    assert status == "failed" and (counts["impressions"], counts["num_bad_rows"]) == (7, 3)

    # The late news file arrives: the same behaviors file ingests clean, its quarantine rows gone.
    code = main([*cli, "--news", str(late_news), "--behaviors", str(behaviors)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (json.loads(out)["impressions"], json.loads(out)["num_bad_rows"]) == (10, 0)
    assert (_count(engine, s.impressions), _count(engine, s.quarantine)) == (10, 0)
    assert [status for status, _ in _ingest_runs_in_order(engine)] == ["failed", "complete"]


def test_a_file_failed_for_its_bad_share_still_warns_of_what_its_good_lines_did(engine, world, tmp_path, caplog):
    # The warnings came after the share's check: a failed ingest that had stored its good lines
    # never said that one of them lost History ids (nor how to restore them).
    import logging

    (tmp_path / "night").mkdir()
    known = (world / "news.tsv").read_text().split("\t", 1)[0]
    lines = [*(world / "behaviors_train.tsv").read_text().splitlines()[:7],
             behavior_line(800, "U_hist", "11/15/2019 7:00:00 AM", ["N99990"], [f"{known}-1"]),
             *(behavior_line(900 + i, "U_late", "11/15/2019 8:00:00 AM", [], [f"N9999{i}-1"]) for i in range(2))]
    behaviors = write_lines(tmp_path / "night" / "behaviors.tsv", lines)
    with caplog.at_level(logging.WARNING, logger="recsys.ingest"), pytest.raises(RecsysError, match="2 of its 10 lines"):
        run_ingest(engine, Workspace(tmp_path / "ws"), news=world / "news.tsv", behaviors=behaviors, images=None)
    assert "1 History entries named articles neither the store nor the news file has" in caplog.text
    assert _count(engine, s.impressions) == 8


def test_a_news_file_that_repeats_its_articles_counts_every_line(engine, world, tmp_path):
    # Train and dev news files joined repeat articles: only the last line of each is stored, and
    # the share counted the earlier ones as neither good nor bad (12 of "112" lines, 10.7%).
    news = (world / "news.tsv").read_text().splitlines()
    bad = [f"N8888{i}\tnews" for i in range(12)]  # two fields of eight
    joined = write_lines(tmp_path / "news.tsv", [*news, *news, *bad])
    summary = run_ingest(engine, Workspace(tmp_path / "ws"), news=joined, behaviors=None, images=None)
    assert (summary["news"], summary["num_bad_rows"], summary["lines_by_file"][str(joined.resolve())]) == (100, 12, 212)


@pytest.mark.parametrize(("bad", "config", "code"), [
    (1, "", 0),  # 10%: at the default limit, not above it
    (3, "[ingest]\nmax_bad_share = 1.0\n", 0),  # only a file without a good line fails, as before the key
    (1, "[ingest]\nmax_bad_share = 0\n", 1),  # any bad line fails the ingest, its good lines stored
], ids=["at-the-default", "one", "zero"])
def test_the_bad_share_a_file_may_have_is_the_configs(engine, db_url, world, tmp_path, capsys, bad, config, code):
    behaviors, _ = _late_night(world, tmp_path, bad=bad)
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "recsys.toml").write_text(config)
    capsys.readouterr()
    got = main(["--workspace", str(tmp_path / "ws"), "--db", db_url, "ingest", "--news", str(world / "news.tsv"),
                "--behaviors", str(behaviors)])
    out, err = capsys.readouterr()
    assert got == code, err
    if code == 0:
        assert (json.loads(out)["impressions"], json.loads(out)["num_bad_rows"]) == (10 - bad, bad)
    else:
        assert f"{bad} of its 10 lines was bad (10.0%, more than ingest.max_bad_share = 0%)" in err
    assert (_count(engine, s.impressions), _count(engine, s.quarantine)) == (10 - bad, bad)
    assert [status for status, _ in _ingest_runs_in_order(engine)] == ["complete" if code == 0 else "failed"]


def test_the_cli_refuses_another_file_under_the_same_source_until_replace_is_given(world, tmp_path, capsys):
    news_ids = [line.split("\t")[0] for line in (world / "news.tsv").read_text().splitlines()]

    def day(users: str, hour: int) -> list[str]:
        from datetime import datetime, timedelta

        t0 = datetime(2019, 11, 14, hour)
        return [behavior_line(i + 1, f"{users}{i}", t0 + timedelta(minutes=i), news_ids[:2],
                              [f"{news_ids[2]}-1", f"{news_ids[3]}-0"]) for i in range(25)]

    first, second = tmp_path / "monday" / "latest", tmp_path / "tuesday" / "latest"
    for folder, users, hour in ((first, "A", 8), (second, "B", 20)):
        folder.mkdir(parents=True)
        write_lines(folder / "behaviors.tsv", day(users, hour))
    ws = ["--workspace", str(tmp_path / "ws")]
    assert main([*ws, "ingest", "--news", str(world / "news.tsv"), "--behaviors", str(first / "behaviors.tsv")]) == 0
    capsys.readouterr()
    assert main([*ws, "stats", "--json"]) == 0
    stats = capsys.readouterr().out
    # Both default to the source 'latest/behaviors': refused, exit 1, nothing stored.
    assert main([*ws, "ingest", "--behaviors", str(second / "behaviors.tsv")]) == 1
    err = capsys.readouterr().err
    assert ("25 of the 25 impressions that source 'latest/behaviors' holds under this file's impression ids would be "
            "replaced") in err and "--replace" in err, err
    assert main([*ws, "stats", "--json"]) == 0
    assert capsys.readouterr().out == stats
    assert main([*ws, "ingest", "--behaviors", str(second / "behaviors.tsv"), "--replace"]) == 0
    assert json.loads(capsys.readouterr().out)["impressions_changed"] == 25
