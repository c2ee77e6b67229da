"""Both engines give the same recommendations as ranking in-process."""

from __future__ import annotations

import contextlib

import os
import re
import signal
import socket
import sys
import time

import pandas as pd
import pytest
from sqlalchemy import select

from recsys.columns import NEWS_ID, RANK, SCORE, USER_ID
from recsys.errors import RecsysError
from recsys.ranking import runs
from recsys.ranking.engines import MIN_PROBE_S, RAY_CONNECT_TIMEOUT_S, check_ray_reachable, threads_per_worker
from recsys.ranking.lock import read_lock
from recsys.ranking.nightly import run_nightly
from recsys.store import schema as s
from tests.ranking.stored import run_rows
from recsys.threads import default_threads
from tests.signals import swallowed_sigterm
from tests.sockets import needs_linux, port_that_never_answers


def _run(engine, world, **kw):
    return run_nightly(engine, **{"model_dir": world.model_dir, "index_dir": world.index_dir, "shard_size": 9, "k": 10,
                                  "num_candidates": 40, "keep_runs": 5, **kw})


def _assert_same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert len(a) > 0
    pd.testing.assert_frame_equal(a[[USER_ID, RANK, NEWS_ID]], b[[USER_ID, RANK, NEWS_ID]])
    pd.testing.assert_series_equal(a[SCORE], b[SCORE], check_exact=False, rtol=1e-5)


def test_threads_per_worker_never_oversubscribes():
    for workers in (1, 2, 3, 64):
        assert threads_per_worker(workers) >= 1
        assert workers * threads_per_worker(workers) <= max(default_threads(), workers)


def test_threads_per_worker_shares_an_explicit_budget_rounding_down():
    assert threads_per_worker(2, 8) == 4
    assert threads_per_worker(3, 8) == 2  # 3 x 3 would be 9 threads on 8
    assert threads_per_worker(4, 2) == 1  # more workers than threads: one each
    assert threads_per_worker(1, 5) == 5


@pytest.mark.slow
@pytest.mark.parametrize("affinity", [False, True], ids=["plain", "category-affinity"])
def test_local_worker_processes_equal_in_process(world_store, world, affinity, affinity_model_dir):
    model = {"model_dir": affinity_model_dir} if affinity else {}
    here = _run(world_store, world, num_workers=0, **model)
    pooled = _run(world_store, world, num_workers=2, **model)
    assert pooled["counts"]["recommendations"] == here["counts"]["recommendations"]
    _assert_same(run_rows(world_store, pooled["run_id"]), run_rows(world_store, here["run_id"]))


@pytest.mark.slow
@pytest.mark.ray
def test_ray_engine_equals_local(world_store, world, affinity_model_dir):
    # With the category affinity, what recsys train fits by default: its key codes travel to the
    # actors and each reads its shard's skips.
    local = _run(world_store, world, num_workers=0, model_dir=affinity_model_dir)
    on_ray = _run(world_store, world, engine_name="ray", num_workers=2, model_dir=affinity_model_dir)
    assert on_ray["engine"] == "ray" and on_ray["status"] == "complete"
    assert on_ray["counts"]["shards"] == local["counts"]["shards"]
    assert on_ray["counts"]["candidates_scored"] == local["counts"]["candidates_scored"]
    _assert_same(run_rows(world_store, on_ray["run_id"]), run_rows(world_store, local["run_id"]))


