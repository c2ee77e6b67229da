"""The longest token sequence a text model takes.

A BERT-style model adds a learned position embedding to each token: a text longer than its
table of positions fails inside onnxruntime (a broadcast error, exit 2), only when an article
that long comes along, possibly after a night's ingest. The text encoder cuts texts there
whatever ``encoders.text_max_length`` says.
"""

from __future__ import annotations

import json
from pathlib import Path

# Positions of the bundled all-MiniLM-L6-v2 (its Hugging Face config.json's
# max_position_embeddings; 513 tokens fail in onnxruntime, checked in tests/encoders).
BUNDLED_TEXT_MAX_POSITIONS = 512
# Model types that, like RoBERTa, number positions from the padding id + 1 (Hugging Face's
# create_position_ids_from_input_ids): their tables hold pad_token_id + 1 positions that no token uses.
_PADDING_OFFSET_MODELS = frozenset({"camembert", "mpnet", "longformer", "luke", "data2vec-text", "ibert", "markuplm"})
# Position kinds whose table bounds the input: learned absolute positions, and BERT's relative
# distances (an embedding of 2 * max_position_embeddings - 1 distances). Rotary, ALiBi and
# DeBERTa's bucketed relative positions take longer inputs whatever max_position_embeddings says.
_BOUNDED_POSITION_KINDS = frozenset({"absolute", "relative_key", "relative_key_query"})


def text_model_max_positions(model_path: str | Path | None) -> tuple[int, str] | None:
    """The most tokens the text model takes, and where that figure comes from.

    Args:
        model_path: an ONNX text model file; None or empty means the bundled model.

    Returns:
        ``(positions, source)``: ``BUNDLED_TEXT_MAX_POSITIONS`` for the bundled model; for
        another model, ``max_position_embeddings`` of a Hugging Face ``config.json`` beside
        it (``pad_token_id + 1`` fewer for RoBERTa-style models, whose first positions stand
        for padding). None when no such file says, or when its positions do not bound the
        input (DeBERTa's ``position_biased_input = false``, rotary or ALiBi positions): the
        model is then run as configured.
    """
    if not model_path:
        return BUNDLED_TEXT_MAX_POSITIONS, "the bundled all-MiniLM-L6-v2's positions"
    config = Path(model_path).parent / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not the model's to have; a broken one is not ours to judge either
    positions = data.get("max_position_embeddings") if isinstance(data, dict) else None
    if not isinstance(positions, int) or isinstance(positions, bool) or positions < 2:
        return None
    kind = data.get("position_embedding_type", "absolute")
    if data.get("position_biased_input") is False or str(kind).lower() not in _BOUNDED_POSITION_KINDS:
        return None
    model_type = str(data.get("model_type", "")).lower()
    if "roberta" in model_type or model_type in _PADDING_OFFSET_MODELS:
        pad = data.get("pad_token_id")
        positions -= (pad if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0 else 1) + 1
    return positions, f"max_position_embeddings in {config}"
