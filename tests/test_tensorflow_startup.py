"""TensorFlow's start-up chatter stays out of stderr; everything else written there gets through."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from recsys import tensorflow_startup

# As TensorFlow 2.21 writes them on a machine without a GPU.
CHATTER = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1796637744.226342   21476 port.cc:153] oneDNN custom operations are on. You may see slightly "
    b"different numerical results due to floating-point round-off errors from different computation orders.\n"
    b"I0000 00:00:1796637744.227383   21476 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    b"not be used.\n"
    b"E0000 00:00:1796637748.225797   21476 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    b"call to cuInit: UNKNOWN ERROR (303)\n"
    b"To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    b"appropriate compiler flags.\n"
)


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the CLI sets it; a library user may not
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_importing_tensorflow_after_recsys_writes_nothing_to_stderr():
    # A night wrote 9-23 such lines, one of them "E0000 ... failed call to cuInit", to cron's mail.
    done = _python("import recsys, keras, tensorflow as tf; tf.constant(1.0) + 1; print('ok')")
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")


def test_thread_counts_can_still_be_set_after_the_quiet_import():
    # The import also lists the devices; that must not start the runtime, which would freeze its thread counts.
    done = _python(
        "import recsys, tensorflow as tf\n"
        "from recsys.threads import configure_threads\n"
        "configure_threads(1)\n"
        "tf.constant(1.0) + 1\n"
        "print(tf.config.threading.get_intra_op_parallelism_threads(), tf.config.threading.get_inter_op_parallelism_threads())\n"
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "1 1\n", "")


def test_the_chatter_goes_to_the_debug_log_and_everything_else_to_stderr(capfd, caplog):
    other = b"2026-12-07T10:05:39.238Z INFO recsys: another thread's line\nE0000 00:00:1.5 77 session.cc:9] a real failure\n"
    with caplog.at_level(logging.DEBUG, logger="recsys.tensorflow"):
        with tensorflow_startup.stderr_captured():
            chatter, others = CHATTER.splitlines(keepends=True), other.splitlines(keepends=True)
            for line in (chatter[0], others[0], *chatter[1:], others[1]):  # as two threads would write them
                os.write(2, line)
            print("a Python write", file=sys.stderr)
    err = capfd.readouterr().err
    # Under pytest sys.stderr is not fd 2, so its line may come first.
    assert sorted(err.splitlines()) == sorted((other + b"a Python write\n").decode().splitlines())
    logged = [r.getMessage() for r in caplog.records if r.name == "recsys.tensorflow"]
    assert logged == [line.decode() for line in CHATTER.splitlines()]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "recsys.tensorflow")


def test_without_a_stderr_the_block_just_runs():
    # cron's `2>&-`: no descriptor 2 to save.
    done = subprocess.run(
        [sys.executable, "-c", "from recsys import tensorflow_startup as t\n"
         "with t.stderr_captured():\n    print('ran')"],
        capture_output=False, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=60,
        preexec_fn=lambda: os.close(2),
    )
    assert (done.returncode, done.stdout) == (0, "ran\n")