def _port_nobody_listens_on() -> int:
    # Free on every interface: Ray connects to this node's IP when given 127.0.0.1.
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def http2_server():
    """A port whose server answers every connection as an HTTP/2 (gRPC) server does: its
    SETTINGS frame (RFC 9113, 3.4) once the client's preface arrives."""
    import threading

    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with conn, contextlib.suppress(OSError):
                conn.recv(64)
                conn.sendall(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def _unreachable(address: str) -> str:
    return rf"cannot reach the Ray cluster at {re.escape(address)} \(--ray-address, config key nightly\.ray_address\): "


def test_ray_engine_fails_fast_where_no_cluster_listens(world_store, world):
    # ray.init waited over 13 minutes there, the nightly lock held; the run must fail at once,
    # as on any other error: run failed, lock released.
    address = f"127.0.0.1:{_port_nobody_listens_on()}"
    started = time.monotonic()
    with pytest.raises(RecsysError, match=_unreachable(address) + r"connecting to .*:\d+: connection refused"):
        _run(world_store, world, engine_name="ray", num_workers=1, ray_address=address)
    assert time.monotonic() - started < RAY_CONNECT_TIMEOUT_S
    with world_store.connect() as conn:
        (run_id,) = conn.execute(select(s.runs.c.run_id)).scalars().all()
    run = runs.get_run(world_store, run_id)
    assert run.status == "failed" and address in run.message
    assert read_lock(world_store) is None


def test_ray_addresses_are_checked_as_ray_init_reads_them(monkeypatch):
    port = _port_nobody_listens_on()
    # Ray Client: host and port as given, refused at once instead of Ray Client's 30 s.
    with pytest.raises(RecsysError, match=_unreachable(f"ray://127.0.0.1:{port}") + f"connecting to 127.0.0.1:{port}: "):
        check_ray_reachable(f"ray://127.0.0.1:{port}")
    # "auto" is RAY_ADDRESS when set (as in ray.init); the error names what the user gave.
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(RecsysError, match=_unreachable("auto") + r"connecting to .*: connection refused"):
        check_ray_reachable("auto")
    monkeypatch.delenv("RAY_ADDRESS")
    # Nothing to check beforehand: a new local instance, a client plugin, no port.
    for address in ("local", "anyscale://prod", "ray://head"):
        check_ray_reachable(address)
    # Through an HTTP proxy (Ray's opt-in) a direct connection proves nothing either way.
    monkeypatch.setenv("RAY_grpc_enable_http_proxy", "1")
    check_ray_reachable(f"127.0.0.1:{port}")


@needs_linux
def test_ray_address_that_never_answers_fails_within_the_timeout():
    with port_that_never_answers() as port:  # as a firewall or a powered-off head
        started = time.monotonic()
        with pytest.raises(RecsysError, match=_unreachable(f"ray://127.0.0.1:{port}") + "connecting to .*: no answer within 0.5 s"):
            check_ray_reachable(f"ray://127.0.0.1:{port}", timeout=0.5)
        assert time.monotonic() - started < 2


def test_a_ray_address_where_something_else_listens_is_refused_at_once(monkeypatch):
    # A wrong port that accepts connections (the dashboard's 8265, a database) passed the TCP
    # check, and ray.init then waited over 13 minutes there, the nightly lock held.
    import threading

    with http2_server() as port:  # as Ray's GCS and Ray Client answer (checked by hand on both)
        check_ray_reachable(f"127.0.0.1:{port}")
        check_ray_reachable(f"ray://127.0.0.1:{port}")

    with socket.socket() as http, socket.socket() as silent:
        for listener in (http, silent):
            listener.bind(("0.0.0.0", 0))
            listener.listen()

        def answer_as_http() -> None:
            conn, _ = http.accept()
            with conn, contextlib.suppress(OSError):
                conn.recv(100)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        threading.Thread(target=answer_as_http, daemon=True).start()
        address = f"127.0.0.1:{http.getsockname()[1]}"
        with pytest.raises(RecsysError, match=_unreachable(address) + r".* accepts connections but answered b'HTTP/1.1 ', "
                                                                     r"not as a gRPC server, so it is not a Ray cluster's GCS"):
            check_ray_reachable(address)
        address = f"127.0.0.1:{silent.getsockname()[1]}"  # accepted by the kernel, never answered
        started = time.monotonic()
        with pytest.raises(RecsysError, match=_unreachable(address) + ".* did not answer as a gRPC server in time"):
            check_ray_reachable(address, timeout=0.5)
        # However short the timeout, a server that accepted gets MIN_PROBE_S to answer, no more.
        assert MIN_PROBE_S <= time.monotonic() - started < MIN_PROBE_S + 1
        # Over TLS the server waits for a handshake first: only the connection is checked.
        monkeypatch.setenv("RAY_USE_TLS", "1")
        check_ray_reachable(address, timeout=0.5)


@pytest.mark.parametrize("answer, named", [
    (b"\x15\x03\x03\x00\x02\x02\x46", "answered with TLS"),  # a TLS alert: the cluster uses RAY_USE_TLS
    (b"\x00" * 9, r"did not answer as a gRPC server in time \(it sent b'(\\x00){2,3}'\)"),  # a byte at a time
])
def test_a_ray_address_that_answers_otherwise_is_named_within_the_probe_time(answer, named):
    import threading

    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen()

        def drip() -> None:  # one byte every 0.7 s: each read alone would wait less than the limit
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError):  # the check hangs up when its time is over
                conn.recv(64)
                for byte in answer:
                    conn.sendall(bytes([byte]))
                    time.sleep(0.7 if answer.startswith(b"\x00") else 0)
                time.sleep(3)

        threading.Thread(target=drip, daemon=True).start()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(RecsysError, match=_unreachable(address) + ".* " + named):
            check_ray_reachable(address, timeout=0.5)
        assert time.monotonic() - started < MIN_PROBE_S + 1


