"""The NER tagger: lattice embeddings (+ optional BERT) -> FLAT -> Linear -> CRF."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .config import ModelConfig
from .crf import bio_allowed_transitions, build_crf
from .embedding import LatticeEmbedding
from .flat import FlatEncoder

KINDS = ("char", "bigram", "word")  # the lattice's token tables


def load_bert(path: str) -> nn.Module:
    """A BERT from a local Hugging Face directory; never downloads."""
    from transformers import AutoModel

    directory = Path(path).expanduser()
    if not directory.is_dir() or not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"BERT model {path!r} is not a local directory with config.json: download it first (for example "
            f"bert-base-chinese with its config.json, weights and vocab.txt) and set model.bert to that directory")
    return AutoModel.from_pretrained(str(directory), local_files_only=True, add_pooling_layer=False)


class NerTagger(nn.Module):
    """``table_sizes``: (trained rows, frozen rows) of the char, bigram and word tables; ``pretrained``:
    their initial (trained, frozen) matrices by kind, where the caller has them (a checkpoint's weights
    replace them anyway)."""

    def __init__(self, cfg: ModelConfig, table_sizes: dict[str, tuple[int, int]], labels: Sequence[str],
                 pretrained: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
        super().__init__()
        self.cfg = cfg
        self.labels = tuple(labels)
        dims = dict(char=cfg.char_dim, bigram=cfg.bigram_dim, word=cfg.word_dim)
        for kind in KINDS:
            setattr(self, f"{kind}_embed", LatticeEmbedding(*table_sizes[kind], dims[kind], cfg.word_dropout))
        for kind, (trained, frozen) in (pretrained or {}).items():
            getattr(self, f"{kind}_embed").load_rows(torch.from_numpy(trained), torch.from_numpy(frozen))
        self.bert = load_bert(cfg.bert) if cfg.bert else None
        self.bert_trains = False  # whether BERT's forward keeps its graph: the phase being trained says
        bert_dim = self.bert.config.hidden_size if self.bert is not None else 0
        self.char_proj = nn.Linear(cfg.char_dim + cfg.bigram_dim + bert_dim, cfg.hidden)
        self.word_proj = nn.Linear(cfg.word_dim, cfg.hidden)
        self.embed_dropout = nn.Dropout(cfg.embed_dropout)
        self.encoder = FlatEncoder(cfg.hidden, layers=cfg.layers, heads=cfg.heads, head_dim=cfg.head_dim,
                                   ff_ratio=cfg.ff_ratio, attn_dropout=cfg.attn_dropout, ff_dropout=cfg.ff_dropout,
                                   residual_dropout=cfg.residual_dropout, position_fusion=cfg.position_fusion,
                                   scaled=cfg.attn_scaled)
        self.output_dropout = nn.Dropout(cfg.output_dropout)
        self.projection = (nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden))
                           if cfg.projection_head else nn.Identity())
        self.head = OutputHead(cfg.hidden, self.labels, cfg.crf_constraints)

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Character representations (B, C, hidden) after the output dropout: the contrastive stage's features."""
        dtype = self.char_proj.weight.dtype  # tables updated row-wise stay fp32 in a bf16 DeepSpeed engine
        chars = torch.cat([self.char_embed(batch["char_ids"]), self.bigram_embed(batch["bigram_ids"])], dim=-1)
        if self.bert is not None:
            chars = torch.cat([chars, self._bert_features(batch, chars.shape[1])], dim=-1)
        chars = self.char_proj(self.embed_dropout(chars.to(dtype)))
        words = self.word_proj(self.embed_dropout(self.word_embed(batch["word_ids"]).to(dtype)))
        x = torch.where(batch["is_char"].unsqueeze(-1), chars, words)
        h = self.encoder(x, batch["heads"], batch["tails"], batch["lattice_mask"])
        return self.output_dropout(h[:, : batch["char_mask"].shape[1]])

    def _bert_features(self, batch: dict[str, torch.Tensor], lattice_len: int) -> torch.Tensor:
        """BERT's last layer at each character (dropping [CLS]/[SEP]), zero-padded to the lattice length."""
        with torch.set_grad_enabled(self.bert_trains and torch.is_grad_enabled()):
            out = self.bert(input_ids=batch["bert_ids"], attention_mask=batch["bert_mask"]).last_hidden_state
        out = out[:, 1:-1]
        return nn.functional.pad(out, (0, 0, 0, lattice_len - out.shape[1]))

    def contrastive_features(self, features: torch.Tensor) -> torch.Tensor:
        """What the contrastive loss compares: the features, or their MLP projection when configured."""
        return self.projection(features)

    def bert_parameters(self) -> list[nn.Parameter]:
        return list(self.bert.parameters()) if self.bert is not None else []

    def embedding_tables(self) -> list[nn.Parameter]:
        """The trained rows of the lattice's character, bigram and word tables (pretrained or random)."""
        return [self.char_embed.weight, self.bigram_embed.weight, self.word_embed.weight]

    def sparse_table_gradients(self, sparse: bool) -> None:
        """Whether the tables' trained rows get sparse gradients (the rows a batch read: for row-wise updates)
        or dense ones."""
        for kind in KINDS:
            getattr(self, f"{kind}_embed").sparse = sparse

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Everything but the output head (and BERT, listed by :meth:`bert_parameters`); includes the
        projection head, which only the contrastive loss uses."""
        skip = {id(p) for p in self.bert_parameters()} | {id(p) for p in self.head.parameters()}
        return [p for p in self.parameters() if id(p) not in skip]

    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor]) -> list[list[int]]:
        return self.head.decode(self.encode(batch), batch["char_mask"])


class OutputHead(nn.Module):
    """Linear emissions and a linear-chain CRF over BIO labels."""

    def __init__(self, hidden: int, labels: Sequence[str], constraints: bool):
        super().__init__()
        self.emission = nn.Linear(hidden, len(labels))
        self.crf = build_crf(len(labels), allowed=bio_allowed_transitions(labels) if constraints else None)

    def nll(self, features: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean CRF negative log-likelihood over the batch's sentences."""
        return -self.crf(self.emission(features), labels, mask, reduction="mean")

    def decode(self, features: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        return self.crf.decode(self.emission(features), mask)
