import json
import re
from pathlib import Path

import pytest

from recsys.config import (
    MAX_DAYS,
    MAX_RANK,
    MAX_SEED,
    MAX_THREADS,
    Config,
    RuntimeConfig,
    Workspace,
    config_from_dict,
    load_config,
    resolve_db_url,
)
from recsys.errors import ConfigError
from recsys.models import NUM_HEADS


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


@pytest.mark.parametrize(("data", "message"), [
    ({"nigthly": {"k": 1}}, "config: unknown section 'nigthly' (did you mean 'nightly'? known: encoders, model, ingest, "
                            "index, nightly, runtime)"),
    ({"nightly": {"kk": 1}}, "config: unknown key 'nightly.kk' (did you mean 'nightly.k'? known in [nightly]: engine, k, "),
    ({"model": {"learnig_rate": 0.1}}, "config: unknown key 'model.learnig_rate' (did you mean 'model.learning_rate'? "
                                       "known in [model]: "),
    # nothing close: the known names alone, as before
    ({"cluster": {"k": 1}}, "config: unknown section 'cluster' (known: encoders, model, "),
    ({"nightly": {"zzz": 1}}, "config: unknown key 'nightly.zzz' (known in [nightly]: engine, "),
])
def test_an_unknown_section_or_key_suggests_a_close_match(data, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert str(info.value).startswith(message), info.value


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nightly": {"k": "ten"}}, r"'nightly.k' is 'ten', expected int"),
        ({"nightly": {"k": True}}, r"'nightly.k' is True, expected int"),
        ({"encoders": {"use_abstract": 1}}, r"'encoders.use_abstract' is 1, expected true or false"),
        ({"model": {"fusion": "sum"}}, r"'model.fusion' is 'sum', expected one of concat, weighted_sum, gated"),
        ({"nightly": {"k": 0}}, r"'nightly.k' is 0, expected a positive number"),
        # refused by the ranking before, after the ingest and the encoding of new articles
        ({"nightly": {"k": 40000, "num_candidates": 50000}}, r"'nightly.k' is 40000, expected at most 32767 \(the largest rank"),
        ({"nightly": 3}, r"'nightly' must be a table"),
        ({"model": {"anchor_dim": 64}}, r"'model.anchor_dim' is 64, expected 0 or more with anchor_dim x modalities \(128\)"),
        ({"model": {"anchor_dim": -1}}, r"'model.anchor_dim' is -1"),
        ({"model": {"affinity_clusters": -1}}, r"'model.affinity_clusters' is -1, expected 0 \(the publisher's keys only\) or 2 to 4096"),
        ({"model": {"affinity_clusters": 1}}, r"'model.affinity_clusters' is 1, expected 0"),
        ({"model": {"affinity_clusters": 5000}}, r"'model.affinity_clusters' is 5000, expected 0"),
        ({"model": {"feature_clock_hours": -24.0}}, r"'model.feature_clock_hours' is -24.0, expected 0 \(off\) or a period"),
        ({"model": {"feature_clock_hours": 1e-4}}, r"'model.feature_clock_hours' is 0.0001, expected 0 \(off\)"),
        ({"model": {"feature_clock_hours": float("nan")}}, r"'model.feature_clock_hours' is nan"),
        ({"model": {"refit": "yes"}}, r"'model.refit' is 'yes', expected true or false"),
        ({"model": {"weight_average": -1.0}}, r"'model.weight_average' is -1.0, expected 0 \(off\) or a horizon above 0 and at most 1000.0 epochs"),
        ({"model": {"weight_average": float("nan")}}, r"'model.weight_average' is nan"),
        ({"model": {"weight_average": 5000}}, r"'model.weight_average' is 5000.0, expected 0 \(off\)"),
        # timedelta cannot hold these: they crashed the nightly with an OverflowError
        ({"nightly": {"freshness_days": float("inf")}}, r"'nightly.freshness_days' is inf, expected a number of days above 0 and at most 36500"),
        ({"nightly": {"active_days": 1e12}}, r"'nightly.active_days' is 1000000000000.0, expected a number of days"),
        ({"nightly": {"active_days": float("nan")}}, r"'nightly.active_days' is nan"),
        ({"nightly": {"freshness_days": 0.0}}, r"'nightly.freshness_days' is 0.0"),
        # a negative count aborted TensorFlow in the helper, reported as the out-of-memory killer
        ({"runtime": {"threads": -1}}, r"'runtime.threads' is -1, expected 0 \(every core\) to 256"),
        # onnxruntime spent about 40 ms per thread creating each session: the nightly hung
        ({"runtime": {"threads": 100000}}, r"'runtime.threads' is 100000, expected 0 \(every core\) to 256"),
        # 4096, the bound before, stalled `index build` and the nightly for minutes (the text encoder's session)
        ({"runtime": {"threads": 4096}}, r"'runtime.threads' is 4096, expected 0 \(every core\) to 256"),
        # found by the encoder or the index build only after a nightly's ingest, naming no key;
        # a batch size below 64 was silently raised to 64
        ({"encoders": {"text_max_length": 1}}, r"'encoders.text_max_length' is 1, expected at least 2 tokens"),
        ({"encoders": {"text_max_length": -5}}, r"'encoders.text_max_length' is -5, expected at least 2 tokens"),
        ({"index": {"exact_max_items": -1}}, r"'index.exact_max_items' is -1, expected 0 \(never exact\) or more"),
        ({"encoders": {"batch_size": 0}}, r"'encoders.batch_size' is 0, expected a positive number"),
    ],
)
def test_bad_values_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


