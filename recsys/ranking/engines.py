"""Engines that run the shards of a nightly run: local worker processes, or Ray Data.

Both engines run the same ``ShardWorker``: it loads the model and the index once, then for
each shard reads the users' histories from the store (one query), ranks them
(``rank_users``) and writes the shard's recommendations with its ``run_shards`` row in one
transaction. Shards are therefore atomic whatever the engine, and a shard written twice (a
retried Ray task, an orphaned worker) is written once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from recsys.errors import ModelMismatchError, RecsysError
from recsys.interrupts import raise_if_terminated
from recsys.models.affinity import SkipCounts
from recsys.threads import configure_threads, default_threads, limit_this_thread

log = logging.getLogger(__name__)

# (shard number, user ids of the shard)
Shard = tuple[int, np.ndarray]
OnResult = Callable[["ShardResult"], None]


class WorkerDiedError(RecsysError):
    """A worker process died (killed by a signal) while shards were pending, or a Ray worker
    died more often than it is restarted: like a killed run, the run stays resumable."""


def ids_fingerprint(news_ids: np.ndarray) -> str:
    """A hash of an ordered id list: workers check that their index has the driver's rows."""
    digest = hashlib.sha256()
    for news_id in news_ids:
        digest.update(str(news_id).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class WorkerSetup:
    """What every worker needs, the same for all shards of a run (pickled once per worker).

    Attributes:
        db_url: store URL, password included (workers open their own connections).
        run_id: the run the shards belong to.
        model_dir / index_dir: the model bundle and the FAISS index to load.
        k / num_candidates: recommendations kept and candidates retrieved per user.
        published_after: freshness cut-off (datetime64[s]) or None.
        side: (n, S) float32 side features of every index row at the run's time.
        popular: (c,) int64 index rows of every fresh article, most popular first: each
            cold-start user's candidates are the first ``num_candidates`` they did not click.
        catalogue_fingerprint: ``ids_fingerprint`` of the index rows the driver saw.
        num_threads: threads per worker for TensorFlow and FAISS.
        created_at: timestamp written on every recommendation of the run.
        item_codes: (n, 2) the index rows' category and subcategory codes
            (``recsys.models.affinity``), for a model with the category affinity (each worker
            adds the model's content clusters); None: without.
    """

    db_url: str
    run_id: int
    model_dir: str
    index_dir: str
    k: int
    num_candidates: int
    published_after: np.datetime64 | None
    side: np.ndarray
    popular: np.ndarray
    catalogue_fingerprint: str
    num_threads: int
    created_at: datetime
    item_codes: np.ndarray | None = None


@dataclass
class ShardResult:
    """What a worker did with one shard.

    Attributes:
        shard: shard number.
        num_users: users in the shard.
        num_cold_start: users without a usable history.
        num_candidates: (user, candidate) pairs scored.
        num_recommendations: rows written.
        written: False when the shard had already been written by someone else.
        timings: seconds per stage (read_histories, user_vectors, search, score, top_k, write;
            and load: the worker's start-up, with its first shard).
    """

    shard: int
    num_users: int
    num_cold_start: int
    num_candidates: int
    num_recommendations: int
    written: bool
    timings: dict = field(default_factory=dict)

    def to_row(self) -> dict:
        return {
            "shard": self.shard, "num_users": self.num_users, "num_cold_start": self.num_cold_start,
            "num_candidates": self.num_candidates, "num_recommendations": self.num_recommendations,
            "written": self.written, "timings": json.dumps(self.timings),
        }

    @classmethod
    def from_row(cls, row: dict) -> ShardResult:
        return cls(
            int(row["shard"]), int(row["num_users"]), int(row["num_cold_start"]), int(row["num_candidates"]),
            int(row["num_recommendations"]), bool(row["written"]), json.loads(row["timings"]),
        )


class ShardWorker:
    """Loads the model, the index and a store connection once; ranks and writes shards.

    Raises:
        ModelMismatchError: the index rows differ from the driver's, or the model's
            embedding size differs from the index's.
    """

    def __init__(self, setup: WorkerSetup):
        started = time.perf_counter()
        from recsys.index.faiss_index import FaissIndex
        from recsys.models.bundle import RankingModel
        from recsys.ranking.candidates import Catalogue
        from recsys.store.database import create_engine_for

        self.threads = configure_threads(setup.num_threads)
        self.setup = setup
        self.model = RankingModel.load(setup.model_dir)
        self.index = FaissIndex.load(
            setup.index_dir, expected={"dim": self.model.config.serving_dim}, num_threads=setup.num_threads
        )
        news_ids = np.asarray(self.index.news_ids, dtype=object)
        if ids_fingerprint(news_ids) != setup.catalogue_fingerprint:
            raise ModelMismatchError(
                f"index {setup.index_dir}: its articles changed since the run started "
                f"(fingerprint {ids_fingerprint(news_ids)}, expected {setup.catalogue_fingerprint})"
            )
        embeddings = np.asarray(self.index.vectors(news_ids), dtype=np.float32)
        codes = None
        if self.model.config.category_affinity is not None:
            if setup.item_codes is None:
                raise ModelMismatchError(f"model {setup.model_dir} reads the category affinity; the run prepared no key codes")
            # The publisher's keys, then the model's content clusters of the index's own vectors.
            codes = self.model.affinity_item_codes(setup.item_codes, embeddings)
        self.catalogue = Catalogue(news_ids, embeddings, setup.side, codes)
        self.engine = create_engine_for(setup.db_url)
        self._warm_up()
        # Reported with the first shard, so that the driver can tell start-up from work.
        self._load_seconds: float | None = time.perf_counter() - started

    def _warm_up(self) -> None:
        """Trace the model's functions now, so that the first shard is not charged for it."""
        if len(self.catalogue) == 0:
            return
        vector = self.model.user_vectors(np.array([0, 1]), np.array([0]), self.catalogue.embeddings)
        self.model.score(vector, self.catalogue.embeddings[:1], self.catalogue.side[:1])

    def process(self, shard: int, user_ids: np.ndarray) -> ShardResult:
        """Rank one shard's users and write the shard (one transaction)."""
        from recsys.ranking.candidates import rank_users
        from recsys.ranking.runs import write_shard
        from recsys.store.repository import read_skipped, read_user_histories

        user_ids = np.asarray(user_ids, dtype=object)
        limit_this_thread(self.threads)  # Ray runs the work on another thread than the set-up
        timings: dict = {}
        clock = time.perf_counter()
        # The history the model was trained on: led by the logged clicks only if it read them.
        # Either way every click is kept out of the lists.
        logged = self.model.config.logged_clicks
        offsets, items = read_user_histories(self.engine, user_ids, self.catalogue.news_ids, include_impression_clicks=logged)
        clicked = None if logged else read_user_histories(self.engine, user_ids, self.catalogue.news_ids)
        timings["read_histories"] = time.perf_counter() - clock
        skips = None
        if self.model.config.category_affinity is not None:
            # Every skip the store holds: a run's as_of is never before the store's latest impression.
            clock = time.perf_counter()
            skipped = read_skipped(self.engine, user_ids, self.catalogue.news_ids)
            skips = SkipCounts.from_pairs(user_ids, *skipped, self.catalogue.codes)
            timings["read_skips"] = time.perf_counter() - clock
        recs = rank_users(
            user_ids, offsets, items, self.model, self.catalogue, self.index,
            num_candidates=self.setup.num_candidates, k=self.setup.k,
            published_after=self.setup.published_after, popular=self.setup.popular, timings=timings, clicked=clicked,
            skips=skips,
        )
        num_candidates = int(timings.pop("candidates", 0))
        clock = time.perf_counter()
        written = write_shard(
            self.engine, self.setup.run_id, shard, recs, num_users=len(user_ids), created_at=self.setup.created_at
        )
        timings["write"] = time.perf_counter() - clock
        if self._load_seconds is not None:
            timings["load"], self._load_seconds = self._load_seconds, None
        return ShardResult(
            shard=int(shard), num_users=len(user_ids), num_cold_start=int(np.sum(np.diff(offsets) == 0)),
            num_candidates=num_candidates, num_recommendations=len(recs), written=written, timings=timings,
        )

    def close(self) -> None:
        self.engine.dispose()


def threads_per_worker(num_workers: int, num_threads: int | None = None) -> int:
    """Threads each worker may use: ``num_threads`` (default: every core available to the
    process) shared out among the workers, at least one each, so more workers than threads
    run one thread each (``run_nightly`` warns of that)."""
    return max(1, (num_threads or default_threads()) // max(1, num_workers))


# ----------------------------------------------------------------------------------------
# local engine


# The worker of this process (local engine), set by ``_init_worker``.
_WORKER: ShardWorker | None = None
_WORKER_ERROR: BaseException | None = None


def _init_worker(setup: WorkerSetup, parent_pid: int) -> None:
    global _WORKER, _WORKER_ERROR
    watch_parent(parent_pid)
    try:
        _WORKER = ShardWorker(setup)
    except Exception as exc:  # noqa: BLE001 - re-raised in the driver by _process_shard
        # A failing Pool initializer makes the pool respawn workers for ever; keep the error
        # and report it with the first shard instead.
        _WORKER_ERROR = exc


def _process_shard(shard: int, user_ids: np.ndarray) -> ShardResult:
    if _WORKER is None:
        raise _WORKER_ERROR or RecsysError("worker was not initialised")
    return _WORKER.process(shard, user_ids)


def watch_parent(parent_pid: int) -> None:
    """Exit when the driver dies (kill -9 gives it no chance to stop its workers)."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="recsys-parent-watch", daemon=True).start()


def run_local(
    setup: WorkerSetup, shards: Sequence[Shard], *, num_workers: int, on_result: OnResult | None = None
) -> list[ShardResult]:
    """Rank shards with worker processes ("spawn" context) on this machine.

    Each worker loads the model and the index once (pool initializer). At most two shards
    per worker are in flight, so a slow consumer (``on_result``) slows the dispatch instead
    of piling up results. A worker that dies fails the call (WorkerDiedError) instead of
    leaving its shard unanswered.

    Args:
        setup: shared inputs; ``setup.num_threads`` threads per worker.
        shards: (shard number, user ids) to process.
        num_workers: worker processes; 0 runs the shards in this process (debugging, tests).
        on_result: called in this process for every finished shard, in completion order.

    Returns:
        One result per shard, in completion order.
    """
    results: list[ShardResult] = []

    def done(result: ShardResult) -> None:
        raise_if_terminated()  # a SIGTERM whose exception some library swallowed
        results.append(result)
        if on_result is not None:
            on_result(result)

    if num_workers == 0:
        worker = ShardWorker(setup)
        try:
            for shard, user_ids in shards:
                done(worker.process(shard, user_ids))
        finally:
            worker.close()
        return results

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Not multiprocessing.Pool: it replaces a worker that dies (the out-of-memory killer) but
    # loses its shard, and the driver then waits for ever while holding the nightly lock. An
    # executor fails every pending shard with BrokenProcessPool instead.
    executor = ProcessPoolExecutor(
        num_workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
        initargs=(setup, os.getpid()),
    )
    with stopping_on_interrupt(executor):
        pending: deque = deque()
        for shard, user_ids in shards:
            pending.append((shard, executor.submit(_process_shard, shard, user_ids)))
            if len(pending) >= 2 * num_workers:
                done(_shard_result(*pending.popleft()))
        while pending:
            done(_shard_result(*pending.popleft()))
    return results


@contextmanager
def stopping_on_interrupt(executor) -> Iterator:
    """Shut a process pool down on the way out; on Ctrl-C or SIGTERM terminate its workers
    first instead of waiting for the shards in flight (a worker still loading TensorFlow held
    the job 30 s after SIGTERM). A shard is written in one transaction, so one cut short is
    simply ranked again when the run resumes."""
    try:
        yield executor
    except BaseException as exc:
        if not isinstance(exc, Exception):  # KeyboardInterrupt (SIGTERM unwinds as one), SystemExit
            for process in list((executor._processes or {}).values()):  # no public way before Python 3.14
                process.terminate()
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _shard_result(shard: int, future) -> ShardResult:
    from concurrent.futures.process import BrokenProcessPool

    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise WorkerDiedError(
            f"a ranking worker process died while shard {shard} was pending (killed by a signal, often the "
            "out-of-memory killer: fewer workers or a smaller shard size need less memory); the run stays "
            "resumable, and the next attempt with the same plan ranks only the shards not yet written"
        ) from exc


# ----------------------------------------------------------------------------------------
# Ray engine


# Ray Data restarts a dead actor and retries its shard, by default for ever: a shard that kills
# its worker every time (out of memory) would hang the job while it holds the store lock. A
# worker that dies once is still replaced and the shard retried.
RAY_ACTOR_RESTARTS = 2

# How long the driver waits for a TCP connection to the Ray cluster given by --ray-address
# before the job stops. ray.init itself, when nothing listens there, retries its GCS client 20
# times at about 40 s each (over 13 minutes, the nightly lock held all along); Ray Client
# (ray://) gives up after 30 s. A head node that is up accepts a connection within
# milliseconds, even across regions; 10 s still covers a few lost SYNs on a bad link (Linux
# resends them after 1, 3 and 7 s), and stays well below Ray's own waits.
RAY_CONNECT_TIMEOUT_S = 10.0


# The HTTP/2 client preface and an empty SETTINGS frame: every gRPC server (Ray's GCS, Ray
# Client) answers them with a SETTINGS frame (RFC 9113, 3.4), type 0x4 in a frame's 4th byte.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_HTTP2_SETTINGS = 4
_FRAME_HEADER_BYTES = 9


def _ray_unreachable(ray_address: str) -> str:
    return f"cannot reach the Ray cluster at {ray_address} (--ray-address, config key nightly.ray_address)"


def _ray_connect_target(ray_address: str) -> str | None:
    """The host:port that ``ray.init(address=ray_address)`` connects to first, or None when
    there is nothing to check beforehand: "local" (a new instance), a scheme other than
    ray:// (a client plugin), a Ray Client address without a port, or "auto" (or a plain
    address) that Ray cannot resolve, in which case ray.init reports it at once."""
    address = ray_address
    if address == "auto":  # as ray.init: RAY_ADDRESS, when set, replaces "auto"
        address = os.environ.get("RAY_ADDRESS") or address
    if address.startswith("ray://"):  # Ray Client: a gRPC channel to host:port as given
        inner = address[len("ray://"):].rstrip("/")
        return inner if _split_host_port(inner) else None
    if address == "local" or "://" in address:
        return None
    try:
        # The GCS address as ray.init reads it: "auto" from RAY_ADDRESS or the address file of
        # the latest `ray start` (stale once that cluster died), localhost as this node's IP.
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address)
    except Exception:  # noqa: BLE001 - a private Ray helper: fall back on the address as given
        return address if _split_host_port(address) else None


def _split_host_port(address: str) -> tuple[str, int] | None:
    """("host", port) of "host:port" or "[v6]:port"; None when it is not that form."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        return None
    return host, int(port)


def check_ray_reachable(ray_address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Refuse a Ray address where no gRPC server answers, within ``timeout`` seconds
    (``RAY_CONNECT_TIMEOUT_S``): ray.init would wait there for many minutes. The check opens a
    TCP connection and sends the HTTP/2 client preface, which every gRPC server (Ray's GCS, Ray
    Client) answers at once; it never asks whether the server is Ray's, so an address that
    ray.init can join always passes.

    Raises:
        RecsysError: nothing accepts a connection at the address (refused, unreachable, no
            answer within ``timeout``, or a host name that does not resolve), or what accepts
            it does not answer as a gRPC server (the dashboard's port, another service).
    """
    if os.environ.get("RAY_grpc_enable_http_proxy", "0").lower() in ("1", "true"):
        return  # Ray then connects through an HTTP proxy: a direct connection proves nothing
    target = _ray_connect_target(ray_address)
    split = _split_host_port(target) if target else None
    if split is None:
        return
    host, port = split
    deadline = time.monotonic() + timeout
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise RecsysError(f"{_ray_unreachable(ray_address)}: cannot resolve the host name {host!r} ({exc})") from exc
    failure = f"connecting to {target}: no address; {_START_OR_FIX}"
    for family, kind, proto, _, sockaddr in addresses:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(left)
                sock.connect(sockaddr)
                not_grpc = _not_grpc(sock, max(deadline, time.monotonic() + MIN_PROBE_S))
        except TimeoutError:
            failure = f"connecting to {target}: no answer within {timeout:g} s; {_START_OR_FIX}"
        except OSError as exc:
            failure = f"connecting to {target}: {(exc.strerror or str(exc)).lower()}; {_START_OR_FIX}"
        else:
            if not_grpc is None:
                return
            # Something else listens there (the dashboard's 8265, a database): ray.init would
            # wait on it as long as on a silent address.
            failure = (f"{target} accepts connections but {not_grpc}, so it is not a Ray cluster's GCS (the head's "
                       "--port, 6379 by default) nor Ray Client (ray://host:10001); the dashboard's port (8265) is not "
                       "a cluster address")
    raise RecsysError(f"{_ray_unreachable(ray_address)}: {failure}")


_START_OR_FIX = "start the cluster (`ray start --head`) or fix the address"
# The least time a server that accepted the connection gets to answer the preface, however
# long the connection took: a head reached after lost SYNs is not refused for being slow.
MIN_PROBE_S = 2.0


def _not_grpc(sock: socket.socket, deadline: float) -> str | None:
    """None when the server on ``sock`` answers the HTTP/2 client preface as every gRPC server
    does (a SETTINGS frame first) before ``deadline`` (``time.monotonic``); else what it did
    instead. Not asked over TLS (``RAY_USE_TLS``): the server then expects a handshake first."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return None
    head, late = b"", False
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(_HTTP2_PREFACE)
        while len(head) < _FRAME_HEADER_BYTES:
            left = deadline - time.monotonic()  # the whole answer, not each read, is timed
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(_FRAME_HEADER_BYTES - len(head))
            if not chunk:
                break
            head += chunk
    except TimeoutError:
        late = True
    except OSError as exc:
        return f"dropped the connection as a gRPC server would not ({exc.strerror or exc})"
    if len(head) == _FRAME_HEADER_BYTES and head[3] == _HTTP2_SETTINGS:
        return None
    if head[:1] in (b"\x15", b"\x16") and head[1:2] == b"\x03":  # a TLS alert or handshake record
        return "answered with TLS (a cluster started with RAY_USE_TLS=1: set it, and Ray's TLS_* variables, here too)"
    if late:
        return "did not answer as a gRPC server in time" + (f" (it sent {head!r})" if head else "")
    return f"answered {head!r}, not as a gRPC server" if head else "closed the connection without an answer"


def _init_ray(ray_address: str | None, num_cpus: int | None = None) -> None:
    """``ray.init`` (a new local instance of ``num_cpus`` CPUs, default every core available,
    when ``ray_address`` is None, even with ``RAY_ADDRESS`` set) that keeps the process's
    SIGTERM handler: Ray replaces it with ``sys.exit(15)``, which skipped the CLI's handling
    (exit 15 without "terminated (SIGTERM)"), and one such SIGTERM early in the ranking was
    lost altogether: the job ranked on to the end. A SIGTERM during the start-up itself is
    handed to the previous handler after ``ray.shutdown()`` (processes of a node that was not
    fully started are not known to it; Ray ties them to this process, so they end with it).

    Raises:
        RecsysError: ray.init could not connect to ``ray_address``, or could not start Ray
            for a cause of the environment (an OSError: Ray's socket path too long for the
            temp folder, ``$TMPDIR/ray`` a file, a full disk).
    """
    import ray

    in_main_thread = threading.current_thread() is threading.main_thread()  # where handlers may be set
    previous = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    try:
        if ray_address:
            ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, logging_level=_ray_console_level())
        else:
            # "local": a new instance whatever RAY_ADDRESS says; with address None ray.init joined
            # the cluster named there, refused num_cpus (ValueError, exit 2) after the night's ingest.
            if os.environ.get("RAY_ADDRESS"):  # e.g. inside `ray job submit`: said, not silently left
                log.warning("RAY_ADDRESS=%s is not used: nightly.ray_address is empty, so a Ray instance of this "
                            "machine ranks; --ray-address auto (or nightly.ray_address) joins that cluster",
                            os.environ["RAY_ADDRESS"])
            ray.init(address="local", num_cpus=num_cpus or default_threads(), include_dashboard=False,
                     log_to_driver=False, logging_level=_ray_console_level())
    except ConnectionError as exc:  # no cluster found for "auto", or Ray's own wait ran out
        raise RecsysError(f"{_ray_unreachable(ray_address)}: {exc}") from exc
    except OSError as exc:  # the environment: a socket path too long, $TMPDIR/ray a file, a full disk
        if ray_address:  # joining a cluster (a TimeoutError, say): nothing of this machine's temp folder
            raise RecsysError(f"{_ray_unreachable(ray_address)}: {type(exc).__name__}: {exc}") from exc
        raise RecsysError(
            f"cannot start Ray: {exc}; Ray keeps its sockets and logs under its temp folder ({_ray_temp_dir()}, "
            "from RAY_TMPDIR or TMPDIR): point TMPDIR (or RAY_TMPDIR) at a short, writable folder"
        ) from exc
    except SystemExit as exc:  # Ray's handler: a SIGTERM arrived during the start-up
        ray.shutdown()
        if exc.code == signal.SIGTERM and callable(previous):
            previous(signal.SIGTERM, None)  # e.g. recsys.interrupts.on_sigterm: raises Terminated
        raise
    finally:
        if in_main_thread:  # None: a handler not set from Python, i.e. the default
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _ray_console_level() -> int:
    """The level of Ray's own lines on stderr: warnings, or everything under ``--verbose``. The job
    logs its own progress; Ray's INFO lines (its start, Ray Data's progress: a dozen a night) went
    to cron's mail."""
    return logging.INFO if logging.getLogger().isEnabledFor(logging.DEBUG) else logging.WARNING


def _quiet_ray_data_console() -> None:
    """Ray Data's console handler at ``_ray_console_level()``; its session log file keeps every line."""
    level = _ray_console_level()
    for handler in logging.getLogger("ray.data").handlers:
        if getattr(handler, "stream", None) in (sys.stderr, sys.__stderr__):
            handler.setLevel(max(handler.level, level))


def _ray_temp_dir() -> str:
    """The folder where ray.init puts its sessions: "ray" under RAY_TMPDIR, else TMPDIR, else /tmp."""
    try:
        from ray._common.utils import get_default_ray_temp_dir  # private: as this Ray version reads it

        return get_default_ray_temp_dir()
    except Exception:  # noqa: BLE001 - another Ray version: the same rule, as Ray 2.60 has it
        return os.path.join(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp", "ray")


class RayShardActor:
    """Ray Data actor: one ``ShardWorker`` per actor, one shard per batch row.

    An error of the worker's set-up (a truncated model file, an index that changed) is kept
    and raised with the first shard, as the local engine's ``_init_worker`` does: raised from
    the constructor, Ray reported it as the actor's death (retried, then ``WorkerDiedError``
    with the run left running) and lost its type and message.
    """

    def __init__(self, setup: WorkerSetup):
        self.worker: ShardWorker | None = None
        self.error: Exception | None = None
        try:
            self.worker = ShardWorker(setup)
        except Exception as exc:  # noqa: BLE001 - raised from __call__, unwrapped by run_ray
            self.error = exc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.worker is None:
            raise self.error or RecsysError("worker was not initialised")
        rows = [self.worker.process(int(shard), np.asarray(users, dtype=object)).to_row()
                for shard, users in zip(batch["shard"], batch["user_ids"])]
        return {key: np.asarray([row[key] for row in rows]) for key in rows[0]} if rows else {}


# How long Ray Data may take to start the actor pool (placing the actors, loading the model)
# before the job stops; Ray Data's default waits for ever, e.g. for actors that ask for more
# CPUs than any node has, the nightly lock held all along.
RAY_START_ACTORS_TIMEOUT_S = 600


def _alive_node_cpus() -> list[float]:
    """The CPUs of every alive node of the Ray cluster this process is connected to."""
    import ray

    return [float(node.get("Resources", {}).get("CPU", 0.0)) for node in ray.nodes() if node.get("Alive")]


def ray_pool_shape(node_cpus: Sequence[float], num_workers: int, cpus_per_actor: int) -> tuple[int, int]:
    """(CPUs per actor, actors that fit the alive nodes' CPUs) for a pool of ``num_workers``
    actors asking ``cpus_per_actor`` CPUs each: the CPUs are capped at the largest node's (an
    actor asking more than any node has is never placed); none is capped where no node has a
    whole CPU (the start's timeout reports it)."""
    largest = int(max(node_cpus, default=0))
    cpus = min(cpus_per_actor, largest) if largest >= 1 else cpus_per_actor
    fit = sum(int(c // cpus) for c in node_cpus)
    return cpus, min(fit, num_workers)


def _ray_error(exc: BaseException) -> BaseException | None:
    """The exception an actor raised, out of Ray's wrappers (RayTaskError, Ray Data's
    UserCodeException); None when Ray did not keep it (not picklable, an older Ray)."""
    import ray

    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ray.exceptions.RayTaskError):
            exc = exc.cause
        elif isinstance(exc, ray.exceptions.UserCodeException) or isinstance(exc, ray.exceptions.RayError):
            if exc.__cause__ is None:
                return None
            exc = exc.__cause__
        else:
            return exc
    return None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# What Ray Data appends to a failed map's exception message (its retry context, Ray 2.60).
_RAY_RETRY_NOTE = re.compile(r"\n?Failed to [^\n]* after \d+/\d+ attempts \(total backoff [^)]*\)\..*\Z", re.DOTALL)


def _without_ray_note(exc: BaseException) -> BaseException:
    """``exc`` with the retry note Ray Data appended to its message taken off again."""
    args = tuple(_RAY_RETRY_NOTE.sub("", a) if isinstance(a, str) else a for a in exc.args)  # Ray notes args[0]
    if args != exc.args:
        try:
            exc.args = args
        except Exception:  # noqa: BLE001 - a read-only args: kept with its note
            pass
    return exc


def _ray_error_line(exc: BaseException) -> str:
    """One line for an error Ray did not keep: the last line of its traceback, which names the
    original exception ("recsys.errors.StoreError: ..."), without Ray's colour codes."""
    text = _RAY_RETRY_NOTE.sub("", _ANSI.sub("", str(exc)))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _cpus_text(node_cpus: Sequence[float]) -> str:
    return "+".join(f"{c:g}" for c in node_cpus) if node_cpus else "an unknown number of"


class RayWorkerError(RuntimeError):
    """An error raised in a Ray worker that Ray did not hand back (an internal error, exit 2)."""


def run_ray(
    setup: WorkerSetup,
    shards: Sequence[Shard],
    *,
    num_workers: int,
    ray_address: str | None = None,
    on_result: OnResult | None = None,
) -> list[ShardResult]:
    """Rank shards with Ray Data: ``map_batches`` over shards with an actor pool.

    The dataset holds one row per shard (its number and user ids, read from the store by the
    driver); each actor loads the model and the index once and writes every shard it ranks
    to the store itself, so the model dir, the index dir and the store must be reachable from
    every node of a cluster.

    Args:
        setup: shared inputs; ``setup.num_threads`` CPUs per actor.
        shards: (shard number, user ids) to process.
        num_workers: actors in the pool.
        ray_address: a cluster to join ("auto", "ray://host:10001", ...); None starts a
            local Ray instance for this call and stops it afterwards.
        on_result: called in the driver for every finished shard.

    Returns:
        One result per shard.

    Raises:
        RecsysError: the cluster at ``ray_address`` cannot be reached (``check_ray_reachable``
            within ``RAY_CONNECT_TIMEOUT_S``, or ray.init failing to connect).
        WorkerDiedError: an actor died more than ``RAY_ACTOR_RESTARTS`` times (one that dies
            less often is replaced and its shard ranked again).
        RecsysError: the actor pool did not start within ``RAY_START_ACTORS_TIMEOUT_S``.
        Exception: what an actor's ``ShardWorker`` raised (set-up or shard), as itself, as
            the local engine raises it; ``RayWorkerError`` where Ray did not keep it.
    """
    import ray

    raise_if_terminated()  # one that landed in `import ray`: its Cython set-up swallows it
    results: list[ShardResult] = []
    if not shards:
        return results
    # No more actors than shards: Ray Data warned of the idle ones (a night of up to
    # shard_size users has one shard), and each loads TensorFlow, the model and the index.
    workers_asked, num_workers = num_workers, min(num_workers, len(shards))
    started_here = not ray.is_initialized()
    if started_here:
        if ray_address:
            check_ray_reachable(ray_address)
        # A local instance gets the actors' CPUs (the thread budget shared out), not every
        # core: Ray would otherwise run its own tasks beside them on cores the budget left free.
        _init_ray(ray_address, num_cpus=num_workers * setup.num_threads)
    try:
        raise_if_terminated()  # one that landed during ray.init
        try:
            node_cpus = _alive_node_cpus()
        except Exception as exc:  # noqa: BLE001 - not known (Ray Client, another version): asked as given
            log.warning("cannot read the Ray cluster's CPUs (%s: %s): each actor asks for %d", type(exc).__name__, exc,
                        setup.num_threads)
            node_cpus = []
        cpus, fit = ray_pool_shape(node_cpus, num_workers, setup.num_threads) if node_cpus else (setup.num_threads, num_workers)
        if cpus < setup.num_threads:
            log.warning("each Ray actor would ask for %d CPUs (runtime.threads or this machine's cores, shared among "
                        "--workers %d) but the largest node of the cluster has %d: each asks for %d and runs as many "
                        "threads", setup.num_threads, workers_asked, cpus, cpus)
            setup = dataclasses.replace(setup, num_threads=cpus)
        if 0 < fit < num_workers:
            log.warning("%d actors (--workers %d, at most one a shard) of %d CPUs do not fit the Ray cluster's CPUs "
                        "(%s): the pool starts with the actors that fit and grows as room frees", num_workers,
                        workers_asked, cpus, _cpus_text(node_cpus))
        if started_here and not ray_address:  # our own instance, sized for the whole pool
            compute = ray.data.ActorPoolStrategy(size=num_workers)
        else:
            # Ray Data waits (below) for the pool's minimum to start: on a shared cluster other
            # jobs may hold CPUs the totals count, so one actor starts it and the others join
            # as room frees, as Ray Data's unbounded wait used to allow.
            compute = ray.data.ActorPoolStrategy(min_size=1, max_size=num_workers)
        dataset = ray.data.from_items(
            [{"shard": int(shard), "user_ids": [str(u) for u in users]} for shard, users in shards],
            override_num_blocks=len(shards),
        )
        with warnings.catch_warnings():
            # Ray 2.60 deprecates actor options given as keywords but names no replacement for
            # max_restarts; its actor pool still reads it from there.
            warnings.simplefilter("ignore", DeprecationWarning)
            ranked = dataset.map_batches(
                RayShardActor,
                batch_size=1,
                batch_format="numpy",
                compute=compute,
                num_cpus=setup.num_threads,
                max_restarts=RAY_ACTOR_RESTARTS,
                fn_constructor_kwargs={"setup": setup},
            )
        # This dataset's own context (a copy of the process's): a pool that cannot be placed
        # stops the job instead of hanging it, and a worker's exception comes back as itself
        # (RayTaskError(StoreError)) rather than as a UserCodeException that has lost it.
        ranked.context.wait_for_min_actors_s = RAY_START_ACTORS_TIMEOUT_S
        ranked.context.raise_original_map_exception = True
        _quiet_ray_data_console()
        try:
            for row in ranked.iter_rows():
                raise_if_terminated()
                result = ShardResult.from_row(row)
                results.append(result)
                if on_result is not None:
                    on_result(result)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as exc:
            raise WorkerDiedError(
                f"a Ray ranking worker died {RAY_ACTOR_RESTARTS + 1} times (killed by a signal or Ray's memory monitor, "
                "often for memory: fewer workers or a smaller shard size need less); the run stays resumable, and the "
                f"next attempt with the same plan ranks only the shards not yet written ({type(exc).__name__})"
            ) from exc
        except ray.exceptions.GetTimeoutError as exc:  # Ray Data's wait_for_min_actors_s
            raise RecsysError(
                f"the Ray cluster did not start the {num_workers} ranking workers (--workers {workers_asked}, at most "
                f"one a shard) of {setup.num_threads} "
                f"CPUs each (runtime.threads, or the driver's cores, shared among the workers) within "
                f"{RAY_START_ACTORS_TIMEOUT_S} s; its alive nodes have {_cpus_text(node_cpus)} CPUs, other jobs may "
                "hold them: fewer workers, or a cluster with room for them"
            ) from exc
        except ray.exceptions.RayTaskError as exc:
            # As the local engine: the worker's own exception, type and one-line message (a
            # RecsysError exits 1), not Ray's wrapper and its remote traceback (exit 2).
            original = _ray_error(exc)
            if isinstance(original, Exception):
                raise _without_ray_note(original) from exc
            raise RayWorkerError(f"a Ray ranking worker failed: {_ray_error_line(exc)}") from None
        except ray.exceptions.RayError as exc:  # e.g. UnserializableException: a worker's error Ray could not send back
            raise RayWorkerError(f"a Ray ranking worker failed: {_ray_error_line(exc)}") from None
    finally:
        if started_here:
            ray.shutdown()
    return results
