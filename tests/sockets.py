"""A TCP port that never answers, for timeout tests."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux drops connections to a full accept queue")


@contextmanager
def port_that_never_answers() -> Iterator[int]:
    """A listening port (on every interface) whose accept queue is full: the kernel drops new
    connections unanswered, as a firewall or a powered-off host does."""
    with socket.socket() as server, socket.socket() as queued:
        server.bind(("0.0.0.0", 0))
        server.listen(0)
        port = server.getsockname()[1]
        queued.connect(("127.0.0.1", port))
        yield port
