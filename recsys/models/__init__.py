"""recsys.models"""

# Heads of the user encoder's self-attention; the item embedding dimension must be a multiple.
# Here rather than in user_encoder.py so that the config's check reads it without loading Keras.
NUM_HEADS = 4

# How the item tower fuses its inputs (models/fusion.py); here so the config checks it without Keras.
FUSION_MODES = ("concat", "weighted_sum", "gated")

# The item tower's inputs an ablation may keep, in canonical order; here for the same reason.
MODALITIES = ("text", "image")


def parse_modalities(modalities: str) -> tuple[str, ...]:
    """``"image, text"`` -> ``("text", "image")``: the modalities named, in canonical order.

    Raises:
        ValueError: an unknown, empty or repeated modality, or none at all.
    """
    parts = [p.strip() for p in str(modalities).split(",")]
    if not set(parts) <= set(MODALITIES) or len(set(parts)) != len(parts):
        raise ValueError(f"modalities is {modalities!r}, expected 'text', 'image' or 'text,image'")
    return tuple(m for m in MODALITIES if m in parts)