def test_ray_init_that_cannot_connect_is_a_recsys_error(store, world, monkeypatch):
    # Something accepts connections there but ray.init still gives up ("auto" finding no
    # cluster, a wrong port): a RecsysError naming the option too, not a traceback.
    import ray

    from recsys.ranking.engines import run_ray

    def cannot_connect(**kwargs):
        raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", cannot_connect)
    with http2_server() as port:  # answers the address check
        address = f"127.0.0.1:{port}"
        with pytest.raises(RecsysError, match=_unreachable(address) + "Failed to connect to Ray cluster"):
            run_ray(_setup(store, world), [(0, ["U000"])], num_workers=1, ray_address=address)


def test_a_local_ray_instance_gets_the_actors_cpus_not_every_core(store, world, monkeypatch):
    # It was started with every core whatever `[runtime] threads` said, and ran Ray's own
    # tasks beside the actors on cores the budget had left free.
    import ray

    from recsys.ranking.engines import run_ray

    asked = {}

    def record(**kwargs):
        asked.update(kwargs)
        raise ConnectionError("stop here")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", record)
    monkeypatch.setattr("recsys.ranking.engines.default_threads", lambda: 64)
    with pytest.raises(RecsysError, match="stop here"):
        run_ray(_setup(store, world, num_threads=3), [(0, ["U000"]), (1, ["U001"])], num_workers=2)
    assert asked["num_cpus"] == 6 and asked["address"] == "local"
    # One shard: one actor (an idle one loaded TensorFlow, the model and the index for nothing).
    with pytest.raises(RecsysError, match="stop here"):
        run_ray(_setup(store, world, num_threads=3), [(0, ["U000"])], num_workers=2)
    assert asked["num_cpus"] == 3


def test_a_local_ray_instance_is_started_whatever_ray_address_says(store, world, monkeypatch, caplog):
    # With RAY_ADDRESS set, ray.init(address=None) joined that cluster and refused num_cpus:
    # "ValueError: When connecting to an existing cluster, num_cpus and num_gpus must not be
    # provided", exit 2 after the night's ingest. "local" makes ray.init ignore the variable.
    import ray

    from recsys.ranking.engines import run_ray

    asked = {}

    def record(**kwargs):
        asked.update(kwargs)
        raise ConnectionError("stop here")

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6390")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", record)
    with caplog.at_level("WARNING", logger="recsys.ranking.engines"), pytest.raises(RecsysError, match="stop here"):
        run_ray(_setup(store, world, num_threads=1), [(0, ["U000"])], num_workers=1)
    assert asked["address"] == "local" and asked["num_cpus"] == 1
    # Inside `ray job submit` the variable names the cluster: not left silently.
    assert "RAY_ADDRESS=127.0.0.1:6390 is not used: nightly.ray_address is empty" in caplog.text
    assert "--ray-address auto" in caplog.text


@pytest.mark.ray
def test_a_real_local_ray_instance_starts_with_ray_address_set(monkeypatch):
    import ray

    from recsys.ranking.engines import _init_ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6390")  # nothing listens there
    _init_ray(None, num_cpus=1)
    try:
        assert ray.cluster_resources().get("CPU") == 1
    finally:
        ray.shutdown()


class _Terminated(KeyboardInterrupt):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated


@pytest.mark.ray
def test_ray_keeps_the_jobs_sigterm_handler():
    # ray.init replaced the CLI's handler with sys.exit(15): a terminated nightly exited 15
    # without its message, and once ranked on to the end (bench_interrupt.py --engines ray).
    import ray

    from recsys.ranking.engines import _init_ray

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _init_ray(None)
        try:
            assert signal.getsignal(signal.SIGTERM) is _raise_terminated
        finally:
            ray.shutdown()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_during_ray_init_reaches_the_jobs_handler(monkeypatch):
    import ray

    from recsys.ranking.engines import _init_ray

    def init_as_ray_does(**kwargs):  # its own handler first, then seconds of start-up
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        pytest.fail("the SIGTERM handler did not run")

    monkeypatch.setattr(ray, "init", init_as_ray_does)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with pytest.raises(_Terminated):
            _init_ray(None)
        assert signal.getsignal(signal.SIGTERM) is _raise_terminated
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_that_a_library_swallowed_still_stops_the_ranking(world_store, world):
    # bench_interrupt.py: a terminated nightly on the ray engine ranked the whole night.
    from recsys.interrupts import Terminated, sigterm_unwinds
    from recsys.ranking.engines import run_ray

    with sigterm_unwinds():
        swallowed_sigterm()
        with pytest.raises(Terminated):
            _run(world_store, world, num_workers=0)
        with pytest.raises(Terminated):  # before starting a Ray instance
            run_ray(_setup(world_store, world), [(0, ["U000"])], num_workers=1)
    r = s.runs.c
    with world_store.connect() as conn:
        run_id, status = conn.execute(select(r.run_id, r.status).order_by(r.run_id.desc()).limit(1)).one()
    written = len(runs.finished_shards(world_store, run_id))
    shards = _run(world_store, world, num_workers=0)["counts"]["shards"]
    # Stopped after its first shard (written whole), and resumable: the retry resumed it.
    assert status == "running" and written == 1 and shards > 1
    assert runs.get_run(world_store, run_id).status == "complete"


