"""Thread-pool sizes for TensorFlow, onnxruntime, FAISS (OpenMP) and numpy's BLAS.

Each library wants every core by default; on a 2-core machine with worker processes that
oversubscribes badly. Callers decide the count once per process, before heavy work starts.
"""

from __future__ import annotations

import os

from recsys.errors import ConfigError


def default_threads() -> int:
    """Cores this process may use: the fewest of the machine's cores, the CPU affinity and the
    container's CPU quota (cgroup v1 or v2, rounded up), as joblib's ``cpu_count`` reads them.

    The affinity alone is every core of the node in a pod limited to 2 CPUs (a CFS quota), and
    one thread per node core in each worker would then oversubscribe the quota many times.

    Raises:
        ConfigError: ``LOKY_MAX_CPU_COUNT`` is set but not a whole number of 1 or more.
    """
    import joblib

    # joblib reads it with int(): "abc", "1.5" or "" would be an internal error (ValueError,
    # exit 2), and 0 or less silently one core.
    value = os.environ.get("LOKY_MAX_CPU_COUNT")
    if value is not None:
        try:
            valid = int(value) >= 1
        except ValueError:
            valid = False
        if not valid:
            raise ConfigError(f"environment variable LOKY_MAX_CPU_COUNT is {value!r}, expected a whole number of cores, "
                              "1 or more (or unset it for every core available)")
    return max(1, int(joblib.cpu_count()))


def limit_this_thread(num_threads: int) -> None:
    """Apply ``num_threads`` to the OpenMP pools of the calling thread (and, as
    ``configure_threads`` does, to the process-wide BLAS pools).

    OpenMP keeps its thread count per thread: ``configure_threads`` on a worker's set-up thread
    left the thread that runs its work (a Ray actor's method thread) at every core in FAISS
    and in OpenMP builds of BLAS.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(num_threads)
    try:
        import faiss

        faiss.omp_set_num_threads(num_threads)
    except ImportError:
        pass


def configure_threads(num_threads: int | None = None, *, tensorflow: bool = True) -> int:
    """Set TensorFlow, FAISS, OpenMP, BLAS and tokenizer (Rayon) thread counts for this process.

    Args:
        num_threads: threads per library; None means every core available to the process.
        tensorflow: False for a process that never runs TensorFlow (the nightly job's own
            process): setting its threads would import it, about 0.8 GB that stays resident.

    Returns:
        The number of threads set.
    """
    n = num_threads or default_threads()
    os.environ["OMP_NUM_THREADS"] = str(n)
    # The tokenizers library encodes batches on a Rayon pool sized to every core, created at
    # its first use; the variable sizes it, so it must be set before any text is encoded.
    os.environ["RAYON_NUM_THREADS"] = str(n)
    # numpy's and scipy's OpenBLAS pools were sized when numpy was imported (to the CPU
    # affinity, not a container's quota): resize every BLAS and OpenMP pool loaded now, and
    # set the variables for the pools of libraries loaded later and of child processes.
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    limit_this_thread(n)
    if not tensorflow:
        return n
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(1 if n == 1 else 2)
    except RuntimeError:
        # TensorFlow refuses once its runtime is initialised; the first setting stands.
        pass
    return n


def onnx_session_options(num_threads: int | None = None):
    """onnxruntime SessionOptions with an explicit intra-op thread count."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = num_threads or default_threads()
    opts.inter_op_num_threads = 1
    return opts
