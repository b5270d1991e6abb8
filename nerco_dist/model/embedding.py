"""The lattice's token tables: trained rows for the training vocabulary, frozen pretrained rows beyond it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.vocab import PAD_ID, UNK_ID


class LatticeEmbedding(nn.Module):
    """Ids below ``num_trained`` (``<pad>``, ``<unk>``, the training split's tokens) read the trained
    ``weight``; ids from ``num_trained`` on read ``frozen``, the pretrained vectors of tokens training never
    saw (FLAT keeps such dev/test tokens' pretrained rows rather than mapping them to ``<unk>``). The frozen
    rows are a buffer: no optimiser holds them, so neither weight decay nor momentum moves them, and they are
    stored in fp16, halving what every checkpoint carries.

    ``sparse``: ``weight``'s gradient is a sparse tensor of the rows the batch read (padding and frozen ids
    excluded), for optimisers that update only those rows; dense otherwise.

    ``word_dropout``: in training, each non-padding id becomes ``<unk>`` with this probability, so that the
    ``<unk>`` row is learnt (without it, ``<unk>`` never occurs in training and stays random)."""

    def __init__(self, num_trained: int, num_frozen: int, dim: int, word_dropout: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_trained, dim).uniform_(-(3 / dim) ** 0.5, (3 / dim) ** 0.5))
        with torch.no_grad():
            self.weight[PAD_ID] = 0
        self.register_buffer("frozen", torch.zeros(num_frozen, dim, dtype=torch.float16))
        self.word_dropout = word_dropout
        self.sparse = False

    @property
    def num_trained(self) -> int:
        return self.weight.shape[0]

    def load_rows(self, trained: torch.Tensor, frozen: torch.Tensor) -> None:
        """Initial rows (float32 matrices of the two parts' shapes)."""
        with torch.no_grad():
            self.weight.copy_(trained)
            self.frozen.copy_(frozen)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Weights saved before tables had frozen rows load into a table without any."""
        if prefix + "frozen" not in state_dict and self.frozen.shape[0] == 0:
            state_dict[prefix + "frozen"] = self.frozen
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(...,) int64 ids -> (..., dim) rows."""
        if self.training and self.word_dropout > 0:
            dropped = (torch.rand(ids.shape, device=ids.device) < self.word_dropout) & (ids != PAD_ID)
            ids = ids.masked_fill(dropped, UNK_ID)
        if self.frozen.shape[0] == 0:
            return F.embedding(ids, self.weight, padding_idx=PAD_ID, sparse=self.sparse)
        is_frozen = ids >= self.num_trained                                              # (...,)
        trained = F.embedding(ids.masked_fill(is_frozen, PAD_ID), self.weight, padding_idx=PAD_ID,
                              sparse=self.sparse)  # (..., dim)
        frozen = F.embedding((ids - self.num_trained).clamp(min=0), self.frozen).to(trained.dtype)  # (..., dim)
        return torch.where(is_frozen.unsqueeze(-1), frozen, trained)

    def extra_repr(self) -> str:
        return (f"trained={self.num_trained}, frozen={self.frozen.shape[0]}, dim={self.weight.shape[1]}, "
                f"word_dropout={self.word_dropout}, sparse={self.sparse}")
