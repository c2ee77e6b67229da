"""TensorFlow's start-up chatter stays out of stderr; everything else written there gets through."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest

from recsys import tensorflow_startup

# As TensorFlow 2.21 writes them on a machine without a GPU (absl's format)...
ABSL_CHATTER = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1796637744.226342   21476 port.cc:153] oneDNN custom operations are on. You may see slightly "
    b"different numerical results due to floating-point round-off errors from different computation orders.\n"
    b"I0000 00:00:1796637744.227383   21476 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    b"not be used.\n"
    b"I0000 00:00:1796637744.959795   21476 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    b"available CPU instructions in performance-critical operations.\n"
    b"To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    b"appropriate compiler flags.\n"
)
# ... and as TensorFlow 2.16 writes them (TSL's format).
TSL_CHATTER = (
    b"2024-05-07 19:48:22.210161: I tensorflow/core/util/port.cc:113] oneDNN custom operations are on.\n"
    b"2024-05-07 19:48:22.240519: I external/local_tsl/tsl/cuda/cudart_stub.cc:32] Could not find cuda drivers on "
    b"your machine, GPU will not be used.\n"
    b"2024-05-07 19:48:23.101010: W tensorflow/compiler/tf2tensorrt/utils/py_utils.cc:38] TF-TRT Warning: Could not "
    b"find TensorRT\n"
)
CUINIT = (
    b"E0000 00:00:1796637748.225797   21476 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    b"call to cuInit: UNKNOWN ERROR (303)\n"
    b"2024-05-07 19:48:24.000001: E external/local_xla/xla/stream_executor/cuda/cuda_driver.cc:282] failed call to "
    b"cuInit: CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected\n"
)
OTHER = (
    b"2026-12-07T10:05:39.238Z INFO recsys: another thread's line\n"
    b"E0000 00:00:1796637749.5   77 session.cc:9] a real failure\n"
    b"2024-05-07 19:48:25.000001: E tensorflow/core/framework/op_kernel.cc:1 another real failure\n"
    b"F0000 00:00:1796637750.1   77 port.cc:9] a fatal one\n"
)
LAST = b"a last line without its newline"


def _filter(data: bytes, drop_cuinit: str) -> bytes:
    ready, told = os.pipe()
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", tensorflow_startup.FILTER, drop_cuinit, str(told)],
                              input=data, capture_output=True, timeout=60, pass_fds=(told,))
        os.close(told)
        assert os.read(ready, 10) == b"1"  # it said it started
    finally:
        os.close(ready)
    assert (done.returncode, done.stderr) == (0, b"")
    return done.stdout


def _interleaved(*blocks: bytes) -> bytes:
    """The blocks' lines taken in turn, as threads would write them."""
    groups = itertools.zip_longest(*(block.splitlines(keepends=True) for block in blocks), fillvalue=b"")
    return b"".join(line for group in groups for line in group)


def test_the_filter_drops_the_chatter_of_both_formats_and_passes_everything_else_in_order():
    data = _interleaved(ABSL_CHATTER, OTHER, TSL_CHATTER, CUINIT) + LAST
    assert _filter(data, "1") == OTHER + LAST
    # Where a CUDA driver is installed, a failed cuInit is a real problem: it gets through.
    assert _filter(data, "0") == _interleaved(OTHER, CUINIT) + LAST


def test_the_block_goes_through_the_filter(capfd):
    with tensorflow_startup.stderr_filtered(drop_cuinit=True):
        for line in _interleaved(ABSL_CHATTER, OTHER, CUINIT).splitlines(keepends=True):
            os.write(2, line)
    assert capfd.readouterr().err == OTHER.decode()


def _python(code: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}  # as `recsys` sets it
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300, **kwargs)


def test_a_crash_in_the_block_still_says_its_last_words():
    # A TensorFlow that aborts in its import (a CPU without the instructions it was built for)
    # wrote why before it died; the filter outlives it and passes that on.
    done = _python("""
        import os
        from recsys import tensorflow_startup
        with tensorflow_startup.stderr_filtered(drop_cuinit=True):
            os.write(2, b"I0000 00:00:1.5   7 port.cc:1] chatter\\nF0000 00:00:1.6   7 cpu_feature_guard.cc:1] no AVX\\n")
            os.abort()
    """)
    assert done.returncode == -6
    assert done.stderr == "F0000 00:00:1.6   7 cpu_feature_guard.cc:1] no AVX\n"