# Values that crashed `recsys train` with exit code 2 (a ValueError from the seeding, an
# OverflowError from timedelta, Keras' attention) or trained on nonsense; refused before any work.
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("seed", -1, r"'model.seed' is -1, expected an integer from 0 to 4294967295"),
        ("seed", 2**32, r"'model.seed' is 4294967296, expected an integer from 0 to 4294967295"),
        ("learning_rate", 0.0, r"'model.learning_rate' is 0.0, expected a finite number above 0"),
        ("learning_rate", -1e-3, r"'model.learning_rate' is -0.001, expected a finite number above 0"),
        ("learning_rate", float("nan"), r"'model.learning_rate' is nan, expected a finite number"),
        ("learning_rate", float("inf"), r"'model.learning_rate' is inf, expected a finite number"),
        ("embedding_dim", 30, rf"'model.embedding_dim' is 30, expected a multiple of {NUM_HEADS} \(the heads of the user encoder"),
        ("embedding_dim", 130, r"'model.embedding_dim' is 130, expected a multiple of"),
        ("valid_days", 0.0, r"'model.valid_days' is 0.0, expected a number of days above 0 and at most 36500"),
        ("valid_days", -2.0, r"'model.valid_days' is -2.0, expected a number of days above 0"),
        ("valid_days", float("nan"), r"'model.valid_days' is nan, expected a number of days"),
        ("valid_days", float("inf"), r"'model.valid_days' is inf, expected a number of days"),
        ("valid_days", 1e12, r"'model.valid_days' is 1000000000000.0, expected a number of days above 0 and at most 36500"),
        ("feature_clock_hours", 1e300, r"'model.feature_clock_hours' is 1e\+300, expected 0 \(off\) or a period of at least "
                                       r"one second \(1/3600 hours\) and at most 876000 hours \(36500 days\)"),
        ("feature_clock_hours", float("inf"), r"'model.feature_clock_hours' is inf, expected 0 \(off\)"),
        ("feature_clock_hours", float("-inf"), r"'model.feature_clock_hours' is -inf, expected 0 \(off\)"),
    ],
)
def test_bad_training_values_are_named(key, value, message):
    with pytest.raises(ConfigError, match=rf"^config key {message}"):
        config_from_dict({"model": {key: value}})


@pytest.mark.parametrize(
    ("key", "value"),
    [("seed", 0), ("seed", MAX_SEED), ("learning_rate", 1e-9), ("valid_days", 1e-3), ("valid_days", float(MAX_DAYS)),
     ("feature_clock_hours", MAX_DAYS * 24.0), ("embedding_dim", 132)],
)
def test_training_values_at_the_bounds_are_accepted(key, value):
    assert getattr(config_from_dict({"model": {key: value}}).model, key) == value


@pytest.mark.parametrize(("value", "canonical"), [("image,text", "text,image"), (" text , image ", "text,image"),
                                                  ("image", "image"), (" text", "text")])
def test_modalities_in_any_order_name_one_model(value, canonical):
    # `--modalities image,text` was refused although it names the multimodal model.
    assert config_from_dict({"model": {"modalities": value}}).model.modalities == canonical


@pytest.mark.parametrize("value", ["text,text", "text,audio", "", ","])
def test_bad_modalities_are_named(value):
    with pytest.raises(ConfigError, match=rf"^config key 'model.modalities' is '{value}', expected one of text, image, text,image"):
        config_from_dict({"model": {"modalities": value}})


