"""The tagger's shape: lattice embeddings, FLAT, optional BERT, CRF constraints."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    char_dim: int = 50
    bigram_dim: int = 50
    word_dim: int = 50
    hidden: int = 160
    layers: int = 1
    heads: int = 8
    head_dim: int = 20
    ff_ratio: int = 3
    position_fusion: str = "four"  # four | two
    attn_scaled: bool = True
    embed_dropout: float = 0.5
    attn_dropout: float = 0.0
    ff_dropout: float = 0.15
    residual_dropout: float = 0.15
    output_dropout: float = 0.3
    bert: str | None = None  # a local Hugging Face directory (nothing is downloaded)
    crf_constraints: bool = True  # forbid O -> I-X and B-X -> I-Y (in the likelihood and at decode)
    projection_head: bool = False  # contrastive loss on an MLP projection of the features, not the features