def test_importing_tensorflow_after_recsys_writes_nothing_to_stderr():
    # Not marked slow (5 s): `make test-lowest` runs it on TensorFlow 2.16, whose lines read otherwise.
    # A night wrote 9-23 such lines, one of them "E0000 ... failed call to cuInit", to cron's mail.
    done = _python("import recsys, keras, tensorflow as tf; tf.constant(1.0) + 1; print('ok')")
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")


@pytest.mark.slow
def test_thread_counts_can_still_be_set_after_the_quiet_import():
    # Without a CUDA driver the import also lists the devices; that must not start the runtime,
    # which would freeze its thread counts.
    done = _python("""
        import importlib.util, recsys
        importlib.util.find_spec("tensorflow")  # a look before the import left it unfiltered
        import tensorflow as tf
        from recsys.threads import configure_threads
        configure_threads(1)
        tf.constant(1.0) + 1
        print(tf.config.threading.get_intra_op_parallelism_threads(), tf.config.threading.get_inter_op_parallelism_threads())
    """)
    assert (done.returncode, done.stdout, done.stderr) == (0, "1 1\n", "")


def test_without_a_stderr_the_block_just_runs():
    # cron's `2>&-`: no descriptor 2 to save.
    done = subprocess.run(
        [sys.executable, "-c", "from recsys import tensorflow_startup as t\n"
         "with t.stderr_filtered(drop_cuinit=True):\n    print('ran')"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=60, preexec_fn=lambda: os.close(2),
    )
    assert (done.returncode, done.stdout) == (0, "ran\n")


def test_a_signal_to_the_jobs_process_group_leaves_the_filter_to_pass_on_its_last_words():
    # A scheduler stops a job by its process group: the filter, in a session of its own, outlives it.
    done = _python("""
        import os, signal
        from recsys import tensorflow_startup
        with tensorflow_startup.stderr_filtered(drop_cuinit=True):
            os.write(2, b"I0000 00:00:1.5   7 port.cc:1] chatter\\nstopped while importing\\n")
            os.killpg(0, signal.SIGTERM)
    """, start_new_session=True)
    assert (done.returncode, done.stderr) == (-15, "stopped while importing\n")


def test_a_filter_that_does_not_start_leaves_stderr_unfiltered():
    # sys.executable that is no Python (an embedded interpreter): every line still gets through.
    done = _python("""
        import os, sys
        from recsys import tensorflow_startup
        sys.executable = "/bin/false"
        with tensorflow_startup.stderr_filtered(drop_cuinit=True):
            os.write(2, b"I0000 00:00:1.5   7 port.cc:1] chatter\\nreal\\n")
        os.write(2, b"after\\n")
    """)
    assert (done.returncode, done.stderr) == (0, "I0000 00:00:1.5   7 port.cc:1] chatter\nreal\nafter\n")


def test_a_child_that_outlives_the_block_does_not_hold_it_up():
    done = _python("""
        import os, subprocess, time, warnings
        warnings.simplefilter("error")
        from recsys import tensorflow_startup
        started = time.monotonic()
        with tensorflow_startup.stderr_filtered(drop_cuinit=True):
            child = subprocess.Popen(["sleep", "6"])
            os.write(2, b"I0000 00:00:1.5   7 port.cc:1] chatter\\nfrom the block\\n")
        print(round(time.monotonic() - started) < 5)
        child.kill(); child.wait()
    """)
    assert (done.returncode, done.stdout, done.stderr) == (0, "True\n", "from the block\n")


@pytest.mark.parametrize(("value", "unusable"), [("-1", True), ("", True), (" ", True), ("0", None)])
def test_hidden_gpus_count_as_none(monkeypatch, value, unusable):
    # CPU batch jobs on GPU hosts hide the GPUs: TensorFlow's cuInit then fails as without a driver.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    expected = unusable if unusable is not None else not _driver_loads()
    assert tensorflow_startup.cuda_unusable() is expected


def _driver_loads() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True
