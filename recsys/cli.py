"""The ``recsys`` command line. Commands are thin: they resolve the workspace, the store and
the config, then call a pipeline in ``recsys.pipelines``. Heavy imports happen inside the
commands so that ``--help`` stays instant.

Exit codes: 0 success, 1 bad usage or bad input (``RecsysError``), 2 internal error, 3 the
nightly run completed on the data already stored but its ingest failed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.exceptions import TyperException

from recsys.config import Config, Workspace, parse_config, read_config_text, resolve_db_url
from recsys.errors import DiskError, RecsysError, disk_errno, disk_error, disk_problem
from recsys.escapes import BIDI_CONTROLS, CONTROL_CODES
from recsys.interrupts import sigterm_unwinds, termination_signal
from recsys.progress import configure_logging

# Plain click help, not Rich's: Rich reads a help text's "[r1,r2,...]" as markup and drops
# it, and typer's Rich panel gives every flag (--strict, --json, --help) a "<bool>" metavar
# as if it took a value. Every Typer sets it: its commands inherit it from there.
_PLAIN_HELP = {"rich_markup_mode": None}

app = typer.Typer(
    help="Multimodal news recommendation: MIND ingest, encoders, FAISS, CTR model, nightly ranking, evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    **_PLAIN_HELP,
)
INGEST_FAILED = 3
MAX_RUN_ID = 2**63 - 1  # run ids are BIGINT on PostgreSQL, 64-bit INTEGER on SQLite
db_app = typer.Typer(help="Store schema migrations.", no_args_is_help=True, **_PLAIN_HELP)
index_app = typer.Typer(help="The FAISS index of item embeddings.", no_args_is_help=True, **_PLAIN_HELP)
model_app = typer.Typer(help="Model versions: list them, choose the current one (rollback).", no_args_is_help=True,
                        **_PLAIN_HELP)
app.add_typer(db_app, name="db")
app.add_typer(index_app, name="index")
app.add_typer(model_app, name="model")

log = logging.getLogger("recsys")
# --verbose as click parsed it (main_options sets it), for the error handling in _main: an
# argument "-v" after the command is some option's value (`recommend --user -v`), not the flag.
_verbose: ContextVar[bool] = ContextVar("recsys_cli_verbose", default=False)
# The store the command opened (its masked URL), for the last resort's line on a server refusal.
_store_shown: ContextVar[str | None] = ContextVar("recsys_cli_store", default=None)


@dataclass
class AppContext:
    workspace: Workspace
    db_url: str
    config_path: Path | None
    verbose: bool
    call_on_close: Callable[[Callable[[], object]], object] | None = None
    db_source: str | None = None  # "--db" or "RECSYS_DB"; None: the workspace's own SQLite file
    # The config file's text, read once: a pipe (--config <(...)) reads empty the second time.
    _config_text: str | None = field(default=None, init=False)
    _config_read: bool = field(default=False, init=False)

    def config(self, overrides: dict | None = None, flags: dict[str, str] | None = None) -> Config:
        """The config with ``overrides`` ({"model.seed": 3}); ``flags`` names the option each came from."""
        if not self._config_read:
            self._config_text = read_config_text(self.config_path)
            self._config_read = True
        return parse_config(self._config_text, self.config_path, overrides, flags=flags)

    def check_config(self) -> None:
        """Refuse a bad config file even in a command that reads none of its keys (docs/configuration.md)."""
        self.config()

    def engine(self, *, create: bool = False, uses_workspace: bool = True):
        """The store, migrated; ``create`` for the commands that write data in (see ``open_store``).

        ``uses_workspace=False`` for a command that only reads the store (``recommend``, ``stats``,
        ``model list``...): the workspace folder is then never created, so a product surface in
        a container with a read-only file system reads PostgreSQL from any working directory.
        """
        from recsys.store.database import open_store, refuse_in_memory_sqlite, shown_store

        self.check_config()  # before the workspace or the store is created
        refuse_in_memory_sqlite(self.db_url, self.db_source)  # each command is its own process
        if create:
            self.workspace.ensure()
        else:
            # A reading command creates the workspace only once the store opens: `--workspace /typo
            # stats` left an empty /typo folder behind.
            self.workspace.check()
        _store_shown.set(shown_store(self.db_url))  # a refusal may come from open_store's own statements
        engine = open_store(self.db_url, create=create, source=self.db_source)
        if not create and uses_workspace:
            try:
                self.workspace.ensure()
            except BaseException:
                engine.dispose()
                raise
        if self.call_on_close is not None:
            self.call_on_close(engine.dispose)  # close pooled connections when the command ends
        return engine


def _ctx(ctx: typer.Context) -> AppContext:
    return ctx.obj


@app.callback()
def main_options(
    ctx: typer.Context,
    # str, not Path: click turns '' into Path('.'), the working directory.
    workspace: Annotated[Optional[str], typer.Option(metavar="<path>", help="Workspace folder (models, caches, reports, default SQLite store). Env: RECSYS_WORKSPACE.")] = None,
    db: Annotated[Optional[str], typer.Option(metavar="<url>", help="SQLAlchemy URL of the store. Env: RECSYS_DB. Default: SQLite in the workspace.")] = None,
    config: Annotated[Optional[str], typer.Option(metavar="<path>", help="Config file (TOML). Default: recsys.toml in the workspace.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging and tracebacks on errors.")] = False,
) -> None:
    _verbose.set(verbose)
    configure_logging(logging.DEBUG if verbose else logging.INFO)
    # An empty value is a script's unset variable (--db "$STORE"): --db fell through to RECSYS_DB,
    # --workspace and --config to the working directory.
    for option, value, expected in (("--workspace", workspace, "a folder"), ("--db", db, "a SQLAlchemy URL"),
                                    ("--config", config, "a TOML file")):
        if value is not None and not value.strip():
            raise RecsysError(f"{option} is {value!r}, expected {expected} (leave the option out for the default)")
    # Set but blank is refused too: " " made a folder named " "; "" (an Airflow template that
    # rendered empty) silently meant the default, so a night's ingest went to a new SQLite
    # file in the workspace instead of the production store, and exited 0.
    env_workspace = os.environ.get("RECSYS_WORKSPACE")
    if workspace is None and env_workspace is not None and not env_workspace.strip():
        raise RecsysError(f"RECSYS_WORKSPACE is {env_workspace!r}, expected a folder (unset it for the default)")
    env_db = os.environ.get("RECSYS_DB")
    if db is None and env_db is not None and not env_db.strip():
        raise RecsysError(f"RECSYS_DB is {env_db!r}, expected a SQLAlchemy URL (unset it for the default)")
    # The store's URL is text (the default one holds the workspace's path): bytes that are not
    # UTF-8 failed as an internal error (UnicodeEncodeError), after ingest had made the folder.
    for name, value in (("--workspace", workspace), ("--db", db),
                        ("RECSYS_WORKSPACE", env_workspace if workspace is None else None),
                        ("RECSYS_DB", env_db if db is None else None)):
        if value:
            _check_id(name, value)
    ws = Workspace.resolve(workspace)
    if not (db or env_db):  # the default store's URL holds the workspace's absolute path
        _check_id("workspace", str(ws.root))  # a relative one under a working directory that is not UTF-8
    config = Path(config) if config is not None else None
    # A dangling link is named as one by AppContext.config, which every command calls.
    if config is not None and not config.exists() and not config.is_symlink():
        raise RecsysError(f"config file {config} does not exist")
    db_source = "--db" if db else "RECSYS_DB" if os.environ.get("RECSYS_DB") else None
    ctx.obj = AppContext(ws, resolve_db_url(db, ws), config or ws.config_path, verbose, ctx.call_on_close, db_source)


# JSON escapes C0 controls (ESC too) but keeps DEL, C1 and the bidi controls raw
# (``recsys.escapes``): a publisher's title would reach a terminal that shows the result. Outside
# strings JSON text is ASCII, so a \u escape here is the same JSON value, only harmless to show.
_TERMINAL_CONTROLS = re.compile("[" + "".join(chr(c) for c in (*CONTROL_CODES, *BIDI_CONTROLS) if c >= 0x7F) + "]")


def _print_json(obj) -> None:
    """A command's result on stdout: UTF-8 text where stdout takes it, else \\u escapes (still
    JSON), so that a title's emoji cannot fail a run in a latin-1 locale after its work is done.
    Control and bidi characters are always \\u escapes (`_TERMINAL_CONTROLS`).
    Indented on a terminal; one line elsewhere, because a scheduler keeps the last line (Airflow's
    BashOperator pushes it to XCom: indented, that was "}").

    Raises:
        DiskError: stdout is a file on a full disk (the command's own work is done by then).
    """
    text = json.dumps(obj, indent=2 if _is_terminal(sys.stdout) else None, default=str,
                      ensure_ascii=not _takes_any_text(sys.stdout))
    text = _TERMINAL_CONTROLS.sub(lambda match: f"\\u{ord(match.group()):04x}", text)
    try:
        typer.echo(text)
    except OSError as exc:
        error = disk_error("write the result to", "standard output", exc)
        if error is None:
            raise
        raise DiskError(f"{error} (the command itself completed)") from exc


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or a stand-in without isatty
        return False


def _takes_any_text(stream) -> bool:
    """Whether ``stream``'s encoding can write every character (UTF-8, UTF-16, UTF-32)."""
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "\u2014\U0001f680".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


# --- data in ---------------------------------------------------------------------------


@app.command("generate-sample")
def generate_sample_cmd(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    users: Annotated[int, typer.Option(help="Number of users (10 to 10 million).")] = 1000,
    news: Annotated[int, typer.Option(help="Number of articles (100 to 2 million).")] = 1000,
    impressions: Annotated[int, typer.Option(help="Number of training impressions, 1 to 50 million (the test window adds a third as many).")] = 1800,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same files.")] = 7,
) -> None:
    """Write a MIND-format sample world with cover images and true click probabilities."""
    from recsys.pipelines.sample import run_generate_sample

    _print_json(run_generate_sample(out, users=users, news=news, impressions=impressions, seed=seed))


@app.command()
def ingest(
    ctx: typer.Context,
    news: Annotated[Optional[Path], typer.Option(help="MIND news.tsv.")] = None,
    behaviors: Annotated[Optional[Path], typer.Option(help="MIND behaviors.tsv (labelled or not).")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Folder of cover images <NewsID>.<jpg|jpeg|png|webp>.")] = None,
    source: Annotated[Optional[str], typer.Option(help="Name of this behaviors file in the store (impression ids are unique per source). Default: <folder>/<file stem>.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first bad row with exit 1 and store none of the data (the runs table records the failed attempt).")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="Let the behaviors file replace the impressions stored under its source even where it drops most of them (a correction that re-times them all). Without it such a file is refused as another file under the same source name.")] = False,
) -> None:
    """Validate and load MIND files into the store; bad rows go to quarantine."""
    from recsys.pipelines.ingest import check_ingest_inputs, run_ingest

    c = _ctx(ctx)
    if news is None and behaviors is None:
        raise RecsysError("ingest needs --news and/or --behaviors")
    config = c.config()
    # Before engine(create=True): a mistyped path left a new, empty store that `stats` then read.
    check_ingest_inputs(news=news, behaviors=behaviors, images=images, source=source)
    report = run_ingest(c.engine(create=True), c.workspace, news=news, behaviors=behaviors, images=images, source=source,
                        strict=strict, max_bad_share=config.ingest.max_bad_share, replace=replace)
    _print_json(report)


@app.command()
def stats(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False) -> None:
    """Counts of what the store holds."""
    from recsys.store.stats import store_stats

    counts = store_stats(_ctx(ctx).engine(uses_workspace=False))
    if as_json:
        _print_json(counts)
        return
    from rich.table import Table

    from recsys.display import console

    table = Table("what", "count", title="store")
    for key, value in counts.items():
        table.add_row(key, str(value))
    console().print(table)


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context, revision: Annotated[str, typer.Option(help="Target revision.")] = "head") -> None:
    """Create or upgrade the store's tables (Alembic migrations)."""
    from recsys.store.database import (
        create_engine_for,
        current_revision,
        ensure_sqlite_folder,
        refuse_in_memory_sqlite,
        shown_store,
        upgrade,
    )

    c = _ctx(ctx)
    c.check_config()
    refuse_in_memory_sqlite(c.db_url, c.db_source)  # as AppContext.engine does: migrating one would keep nothing
    _store_shown.set(shown_store(c.db_url))
    c.workspace.ensure()
    ensure_sqlite_folder(c.db_url)  # as every other command does through open_store
    engine = create_engine_for(c.db_url)
    upgrade(engine, revision)
    typer.echo(f"store at revision {current_revision(engine)}")


