from pathlib import Path

import pytest

from recsys.config import Config, Workspace, config_from_dict, load_config, resolve_db_url
from recsys.errors import ConfigError


def test_defaults_are_valid():
    config = Config()
    assert config.nightly.k == 10
    assert config.nightly.num_candidates == 200
    assert config.model.fusion == "gated"


def test_file_then_overrides(tmp_path: Path):
    path = tmp_path / "recsys.toml"
    path.write_text('[nightly]\nk = 5\nactive_days = 2\n[model]\nfusion = "concat"\n')
    config = load_config(path, {"nightly.k": 7, "model.epochs": None})
    assert config.nightly.k == 7  # the flag wins over the file
    assert config.nightly.active_days == 2.0  # int accepted for a float key
    assert config.model.fusion == "concat"
    assert config.model.epochs == Config().model.epochs  # None means "flag not given"


def test_unknown_key_is_named(tmp_path: Path):
    path = tmp_path / "recsys.toml"
    path.write_text("[nightly]\nkk = 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'nightly.kk'"):
        load_config(path)


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"unknown section 'nighty'"):
        config_from_dict({"nighty": {"k": 1}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nightly": {"k": "ten"}}, r"'nightly.k' is 'ten', expected int"),
        ({"nightly": {"k": True}}, r"'nightly.k' is True, expected int"),
        ({"encoders": {"use_abstract": 1}}, r"'encoders.use_abstract' is 1, expected true or false"),
        ({"model": {"fusion": "sum"}}, r"'model.fusion' is 'sum', expected one of concat, weighted_sum, gated"),
        ({"nightly": {"k": 0}}, r"'nightly.k' is 0, expected a positive number"),
        ({"nightly": 3}, r"'nightly' must be a table"),
        ({"model": {"anchor_dim": 64}}, r"'model.anchor_dim' is 64, expected 0 or more with anchor_dim x modalities \(128\)"),
        ({"model": {"anchor_dim": -1}}, r"'model.anchor_dim' is -1"),
        ({"model": {"feature_clock_hours": -24.0}}, r"'model.feature_clock_hours' is -24.0, expected 0 \(off\) or a period"),
        ({"model": {"feature_clock_hours": 1e-4}}, r"'model.feature_clock_hours' is 0.0001, expected 0 \(off\)"),
        ({"model": {"feature_clock_hours": float("nan")}}, r"'model.feature_clock_hours' is nan"),
        ({"model": {"refit": "yes"}}, r"'model.refit' is 'yes', expected true or false"),
        # timedelta cannot hold these: they crashed the nightly with an OverflowError
        ({"nightly": {"freshness_days": float("inf")}}, r"'nightly.freshness_days' is inf, expected a number of days above 0 and at most 36500"),
        ({"nightly": {"active_days": 1e12}}, r"'nightly.active_days' is 1000000000000.0, expected a number of days"),
        ({"nightly": {"active_days": float("nan")}}, r"'nightly.active_days' is nan"),
        ({"nightly": {"freshness_days": 0.0}}, r"'nightly.freshness_days' is 0.0"),
        # a negative count aborted TensorFlow in the helper, reported as the out-of-memory killer
        ({"runtime": {"threads": -1}}, r"'runtime.threads' is -1, expected 0 \(every core\) or more"),
    ],
)
def test_bad_values_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_bad_toml_names_the_file(tmp_path: Path):
    path = tmp_path / "recsys.toml"
    path.write_text("[nightly\n")
    with pytest.raises(ConfigError, match=r"recsys.toml: not valid TOML"):
        load_config(path)


def test_workspace_and_db_resolution(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("RECSYS_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.delenv("RECSYS_DB", raising=False)
    ws = Workspace.resolve(None)
    assert ws.root == (tmp_path / "ws").resolve()
    assert resolve_db_url(None, ws) == f"sqlite:///{ws.root / 'recsys.db'}"
    monkeypatch.setenv("RECSYS_DB", "postgresql://postgres@127.0.0.1/x")
    assert resolve_db_url(None, ws) == "postgresql://postgres@127.0.0.1/x"
    assert resolve_db_url("sqlite:///other.db", ws) == "sqlite:///other.db"  # the flag wins
    assert Workspace.resolve(tmp_path / "flag").root == (tmp_path / "flag").resolve()
