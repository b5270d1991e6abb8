"""The tagger's shape: lattice embeddings, FLAT, optional BERT, CRF constraints."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

POSITIVE = {"ge": 1}  # field metadata: the allowed range (checked by nerco_dist.config when a config is read)
DROPOUT = {"ge": 0, "lt": 1}


@dataclass
class ModelConfig:
    char_dim: int = field(default=50, metadata=POSITIVE)
    bigram_dim: int = field(default=50, metadata=POSITIVE)
    word_dim: int = field(default=50, metadata=POSITIVE)
    hidden: int = field(default=160, metadata=POSITIVE)
    layers: int = field(default=1, metadata=POSITIVE)
    heads: int = field(default=8, metadata=POSITIVE)
    head_dim: int = field(default=20, metadata=POSITIVE)
    ff_ratio: int = field(default=3, metadata=POSITIVE)
    position_fusion: str = "four"  # four | two
    attn_scaled: bool = True
    embed_dropout: float = field(default=0.5, metadata=DROPOUT)
    attn_dropout: float = field(default=0.0, metadata=DROPOUT)
    ff_dropout: float = field(default=0.15, metadata=DROPOUT)
    residual_dropout: float = field(default=0.15, metadata=DROPOUT)
    output_dropout: float = field(default=0.3, metadata=DROPOUT)
    word_dropout: float = field(default=0.01, metadata=DROPOUT)  # a token id becomes <unk> (training only)
    bert: str | None = None  # a local Hugging Face directory (nothing is downloaded)
    crf_constraints: bool = True  # forbid O -> I-X and B-X -> I-Y (in the likelihood and at decode)
    projection_head: bool = False  # contrastive loss on an MLP projection of the features, not the features

    @classmethod
    def from_args(cls, args: dict) -> "ModelConfig":
        """The config a checkpoint's ``model_args`` describe; keys this version does not know are left out
        (a dropout or switch added later: the weights fix everything that has a shape)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in args.items() if k in known})
