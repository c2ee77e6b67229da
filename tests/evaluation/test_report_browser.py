"""The report renders in a real browser: headless Chromium loads every image and shows the tables."""

import os
import shutil
import sys
from pathlib import Path

import pytest

from recsys.evaluation.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.browser


def _require_browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing and os.environ.get("CI") != "true":
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)")
    if missing:  # under CI=true a missing browser is a failure, not a skip
        pytest.fail(f"CI=true but {', '.join(missing)} not installed")


@pytest.fixture
def driver(tmp_path):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    browser.set_page_load_timeout(60)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def test_report_renders_in_chromium(driver, tmp_path, synthetic_result):
    _, html_path = write_report(synthetic_result, tmp_path / "report")
    driver.get(html_path.resolve().as_uri())
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.id || i.className, i.complete, i.naturalWidth, i.naturalHeight]);"
    )
    assert len(images) == 5
    for name, complete, width, height in images:
        assert complete and width > 0 and height > 0, name
    tables = driver.execute_script(
        "return Array.from(document.querySelectorAll('table')).map(t => [t.id, t.rows.length]);"
    )
    rows = dict(tables)
    for table in ("header-table", "metrics-table", "diff-table", "calibration-table", "beyond-table",
                  "breakdown-category", "breakdown-has_image", "breakdown-history_length"):
        assert rows.get(table, 0) > 1, table
    assert rows["metrics-table"] == 1 + len(synthetic_result["models"])
    assert driver.title.startswith("recsys evaluation report")


def test_missing_browser_skips_locally_and_fails_under_ci(monkeypatch, tmp_path):
    # Both paths are replaced, so the messages do not depend on what this machine has installed.
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setattr(sys.modules[__name__], "CHROMEDRIVER", tmp_path / "no-chromedriver")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-chromium, .*no-chromedriver not installed"):
        _require_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but .*no-chromium, .*no-chromedriver not installed"):
        _require_browser()