def test_a_bad_flag_is_named_before_its_key(tmp_path: Path):
    flags = {"model.seed": "--seed", "model.epochs": "--epochs"}
    with pytest.raises(ConfigError, match=r"^--seed: config key 'model.seed' is -1, expected an integer from 0"):
        load_config(None, {"model.seed": -1, "model.epochs": None}, flags=flags)
    with pytest.raises(ConfigError, match=r"^--epochs: config key 'model.epochs' is 0, expected a positive number"):
        load_config(None, {"model.seed": 3, "model.epochs": 0}, flags=flags)
    # A bad value from the file is the file's, not the (unused) flag's.
    path = tmp_path / "recsys.toml"
    path.write_text("[model]\nseed = -1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: config key 'model.seed' is -1"):
        load_config(path, {"model.seed": None}, flags=flags)


def test_fewer_candidates_than_k_is_refused_naming_both_keys_and_the_flags_given(tmp_path: Path):
    # The nightly refused it only after its ingest and the encoding of new articles.
    message = r"config key 'nightly.k' is 10, expected at most 'nightly.num_candidates' \(5\)"
    with pytest.raises(ConfigError, match=rf"^{message}"):
        config_from_dict({"nightly": {"num_candidates": 5}})
    flags = {"nightly.k": "--k", "nightly.num_candidates": "--candidates"}
    with pytest.raises(ConfigError, match=rf"^--k, --candidates: {message}"):
        load_config(None, {"nightly.k": 10, "nightly.num_candidates": 5}, flags=flags)
    # Only the flags given are named: here k is the file's, and the file is named first (it was not).
    path = tmp_path / "recsys.toml"
    path.write_text("[nightly]\nk = 10\n")
    with pytest.raises(ConfigError, match=rf"^{path}: --candidates: {message}"):
        load_config(path, {"nightly.k": None, "nightly.num_candidates": 5}, flags=flags)
    # Both given by flags: the file's k is replaced, so the file is not named.
    with pytest.raises(ConfigError, match=rf"^--k, --candidates: {message}"):
        load_config(path, {"nightly.k": 10, "nightly.num_candidates": 5}, flags=flags)
    assert load_config(None, {"nightly.k": 5, "nightly.num_candidates": 5}, flags=flags).nightly.k == 5


def test_a_bad_value_in_the_file_names_the_file_and_one_given_by_flag_does_not(tmp_path: Path):
    path = tmp_path / "recsys.toml"
    path.write_text("[nightly]\nk = -3\n")
    with pytest.raises(ConfigError, match=rf"^{path}: config key 'nightly.k' is -3, expected a positive number"):
        load_config(path)
    path.write_text('[nightly]\nk = "ten"\n')
    with pytest.raises(ConfigError, match=rf"^{path}: config key 'nightly.k'"):
        load_config(path)
    # The same key given by a flag replaces the file's value: the error is the flag's.
    with pytest.raises(ConfigError, match=r"^config key 'nightly.k' is -3"):
        load_config(path, {"nightly.k": -3})


def test_a_key_above_every_section_is_named_as_such(tmp_path: Path):
    path = tmp_path / "recsys.toml"
    path.write_text("k = 3\n[nightly]\nk = 5\n")
    with pytest.raises(ConfigError, match=rf"^{path}: key 'k' is outside any \[section\] \(sections: "):
        load_config(path)


def test_bad_toml_names_the_file(tmp_path: Path):
    path = tmp_path / "recsys.toml"
    path.write_text("[nightly\n")
    with pytest.raises(ConfigError, match=r"recsys.toml: not valid TOML"):
        load_config(path)


@pytest.mark.parametrize(("data", "line", "byte"), [
    (b'[nightly]\nengine = "local" # caf\xe9\n', 2, "0xe9"),  # latin-1
    (b"\xef\xbb\xbf[nightly]\r\n\r\nk = 5\r\n# \xff\n", 4, "0xff"),  # a byte-order mark and CRLF lines
    (b"[model]\nseed = 1\n" + b"# padding\n" * 2000 + b"# \x80\n", 2003, "0x80"),  # beyond the first chunk read
])
def test_a_config_file_that_is_not_utf8_names_the_line_and_the_byte(tmp_path: Path, data, line, byte):
    # It said "not valid TOML: 'utf-8' codec can't decode byte 0xe9 in position 21": no line to look at.
    path = tmp_path / "recsys.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: not UTF-8: line {line} holds the byte {byte} (a TOML file is UTF-8 text: save it as UTF-8)"
    path.write_bytes(data.replace(bytes([int(byte, 16)]), "\u00e9".encode()))  # the same file in UTF-8 is read
    assert load_config(path).nightly.engine == "local"