# --- model ------------------------------------------------------------------------------


@app.command()
def train(
    ctx: typer.Context,
    modalities: Annotated[Optional[str], typer.Option(help="text | image | text,image (any order)")] = None,
    fusion: Annotated[Optional[str], typer.Option(help="concat | weighted_sum | gated")] = None,
    since: Annotated[Optional[str], typer.Option(help="First impression time to train on (ISO date or datetime).")] = None,
    until: Annotated[Optional[str], typer.Option(help="End of the window, exclusive (ISO).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs (early stopping on validation AUC).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    source: Annotated[Optional[str], typer.Option(help="Train only on impressions of this source.")] = None,
    keep_current: Annotated[bool, typer.Option("--keep-current", help="Publish the version without making it current (a candidate: evaluate it, then `recsys model use VERSION`).")] = False,
) -> None:
    """Train the CTR model on a time window; write a model version and mark it current."""
    from recsys.pipelines.train import run_train

    _check_name("--source", source, "the source of a behaviors file")
    c = _ctx(ctx)
    config = c.config(
        {"model.modalities": modalities, "model.fusion": fusion, "model.epochs": epochs, "model.seed": seed},
        flags={"model.modalities": "--modalities", "model.fusion": "--fusion", "model.epochs": "--epochs",
               "model.seed": "--seed"},
    )
    _print_json(run_train(c.engine(), c.workspace, config, since=since, until=until, source=source,
                          make_current=not keep_current, exact_modalities=modalities is not None))


# created_at is in the version's name (vYYYYMMDD-HHMMSS-xxxxxx) and in --json.
_MODEL_LIST_COLUMNS = ["version", "current", "modalities", "fusion", "since", "until", "val_auc", "index", "status"]
INDEX_MISSING = "missing, built by the next nightly or recsys index build"


@model_app.command("list")
def model_list(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False) -> None:
    """Every model version, oldest first: current or not, settings, training window, validation AUC, index."""
    from recsys.versions import describe_versions

    c = _ctx(ctx)
    rows = describe_versions(c.engine(uses_workspace=False), models_dir=c.workspace.models_dir)
    if as_json:
        _print_json(rows)
        return
    from recsys.display import console, rows_table

    shown = [{**row, "current": "yes" if row["current"] else "no", "index": "yes" if row["index"] else "no",
              "val_auc": _auc_cell(row["val_auc"]),
              **{key: "-" if row[key] is None else row[key] for key in ("modalities", "fusion")},
              **{key: "-" if row[key] is None else str(row[key]).replace("T", " ")[:16] for key in ("since", "until")}}
             for row in rows]
    table = rows_table(shown, _MODEL_LIST_COLUMNS, title="model versions")
    for column in table.columns:  # a narrow terminal wraps the cells instead of cutting version names short
        column.overflow = "fold"
    console().print(table)
    for row in rows:
        if row["problem"]:
            typer.echo(f"note: {row['problem']}", err=True)


def _auc_cell(value) -> str:
    # A hand-edited or damaged manifest may hold anything there: shown, not an internal error.
    try:
        return "-" if value is None else f"{float(value):.4f}"
    except (TypeError, ValueError):
        return str(value)


@model_app.command("use")
def model_use(ctx: typer.Context, version: Annotated[str, typer.Argument(metavar="VERSION", help="The model version to make current (see `recsys model list`).")]) -> None:
    """Make a model version the current one (a rollback); the next nightly run ranks with it."""
    from recsys.index.faiss_index import FaissIndex
    from recsys.pipelines.features import configured_encoder_infos
    from recsys.versions import get_version, set_current

    _check_id("VERSION", version)
    c = _ctx(ctx)
    config = c.config()
    engine = c.engine()
    previous = set_current(engine, version, encoders=lambda: configured_encoder_infos(config),
                           models_dir=c.workspace.models_dir)
    mv = get_version(engine, version, models_dir=c.workspace.models_dir)
    if previous == version:
        typer.echo(f"note: model version '{version}' is already current: nothing changed", err=True)
    _print_json({"current": version, "previous": previous, "changed": previous != version,
                 "index": "present" if FaissIndex.exists(mv.index_dir) else INDEX_MISSING})


@index_app.command("build")
def index_build(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option(help="Model version (default: current).")] = None,
    kind: Annotated[Optional[str], typer.Option(help="auto | flat | hnsw | ivf")] = None,
) -> None:
    """Embed every article with the model's item tower and build the FAISS index."""
    from recsys.pipelines.index import run_index_build

    _check_name("--model", model, _A_MODEL_VERSION)
    c = _ctx(ctx)
    config = c.config({"index.kind": kind}, flags={"index.kind": "--kind"})
    _print_json(run_index_build(c.engine(), c.workspace, config, version=model))


@app.command()
def similar(
    ctx: typer.Context,
    news: Annotated[str, typer.Option(help="News id.")],
    k: Annotated[int, typer.Option(help="How many.")] = 10,
    model: Annotated[Optional[str], typer.Option(help="Model version (default: current).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """Articles closest to an article in the item-embedding space."""
    from recsys.pipelines.index import run_similar

    _check_id("--news", news)
    _check_k(k)
    _check_name("--model", model, _A_MODEL_VERSION)
    c = _ctx(ctx)
    rows = run_similar(c.engine(), c.workspace, news_id=news, k=k, version=model,
                       num_threads=c.config().runtime.threads or None)
    if not rows:
        # On stderr, so that the output stays a valid (empty) list.
        typer.echo(f"note: the index holds no article other than {news!r}", err=True)
    _print_rows(rows, as_json, title=f"similar to {news}")


@app.command()
def nightly(
    ctx: typer.Context,
    engine_name: Annotated[Optional[str], typer.Option("--engine", help="local | ray")] = None,
    k: Annotated[Optional[int], typer.Option(help="Recommendations per user.")] = None,
    candidates: Annotated[Optional[int], typer.Option(help="Candidates retrieved from FAISS per user.")] = None,
    shard_size: Annotated[Optional[int], typer.Option(help="Users per shard.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes (local) or actors (ray).")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: a local Ray instance).")] = None,
    news: Annotated[Optional[Path], typer.Option(help="New news.tsv to ingest first.")] = None,
    behaviors: Annotated[Optional[Path], typer.Option(help="New behaviors.tsv to ingest first.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Cover images of the new articles.")] = None,
    source: Annotated[Optional[str], typer.Option(help="Name of the new behaviors file in the store; give each night its own when files reuse one path (impression ids restart in every MIND file). Default: <folder>/<file stem>.")] = None,
    export: Annotated[Optional[Path], typer.Option(help="Also write the run as Parquet into this folder.")] = None,
    rerank: Annotated[bool, typer.Option("--rerank", help="Rank even when the latest complete run had the same inputs (by default a retried night returns that run).")] = False,
) -> None:
    """The nightly job: ingest, encode new articles, rank every active user, switch atomically."""
    from recsys.pipelines.nightly import check_nightly_inputs, run_nightly_job
    from recsys.store.ingest import check_source

    # Blank (a script's unset variable) it meant a local Ray instance; white space around an
    # address is refused with the config key (Config), both before the night's ingest.
    _check_name("--ray-address", ray_address, "a Ray cluster address")
    if source is not None:  # an option's typo, not a failed ingest (exit 3) after the store is opened
        check_source(source, "--source")
    # Before the store is opened (run_nightly_job checks them again, for callers in Python).
    check_nightly_inputs(news=news, behaviors=behaviors, images=images, source=source)
    c = _ctx(ctx)
    config = c.config({
        "nightly.engine": engine_name, "nightly.k": k, "nightly.num_candidates": candidates,
        "nightly.shard_size": shard_size, "nightly.workers": workers, "nightly.ray_address": ray_address,
    }, flags={
        "nightly.engine": "--engine", "nightly.k": "--k", "nightly.num_candidates": "--candidates",
        "nightly.shard_size": "--shard-size", "nightly.workers": "--workers", "nightly.ray_address": "--ray-address",
    })
    if ray_address and config.nightly.engine != "ray":
        # Typed for this run, so meant: the local engine would rank on this machine instead.
        raise RecsysError(f"--ray-address {ray_address} goes with the ray engine, but nightly.engine is "
                          f"{config.nightly.engine!r}: add --engine ray (or leave --ray-address out)")
    summary = run_nightly_job(
        c.engine(create=True), c.workspace, config, news=news, behaviors=behaviors, images=images, source=source,
        export=export, rerank=rerank,
    )
    _print_json(summary)
    export_failed = summary["export"].get("error") if isinstance(summary.get("export"), dict) else None
    if export_failed is not None:
        typer.echo(f"error: {export_failed}", err=True)
    failed = summary.get("ingest", {}).get("error")
    if failed is not None:
        # The lists were made from the data already stored; the scheduler must still hear of it.
        run = summary.get("run", {})
        done = (f"the complete run {run.get('run_id')} of the data already stored stays served"
                if run.get("already_complete") else "the run ranked the data already stored")
        typer.echo(f"error: ingest failed, {done}: {failed}", err=True)
        raise typer.Exit(INGEST_FAILED)
    if export_failed is not None:
        raise typer.Exit(1)


@app.command()
def export(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Folder to write recommendations-run-<id>.parquet into.")],
    run: Annotated[Optional[int], typer.Option(help="Run id (default: the latest complete nightly run).")] = None,
) -> None:
    """Write a complete nightly run's recommendations as Parquet (as `nightly --export` does)."""
    from recsys.pipelines.inputs import check_output_folder
    from recsys.ranking.export import export_run

    if run is not None and not 1 <= run <= MAX_RUN_ID:
        # The store's run ids are 64-bit: a larger one failed in the driver (exit 2).
        raise RecsysError(f"--run {run}: expected a run id from 1 to {MAX_RUN_ID} (see the runs of `recsys nightly`)")
    check_output_folder("--out", out)
    c = _ctx(ctx)
    typer.echo(str(export_run(c.engine(uses_workspace=False), out, run_id=run)))


@app.command()
def recommend(
    ctx: typer.Context,
    user: Annotated[str, typer.Option(help="User id.")],
    k: Annotated[Optional[int], typer.Option(help="How many (default 10).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """The latest complete nightly run's recommendations for a user."""
    from recsys.ranking.runs import recommendations_for_user

    _check_id("--user", user)
    if k is not None:
        _check_k(k)
    rows = recommendations_for_user(_ctx(ctx).engine(uses_workspace=False), user, 10 if k is None else k)
    if rows.empty:
        # Known user, empty list: say why on stderr, so that the output stays a valid (empty) list.
        typer.echo(
            f"note: user {user!r} has no list in run {rows.attrs.get('run_id')}: not active in that run's window "
            "(nightly.active_days) or no eligible article", err=True,
        )
    elif k is not None and len(rows) < k:  # --k 1000 printed the 10 stored without a word; a list shorter than the default is no news
        typer.echo(
            f"note: run {rows.attrs.get('run_id')} holds {len(rows)} articles for user {user!r}, fewer than --k {k}: "
            "a night stores at most its own k (nightly.k) per user, fewer when fewer articles are eligible", err=True,
        )
    _print_rows(rows.to_dict("records"), as_json, title=f"recommendations for {user}")


def _check_id(option: str, value: str) -> None:
    # Bytes that are not UTF-8 reach Python as surrogates, which no driver can send: an
    # operator's typo, not an internal error.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RecsysError(f"{option} {value.encode('utf-8', 'surrogateescape')!r}: not valid UTF-8") from None


def _check_k(k: int) -> None:
    # The library checks it too, but cannot name the option.
    if k < 1:
        raise RecsysError(f"--k is {k}, expected at least 1")


_A_MODEL_VERSION = "a model version (see `recsys model list`)"


def _check_name(option: str, value: str | None, expected: str) -> None:
    # An empty value is a script's unset variable (--model "$VERSION"): it meant the default.
    if value is None:
        return
    if not value.strip():
        raise RecsysError(f"{option} is {value!r}, expected {expected} (leave the option out for the default)")
    _check_id(option, value)


def _print_rows(rows: list[dict], as_json: bool, *, title: str) -> None:
    keys = ["rank", "news_id", "title", "category", "score"]
    clean = [{key: row[key] for key in keys} for row in rows]
    for row in clean:
        row["rank"] = int(row["rank"])
        row["score"] = round(float(row["score"]), 6)
    if as_json:
        _print_json(clean)
        return
    from recsys.display import console, rows_table

    console().print(rows_table(clean, keys, title=title))


_FEATURES_AT_HELP = (
    "popularity-at-end | impression | store-end: for impressions later than the store's last logged show "
    "(MIND dev after MIND train), read popularity no later than the store's end and age at each impression's "
    "time (default), both at each impression's time, or both no later than the store's end."
)

_FILE_EXPOSURE_HELP = (
    "Score without the file's exposure. By default an impression later than the store's last logged show is scored "
    "with how often the file showed each candidate before it, and since when (shows only, never labels), through "
    "the model version's calibration, fitted on its validation window for the default --features-at. The nightly "
    "job cannot read tomorrow's shows: this gives the figures that match what it serves."
)


@app.command()
def predict(
    ctx: typer.Context,
    behaviors: Annotated[Path, typer.Option(help="MIND behaviors file to score (labelled or not).")],
    out: Annotated[Path, typer.Option(help="Prediction file to write (MIND format).")],
    model: Annotated[Optional[str], typer.Option(help="Model version (default: current).")] = None,
    news: Annotated[Optional[Path], typer.Option(help="news.tsv with articles the store does not know.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Cover images of those articles.")] = None,
    features_at: Annotated[str, typer.Option("--features-at", help=_FEATURES_AT_HELP)] = "popularity-at-end",
    no_file_exposure: Annotated[bool, typer.Option("--no-file-exposure", help=_FILE_EXPOSURE_HELP)] = False,
) -> None:
    """Score every impression of a behaviors file; write `ImpressionID [r1,r2,...]` lines."""
    from recsys.pipelines.predict import run_predict

    _check_name("--model", model, _A_MODEL_VERSION)
    c = _ctx(ctx)
    _print_json(run_predict(
        c.engine(), c.workspace, c.config(), behaviors=behaviors, out=out, version=model, news=news, images=images,
        features_at=features_at, file_exposure=not no_file_exposure,
    ))


@app.command()
def evaluate(
    ctx: typer.Context,
    behaviors: Annotated[Optional[Path], typer.Option(help="Held-out MIND behaviors file (labelled; an unlabelled one gives counts and prediction files, no metrics).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Report folder (metrics.json, report.html, predictions).")] = None,
    models: Annotated[Optional[str], typer.Option(help="Comma-separated model versions (default: current).")] = None,
    baselines: Annotated[bool, typer.Option("--baselines", help="Also the text-only and image-only ablations of the first model evaluated (reused, or trained with its settings).")] = False,
    truth: Annotated[Optional[Path], typer.Option(help="Sample-world truth.tsv for the oracle row (found beside the behaviors file by default).")] = None,
    news: Annotated[Optional[Path], typer.Option(help="news.tsv with articles the store does not know.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Cover images of those articles.")] = None,
    compare: Annotated[Optional[list[Path]], typer.Option(metavar="<path>", help="Two metrics.json files to compare (give the option twice).")] = None,
    # None when not given: --compare refuses it even when it names the default.
    features_at: Annotated[Optional[str], typer.Option("--features-at", help=_FEATURES_AT_HELP, show_default="popularity-at-end")] = None,
    no_file_exposure: Annotated[bool, typer.Option("--no-file-exposure", help=_FILE_EXPOSURE_HELP)] = False,
    allow_different_data: Annotated[bool, typer.Option("--allow-different-data", help="--compare two reports of different behaviors files (refused by default).")] = False,
) -> None:
    """Offline CTR evaluation report: metrics.json, report.html and MIND prediction files."""
    scoring = {"--behaviors": behaviors is not None, "--out": out is not None, "--models": models is not None,
               "--baselines": baselines, "--truth": truth is not None, "--news": news is not None,
               "--images": images is not None, "--features-at": features_at is not None,
               "--no-file-exposure": no_file_exposure}
    if compare:
        from recsys.evaluation.compare import compare_files

        _ctx(ctx).check_config()
        # Ignored by a comparison: a user who added them expected something else to happen.
        if given := [option for option, used in scoring.items() if used]:
            raise RecsysError(f"evaluate --compare reads two metrics.json files; {', '.join(given)} "
                              "go with scoring a behaviors file, not with --compare")
        if len(compare) != 2:
            raise RecsysError(f"--compare needs exactly two metrics.json files, got {len(compare)}")
        typer.echo(compare_files(compare[0], compare[1], allow_different_data=allow_different_data))
        return
    if behaviors is None or out is None:
        raise RecsysError("evaluate needs --behaviors and --out (or --compare A.json --compare B.json)")
    if allow_different_data:
        raise RecsysError("evaluate --allow-different-data goes with --compare A.json --compare B.json")
    from recsys.pipelines.evaluate import run_evaluate

    c = _ctx(ctx)
    versions = None
    if models is not None:
        _check_id("--models", models)
        versions = [v.strip() for v in models.split(",") if v.strip()]
        if not versions:
            raise RecsysError(f"--models {models!r} names no model version (comma-separated names, see `recsys model list`)")
        if twice := sorted({v for v in versions if versions.count(v) > 1}):
            raise RecsysError(f"--models names {', '.join(twice)} more than once")
    summary = run_evaluate(
        c.engine(), c.workspace, c.config(), behaviors=behaviors, out=out, versions=versions,
        ablations=baselines, truth=truth, news=news, images=images, features_at="popularity-at-end" if features_at is None else features_at,
        file_exposure=not no_file_exposure,
    )
    _print_json(summary)


@app.command()
def demo(
    ctx: typer.Context,
    sample: Annotated[Optional[Path], typer.Option(help="Sample world folder (default: the committed data/sample).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs.")] = None,
) -> None:
    """The whole pipeline on the sample world: ingest, train, index, nightly, report."""
    from recsys.pipelines.demo import run_demo

    c = _ctx(ctx)
    run_demo(c, sample=sample, epochs=epochs)


# Typer turns a KeyboardInterrupt in a command into a silent exit code 130, which click hands
# back as the result outside standalone mode; no recsys command exits 130 itself.
_TYPER_CTRL_C = 130


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps errors to exit codes and one clear line on stderr."""
    _reserve_standard_fds()
    _tolerant_streams()
    with sigterm_unwinds():
        return _main(argv)


def _reserve_standard_fds() -> None:
    """Give a closed stdin, stdout or stderr (cron's `2>&-`) /dev/null: else the next file opened
    takes its number, and what C libraries write to fd 2 (TensorFlow's start-up lines) would
    land in that file, a store or a model file. Processes spawned from here inherit them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _tolerant_streams() -> None:
    """A terminal or log in a legacy charset (a latin-1 locale) gets \\u escapes for what it
    cannot show, instead of a UnicodeEncodeError that failed a command after its work was done."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and not _takes_any_text(stream) and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _main(argv: list[str] | None) -> int:
    token, store_token = _verbose.set(False), _store_shown.set(None)
    try:
        return _run(argv)
    finally:
        _verbose.reset(token)
        _store_shown.reset(store_token)


def _run(argv: list[str] | None) -> int:
    try:
        # Outside standalone mode click hands back a command's typer.Exit code as the result.
        code = app(args=argv, standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 1
    except TyperException as exc:
        # Bad usage (unknown option, missing value): typer's own message, then exit 1.
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            typer.echo(f"error: {exc.format_message()}", err=True)
        return 1
    except RecsysError as exc:
        if _verbose.get():
            log.exception("failed")
        typer.echo(f"error: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo(_interrupted(), err=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: exit code 2
        disk = disk_errno(exc) if isinstance(exc, OSError) else None
        if _verbose.get():
            log.exception("failed" if disk is not None else "internal error")
        if disk is not None:
            # A full or read-only disk that no write site turned into a RecsysError: the
            # operator's to fix, not a bug (the write sites name their path; this, the file if any).
            where = f"cannot write {exc.filename}" if exc.filename is not None else "a write failed"
            typer.echo(f"error: {where}: {disk_problem(disk)} (run with --verbose for the traceback)", err=True)
            return 1
        from recsys.store.database import server_refusal

        refusal = server_refusal(exc, _store_shown.get())
        if refusal is not None:
            typer.echo(f"error: {refusal}", err=True)
            return 1
        typer.echo(f"internal error: {type(exc).__name__}: {exc} (run with --verbose for the traceback)", err=True)
        return 2
    if code == _TYPER_CTRL_C:
        typer.echo(_interrupted(), err=True)
        return 2
    return code if isinstance(code, int) else 0


def _interrupted() -> str:
    name = termination_signal()
    return f"terminated ({name})" if name else "interrupted"


def entry() -> None:
    # TensorFlow's C++ start-up chatter (CUDA probing, CPU flags) buries the job's own log
    # lines in cron mails; users can still set the variable themselves.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    code = main()
    _exit_on_late_signals(code)
    sys.exit(code)


def _exit_on_late_signals(code: int) -> None:
    """The command is done and its result written; the interpreter's shutdown (TensorFlow's, 1-2 s)
    follows. A SIGTERM or SIGHUP then (a scheduler's timeout) is ignored, so the process ends with
    the command's own exit code: it used to die of the signal, and a finished job read as killed.
    Ignored, not handled: Python runs no handler once its shutdown is past the atexit callbacks."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or gone: nothing left to flush
            pass
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
