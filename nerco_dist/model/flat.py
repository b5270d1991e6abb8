"""FLAT encoder (Li et al., ACL 2020): a Transformer over a flat character-word lattice with relative
span positions.

Each lattice token has a head and a tail (a character: both its position; a word: its first and last
character). Token i attends to token j through four distances: head-head, head-tail, tail-head and
tail-tail, each encoded by fixed sinusoids and fused by Linear + ReLU into R_ij. Attention is
Transformer-XL's: A_ij = (q_i + u)·k_j + (q_i + v)·W_R R_ij.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

POSITION_FUSIONS = ("four", "two")  # the paper's four distances; the reference code's head-head + tail-tail


def sinusoid_table(max_distance: int, dim: int, device=None) -> torch.Tensor:
    """Sinusoid encodings of the distances ``-max_distance..max_distance`` (row ``d + max_distance``)."""
    positions = torch.arange(-max_distance, max_distance + 1, device=device, dtype=torch.float32).unsqueeze(1)
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -(math.log(10000.0) / max(half - 1, 1)))
    angles = positions * freqs
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = F.pad(table, (0, 1))
    return table


class RelativePositionFusion(nn.Module):
    """R_ij = ReLU(W [pe(d_hh); pe(d_ht); pe(d_th); pe(d_tt)] + b) (or head-head and tail-tail only).

    The four distances of a pair are fixed by d_hh and the two span widths (d_ht = d_hh - w_j,
    d_th = d_hh + w_i, d_tt = d_hh + w_i - w_j), and a batch has few distinct widths. So the fused
    encoding is computed once per (d_hh, w_i, w_j) on a small grid, and each pair is a single row gather:
    the same function as Linear + ReLU over the concatenation, without four (L, L, H) gathers and sums.
    """

    def __init__(self, hidden: int, fusion: str = "four"):
        super().__init__()
        if fusion not in POSITION_FUSIONS:
            raise ValueError(f"position fusion {fusion!r}: expected one of {POSITION_FUSIONS}")
        self.fusion = fusion
        self.hidden = hidden
        self.linear = nn.Linear(hidden * (4 if fusion == "four" else 2), hidden)

    def forward(self, heads: torch.Tensor, tails: torch.Tensor) -> torch.Tensor:
        widths, width_index = torch.unique(tails - heads, return_inverse=True)
        d_hh = heads.unsqueeze(-1) - heads.unsqueeze(-2)
        span = int(d_hh.abs().max().item())
        d = torch.arange(-span, span + 1, device=heads.device)[:, None, None]
        w_i, w_j = widths[None, :, None], widths[None, None, :]
        grid = (d, d - w_j, d + w_i, d + w_i - w_j)  # d_hh, d_ht, d_th, d_tt on the (d, w_i, w_j) grid
        if self.fusion == "two":
            grid = (grid[0], grid[3])
        reach = span + 2 * int(widths.max().item())
        table = sinusoid_table(reach, self.hidden, heads.device).to(self.linear.weight.dtype)
        fused = self.linear.bias
        for dist, w in zip(grid, self.linear.weight.split(self.hidden, dim=1)):
            fused = fused + F.embedding(dist + reach, table @ w.t())
        fused = F.relu(fused).reshape(-1, self.hidden)  # row (d + span, w_i, w_j)
        n = len(widths)
        index = ((d_hh + span) * n + width_index.unsqueeze(-1)) * n + width_index.unsqueeze(-2)
        return RelativePositions(fused, index)


class RelativePositions(NamedTuple):
    """R_ij as rows of a small table, ``R[b, i, j] = table[index[b, i, j]]``: the (B, L, L, H) tensor is never
    kept (``dense()`` builds it, for checks)."""

    table: torch.Tensor  # (rows, H)
    index: torch.Tensor  # (B, L, L) int64

    def dense(self) -> torch.Tensor:
        return F.embedding(self.index, self.table)


class GatheredScores(torch.autograd.Function):
    """``scores[n, h, j] = query[n, h] · table[index[n, j]]`` for (N, heads, H) queries and (N, L) row indices.

    The (N, L, H) gathered rows would be a step's largest tensor (hundreds of MB for a batch of long
    sentences): they are gathered a chunk of queries at a time, into buffers small enough for the allocator
    to reuse, and gathered again in the backward pass instead of kept. The table's gradient is an
    ``index_add_`` of the rows' gradients (no transposed copy, no sort as in the embedding backward).
    """

    @staticmethod
    def forward(ctx, query: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(query, table, index)
        out = query.new_empty(query.shape[0], query.shape[1], index.shape[1])
        for chunk in _query_chunks(index, table):
            torch.bmm(query[chunk], _gather_rows(table, index[chunk]).transpose(1, 2), out=out[chunk])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        query, table, index = ctx.saved_tensors
        grad_query = torch.empty_like(query) if ctx.needs_input_grad[0] else None
        # a table row sums the gradients of many pairs: in fp32 also when training in bf16/fp16
        accumulate = torch.promote_types(table.dtype, torch.float32)
        grad_table = table.new_zeros(table.shape, dtype=accumulate) if ctx.needs_input_grad[1] else None
        for chunk in _query_chunks(index, table):
            if grad_query is not None:
                torch.bmm(grad[chunk], _gather_rows(table, index[chunk]), out=grad_query[chunk])
            if grad_table is not None:
                grad_rows = torch.bmm(grad[chunk].transpose(1, 2), query[chunk])  # (n, L, H)
                grad_table.index_add_(0, index[chunk].reshape(-1), grad_rows.view(-1, table.shape[1]).to(accumulate))
        return grad_query, None if grad_table is None else grad_table.to(table.dtype), None


CHUNK_BYTES = 8 << 20  # gathered rows per chunk on CPU: under glibc's largest mmap threshold (see machine.py)


def _query_chunks(index: torch.Tensor, table: torch.Tensor) -> list[slice]:
    """Slices of the queries; one on a GPU, whose caching allocator reuses memory and where every chunk
    would be three more kernel launches."""
    if table.device.type != "cpu":
        return [slice(None)]
    per_query = index.shape[1] * table.shape[1] * table.element_size()
    size = max(1, CHUNK_BYTES // per_query)
    return [slice(start, start + size) for start in range(0, index.shape[0], size)]


def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[1])


class RelativeMultiHeadAttention(nn.Module):
    """Transformer-XL attention over relative span positions.

    The position term (q_i + v)·W_R R_ij is computed as ((q_i + v) W_R)·R_ij per head: an (L, L, H)
    product per head instead of projecting every R_ij by W_R (an (L, L, H) x (H, H) product).
    """

    def __init__(self, hidden: int, heads: int, head_dim: int, attn_dropout: float, scaled: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.query = nn.Linear(hidden, inner)
        self.key = nn.Linear(hidden, inner)
        self.value = nn.Linear(hidden, inner)
        self.position = nn.Linear(hidden, inner)  # W_R
        self.u = nn.Parameter(torch.zeros(heads, head_dim))
        self.v = nn.Parameter(torch.zeros(heads, head_dim))
        self.out = nn.Linear(inner, hidden)
        self.dropout = nn.Dropout(attn_dropout)
        self.scale = 1.0 / math.sqrt(head_dim) if scaled else 1.0

    def forward(self, x: torch.Tensor, rel: RelativePositions, mask: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.query(x).view(B, L, self.heads, self.head_dim)
        k = self.key(x).view(B, L, self.heads, self.head_dim)
        val = self.value(x).view(B, L, self.heads, self.head_dim)
        content = torch.einsum("bihd,bjhd->bhij", q + self.u, k)
        qv = q + self.v
        w_r = self.position.weight.view(self.heads, self.head_dim, -1)
        q_pos = torch.einsum("bihd,hde->bihe", qv, w_r)
        # one (heads x H) @ (H x L) product per query token, over R_ij gathered from the positions' table
        position = GatheredScores.apply(q_pos.reshape(B * L, self.heads, -1), rel.table,
                                        rel.index.reshape(B * L, L))
        position = position.view(B, L, self.heads, L).transpose(1, 2)
        position = position + torch.einsum("bihd,hd->bhi", qv, self.position.bias.view(self.heads, -1)).unsqueeze(-1)
        scores = (content + position) * self.scale
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        attn = self.dropout(torch.softmax(scores, dim=-1))
        context = torch.einsum("bhij,bjhd->bihd", attn, val).reshape(B, L, -1)
        return self.out(context)


class FlatLayer(nn.Module):
    """Attention and feed-forward sublayers, each as LayerNorm(x + Dropout(sublayer(x)))."""

    def __init__(self, hidden: int, *, heads: int, head_dim: int, ff_size: int, attn_dropout: float,
                 ff_dropout: float, residual_dropout: float, scaled: bool):
        super().__init__()
        self.attention = RelativeMultiHeadAttention(hidden, heads, head_dim, attn_dropout, scaled)
        self.norm1 = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, ff_size), nn.ReLU(), nn.Dropout(ff_dropout), nn.Linear(ff_size, hidden))
        self.norm2 = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(residual_dropout)

    def forward(self, x: torch.Tensor, rel: RelativePositions, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.attention(x, rel, mask)))
        return self.norm2(x + self.dropout(self.ff(x)))


class FlatEncoder(nn.Module):
    """Stack of FLAT layers sharing one relative-position fusion."""

    def __init__(self, hidden: int = 160, *, layers: int = 1, heads: int = 8, head_dim: int = 20, ff_ratio: int = 3,
                 attn_dropout: float = 0.0, ff_dropout: float = 0.15, residual_dropout: float = 0.15,
                 position_fusion: str = "four", scaled: bool = True):
        super().__init__()
        self.positions = RelativePositionFusion(hidden, position_fusion)
        self.layers = nn.ModuleList(
            FlatLayer(hidden, heads=heads, head_dim=head_dim, ff_size=ff_ratio * hidden, attn_dropout=attn_dropout,
                      ff_dropout=ff_dropout, residual_dropout=residual_dropout, scaled=scaled)
            for _ in range(layers))

    def forward(self, x: torch.Tensor, heads: torch.Tensor, tails: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rel = self.positions(heads, tails)
        for layer in self.layers:
            x = layer(x, rel, mask)
        return x