def test_a_config_file_with_a_byte_order_mark_is_read(tmp_path: Path):
    # Windows editors write one: it was "not valid TOML: Invalid statement (at line 1, column 1)".
    path = tmp_path / "recsys.toml"
    path.write_bytes("\ufeff[nightly]\nk = 5\n".encode("utf-8"))
    assert load_config(path).nightly.k == 5


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


def test_a_workspace_path_that_cannot_be_a_folder_is_a_config_error(tmp_path: Path):
    # exit 2 ("internal error: FileExistsError") before, for a wrong RECSYS_WORKSPACE in cron
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ConfigError, match=rf"^workspace {afile} is a file, expected a folder$"):
        Workspace(afile).ensure()
    with pytest.raises(ConfigError, match=rf"^workspace {afile / 'sub'} cannot be created: Not a directory$"):
        Workspace(afile / "sub").ensure()
    assert Workspace(tmp_path / "new" / "ws").ensure().root.is_dir()


def test_a_config_path_that_is_a_folder_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match=rf"^config file {tmp_path} is a folder, expected a TOML file$"):
        load_config(tmp_path)


def test_a_config_path_that_is_a_dangling_link_is_a_config_error(tmp_path: Path):
    # It read as no file at all: the nightly job ran on the defaults without a word.
    link = tmp_path / "recsys.toml"
    link.symlink_to(tmp_path / "gone" / "recsys.toml")
    with pytest.raises(ConfigError, match=rf"^config file {link} is a symbolic link to {tmp_path / 'gone' / 'recsys.toml'}, "
                                          "which cannot be read: No such file or directory$"):
        load_config(link)
    loop = tmp_path / "loop.toml"
    loop.symlink_to(loop)
    with pytest.raises(ConfigError, match="loop.toml is a symbolic link to .*loop.toml, which cannot be read: Too many levels"):
        load_config(loop)


def test_a_link_to_a_config_file_is_read(tmp_path: Path):
    (tmp_path / "real.toml").write_text("[nightly]\nk = 5\n")
    (tmp_path / "recsys.toml").symlink_to(tmp_path / "real.toml")
    assert load_config(tmp_path / "recsys.toml").nightly.k == 5


def test_an_unreadable_config_file_is_a_config_error(tmp_path: Path, monkeypatch):
    # chmod 000 does not stop root, which runs the tests in CI: fail the read itself.
    path = tmp_path / "recsys.toml"
    path.write_text("[nightly]\nk = 5\n")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError, match=rf"^config file {path} cannot be read: Permission denied$"):
        load_config(path)


def test_text_max_length_above_the_models_positions_is_accepted(tmp_path: Path):
    # Refusing it broke configs that encoded every text right, and lowering the value changes
    # the encoder's identity (a retrain); the encoder cuts texts at the positions instead.
    config = tmp_path / "recsys.toml"
    config.write_text("[encoders]\ntext_max_length = 1024\n")
    assert load_config(config).encoders.text_max_length == 1024


def test_a_ray_address_in_the_file_goes_with_either_engine(tmp_path: Path):
    # The file's cluster with `--engine local` (a cluster down) and every other command, which
    # never ranks, must still run; the nightly warns (tests/test_nightly_job.py).
    config = tmp_path / "recsys.toml"
    config.write_text('[nightly]\nray_address = "auto"\n')
    assert load_config(config).nightly.ray_address == "auto"
    assert load_config(config, {"nightly.engine": "ray"}).nightly.ray_address == "auto"


@pytest.mark.parametrize("value", ["   ", " auto", "10.0.0.1:6379\n"])
def test_a_ray_address_with_white_space_around_it_is_refused_naming_the_file(tmp_path: Path, value):
    # "   " reached ray.init ("ValueError: Invalid address format", exit 2) after the night's ingest and index.
    config = tmp_path / "recsys.toml"
    config.write_text(f"[nightly]\nray_address = {json.dumps(value)}\n")  # a TOML basic string too
    with pytest.raises(ConfigError, match=rf"^{config}: config key 'nightly.ray_address' is {re.escape(repr(value))}, "
                                          r"expected a Ray cluster address without white space around it"):
        load_config(config)
    config.write_text('[nightly]\nray_address = ""\n')  # no address: a local Ray instance, as before
    assert load_config(config, {"nightly.engine": "ray"}).nightly.ray_address == ""


