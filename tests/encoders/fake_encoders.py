"""Stand-ins for the encoders: deterministic, fast, and counting what they were asked to do."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from recsys.encoders.item_features import EncoderInfo


def _vector(seed_text: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeTextEncoder:
    """Deterministic vectors from the text; records every text it was asked to encode."""

    def __init__(self, name: str = "fake-text", dim: int = 8, fail_on_call: int | None = None):
        self.info = EncoderInfo(name, "1", dim)
        self.calls: list[list[str]] = []
        self.fail_on_call = fail_on_call

    @property
    def num_encoded(self) -> int:
        return sum(len(c) for c in self.calls)

    def encode(self, texts, batch_size: int = 64) -> np.ndarray:
        self.calls.append(list(texts))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("simulated crash")
        return np.stack([_vector(t, self.info.dim) for t in texts]) if texts else np.zeros((0, self.info.dim), np.float32)


class FakeImageEncoder:
    """Vectors from the file's bytes; a file holding b"bad" fails to decode."""

    def __init__(self, name: str = "fake-image", dim: int = 4):
        self.info = EncoderInfo(name, "1", dim)
        self.calls: list[list] = []

    @property
    def paths_seen(self) -> list:
        return [p for call in self.calls for p in call]

    def encode(self, paths, batch_size: int = 32):
        self.calls.append(list(paths))
        features = np.zeros((len(paths), self.info.dim), np.float32)
        ok = np.zeros(len(paths), bool)
        for i, path in enumerate(paths):
            if path is None or not os.path.isfile(path):  # as the real encoder, never opens a named pipe
                continue
            data = Path(path).read_bytes()
            if data == b"bad":
                continue
            features[i] = np.abs(_vector(data.decode(), self.info.dim)) * 3
            ok[i] = True
        return features, ok
