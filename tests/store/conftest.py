"""Fixtures of the store tests: small MIND worlds written to tmp_path."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest

from .mind_files import behavior_line, news_line, write_lines

T0 = datetime(2019, 11, 11, 9, 5, 58)


@pytest.fixture
def quarantine_dir(tmp_path) -> Path:
    return tmp_path / "quarantine"


@pytest.fixture
def small_world(tmp_path) -> dict[str, Path]:
    """Six articles (one with non-Latin text and entity JSON) and four labelled impressions.

    U1 is seen twice: at T0 with History N1 N2, and a day later with History N1 N2 N3.
    """
    news = write_lines(tmp_path / "news.tsv", [
        news_line("N1", title="Storm hits the coast", abstract="Heavy rain.",
                  title_entities='[{"Label": "Coast", "Type": "G", "WikidataId": "Q1", "Confidence": 0.9, '
                                 '"OccurrenceOffsets": [16], "SurfaceForms": ["coast"]}]'),
        news_line("N2", category="sports", subcategory="football", title="Team wins the cup"),
        news_line("N3", title="東京で大雨、交通に影響", abstract="Тяжёлый дождь — العاصفة"),
        news_line("N4", category="finance", title="Markets rise"),
        news_line("N5", category="lifestyle", title="Ten recipes"),
        news_line("N6", category="travel", title="Cheap flights", title_entities="", abstract_entities=""),
    ])
    behaviors = write_lines(tmp_path / "behaviors.tsv", [
        behavior_line(1, "U1", T0, ["N1", "N2"], ["N3-1", "N4-0", "N5-0"]),
        behavior_line(2, "U2", T0 + timedelta(hours=1), [], ["N1-0", "N2-1", "N6-1"]),
        behavior_line(3, "U1", T0 + timedelta(days=1), ["N1", "N2", "N3"], ["N4-1", "N5-0"]),
        behavior_line(4, "U3", T0 - timedelta(hours=2), ["N6"], ["N3-0", "N4-0"]),
    ])
    return {"news": news, "behaviors": behaviors, "root": tmp_path}
