"""`recsys evaluate`: held-out behaviors -> metrics.json, report.html, MIND prediction files.

Streams the behaviors file chunk by chunk; per chunk every model version scores the
impressions once and the baselines are computed, then the accumulator keeps only compact
per-candidate values (see recsys.metrics.accumulator).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Iterable
from contextlib import ExitStack, closing, suppress
from dataclasses import fields, replace
from datetime import datetime
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from recsys.columns import CATEGORY, NEWS_ID
from recsys.config import Config, ModelConfig, Workspace
from recsys.data.mind import impression_keys, scan_behaviors, user_time_key
from recsys.errors import RecsysError, SchemaError
from recsys.metrics.accumulator import NEW_TO_STORE, ImpressionMetrics, article_age_buckets, history_length_bucket
from recsys.pipelines.inputs import check_file, check_folder, check_images_go_with_news, check_output_folder
from recsys.pipelines.predict import split_scores
from recsys.progress import progress
from recsys.pipelines.scoring import (
    IGNORED_HISTORY, Catalogue, VersionScorer, DEFAULT_FEATURES_AT, check_features_at, describe_reading, feature_times,
    iter_scored, load_scoring_catalogue, read_file_shows, scoring_span,
)
from recsys.store import repository as repo
from recsys.threads import configure_threads
from recsys.versions import ModelVersion, check_encoders, get_version, list_versions

log = logging.getLogger("recsys.evaluate")

RANDOM, POPULAR, ORACLE = "random", "most popular", "oracle (true probability)"


# [model] keys added after manifests began to record every setting (``model_config``), with the
# value each had in effect before it existed: a manifest that records no such key was trained so.
ADDED_SETTINGS = {"category_affinity": False, "affinity_clusters": 0, "weight_average": 0.0}


def training_settings(manifest: dict) -> dict:
    """The ``[model]`` settings a version was trained with, as far as its manifest records them
    (all of them since ``model_config`` was recorded, those added since at the value they had
    before they existed; a few named keys before)."""
    names = {f.name for f in fields(ModelConfig)}
    if not manifest.get("model_config"):
        return {k: v for k, v in manifest.items() if k in names}
    return {**ADDED_SETTINGS, **{k: v for k, v in manifest["model_config"].items() if k in names}}


def _trained_alike(manifest: dict, current: dict) -> bool:
    """Same settings as ``current`` except the modalities, on every setting both record."""
    mine, theirs = training_settings(manifest), training_settings(current)
    return all(mine[k] == theirs[k] for k in mine.keys() & theirs.keys() if k != "modalities")


def ablation_modalities(current: ModelVersion) -> tuple[str, ...]:
    """The single-modality variants to compare ``current`` with: text-only and image-only, less
    the one ``current`` is itself (a text-only model is not its own ablation)."""
    return tuple(m for m in ("text", "image") if m != current.manifest.get("modalities"))


def find_ablations(engine: Engine, current: ModelVersion, *, models_dir: Path | None = None) -> dict[str, ModelVersion]:
    """The latest versions of ``ablation_modalities`` trained like the current one: the same
    window and the same settings apart from the modalities (seed, epochs, history, prior...);
    their folders as found in the workspace of ``models_dir`` (``recsys.versions.version_folder``)."""
    found = {}
    window = current.manifest.get("training_window")
    wanted = ablation_modalities(current)
    for row in reversed(list_versions(engine)):
        m = row["manifest"]
        if (m.get("modalities") in wanted and m["modalities"] not in found
                and m.get("training_window") == window and _trained_alike(m, current.manifest)):
            found[m["modalities"]] = get_version(engine, row["version"], models_dir=models_dir)
    return found


def train_missing_ablations(engine: Engine, workspace: Workspace, config: Config, current: ModelVersion, found: dict) -> dict:
    """Train the missing text-only and image-only versions with the current version's settings
    (today's config fills in what an older manifest does not record), on its window."""
    from recsys.pipelines.features import configured_encoder_infos
    from recsys.pipelines.train import run_train

    window = current.field("training_window")
    settings = training_settings(current.manifest)
    missing = [modalities for modalities in ablation_modalities(current) if modalities not in found]
    if missing:
        # The ablations are trained with today's [encoders]: other than the version's, they would be
        # trained (minutes) and then refused beside it.
        check_encoders(current, *configured_encoder_infos(config))
    for modalities in missing:
        log.info("no %s-only version trained with %s's settings on its window: training one", modalities,
                 current.version)
        cfg = replace(config, model=replace(config.model, **{**settings, "modalities": modalities}))
        result = run_train(engine, workspace, cfg, since=window["since"], until=window["until"], source=window.get("source"),
                           make_current=False, exact_modalities=True)
        found[modalities] = get_version(engine, result["version"], models_dir=workspace.models_dir)
    return found


TRUTH_COLUMNS = ("split", "impression_id", NEWS_ID, "position", "p", "label")


def load_truth(path: Path, split: str) -> dict[int, tuple[list, np.ndarray]]:
    """impression id -> (news ids, true probabilities) of one split of a sample world's truth.tsv
    (empty when the file has no rows for ``split``).

    Raises:
        SchemaError: a line without six tab-separated columns, an impression id or position
            that is not a non-negative integer, a probability outside [0, 1] or a label not 0
            or 1, naming the file, line, field and value.
        RecsysError: the file cannot be read as text.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            df = pd.read_csv(path, sep="\t", header=None, names=list(TRUTH_COLUMNS), dtype=str, na_filter=False,
                             quoting=3, encoding="utf-8",  # 3: csv.QUOTE_NONE, as MIND files are read
                             skip_blank_lines=False,  # a skipped line would shift every later line's number
                             index_col=False)  # wider lines: not the leading columns as an index, every field shifted
        if any(issubclass(w.category, pd.errors.ParserWarning) for w in caught):
            _refuse_wide_truth_line(path)
    except UnicodeDecodeError as exc:
        raise RecsysError(f"{path}: not UTF-8 text ({exc}); expected a sample world's truth.tsv") from None
    except pd.errors.ParserError as exc:  # more columns than six on some line
        raise RecsysError(f"{path}: {str(exc).strip()}; expected six tab-separated columns (split, impression id, news id, "
                          "position, true probability, label)") from None
    numbers = {c: pd.to_numeric(df[c], errors="coerce") for c in ("impression_id", "position", "p")}
    # A short line leaves the last column empty; so does a line of six whose label is empty.
    widths = np.full(len(df), len(TRUTH_COLUMNS))
    if (df["label"] == "").any():
        counted = _line_widths(path)[: len(df)]  # pandas' rows are the file's lines
        widths[: len(counted)] = counted
    checks = (  # (field, rows where it is wrong, what was expected), in column order
        ("columns", pd.Series(widths < len(TRUTH_COLUMNS)), "six tab-separated columns"),
        ("impression_id", ~df["impression_id"].str.fullmatch(r"[0-9]{1,18}"), "a non-negative integer"),
        (NEWS_ID, df[NEWS_ID] == "", "a news id"),
        ("position", ~df["position"].str.fullmatch(r"[0-9]{1,9}"), "a non-negative integer"),
        ("p", ~numbers["p"].between(0.0, 1.0), "a probability between 0 and 1"),
        ("label", ~df["label"].isin(["0", "1"]), "label 0 or 1"),
    )
    first = min(((int(np.flatnonzero(bad.to_numpy())[0]), order, field, expected)
                 for order, (field, bad, expected) in enumerate(checks) if bad.any()), default=None)
    if first is not None:
        row, _, field, expected = first
        if field != "columns":
            value = df[field].iat[row]
        else:
            value = f"{widths[row]} columns" if widths[row] else "an empty line"
        raise SchemaError(str(path), row + 1, field, value, f"{expected} (a sample world's truth.tsv)")
    df = df.assign(impression_id=numbers["impression_id"].astype(np.int64), position=numbers["position"].astype(np.int64),
                   p=numbers["p"].astype(np.float64))
    df = df[df["split"] == split].sort_values(["impression_id", "position"], kind="stable")
    out = {}
    for iid, group in df.groupby("impression_id", sort=False):
        out[int(iid)] = (group[NEWS_ID].tolist(), group["p"].to_numpy(np.float64))
    return out


def _line_widths(path: Path) -> np.ndarray:
    """The number of tab-separated columns of each line of ``path`` (0 for an empty line), lines
    ended by LF, CRLF or CR as pandas reads them."""
    with open(path, encoding="utf-8", newline=None) as lines:
        return np.array([line.count("\t") + 1 if line.rstrip("\n") else 0 for line in lines], dtype=np.int64)


def _refuse_wide_truth_line(path: Path) -> None:
    """Raises SchemaError naming the first line of ``path`` with more than six columns."""
    widths = _line_widths(path)
    wide = np.flatnonzero(widths > len(TRUTH_COLUMNS))
    if len(wide):
        raise SchemaError(str(path), int(wide[0]) + 1, "columns", f"{widths[wide[0]]} columns",
                          "six tab-separated columns (a sample world's truth.tsv)")


def _oracle(behaviors: Path, truth: Path | None) -> dict | None:
    """The true probabilities of ``behaviors``'s split: from ``--truth``, which must hold that
    split, or else from a ``truth.tsv`` beside the file, which may not hold it (a file cut from
    a sample world's split and named otherwise) or be another kind of file: then the report
    has no oracle row, with a warning."""
    split = split_of(behaviors)
    path = Path(truth) if truth is not None else behaviors.parent / "truth.tsv"
    if not path.is_file():
        return None
    try:
        oracle = load_truth(path, split)
    except RecsysError as exc:
        if truth is not None or _first_line_is_ours(path):
            raise  # asked for, or a sample world's truth file damaged after its first line
        # A truth.tsv of another kind (a MIND scorer's labels, say: its first line is not one of
        # ours) beside a foreign file must not stop its evaluation: it was never asked for.
        log.warning("%s was found beside %s but is not a sample world's truth file (%s): the report has no oracle "
                    "row; give --truth to read one", path, behaviors.name, exc)
        return None
    if oracle:
        return oracle
    message = (f"{path}: no rows for split '{split}' (expected a sample world's truth.tsv, as generate-sample "
               "writes it: split, impression id, news id, position, true probability, label)")
    if truth is not None:
        raise RecsysError(message)
    log.warning("%s; the report has no oracle row", message)
    return None


def _first_line_is_ours(path: Path) -> bool:
    """Whether the first line of ``path`` reads as a sample world's truth line."""
    try:
        with open(path, "rb") as f:
            first = f.readline().decode("utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return False
    cells = first.split("\t")
    if len(cells) != len(TRUTH_COLUMNS):
        return False
    try:
        return 0.0 <= float(cells[4]) <= 1.0 and cells[5] in ("0", "1") and cells[1].isdigit() and cells[3].isdigit()
    except ValueError:
        return False


def split_of(behaviors: Path) -> str:
    """The sample world names its files behaviors_<split>[_unlabelled].tsv."""
    stem = behaviors.stem
    return stem.removeprefix("behaviors_").removesuffix("_unlabelled") if stem.startswith("behaviors_") else stem


def _age_groups(times: np.ndarray, offsets: np.ndarray, items: np.ndarray, first_seen: np.ndarray) -> list[str]:
    """(c,) age group of each candidate when shown; one the store never saw before its
    impression is ``NEW_TO_STORE`` (the model's age feature reads it as brand new; the file
    may have shown it for hours), the others by their age since the store first saw them."""
    shown_at = np.repeat(times, np.diff(offsets))
    fs = first_seen[items]
    age_h = (shown_at - fs).astype("timedelta64[s]").astype(np.float64) / 3600.0
    new = np.isnat(fs) | (age_h < 0)
    return np.where(new, NEW_TO_STORE, article_age_buckets(np.where(new, 0.0, age_h))).tolist()


def run_evaluate(
    engine: Engine, workspace: Workspace, config: Config, *, behaviors: Path, out: Path, versions: list[str] | None = None,
    ablations: bool = False, truth: Path | None = None, news: Path | None = None, images: Path | None = None,
    chunk_size: int = 20_000, num_resamples: int = 1000, features_at: str = DEFAULT_FEATURES_AT,
    file_exposure: bool = True,
) -> dict:
    """Score ``behaviors`` with the chosen versions and the baselines; write the report to ``out``.

    ``features_at``: one of ``FEATURES_AT`` (recsys.pipelines.scoring), the same
    for every version; ``file_exposure``: score impressions after the store's end with the
    file's earlier shows of each candidate (``read_file_shows``) through each version's
    file-exposure calibration. The report's header records both.
    """
    from recsys.atomic import atomic_open
    from recsys.evaluation.prediction_file import format_prediction_line
    from recsys.evaluation.report import build_result, label_warning, write_report

    behaviors = Path(behaviors)
    check_file("--behaviors", behaviors)
    check_images_go_with_news("evaluate", news, images)
    for option, path, check in (("--news", news, check_file), ("--images", images, check_folder)):
        if path is not None:
            check(option, path)
    check_features_at(features_at)
    check_output_folder("--out", out)  # created for the scoring, removed if it fails
    if truth is not None and not Path(truth).is_file():
        what = "is not a file" if Path(truth).exists() else "no such file"
        raise RecsysError(f"--truth {truth}: {what} (a sample world's truth.tsv, as generate-sample writes it)")
    # Read before the ablations are trained and the catalogue encoded (minutes to hours): a
    # damaged truth file is refused before that work, not after it.
    oracle = _oracle(behaviors, truth)
    configure_threads(config.runtime.threads or None)
    t_start = time.perf_counter()
    chosen = ([get_version(engine, v, models_dir=workspace.models_dir) for v in versions] if versions
              else [get_version(engine, models_dir=workspace.models_dir)])
    kinds = {mv.version: "model" for mv in chosen}
    if ablations:
        found = find_ablations(engine, chosen[0], models_dir=workspace.models_dir)
        found = train_missing_ablations(engine, workspace, config, chosen[0], found)
        for modalities, mv in sorted(found.items()):
            if mv.version not in kinds:  # also listed in --models: it stays a model
                chosen.append(mv)
                kinds[mv.version] = "ablation"
    scan = scan_behaviors(behaviors)  # the checksum for the report, and the span of store data to read
    trained_on = trained_on_the_file(scan, chosen)
    not_held_out = [
        f"{behaviors}: its impressions ({scan.first} .. {scan.last}) lie in the training window of model version {mv} "
        f"({window['since']} .. {window['until']}, validation from {window.get('valid_start')}), which chose its epoch "
        "and fitted it: these figures are not held-out"
        for mv, window in trained_on.items()
    ]
    in_store, in_sources = labelled_impressions_in_store(engine, behaviors, scan)
    if in_store:
        not_held_out.append(
            f"{behaviors}: the store holds {in_store} of its {scan.lines} impressions with their clicks (the same reader at "
            f"the same second, ingested as source {', '.join(repr(x) for x in in_sources)}): the popularity, histories and "
            "article ages the models read include the file's own clicks, so these figures are not held-out; evaluate "
            "it against a store that has not ingested it with its labels")
    for text in not_held_out:
        log.warning("%s", text)
    catalogue = load_scoring_catalogue(engine, workspace, config, news=news, images=images,
                                       span=scoring_span(scan, chosen), versions=chosen)
    times = feature_times(catalogue, features_at)
    shows = read_file_shows(behaviors, catalogue) if file_exposure else None
    scorers = {mv.version: VersionScorer(mv, catalogue, times=times, shows=shows) for mv in chosen}
    reading = describe_reading(times, scorers, file_exposure)
    names = {mv.version: _display_name(mv, kinds[mv.version]) for mv in chosen}

    popularity = _popularity(engine, catalogue, chosen[0])
    article_keys = news_id_keys(catalogue.features.news_ids)

    model_names = [names[v] for v in scorers] + [RANDOM, POPULAR] + ([ORACLE] if oracle else [])
    acc = ImpressionMetrics(
        model_names, item_groups=("category", "has_image", "article_age"), impression_groups=("history_length",),
        num_resamples=num_resamples, breakdown_resamples=min(200, num_resamples),
        cluster_unit="user",  # a reader's impressions are not independent draws
    )
    out = Path(out)
    created = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    prediction_files = {v: out / f"prediction-{v}.txt" for v in scorers}
    categories = catalogue.news[CATEGORY].to_numpy(dtype=object)
    has_image = np.where(catalogue.features.has_image, "with image", "no image").astype(object)
    window = [None, None]
    tally = {IGNORED_HISTORY: 0}
    # Prediction lines are written as each chunk is scored (nothing kept per impression); the
    # files replace earlier ones only when every chunk is done.
    try:
        with ExitStack() as files:
            written = {v: files.enter_context(atomic_open(path, "w", newline="\n")) for v, path in prediction_files.items()}
            # Minutes on a MIND dev file: a line every 10 s says how far it got.
            advance = files.enter_context(progress("scoring impressions", total=scan.lines or None))
            for chunk in iter_scored(behaviors, catalogue, scorers, chunk_size=chunk_size, tally=tally):
                imps = chunk.impressions
                window[0] = imps.times.min() if window[0] is None else min(window[0], imps.times.min())
                window[1] = imps.times.max() if window[1] is None else max(window[1], imps.times.max())
                scores = {names[v]: s for v, s in chunk.scores.items()}
                keys = article_keys[imps.candidate_items]
                scores[RANDOM] = fixed_uniform(imps.impression_ids, imps.candidate_offsets, keys, salt=1)
                # Click counts tie often; a pseudo-random tie-break keeps candidate order out of the baseline.
                scores[POPULAR] = popularity[imps.candidate_items] + 0.5 * fixed_uniform(
                    imps.impression_ids, imps.candidate_offsets, keys, salt=2)
                if oracle is not None:
                    scores[ORACLE] = _oracle_scores(oracle, imps, catalogue, behaviors, chunk.lines)
                # The history the first model reads: a user with an empty History column may not be cold.
                hist_len = np.diff(chunk.read.history_offsets)
                acc.add_batch(
                    imps.labels, scores, imps.candidate_offsets,
                    item_groups={
                        "category": categories[imps.candidate_items].tolist(),
                        "has_image": has_image[imps.candidate_items].tolist(),
                        "article_age": _age_groups(imps.times, imps.candidate_offsets, imps.candidate_items, catalogue.first_seen),
                    },
                    impression_groups={"history_length": [history_length_bucket(int(h)) for h in hist_len]},
                    clusters=imps.user_ids,
                )
                for v, s in chunk.scores.items():
                    for impression_id, row in zip(imps.impression_ids.tolist(), split_scores(imps.candidate_offsets, s)):
                        written[v].write(format_prediction_line(impression_id, row) + "\n")
                advance(len(imps))
            if acc.num_impressions == 0:
                raise RecsysError(f"{behaviors}: no impressions")
        prediction_files = {v: str(path) for v, path in prediction_files.items()}
        t_scored = time.perf_counter() - t_start
        log.info("computing metrics and their intervals (%d bootstrap resamples of the %ss of %d impressions)",
                 num_resamples, acc.cluster_unit or "impression", acc.num_impressions)
        result = build_result(
            acc,
            kinds={**{names[v]: kinds[v] for v in scorers}, RANDOM: "baseline", POPULAR: "baseline", **({ORACLE: "oracle"} if oracle else {})},
            behaviors_file=behaviors,
            data_window=f"{window[0]} to {window[1]}",
            model_versions=list(scorers),
            encoders={
                "text": catalogue.features.text_encoder.to_dict(),
                "image": catalogue.features.image_encoder.to_dict(),
            },
            beyond_accuracy=_beyond_accuracy(engine, catalogue, popularity, evaluated=list(scorers)),
            side_features_at=reading,
            behaviors_sha256=scan.sha256,
            ignored_history_entries=tally[IGNORED_HISTORY],
            trained_on_the_file=sorted(trained_on),
            labelled_impressions_in_store=in_store,
            warnings=not_held_out,  # the report shows them too, not only this command's log
        )
        # Read before write_report replaces the earlier report's metrics.json, which names them.
        stale = earlier_prediction_files(out, keep=[Path(p) for p in prediction_files.values()],
                                         known_versions=[row["version"] for row in list_versions(engine)])
        metrics_path, html_path = write_report(result, out)
    except BaseException:
        # Scoring or the report failed; with several versions one prediction file may already be
        # in place when the next fails.
        _remove_created(created, prediction_files.values())
        raise
    # An earlier report in the same folder left its models' prediction files: beside a
    # metrics.json that no longer describes them, a MIND scorer run over the folder would mix
    # two evaluations. Removed only now that the new report is whole.
    for path in stale:
        path.unlink()
        log.warning("removed %s: an earlier report's prediction file, not of this report's models", path)
    gaps = {name: m.get("gap_closed") for name, m in result["models"].items()}
    warning = {}
    about_labels = label_warning(behaviors, result["header"]["num_labelled_impressions"], result["header"]["num_scored"])
    if about_labels:
        warning = {"warning": about_labels}
        log.warning(about_labels)
    return {
        "metrics_json": str(metrics_path), "html": str(html_path), "predictions": prediction_files,
        "removed_stale_predictions": [str(p) for p in stale],
        "num_impressions": result["header"]["num_impressions"], "num_unlabelled": result["header"]["num_unlabelled"],
        IGNORED_HISTORY: tally[IGNORED_HISTORY],
        "impression_auc": {name: m["metrics"]["impression_auc"]["value"] for name, m in result["models"].items()},
        "gap_closed": gaps, "seconds": round(time.perf_counter() - t_start, 2), "scoring_seconds": round(t_scored, 2),
        "trained_on_the_file": sorted(trained_on), "labelled_impressions_in_store": in_store, **warning,
    }


def news_id_keys(news_ids) -> np.ndarray:
    """(n,) uint64 key of each news id (the first 8 bytes of its BLAKE2b digest): the same for an
    article in every catalogue, whatever its row."""
    return np.array([int.from_bytes(hashlib.blake2b(str(n).encode("utf-8"), digest_size=8).digest(), "little")
                     for n in news_ids], dtype=np.uint64)


def fixed_uniform(impression_ids: np.ndarray, candidate_offsets: np.ndarray, candidate_keys: np.ndarray, *,
                  salt: int) -> np.ndarray:
    """A pseudo-random number in [0, 1) for each candidate, fixed by its impression's id, its
    article's key (``news_id_keys``) and ``salt`` (splitmix64's mixer), for the baselines' scores.

    A draw from one generator moved with the chunk size (each chunk draws in turn) and its
    numbers followed the candidates' positions; these are the same on every run, in every
    chunking, in any candidate order and whatever other articles the catalogue holds.

    Args:
        impression_ids: (m,) int64.
        candidate_offsets: (m + 1,) int64, the candidates of impression ``i`` at
            ``candidate_offsets[i]:candidate_offsets[i + 1]``.
        candidate_keys: (n,) uint64 keys of the candidates' articles.
    Returns:
        (n,) float64.
    """
    owners = np.repeat(np.asarray(impression_ids, dtype=np.int64), np.diff(candidate_offsets))
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the mixer wants
        x = (owners.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             + np.asarray(candidate_keys, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
             + np.uint64(salt))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _remove_created(created: list[Path], prediction_files: Iterable[str | Path]) -> None:
    """After a failed run: the folders it created for its report, deepest first, with the
    prediction files it wrote into the report folder if it created that one. In an existing
    folder they stay, replaced (the next evaluate there removes them if stale)."""
    if created:  # created[0] is the report folder itself
        for path in prediction_files:
            with suppress(OSError):
                Path(path).unlink()
    for folder in created:
        with suppress(OSError):
            folder.rmdir()


def earlier_prediction_files(out: Path, *, keep: list[Path], known_versions: list[str] = ()) -> list[Path]:
    """The prediction files that an earlier evaluate wrote in ``out``, less ``keep``: the
    ``prediction-<version>.txt`` of the versions its ``metrics.json`` lists, or of any version
    in ``known_versions`` (the store's: a run interrupted after it wrote its prediction files
    left them beside the older metrics.json, which does not list them). Any other file (a
    ``prediction-mine.txt`` of the user's) was not written by recsys and is not ours to remove."""
    versions = list(known_versions)
    try:
        with open(out / "metrics.json", encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        document = None
    header = document.get("header") if isinstance(document, dict) else None
    listed = header.get("model_versions") if isinstance(header, dict) else None
    if isinstance(listed, list):
        versions += listed
    kept = {Path(p) for p in keep}
    found = []
    for version in versions:
        name = f"prediction-{version}.txt"
        # A version id is one file name; anything else in a hand-edited file names no file of ours.
        if not isinstance(version, str) or Path(name).name != name:
            continue
        path = out / name
        if path not in kept and path.is_file() and not path.is_symlink():
            found.append(path)
    return sorted(set(found))


def trained_on_the_file(scan, versions: list[ModelVersion]) -> dict[str, dict]:
    """{version: its training window} of the versions whose training window (validation days
    included) holds a time of the scanned file: a file the model learned from, or one of the
    same days (its articles' popularity, its readers' clicks), is not held-out."""
    out = {}
    if scan.first is None:
        return out
    for mv in versions:
        window = mv.manifest.get("training_window") or {}
        if "since" in window and "until" in window and (
                scan.first < datetime.fromisoformat(window["until"]) and scan.last >= datetime.fromisoformat(window["since"])):
            out[mv.version] = window
    return out


def labelled_impressions_in_store(engine: Engine, behaviors: Path, scan) -> tuple[int, list[str]]:
    """How many of the file's impressions the store holds with labels (a stored labelled
    impression of the same user at the same second), and under which sources.

    A file ingested with its labels (a nightly flow that ingests MIND dev, then evaluates on
    it) feeds its own clicks to the popularity, the histories and the first-seen times the
    models read: its figures are not held-out, though no model trained on it. Reads the
    store's labelled impressions of the file's span and the file's users and times once more.
    """
    if scan.first is None:
        return 0, []
    users, times, sources = repo.read_labelled_user_times(engine, first=scan.first, last=scan.last)
    if not len(users):
        return 0, []
    _, file_keys = impression_keys(behaviors)
    stored_keys = np.fromiter((user_time_key(u, t) for u, t in zip(users, times.astype(object))), np.int64, len(users))
    held = np.isin(stored_keys, file_keys)
    return int(np.isin(file_keys, stored_keys[held]).sum()), sorted(set(sources[held].tolist()))


def _display_name(mv: ModelVersion, kind: str) -> str:
    modalities = mv.manifest.get("modalities", "text,image")
    label = {"text,image": "text+image", "text": "text only", "image": "image only"}.get(modalities, modalities)
    return f"{label} ({mv.version})"


def _popularity(engine: Engine, catalogue: Catalogue, reference: ModelVersion) -> np.ndarray:
    """Clicks per article in the reference model's training window: the popularity baseline."""
    window = reference.field("training_window")
    return repo.read_click_counts(engine, catalogue.features.news_ids, since=datetime.fromisoformat(window["since"]),
                                  until=datetime.fromisoformat(window["until"]))


def _oracle_scores(oracle: dict, imps, catalogue: Catalogue, behaviors: Path, lines: np.ndarray) -> np.ndarray:
    out = np.empty(len(imps.candidate_items), dtype=np.float64)
    ids = catalogue.features.news_ids
    for i, iid in enumerate(imps.impression_ids.tolist()):
        lo, hi = imps.candidate_offsets[i], imps.candidate_offsets[i + 1]
        entry = oracle.get(iid)
        if entry is None or entry[0] != ids[imps.candidate_items[lo:hi]].tolist():
            raise SchemaError(behaviors, int(lines[i]), "impressions", iid, "the same candidates as in truth.tsv (is it this world's truth file?)")
        out[lo:hi] = entry[1]
    return out


def describe_run(run, evaluated: list[str]) -> dict:
    """Which nightly run the beyond-accuracy figures describe: ``{"run_id", "model_version",
    "as_of", "model_version_evaluated"}``. The run's lists may come from a version other than
    the evaluated ones (an older current version, say): the report must not pass them off as
    the evaluated model's."""
    as_of = pd.Timestamp(run.plan.get("as_of") or run.started_at)
    return {
        "run_id": int(run.run_id),
        "model_version": run.model_version,
        "as_of": as_of.isoformat(),
        "model_version_evaluated": run.model_version in evaluated,
    }


def _beyond_accuracy(engine: Engine, catalogue: Catalogue, popularity: np.ndarray, *, evaluated: list[str]) -> dict | None:
    """Coverage, diversity, novelty and popularity bias of the latest complete nightly run, and
    which run that is (``describe_run``)."""
    from recsys.evaluation.report import beyond_accuracy
    from recsys.ranking.runs import latest_run

    run = latest_run(engine)
    if run is None:
        return None
    # Closed on any exit: an open stream holds a PostgreSQL transaction and server-side cursor.
    with closing(repo.iter_run_recommendations(engine, run.run_id)) as chunks:
        first = next(chunks, None)
        if first is None:
            return None
        # The run could recommend only the store's articles: those --news adds for scoring are
        # no part of its catalogue (counted, they lowered its coverage and raised its bias).
        n = len(catalogue.features.news_ids) if catalogue.stored is None else catalogue.stored
        ids = catalogue.features.news_ids[:n]
        first_seen = pd.Series(pd.to_datetime(catalogue.first_seen[:n]), index=ids)
        # "New" = first shown within the day before the run's as-of time (or never shown).
        run_facts = describe_run(run, evaluated)
        as_of = pd.Timestamp(run_facts["as_of"])
        return run_facts | beyond_accuracy(
            chain([first], chunks), pd.Series(catalogue.news[CATEGORY].to_numpy()[:n], index=ids),
            first_seen, pd.Series(popularity[:n], index=ids), n, as_of - pd.Timedelta(days=1),
        )
