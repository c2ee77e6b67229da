"""Thread counts follow what the process may really use: affinity and the container's CPU quota."""

from __future__ import annotations

import builtins
import io
import json
import os
import subprocess
import sys

import pytest

from recsys.errors import ConfigError
from recsys.ranking.engines import threads_per_worker
from recsys.threads import default_threads, onnx_session_options

CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "<quota> <period>" in microseconds, or "max <period>"


@pytest.fixture
def cgroup_quota(monkeypatch):
    """Make the cgroup v2 file say ``text``, as a container runtime would."""

    def install(text: str) -> None:
        real_exists, real_open = os.path.exists, builtins.open
        monkeypatch.setattr(os.path, "exists", lambda p: True if str(p) == CPU_MAX else real_exists(p))
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: io.StringIO(text) if str(p) == CPU_MAX else real_open(p, *a, **k))

    monkeypatch.delenv("LOKY_MAX_CPU_COUNT", raising=False)
    return install


def test_default_is_the_affinity_without_a_quota(cgroup_quota):
    cgroup_quota("max 100000\n")
    assert default_threads() == min(len(os.sched_getaffinity(0)), os.cpu_count())


def test_a_cpu_quota_below_the_cores_caps_every_pool(cgroup_quota):
    # Half a CPU of quota (a pod with `cpu: 500m`): one thread, whatever the node has.
    cgroup_quota("50000 100000\n")
    assert default_threads() == 1
    assert threads_per_worker(2) == 1
    assert threads_per_worker(2, 6) == 3  # an explicit budget ([runtime] threads) wins
    assert onnx_session_options().intra_op_num_threads == 1


def test_a_quota_above_the_cores_does_not_raise_the_count(cgroup_quota):
    cgroup_quota(f"{(len(os.sched_getaffinity(0)) + 3) * 100000} 100000\n")
    assert default_threads() == len(os.sched_getaffinity(0))


def test_loky_max_cpu_count_is_honoured(monkeypatch):
    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "1")
    assert default_threads() == 1


@pytest.mark.parametrize("value", ["abc", "1.5", "", "0", "-2"])
def test_a_loky_max_cpu_count_that_is_not_a_count_is_named(monkeypatch, value):
    # joblib's int() made "abc" and "1.5" an internal error (exit 2); 0 silently meant one core.
    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", value)
    with pytest.raises(ConfigError, match=rf"^environment variable LOKY_MAX_CPU_COUNT is {value!r}, expected a whole "
                                          "number of cores, 1 or more"):
        default_threads()


PROBE = """
import os
from recsys.threads import configure_threads
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

configure_threads(3)
tokenizer = Tokenizer(WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
tokenizer.pre_tokenizer = Whitespace()
before = len(os.listdir("/proc/self/task"))
tokenizer.encode_batch(["a b a"] * 1000)
print(len(os.listdir("/proc/self/task")) - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_the_tokenizer_pool_gets_the_configured_thread_count():
    # Three is more than this machine's cores, so the default pool would be smaller.
    env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True, timeout=300)
    assert out.stdout.split()[-1] == "3"


BLAS_PROBE = """
import json
import numpy as np  # sizes its OpenBLAS pool now, to the affinity
import scipy.linalg  # its own OpenBLAS
from threadpoolctl import threadpool_info
from recsys.threads import configure_threads

configure_threads(1, tensorflow=False)
import faiss  # noqa: F401
print(json.dumps(sorted({(p["internal_api"], p["num_threads"]) for p in threadpool_info()})))
"""


@pytest.mark.slow
def test_every_blas_and_openmp_pool_loaded_gets_the_configured_count():
    # numpy's OpenBLAS kept every core at `threads = 1`: train, predict and evaluate ran at up
    # to 190% of a core in its eigendecompositions and matrix products.
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", BLAS_PROBE], capture_output=True, text=True, env=env, check=True, timeout=300)
    pools = json.loads(out.stdout.split("\n")[-2])
    assert any(api == "openblas" for api, _ in pools)
    assert [count for _, count in pools] == [1] * len(pools), pools


def test_the_openmp_count_is_set_on_the_calling_thread():
    import threading

    import faiss

    from recsys.threads import limit_this_thread

    before = faiss.omp_get_max_threads()
    seen = []

    def work():
        limit_this_thread(before + 2)
        seen.append(faiss.omp_get_max_threads())

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=None):  # puts back the process-wide (BLAS) pools it also sets
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    assert seen == [before + 2] and faiss.omp_get_max_threads() == before  # the other thread's own
