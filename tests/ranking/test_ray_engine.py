"""The Ray engine on a Ray instance of one CPU (started once for the module): a pool that does
not fit the cluster, and workers' errors, end as with the local engine."""

from __future__ import annotations

import shutil
import threading

import pytest

from recsys.errors import DamagedFileError, RecsysError, StoreError
from recsys.ranking import runs
from recsys.ranking.engines import ids_fingerprint, ray_pool_shape, run_local, run_ray
from recsys.ranking.nightly import run_nightly
from tests.ranking.test_engines import _setup

SETTINGS = dict(shard_size=9, k=10, num_candidates=40, keep_runs=5)


def test_ray_pool_shape_caps_each_actor_at_the_largest_node():
    # An actor asking for more CPUs than any node has was never placed: the job hung, lock held.
    assert ray_pool_shape([1.0], num_workers=1, cpus_per_actor=2) == (1, 1)
    assert ray_pool_shape([4.0, 2.0], num_workers=2, cpus_per_actor=8) == (4, 1)
    # Fits: asked as given; more actors than fit: as many as fit start the pool.
    assert ray_pool_shape([8.0, 8.0], num_workers=4, cpus_per_actor=4) == (4, 4)
    assert ray_pool_shape([2.0], num_workers=3, cpus_per_actor=1) == (1, 2)
    # No node with a whole CPU: nothing to cap at (the start's timeout says so).
    assert ray_pool_shape([0.0], num_workers=1, cpus_per_actor=2) == (2, 0)


@pytest.fixture(scope="module")
def one_cpu_ray():
    import ray

    from recsys.ranking.engines import _init_ray
    from tests.ray_lock import ray_tests_lock

    # Under the Ray tests' lock from the start: started beside test_kill's Ray test, its workers
    # were among the processes that test kills.
    with ray_tests_lock():
        _init_ray(None, num_cpus=1)
        try:
            yield
        finally:
            ray.shutdown()


def _in_thread(fn, timeout: float = 240):
    outcome: dict = {}

    def call():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the Ray engine hung"
    return outcome


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the engine, not the store, is under test
def test_actors_asking_more_cpus_than_any_node_has_are_capped(one_cpu_ray, world_store, world, caplog):
    # 4 threads for 2 workers: 2 CPUs per actor on a cluster whose largest node has 1. Ray
    # Data waited for ever ("Cluster resources are not enough"), the nightly lock held.
    with caplog.at_level("WARNING", logger="recsys.ranking.engines"):
        outcome = _in_thread(lambda: run_nightly(world_store, model_dir=world.model_dir, index_dir=world.index_dir,
                                                 engine_name="ray", num_workers=2, num_threads=4, **SETTINGS))
    assert "error" not in outcome, outcome
    assert outcome["value"]["status"] == "complete"
    assert "the largest node of the cluster has 1: each asks for 1" in caplog.text
    assert "the pool starts with the actors that fit and grows as room frees" in caplog.text


def _clean(message: str) -> None:
    assert "\x1b[" not in message and "ray::" not in message and "\n" not in message, message


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the engine, not the store, is under test
def test_a_ray_workers_setup_error_fails_the_run_as_the_local_engine_does(one_cpu_ray, world_store, world, tmp_path):
    # It was the actor's death: retried, then WorkerDiedError "died 3 times (... often for
    # memory ...)" with the run left running, the real cause (here a truncated scorer.keras) lost.
    model_dir = tmp_path / "model"
    shutil.copytree(world.model_dir, model_dir)
    (model_dir / "scorer.keras").write_bytes(b"PK")
    errors = {}
    for name, workers in (("local", 0), ("ray", 1)):
        outcome = _in_thread(lambda: run_nightly(world_store, model_dir=model_dir, index_dir=world.index_dir,
                                                 engine_name=name, num_workers=workers, **SETTINGS))
        errors[name] = outcome.get("error")
    assert isinstance(errors["local"], DamagedFileError), errors
    assert type(errors["ray"]) is type(errors["local"]) and str(errors["ray"]) == str(errors["local"]), errors
    local_run, ray_run = runs.get_run(world_store, 1), runs.get_run(world_store, 2)
    assert local_run.status == ray_run.status == "failed"
    assert ray_run.message == local_run.message
    _clean(ray_run.message)


@pytest.mark.ray
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the engine, not the store, is under test
def test_a_ray_workers_error_keeps_its_type_and_message(one_cpu_ray, world_store, world):
    # Ray wrapped it in RayTaskError(UserCodeException): "internal error" (exit 2) with Ray's
    # remote traceback and colour codes, stored as the run's message; the local engine gives
    # the StoreError itself (exit 1, one line).
    from recsys.index.faiss_index import FaissIndex

    setup = _setup(world_store, world, run_id=999, catalogue_fingerprint=ids_fingerprint(FaissIndex.load(world.index_dir).news_ids))
    shards = [(0, ["U000", "U001"])]
    with pytest.raises(StoreError) as local:
        run_local(setup, shards, num_workers=0)
    outcome = _in_thread(lambda: run_ray(setup, shards, num_workers=1))
    assert type(outcome.get("error")) is StoreError, outcome
    assert str(outcome["error"]) == str(local.value) == "run 999 is missing, not running: shard 0 not written"
    _clean(str(outcome["error"]))


def test_a_ray_workers_error_ray_did_not_keep_is_one_line():
    # An exception that cannot be pickled back (or an older Ray's UserCodeException): an
    # internal error still, but one line, not Ray's remote traceback.
    import ray

    from recsys.ranking.engines import RayWorkerError, _ray_error, _ray_error_line

    wrapped = ray.exceptions.RayTaskError(
        "MapWorker.submit", "Traceback ...\n\x1b[36mray::MapWorker\x1b[39m\nrecsys.errors.StoreError: run 1 is failed\nFailed to apply UDF transform after 1/1 attempts (total backoff 0.0s).\nTo change retry attempts, ... if you believe this to be transient.",
        ray.exceptions.UserCodeException("UDF failed to process a data block."),
    )
    assert _ray_error(wrapped) is None
    assert _ray_error_line(wrapped) == "recsys.errors.StoreError: run 1 is failed"
    assert issubclass(RayWorkerError, RuntimeError) and not issubclass(RayWorkerError, RecsysError)


def test_ray_s_retry_note_comes_off_every_argument_of_a_workers_error():
    # Ray Data appends its note to args[0]; only args[-1] was cleaned.
    from recsys.ranking.engines import _without_ray_note

    note = "\nFailed to apply UDF transform after 1/1 attempts (total backoff 0.0s). If you believe this to be transient."
    exc = _without_ray_note(ValueError("first message" + note, 42))
    assert exc.args == ("first message", 42)


def test_a_schema_error_survives_the_trip_back_from_a_worker_process():
    # Its five-argument constructor made the default pickling fail: Ray handed it back as an
    # UnserializableException with its coloured remote traceback (exit 2).
    import pickle

    from recsys.errors import SchemaError

    error = SchemaError("/data/behaviors.tsv", 3, "Time", "yesterday", "a MIND time")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is SchemaError and str(back) == str(error) and (back.line, back.field) == (3, "Time")