@pytest.mark.parametrize(("value", "message"), [
    (1.5, r"is 1.5, expected a share from 0.0 \(any bad line fails the ingest\) to 1.0 \(only a file of which every line is bad\)"),
    (-0.1, r"is -0.1, expected a share from 0.0"),
    (float("nan"), r"is nan, expected a share from 0.0"),
    (10, r"is 10.0, expected a share from 0.0"),  # a percentage
    ("10%", r"is '10%', expected float"),
])
def test_ingest_max_bad_share_is_a_share_from_0_to_1(tmp_path: Path, value, message):
    # A behaviors file 98% bad (its news file came late) was stored and served with exit 0.
    assert Config().ingest.max_bad_share == 0.1
    with pytest.raises(ConfigError, match=rf"^config key 'ingest.max_bad_share' {message}"):
        config_from_dict({"ingest": {"max_bad_share": value}})
    path = tmp_path / "recsys.toml"
    path.write_text("[ingest]\nmax_bad_share = 0\n")
    assert load_config(path).ingest.max_bad_share == 0.0  # an int is a float key's value too
    path.write_text("[ingest]\nmax_bad_share = 1.0\n")
    assert load_config(path).ingest.max_bad_share == 1.0
    path.write_text("[ingest]\nmax_bad_rows = 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'ingest.max_bad_rows' \(did you mean 'ingest.max_bad_share'\? "
                                          r"known in \[ingest\]: max_bad_share\)"):
        load_config(path)


def test_runtime_threads_at_its_bound_is_accepted():
    assert Config(runtime=RuntimeConfig(threads=MAX_THREADS)).runtime.threads == MAX_THREADS == 256


def test_runtime_threads_above_the_cores_is_warned_once(tmp_path: Path, monkeypatch, caplog):
    # Threads above the cores oversubscribe them; accepted (a Ray cluster's budget is shared out), but said.
    monkeypatch.setattr("recsys.config.os.cpu_count", lambda: 8)
    monkeypatch.setattr("recsys.config._threads_warned", set())
    path = tmp_path / "recsys.toml"
    with caplog.at_level("WARNING", logger="recsys.config"):
        for threads in (0, 8):
            path.write_text(f"[runtime]\nthreads = {threads}\n")
            load_config(path)
        assert not caplog.records
        path.write_text("[runtime]\nthreads = 9\n")
        for _ in range(3):  # a command reads its config more than once
            assert load_config(path).runtime.threads == 9
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == ["runtime.threads is 9, more than this machine's 8 cores: the threads oversubscribe them "
                        "(0 uses every core available to the process)"]


# Boundaries a mutation hunt found unpinned: the value at each bound is accepted, one past it refused.
def test_index_exact_max_items_zero_means_never_exact_and_is_accepted():
    assert config_from_dict({"index": {"exact_max_items": 0}}).index.exact_max_items == 0


@pytest.mark.parametrize("key", ["learning_rate", "valid_days", "feature_clock_hours"])
def test_a_bool_for_a_float_key_is_refused(key):
    # TOML's true is not the number 1.0: an int is accepted for a float key, a bool is not.
    with pytest.raises(ConfigError, match=rf"^config key 'model.{key}' is True, expected float$"):
        config_from_dict({"model": {key: True}})


def test_k_equal_to_num_candidates_is_accepted_and_one_more_is_refused():
    assert config_from_dict({"nightly": {"k": 7, "num_candidates": 7}}).nightly.k == 7
    with pytest.raises(ConfigError, match=r"^config key 'nightly.k' is 8, expected at most 'nightly.num_candidates' \(7\)"):
        config_from_dict({"nightly": {"k": 8, "num_candidates": 7}})


def test_k_at_the_largest_storable_rank_is_accepted_and_one_more_is_refused():
    assert MAX_RANK == 32_767  # recommendations.rank is a SmallInteger
    config = config_from_dict({"nightly": {"k": MAX_RANK, "num_candidates": MAX_RANK + 1}})
    assert config.nightly.k == MAX_RANK
    with pytest.raises(ConfigError, match=rf"^config key 'nightly.k' is {MAX_RANK + 1}, expected at most {MAX_RANK} "):
        config_from_dict({"nightly": {"k": MAX_RANK + 1, "num_candidates": MAX_RANK + 1}})


def test_image_size_32_is_accepted_and_31_refused():
    assert config_from_dict({"encoders": {"image_size": 32}}).encoders.image_size == 32
    with pytest.raises(ConfigError, match=r"^config key 'encoders.image_size' is 31, expected at least 32$"):
        config_from_dict({"encoders": {"image_size": 31}})
