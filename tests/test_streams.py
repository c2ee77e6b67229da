"""The command line where a nightly job runs: cron's closed or full streams, a legacy charset,
another time zone (a hunt ran the job in each; these failed it after or before its work)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.store.mind_files import behavior_line, news_line, write_lines

TITLES = {"N1": "🚀 東京 café naïve", "N2": "— Ñandú “quoted” 😀"}
BAD = news_line("N€bad", title="Bad row ✓ 日本語 é")  # an id out of the pattern: quarantined, quoted in the summary


def _recsys(tmp_path: Path, *args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``python -m recsys --workspace WS ARGS`` in a child process of its own streams."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "recsys", "--workspace", str(tmp_path / "ws"), *args],
                          env=full_env, timeout=300, **kwargs)


def _ingest_args(tmp_path: Path) -> list[str]:
    news = write_lines(tmp_path / "news.tsv", [*(news_line(n, title=t) for n, t in TITLES.items()), BAD])
    behaviors = write_lines(tmp_path / "behaviors.tsv", [behavior_line(1, "U1", "11/11/2019 9:05:58 AM", [], ["N1-1", "N2-0"])])
    # One bad line of three is more than the default ingest.max_bad_share; the summary quotes it.
    config = tmp_path / "recsys.toml"
    config.write_text("[ingest]\nmax_bad_share = 1.0\n")
    return ["--config", str(config), "ingest", "--news", str(news), "--behaviors", str(behaviors)]


def _stored_impressions(tmp_path: Path) -> int:
    stats = _recsys(tmp_path, "stats", "--json", capture_output=True, text=True, encoding="utf-8")
    assert stats.returncode == 0, stats.stderr
    return json.loads(stats.stdout)["impressions"]


def test_an_ingest_whose_stderr_cron_closed_stores_its_files_and_exits_0(tmp_path: Path):
    # `2>&-`: Python's sys.stderr is None, and the progress reporter's isatty() failed the ingest
    # (exit 2, nothing stored; inside `nightly`, the night's data was not loaded).
    done = _recsys(tmp_path, *_ingest_args(tmp_path), stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2))
    assert done.returncode == 0
    assert json.loads(done.stdout)["impressions"] == 1
    assert _stored_impressions(tmp_path) == 1


def test_a_latin1_stdout_gets_json_escapes_and_the_log_its_time_in_utc(tmp_path: Path):
    # A latin-1 locale: printing the summary (it quotes the bad line) raised UnicodeEncodeError
    # after the ingest had stored everything (exit 2). The log's times were the machine's zone.
    before = datetime.now(timezone.utc).replace(tzinfo=None)
    done = _recsys(tmp_path, *_ingest_args(tmp_path), capture_output=True,
                   env={"PYTHONIOENCODING": "latin-1", "TZ": "America/Los_Angeles"})
    after = datetime.now(timezone.utc).replace(tzinfo=None)
    assert done.returncode == 0, done.stderr
    assert done.stdout.isascii()  # \u escapes: still JSON, whatever reads it
    summary = json.loads(done.stdout)
    assert summary["impressions"] == 1 and "N€bad" in json.dumps(summary, ensure_ascii=False)
    times = re.findall(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z INFO ", done.stderr, flags=re.M)
    assert times, done.stderr
    logged = datetime.fromisoformat(times[0].decode())
    assert before - timedelta(seconds=1) <= logged <= after + timedelta(seconds=1)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_result_that_a_full_stdout_cannot_take_is_exit_1_saying_the_work_is_done(tmp_path: Path):
    # It read "error: a write failed: no space left on device": the operator looked for a full
    # data disk, and the ingest had stored everything.
    with open("/dev/full", "w") as full:
        done = _recsys(tmp_path, *_ingest_args(tmp_path), stdout=full, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "error: cannot write the result to standard output: no space left on device (the command itself completed)")
    assert _stored_impressions(tmp_path) == 1


def test_a_closed_standard_stream_gets_dev_null_so_no_file_takes_its_number():
    # With fd 2 closed the next file opened was fd 2, and TensorFlow's C++ start-up lines, written
    # to fd 2, would go into it (the store, a model file).
    script = ("import os; from recsys.cli import _reserve_standard_fds; _reserve_standard_fds(); "
              "print(os.open(os.devnull, os.O_RDONLY), os.path.realpath('/proc/self/fd/2'))")
    done = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, timeout=120,
                          preexec_fn=lambda: os.close(2))
    assert done.returncode == 0
    fd, stderr_path = done.stdout.split()
    assert int(fd) >= 3 and stderr_path == os.devnull


def test_the_result_is_one_line_for_a_scheduler_and_indented_on_a_terminal(tmp_path: Path):
    # Airflow's BashOperator pushes the last line of stdout to XCom: indented, that was "}".
    import pty

    piped = _recsys(tmp_path, *_ingest_args(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert piped.returncode == 0
    lines = piped.stdout.decode().splitlines()
    assert len(lines) == 1 and json.loads(lines[-1])["impressions"] == 1
    main, terminal = pty.openpty()
    try:
        shown = _recsys(tmp_path, "stats", "--json", stdout=terminal, stderr=subprocess.DEVNULL)
        text = os.read(main, 65536).decode()
    finally:
        os.close(main)
        os.close(terminal)
    assert shown.returncode == 0
    assert text.startswith("{\r\n  \"") and json.loads(text)["impressions"] == 1