def _setup(store, world, **overrides):
    from datetime import datetime

    import numpy as np

    from recsys.ranking.engines import WorkerSetup

    fields = dict(
        db_url=store.url.render_as_string(hide_password=False), run_id=1, model_dir=str(world.model_dir),
        index_dir=str(world.index_dir), k=10, num_candidates=40, published_after=None,
        side=np.zeros((len(world.news_ids), 3), np.float32), popular=np.arange(5), catalogue_fingerprint="0" * 16,
        num_threads=1, created_at=datetime(2019, 11, 15),
    )
    fields.update(overrides)
    return WorkerSetup(**fields)


def test_worker_refuses_an_index_that_changed(store, world):
    from recsys.errors import ModelMismatchError
    from recsys.ranking.engines import run_local

    with pytest.raises(ModelMismatchError, match="its articles changed since the run started"):
        run_local(_setup(store, world), [(0, ["U000"])], num_workers=0)


@pytest.mark.slow
def test_worker_process_setup_error_reaches_the_driver(store, world):
    from recsys.errors import ModelMismatchError
    from recsys.ranking.engines import run_local

    # A failing pool initializer would make the pool respawn workers for ever: the error must
    # come back with the first shard instead.
    with pytest.raises(ModelMismatchError, match="its articles changed since the run started"):
        run_local(_setup(store, world), [(0, ["U000"]), (1, ["U001"])], num_workers=1)


def _starting_slowly() -> None:  # a worker still loading TensorFlow and the model
    time.sleep(60)


def _shard(x: int) -> int:
    return x


def test_an_interrupt_stops_the_local_workers_instead_of_waiting_for_their_shards():
    # SIGTERM to the job's process alone waited 30 s for workers still starting up.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from recsys.ranking.engines import stopping_on_interrupt

    executor = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"), initializer=_starting_slowly)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with stopping_on_interrupt(executor):
            executor.submit(_shard, 1)
            time.sleep(1.0)  # the workers are up and in their initializer
            processes = list(executor._processes.values())
            raise KeyboardInterrupt
    assert time.monotonic() - started < 20
    assert processes and not any(p.is_alive() for p in processes)


def test_an_error_lets_the_local_workers_finish_their_shards():
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from recsys.ranking.engines import stopping_on_interrupt

    executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    with pytest.raises(ValueError):
        with stopping_on_interrupt(executor):
            future = executor.submit(_shard, 7)
            deadline = time.monotonic() + 30
            while not future.running() and not future.done() and time.monotonic() < deadline:
                time.sleep(0.01)  # handed to the worker: what shutdown(cancel_futures=True) cannot cancel
            raise ValueError("one shard failed")
    assert future.result(timeout=0) == 7  # shut down with wait: the shard in flight was finished


@pytest.mark.parametrize("error", [
    OSError("validate_socket_filename failed: AF_UNIX path length cannot exceed 107 bytes: /tmp/x/ray/session/sockets/plasma_store"),
    FileExistsError(17, "File exists", "/tmp/ray"),
])
def test_ray_that_cannot_start_for_its_temp_folder_is_a_recsys_error(monkeypatch, error):
    # A TMPDIR too long for Ray's AF_UNIX socket path, or $TMPDIR/ray a file, was "internal
    # error" (exit 2) after the night's ingest: the environment's cause, named, exit 1.
    import ray

    from recsys.ranking.engines import _init_ray

    def cannot_start(**kwargs):
        raise error

    monkeypatch.setenv("RAY_TMPDIR", "/some/temp")
    monkeypatch.setattr(ray, "init", cannot_start)
    with pytest.raises(RecsysError, match=r"cannot start Ray: .*\(/some/temp/ray, from RAY_TMPDIR or TMPDIR\)") as caught:
        _init_ray(None, num_cpus=1)
    assert str(error) in str(caught.value)
