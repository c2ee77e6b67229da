"""Typed configuration: defaults, then ``recsys.toml``, then environment, then CLI flags.

Every section is a frozen dataclass; an unknown key or a value of the wrong type is a
``ConfigError`` naming the key, so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from recsys.errors import ConfigError
from recsys.models import FUSION_MODES, NUM_HEADS, parse_modalities

MODALITY_SETS = ("text", "image", "text,image")  # what model.modalities may be, canonically spelled
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")
ENGINES = ("local", "ray")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodersConfig:
    text_model: str = ""  # path of an ONNX text model; empty = bundled all-MiniLM-L6-v2 (int8)
    tokenizer: str = ""  # path of a tokenizer.json; empty = bundled BERT uncased WordPiece
    image_model: str = ""  # path of a Keras image model file; empty = ImageNet MobileNet v1
    image_size: int = 224
    # Title + abstract: more of what an article is about than its headline (measured in
    # docs/model.md on two kinds of world); 128 tokens hold both for almost every article.
    use_abstract: bool = True
    text_max_length: int = 128
    batch_size: int = 64


@dataclass(frozen=True)
class ModelConfig:
    fusion: str = "gated"
    modalities: str = "text,image"
    embedding_dim: int = 128
    anchor_dim: int = 16  # fixed content dimensions per modality in the item embedding (0: none)
    history_len: int = 50
    epochs: int = 6
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0
    valid_days: float = 1.0  # the last days of the training window are held out for validation
    # Lead each History column with the user's clicks in earlier impressions of the store.
    logged_clicks: bool = True
    # Blend in a training-free content-similarity prior, its weight fitted on the validation window.
    content_prior: bool = True
    # Train on side features as of the last nightly clock tick (hours; 0: each impression's own time).
    feature_clock_hours: float = 0.0
    # After early stopping, train the networks again on the training and validation windows together.
    refit: bool = False
    # Combine the served logit with the reader's clicks and skips per category and subcategory,
    # weights fitted on the validation window (recsys.models.affinity).
    category_affinity: bool = True
    # ... and per content cluster: this many k-means centres of each modality's content anchors
    # (0: the publisher's keys only). Read only with category_affinity and the content prior.
    affinity_clusters: int = 16
    # Serve (and validate) an exponential moving average of the networks' weights over about this
    # many epochs of steps instead of the last step's weights (0: off).
    weight_average: float = 0.0


@dataclass(frozen=True)
class IngestConfig:
    # The share of a given file's lines that may be bad before the ingest fails (after storing
    # its good lines): a behaviors file delivered before its news file quarantined 98% of its
    # lines and the night exited 0. 1.0: only a file of which every line is bad fails.
    max_bad_share: float = 0.1


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "auto"
    exact_max_items: int = 100_000


# Longest look-back the nightly windows accept (a century): far beyond any log, still a timedelta.
MAX_DAYS = 36_500
# NumPy and TensorFlow seeds are unsigned 32-bit integers.
MAX_SEED = 2**32 - 1
# Content clusters per modality the category affinity may ask for: each is 5 columns of a
# reader's counts, read against a few thousand labelled validation impressions.
MAX_AFFINITY_CLUSTERS = 4096
# The longest weight-averaging horizon, in epochs: beyond any training's length.
MAX_WEIGHT_AVERAGE = 1000.0
# The largest rank the store's recommendations.rank column (SmallInteger) holds.
MAX_RANK = 32_767


@dataclass(frozen=True)
class NightlyConfig:
    engine: str = "local"
    k: int = 10
    num_candidates: int = 200
    active_days: float = 7.0
    freshness_days: float = 3.0
    keep_runs: int = 3
    shard_size: int = 2000
    workers: int = 2
    ray_address: str = ""


# Most threads runtime.threads may ask for: onnxruntime spends about 40 ms per thread creating
# each session, and every command that reads the catalogue opens one (the text encoder) even
# when every feature is cached: 4096 stalled `index build` and the nightly for minutes, 100000
# hung them. 256 start one in about 20 s on a 2-core machine (64: 6 s); the largest machines have
# a few hundred cores. More threads than the machine's cores are warned (parse_config).
MAX_THREADS = 256


@dataclass(frozen=True)
class RuntimeConfig:
    threads: int = 0  # 0 = every core available to the process


@dataclass(frozen=True)
class Config:
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        _check_choice("model.fusion", self.model.fusion, FUSION_MODES)
        # "image,text" or "text, image" name the multimodal model too: keep its one canonical
        # spelling, which the manifest records and the report compares.
        try:
            modalities = ",".join(parse_modalities(self.model.modalities))
        except ValueError:
            modalities = self.model.modalities  # named by _check_choice below
        if modalities != self.model.modalities:
            object.__setattr__(self, "model", dataclasses.replace(self.model, modalities=modalities))
        _check_choice("model.modalities", self.model.modalities, MODALITY_SETS)
        _check_choice("index.kind", self.index.kind, INDEX_KINDS)
        _check_choice("nightly.engine", self.nightly.engine, ENGINES)
        address = self.nightly.ray_address
        if address != address.strip():
            # "   " was taken for a cluster's address: ray.init failed with "Invalid address format"
            # (exit 2) only after the night's ingest and index.
            raise ConfigError(f"config key 'nightly.ray_address' is {address!r}, expected a Ray cluster address "
                              "without white space around it (\"auto\", \"<head-ip>:6379\", \"ray://<head-ip>:10001\"), "
                              "or \"\" for a local Ray instance")
        for key, value in (
            ("encoders.image_size", self.encoders.image_size),
            ("encoders.batch_size", self.encoders.batch_size),
            ("model.embedding_dim", self.model.embedding_dim),
            ("model.history_len", self.model.history_len),
            ("model.epochs", self.model.epochs),
            ("model.batch_size", self.model.batch_size),
            ("nightly.k", self.nightly.k),
            ("nightly.num_candidates", self.nightly.num_candidates),
            ("nightly.shard_size", self.nightly.shard_size),
            ("nightly.workers", self.nightly.workers),
            ("nightly.keep_runs", self.nightly.keep_runs),
        ):
            if value < 1:
                raise ConfigError(f"config key '{key}' is {value}, expected a positive number")
        if self.nightly.k > MAX_RANK:
            raise ConfigError(f"config key 'nightly.k' is {self.nightly.k}, expected at most {MAX_RANK} "
                              "(the largest rank the store holds)")
        if self.nightly.k > self.nightly.num_candidates:
            raise ConfigError(f"config key 'nightly.k' is {self.nightly.k}, expected at most 'nightly.num_candidates' "
                              f"({self.nightly.num_candidates}): each list is the best k of the candidates retrieved")
        for key, value in (("nightly.active_days", self.nightly.active_days), ("nightly.freshness_days", self.nightly.freshness_days)):
            if not 0 < value <= MAX_DAYS:  # also rejects NaN and inf, which timedelta cannot hold
                raise ConfigError(f"config key '{key}' is {value}, expected a number of days above 0 and at most {MAX_DAYS}")
        if not 0 <= self.ingest.max_bad_share <= 1:  # also rejects NaN
            raise ConfigError(f"config key 'ingest.max_bad_share' is {self.ingest.max_bad_share}, expected a share from "
                              "0.0 (any bad line fails the ingest) to 1.0 (only a file of which every line is bad)")
        if not 0 <= self.runtime.threads <= MAX_THREADS:
            raise ConfigError(f"config key 'runtime.threads' is {self.runtime.threads}, expected 0 (every core) to "
                              f"{MAX_THREADS}")
        if self.encoders.image_size < 32:
            raise ConfigError(f"config key 'encoders.image_size' is {self.encoders.image_size}, expected at least 32")
        # Found by the encoder only once the nightly had ingested (and named no key).
        if self.encoders.text_max_length < 2:
            raise ConfigError(f"config key 'encoders.text_max_length' is {self.encoders.text_max_length}, expected at "
                              "least 2 tokens (the tokenizer's [CLS] and [SEP])")
        if self.index.exact_max_items < 0:
            raise ConfigError(f"config key 'index.exact_max_items' is {self.index.exact_max_items}, expected 0 (never "
                              "exact) or more")
        clock = self.model.feature_clock_hours
        if not (clock == 0 or 1 / 3600 <= clock <= MAX_DAYS * 24):  # also rejects NaN; clock_floor ticks in seconds
            raise ConfigError(f"config key 'model.feature_clock_hours' is {clock}, expected 0 (off) or a period of "
                              f"at least one second (1/3600 hours) and at most {MAX_DAYS * 24} hours ({MAX_DAYS} days)")
        if not 0 <= self.model.seed <= MAX_SEED:
            raise ConfigError(f"config key 'model.seed' is {self.model.seed}, expected an integer from 0 to {MAX_SEED} "
                              "(NumPy and TensorFlow seeds are unsigned 32-bit)")
        if not 0 < self.model.learning_rate < float("inf"):  # also rejects NaN
            raise ConfigError(f"config key 'model.learning_rate' is {self.model.learning_rate}, expected a finite number above 0")
        if not 0 < self.model.valid_days <= MAX_DAYS:  # also rejects NaN and inf, which timedelta cannot hold
            raise ConfigError(f"config key 'model.valid_days' is {self.model.valid_days}, expected a number of days above 0 "
                              f"and at most {MAX_DAYS} (the last days of the training window, held out for validation)")
        if self.model.embedding_dim % NUM_HEADS:
            raise ConfigError(
                f"config key 'model.embedding_dim' is {self.model.embedding_dim}, expected a multiple of {NUM_HEADS} "
                "(the heads of the user encoder's self-attention)"
            )
        if not (self.model.affinity_clusters == 0 or 2 <= self.model.affinity_clusters <= MAX_AFFINITY_CLUSTERS):
            raise ConfigError(f"config key 'model.affinity_clusters' is {self.model.affinity_clusters}, expected 0 (the "
                              f"publisher's keys only) or 2 to {MAX_AFFINITY_CLUSTERS} content clusters per modality")
        if not 0 <= self.model.weight_average <= MAX_WEIGHT_AVERAGE:  # also rejects NaN
            raise ConfigError(f"config key 'model.weight_average' is {self.model.weight_average}, expected 0 (off) or a "
                              f"horizon above 0 and at most {MAX_WEIGHT_AVERAGE} epochs")
        anchors = self.model.anchor_dim * len(self.model.modalities.split(","))
        if self.model.anchor_dim < 0 or anchors >= self.model.embedding_dim:
            raise ConfigError(
                f"config key 'model.anchor_dim' is {self.model.anchor_dim}, expected 0 or more with "
                f"anchor_dim x modalities ({anchors}) below 'model.embedding_dim' ({self.model.embedding_dim})"
            )


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"config key '{key}' is {value!r}, expected one of {', '.join(choices)}")


def _coerce(key: str, value: object, kind: type) -> object:
    # TOML already gives typed values; only accept the ones that mean the same thing.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' is {value!r}, expected true or false")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' is {value!r}, expected {kind.__name__}")
    return value


def _did_you_mean(name: str, known, *, prefix: str = "") -> str:
    """"did you mean 'nightly'? " for a close match of ``name`` among ``known``, else ""."""
    matches = difflib.get_close_matches(name, list(known), n=1)
    return f"did you mean '{prefix}{matches[0]}'? " if matches else ""


def config_from_dict(data: dict, *, source: str = "config") -> Config:
    """Build a Config from nested dicts, rejecting unknown sections and keys.

    Raises:
        ConfigError: naming the first unknown key or badly typed value.
    """
    sections = {}
    hints = typing.get_type_hints(Config)
    for section_name, section_value in data.items():
        if section_name not in hints:
            known = ", ".join(hints)
            if not isinstance(section_value, dict):  # `k = 3` above every [section] header
                raise ConfigError(f"{source}: key '{section_name}' is outside any [section] (sections: {known})")
            raise ConfigError(f"{source}: unknown section '{section_name}' ({_did_you_mean(section_name, hints)}known: "
                              f"{known})")
        if not isinstance(section_value, dict):
            raise ConfigError(f"{source}: '{section_name}' must be a table, got {section_value!r}")
        section_cls = hints[section_name]
        field_types = typing.get_type_hints(section_cls)
        values = {}
        for key, value in section_value.items():
            full = f"{section_name}.{key}"
            if key not in field_types:
                known = ", ".join(field_types)
                guess = _did_you_mean(key, field_types, prefix=f"{section_name}.")
                raise ConfigError(f"{source}: unknown key '{full}' ({guess}known in [{section_name}]: {known})")
            values[key] = _coerce(full, value, field_types[key])
        sections[section_name] = section_cls(**values)
    return Config(**sections)


def load_config(path: Path | None, overrides: dict | None = None, *, flags: dict[str, str] | None = None) -> Config:
    """Load ``path`` (if it exists) and apply ``overrides`` ({"section.key": value}).

    Args:
        flags: the command-line option each override came from ({"model.seed": "--seed"}); an
            error about a value given that way names the option before the key (both options,
            when it is about two keys given that way).

    Raises:
        ConfigError: unreadable TOML, unknown keys, wrong types or values.
    """
    return parse_config(read_config_text(path), path, overrides, flags=flags)


def read_config_text(path: Path | None) -> str | None:
    """The text of the config file at ``path``; None when there is none.

    A caller that needs the config more than once keeps this text: a file given as a pipe
    (``--config <(...)``, ``/dev/stdin``) can be read only once, and a second read is empty.

    Raises:
        ConfigError: a dangling link, a folder, a file that cannot be read or is not UTF-8.
    """
    if path is None:
        return None
    _refuse_dangling_link(Path(path))
    if not Path(path).exists():
        return None
    if Path(path).is_dir():
        raise ConfigError(f"config file {path} is a folder, expected a TOML file")
    try:
        # utf-8-sig: Windows editors (Notepad) start a UTF-8 file with a byte-order mark. Bytes
        # that are not UTF-8 are kept as surrogates, to name the first one and its line: the
        # decoder's own message gave an offset into one chunk of the file.
        text = Path(path).read_text(encoding="utf-8-sig", errors="surrogateescape")
    except OSError as exc:  # unreadable (permissions): the operator's file, exit 1
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from exc
    bad = _NOT_UTF8.search(text)
    if bad is not None:
        line = text.count("\n", 0, bad.start()) + 1
        raise ConfigError(f"{path}: not UTF-8: line {line} holds the byte 0x{ord(bad.group()) - 0xDC00:02x} (a TOML file "
                          "is UTF-8 text: save it as UTF-8)")
    return text


# What errors="surrogateescape" makes of a byte that is not UTF-8 (0x80 to 0xff).
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def parse_config(text: str | None, path: Path | None, overrides: dict | None = None, *,
                 flags: dict[str, str] | None = None) -> Config:
    """The config from ``text`` (read from ``path`` by ``read_config_text``) with ``overrides``;
    see ``load_config``."""
    data: dict = {}
    if text is not None:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    from_file = {f"{s}.{k}" for s, section in data.items() if isinstance(section, dict) for k in section}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        from_file.discard(dotted)
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})[key] = value
    try:
        config = config_from_dict(data, source=str(path) if path else "config")
    except ConfigError as exc:
        # Every flag given whose key the error names (a rule between two keys names both).
        given = [flag for dotted, flag in (flags or {}).items()
                 if (overrides or {}).get(dotted) is not None and f"'{dotted}'" in str(exc)]
        # A bad value read from the file: name the file first, as the unknown-key errors do, also
        # when a flag is named too (--candidates 20 against the file's k = 50 named no file).
        in_file = not str(exc).startswith(f"{path}:") and any(f"'{dotted}'" in str(exc) for dotted in from_file)
        named = ([f"{path}"] if in_file else []) + ([", ".join(given)] if given else [])
        if named:
            raise ConfigError(f"{': '.join(named)}: {exc}") from exc
        raise
    _warn_threads_above_cores(config.runtime.threads)
    return config


_threads_warned: set[int] = set()


def _warn_threads_above_cores(threads: int) -> None:
    """One warning per process when ``runtime.threads`` is more than the machine's cores: each
    library's pool then runs more threads than there are cores to run them (a command reads its
    config several times; the warning is logged once)."""
    cores = os.cpu_count()
    if cores is None or threads <= cores or threads in _threads_warned:
        return
    _threads_warned.add(threads)
    log.warning("runtime.threads is %d, more than this machine's %d cores: the threads oversubscribe them "
                "(0 uses every core available to the process)", threads, cores)


def _refuse_dangling_link(path: Path) -> None:
    # A link whose target is gone (a moved /etc file, an unmounted volume) looks like no file at
    # all: the job would run on the defaults without a word.
    if not path.is_symlink():
        return
    try:
        path.stat()
    except OSError as exc:
        raise ConfigError(f"config file {path} is a symbolic link to {os.readlink(path)}, which cannot be read: "
                          f"{exc.strerror or exc}") from exc


@dataclass(frozen=True)
class Workspace:
    """Where models, caches, reports and (by default) the SQLite store live.

    Layout::

        <root>/recsys.toml        configuration (optional)
        <root>/recsys.db          default SQLite store
        <root>/cache/features/    encoder feature cache
        <root>/models/<version>/  model versions (Keras models, FAISS index, manifest)
        <root>/quarantine/        bad input rows, one file per ingested file and run
        <root>/reports/           evaluation reports
        <root>/exports/           Parquet exports of nightly runs
    """

    root: Path

    @classmethod
    def resolve(cls, root: str | Path | None) -> "Workspace":
        value = root or os.environ.get("RECSYS_WORKSPACE") or "workspace"
        return cls(Path(value).expanduser().resolve())

    @property
    def config_path(self) -> Path:
        return self.root / "recsys.toml"

    @property
    def default_db_url(self) -> str:
        return f"sqlite:///{self.root / 'recsys.db'}"

    @property
    def features_dir(self) -> Path:
        return self.root / "cache" / "features"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    def check(self) -> None:
        """ConfigError when something other than a folder stands at the workspace's path."""
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"workspace {self.root} is a file, expected a folder")

    def ensure(self) -> "Workspace":
        """Create the workspace folder; ConfigError when its path cannot be one (a file in the way,
        a folder that cannot be created): the operator's path, not an internal error."""
        self.check()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"workspace {self.root} cannot be created: {exc.strerror or exc}") from exc
        return self


def resolve_db_url(db: str | None, workspace: Workspace) -> str:
    """``--db`` flag, else ``RECSYS_DB``, else SQLite inside the workspace."""
    return db or os.environ.get("RECSYS_DB") or workspace.default_db_url
