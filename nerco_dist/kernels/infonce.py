"""Fused semantic-class InfoNCE: loss, dL/dQ and dL/dK without a query x key matrix.

For a query i of class c with weight w_c = 1/(|P_c|(|P_c|-1)) (class sizes counted over the keys):

    L_i = w_c * sum_{j in P_c, j != self(i)} softplus(LSE_i - a_ij),   LSE_i = log sum_{n: class(n) != c} exp(a_in)

with a = cos(q, k) / tau. Only the queries of a :class:`QuerySelection` are processed (which classes qualify
is decided in query_classes.py), and both sides are sorted by class so that each class's keys (queries) are
one contiguous range: the positive sweep of a query block then costs its classes' range only,
and the negative sweep skips key blocks made only of the block's own class.

Forward: kernel 1 sweeps the negatives with an online log-sum-exp, kernel 2 the positives (loss and
g_i = dL/dLSE_i = w_c sum_j sigmoid(LSE_i - a_ij)); only LSE and g (O(N)) are saved. Backward recomputes the
logit tiles: dL/da_in = g_i softmax_n (negatives), dL/da_ij = -w_c sigmoid(LSE_i - a_ij) (positives), run once
with queries as rows (dQ) and once with keys as rows (dK), so no atomics and a deterministic result.
Cosine normalisation is fused: kernels read raw rows through index arrays (no sorted or normalised copies)
and take inverse norms; the gradient through the normalisation is applied per row at the end of the sweep.
Every sweep can be split over the column blocks (partials summed in torch) to fill the GPU when few row
blocks exist. Logits are kept in base 2 (exp2/log2).

Host functions: :func:`infonce_forward` and :func:`infonce_backward` run the kernels without autograd (on
the :func:`sort_by_class` of a selection); :func:`semantic_infonce` is the differentiable loss over them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .query_classes import QuerySelection

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_EPS = 1e-12  # as F.normalize


@triton.jit
def _load_rows(X, idx, rows, n, stride, d, D_A: tl.constexpr, D_B: tl.constexpr):
    """Rows idx[rows] of X as two power-of-two column pieces [0, D_A) and [D_A, D_A + D_B): d = 160 costs
    128 + 32 columns instead of 256."""
    mask = rows < n
    src = tl.load(idx + rows, mask=mask, other=0).to(tl.int64) * stride
    ca = tl.arange(0, D_A)
    xa = tl.load(X + src[:, None] + ca[None, :], mask=mask[:, None] & (ca[None, :] < d), other=0.0)
    if D_B > 0:
        cb = D_A + tl.arange(0, D_B)
        xb = tl.load(X + src[:, None] + cb[None, :], mask=mask[:, None] & (cb[None, :] < d), other=0.0)
    else:
        xb = xa
    return xa, xb


@triton.jit
def _logits(xa, xb, ya, yb, rx, ry, D_B: tl.constexpr, PRECISION: tl.constexpr):
    """Tile of logits between raw rows x and y: dot * rx * ry (rx carries the scale)."""
    acc = tl.dot(xa, tl.trans(ya), input_precision=PRECISION)
    if D_B > 0:
        acc += tl.dot(xb, tl.trans(yb), input_precision=PRECISION)
    return acc * rx[:, None] * ry[None, :]


@triton.jit
def _column_ranges(row_cls, n_rows, start, end, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Column blocks that this row block visits. Negatives: all but the blocks lying inside its own class's
    range (only when the block holds one class, else each column is needed by some row). Positives: the
    range of its classes. Returns (skip_at, skip_len, n_neg, pos_first, n_pos) in blocks."""
    r0 = tl.program_id(0) * BLOCK_R
    c_lo = tl.load(row_cls + r0)
    c_hi = tl.load(row_cls + tl.minimum(r0 + BLOCK_R, n_rows) - 1)
    lo = tl.load(start + c_lo)
    hi = tl.load(end + c_hi)
    skip_at = tl.cdiv(lo, BLOCK_C)
    skip_end = tl.maximum(skip_at, tl.where(c_lo == c_hi, hi // BLOCK_C, skip_at))
    n_neg = tl.cdiv(n_cols, BLOCK_C) - (skip_end - skip_at)
    n_pos = tl.where(hi > lo, tl.cdiv(hi, BLOCK_C) - lo // BLOCK_C, 0)
    return skip_at, skip_end - skip_at, n_neg, lo // BLOCK_C, n_pos


@triton.jit
def _split(n_iter):
    """This program's share [t0, t1) of n_iter column blocks (axis 1 splits the sweep)."""
    per = tl.cdiv(n_iter, tl.num_programs(1))
    t0 = tl.program_id(1) * per
    return t0, tl.minimum(t0 + per, n_iter)


@triton.jit
def _query_block(Q, q_idx, q_r, q_cls, n_q, d, stride_q, scale2, BLOCK_M: tl.constexpr, D_A: tl.constexpr,
                 D_B: tl.constexpr):
    """This program's block of query rows: their mask, classes, scaled inverse norms and raw features."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_q
    cls = tl.load(q_cls + rows, mask=rmask, other=-1)
    rq = tl.load(q_r + rows, mask=rmask, other=0.0) * scale2
    qa, qb = _load_rows(Q, q_idx, rows, n_q, stride_q, d, D_A, D_B)
    return rows, rmask, cls, rq, qa, qb


@triton.jit
def _lse_kernel(Q, K, q_idx, k_idx, q_r, k_r, q_cls, k_cls, k_start, k_end, LSE_PART,
                n_q, n_k, d, stride_q, stride_k, scale2,
                D_A: tl.constexpr, D_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr):
    """Base-2 log-sum-exp of each query's negative logits over this program's split of the key blocks."""
    # 1. the block of queries (rows, class, inverse norm, the scaled row pieces)
    rows, rmask, cls, rq, qa, qb = _query_block(Q, q_idx, q_r, q_cls, n_q, d, stride_q, scale2, BLOCK_M, D_A, D_B)
    # 2. the key blocks holding negatives (the block's own classes skipped), this program's split of them
    skip_at, skip_len, n_neg, _, _ = _column_ranges(q_cls, n_q, k_start, k_end, n_k, BLOCK_M, BLOCK_N)
    t0, t1 = _split(n_neg)
    # 3. online log-sum-exp over their logits, same-class keys masked out
    m = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: a row with no negative in a tile stays NaN-free
    l = tl.zeros([BLOCK_M], tl.float32)
    for t in range(t0, t1):
        cols = (t + tl.where(t >= skip_at, skip_len, 0)) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < n_k
        kcls = tl.load(k_cls + cols, mask=cmask, other=-1)
        rk = tl.load(k_r + cols, mask=cmask, other=0.0)
        ka, kb = _load_rows(K, k_idx, cols, n_k, stride_k, d, D_A, D_B)
        a = _logits(qa, qb, ka, kb, rq, rk, D_B, PRECISION)
        a = tl.where((kcls[None, :] != cls[:, None]) & cmask[None, :], a, float("-inf"))
        m_new = tl.maximum(m, tl.max(a, 1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(a - m_new[:, None]), 1)
        m = m_new
    # 4. store; l >= 1 once a row has seen a negative, the floor only keeps empty splits and padding rows finite
    tl.store(LSE_PART + tl.program_id(1) * n_q + rows, m + tl.log2(tl.maximum(l, 1e-30)), mask=rmask)


@triton.jit
def _pos_kernel(Q, K, q_idx, k_idx, q_r, k_r, q_cls, k_cls, k_start, k_end, q_self, q_weight, LSE,
                LOSS_PART, G_PART, n_q, n_k, d, stride_q, stride_k, scale2,
                D_A: tl.constexpr, D_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr):
    """Per query, over its positives: w * sum softplus(LSE - a) (its loss) and w * sum sigmoid(LSE - a) (g)."""
    # 1. the block of queries, each one's own key position and its LSE from kernel 1
    rows, rmask, cls, rq, qa, qb = _query_block(Q, q_idx, q_r, q_cls, n_q, d, stride_q, scale2, BLOCK_M, D_A, D_B)
    me = tl.load(q_self + rows, mask=rmask, other=-1)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    # 2. the key blocks of the block's classes, this program's split of them
    _, _, _, pos_first, n_pos = _column_ranges(q_cls, n_q, k_start, k_end, n_k, BLOCK_M, BLOCK_N)
    t0, t1 = _split(n_pos)
    # 3. softplus and sigmoid of LSE - a summed over the positives (same class, not the query's own row)
    sp = tl.zeros([BLOCK_M], tl.float32)
    sg = tl.zeros([BLOCK_M], tl.float32)
    for t in range(t0, t1):
        cols = (pos_first + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < n_k
        kcls = tl.load(k_cls + cols, mask=cmask, other=-1)
        rk = tl.load(k_r + cols, mask=cmask, other=0.0)
        ka, kb = _load_rows(K, k_idx, cols, n_k, stride_k, d, D_A, D_B)
        x = lse[:, None] - _logits(qa, qb, ka, kb, rq, rk, D_B, PRECISION)
        e = tl.exp2(-tl.abs(x))  # stable softplus / sigmoid in base 2
        pos = (kcls[None, :] == cls[:, None]) & (cols[None, :] != me[:, None]) & cmask[None, :]
        sp += tl.sum(tl.where(pos, tl.maximum(x, 0.0) + tl.log2(1.0 + e), 0.0), 1)
        sg += tl.sum(tl.where(pos, tl.where(x >= 0, 1.0, e) / (1.0 + e), 0.0), 1)
    # 4. weighted by the class's 1/(|P|(|P|-1)); the loss back to natural log
    w = tl.load(q_weight + rows, mask=rmask, other=0.0)
    part = tl.program_id(1) * n_q + rows
    tl.store(LOSS_PART + part, w * sp * 0.6931471805599453, mask=rmask)
    tl.store(G_PART + part, w * sg, mask=rmask)


@triton.jit
def _bwd_kernel(X, Y, x_idx, y_idx, x_r, y_r, x_cls, y_cls, y_start, y_end, q_self, LSE, G, q_weight, GO,
                DX_PART, n_x, n_y, d, stride_x, stride_y, scale2, inv_tau,
                QUERY_ROWS: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    """dL/dX for a block of rows X (queries when QUERY_ROWS, else keys) against the columns Y (the other
    side), over this program's split. coef = dL/da per pair; then, through the cosine,
    dx = go/tau * r_x * (sum_y coef r_y y - r_x (sum_y coef s) x)."""
    # 1. the block of rows, and (queries as rows) their LSE, g, weight and own key position
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_x
    xcls = tl.load(x_cls + rows, mask=rmask, other=-1)
    rx = tl.load(x_r + rows, mask=rmask, other=0.0)
    xa, xb = _load_rows(X, x_idx, rows, n_x, stride_x, d, D_A, D_B)
    if QUERY_ROWS:
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)[:, None]
        g = tl.load(G + rows, mask=rmask, other=0.0)[:, None]
        w = tl.load(q_weight + rows, mask=rmask, other=0.0)[:, None]
        me = tl.load(q_self + rows, mask=rmask, other=-1)
    # 2. the column blocks: negatives first, then positives; this program's split of them
    skip_at, skip_len, n_neg, pos_first, n_pos = _column_ranges(x_cls, n_x, y_start, y_end, n_y, BLOCK_R, BLOCK_C)
    t0, t1 = _split(n_neg + n_pos)
    # 3. per tile: the logits recomputed, coef = dL/da, accumulated as coef r_y y and coef a
    acc_a = tl.zeros([BLOCK_R, D_A], tl.float32)
    acc_b = tl.zeros(xb.shape, tl.float32)  # unused (and dropped) when D_B == 0
    acc_s = tl.zeros([BLOCK_R], tl.float32)
    for t in range(t0, t1):
        neg = t < n_neg
        cb = tl.where(neg, t + tl.where(t >= skip_at, skip_len, 0), pos_first + t - n_neg)
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < n_y
        ycls = tl.load(y_cls + cols, mask=cmask, other=-1)
        ry = tl.load(y_r + cols, mask=cmask, other=0.0)
        ya, yb = _load_rows(Y, y_idx, cols, n_y, stride_y, d, D_A, D_B)
        a = _logits(xa, xb, ya, yb, rx * scale2, ry, D_B, PRECISION)
        if QUERY_ROWS:
            not_self = cols[None, :] != me[:, None]
        else:
            lse = tl.load(LSE + cols, mask=cmask, other=0.0)[None, :]
            g = tl.load(G + cols, mask=cmask, other=0.0)[None, :]
            w = tl.load(q_weight + cols, mask=cmask, other=0.0)[None, :]
            not_self = rows[:, None] != tl.load(q_self + cols, mask=cmask, other=-1)[None, :]
        e = tl.exp2(a - lse)  # softmax weight of a negative; exp(a - LSE) for a positive (may be inf)
        same = ycls[None, :] == xcls[:, None]
        live = rmask[:, None] & cmask[None, :]
        coef = tl.where(live & ~same & neg, g * e, tl.where(live & same & not_self & ~neg, -w / (1.0 + e), 0.0))
        acc_s += tl.sum(coef * a, 1)
        cw = (coef * ry[None, :]).to(ya.dtype)
        acc_a = tl.dot(cw, ya, acc_a, input_precision=PRECISION)
        if D_B > 0:
            acc_b = tl.dot(cw, yb, acc_b, input_precision=PRECISION)
    # 4. through the cosine normalisation, scaled by the incoming gradient; stored as this split's part
    scale = tl.load(GO) * inv_tau * rx
    shrink = (rx * acc_s / scale2)[:, None]
    xa, xb = _load_rows(X, x_idx, rows, n_x, stride_x, d, D_A, D_B)  # reloaded: not kept live through the loop
    out = DX_PART + (tl.program_id(1) * n_x + rows.to(tl.int64))[:, None] * d
    ca = tl.arange(0, D_A)
    da = scale[:, None] * (acc_a - shrink * xa.to(tl.float32))
    tl.store(out + ca[None, :], da.to(DX_PART.dtype.element_ty), mask=rmask[:, None] & (ca[None, :] < d))
    if D_B > 0:
        cb = D_A + tl.arange(0, D_B)
        db = scale[:, None] * (acc_b - shrink * xb.to(tl.float32))
        tl.store(out + cb[None, :], db.to(DX_PART.dtype.element_ty), mask=rmask[:, None] & (cb[None, :] < d))


class SortedSide(NamedTuple):
    """Queries or keys in class order, so that each class is one contiguous range."""

    idx: torch.Tensor  # (n,) int32: row of the input tensor at each sorted position
    cls: torch.Tensor  # (n,) int32: class at each sorted position
    start: torch.Tensor  # (C,) int32: sorted range [start, end) of each class
    end: torch.Tensor


class SortedClasses(NamedTuple):
    """A :class:`QuerySelection` as the kernels read it (:func:`sort_by_class`)."""

    queries: SortedSide
    keys: SortedSide
    q_self: torch.Tensor  # (Nq,) int32: position of the query's own row among the sorted keys, or -1
    q_weight: torch.Tensor  # (Nq,) fp32: 1/(|P_c|(|P_c|-1)) of each sorted query


def sort_by_class(selection: QuerySelection) -> SortedClasses:
    """The queries and keys of ``selection`` in class order: an O(N log N) pre-pass in torch, without host
    syncs (the sizes are known from the selection)."""
    k_cls, k_idx = torch.sort(selection.key_labels, stable=True)
    q_cls, order = torch.sort(selection.classes, stable=True)
    classes = torch.arange(selection.key_counts.numel(), device=q_cls.device)
    k_end = torch.cumsum(selection.key_counts, 0)
    sorted_pos = torch.empty_like(k_idx)
    sorted_pos[k_idx] = torch.arange(k_idx.numel(), device=k_idx.device)
    me = selection.self_rows[order]
    i32 = torch.int32
    return SortedClasses(
        queries=SortedSide(idx=selection.rows[order].to(i32), cls=q_cls.to(i32),
                      start=torch.searchsorted(q_cls, classes).to(i32),
                      end=torch.searchsorted(q_cls, classes, right=True).to(i32)),
        keys=SortedSide(idx=k_idx.to(i32), cls=k_cls.to(i32), start=(k_end - selection.key_counts).to(i32),
                   end=k_end.to(i32)),
        q_self=torch.where(me >= 0, sorted_pos[me.clamp_min(0)], -1).to(i32),
        q_weight=selection.weight[order].float(),
    )


# (largest bytes per row, (block_rows, block_cols, num_warps, num_stages)): picked by compiling for sm_90
# on a CPU-only machine (ptxas -v, see test_compiles_for_hopper); not yet timed on a GPU. The forward ones do
# not spill registers; fp32 with IEEE products has its own, as its tl.dot is FMA-based (the (128, 64) tiles
# that suit tensor cores spill about 27 KB per thread there). The backward ones fit shared memory but spill a
# little at some sizes (148 B for bf16, d = 160, keys as rows), the IEEE ones at every configuration tried
# (0.4 KB at d = 160 to 2.8 KB at d = 1000 with these; 17 KB at d = 768 with the tensor-core ones).
_FWD_CONFIGS = ((512, (128, 64, 8, 3)), (640, (128, 64, 8, 2)), (1024, (64, 64, 8, 2)), (1536, (64, 32, 8, 2)),
                (3072, (16, 32, 4, 1)), (None, (16, 32, 8, 1)))
_BWD_CONFIGS = ((384, (64, 64, 8, 2)), (512, (32, 32, 8, 2)), (1536, (16, 64, 8, 1)), (3072, (16, 32, 8, 1)),
                (None, (16, 16, 4, 1)))
_IEEE_FWD_CONFIGS = ((1024, (32, 64, 8, 2)), (None, (16, 32, 8, 1)))
_IEEE_BWD_CONFIGS = ((640, (16, 64, 8, 1)), (None, (16, 32, 16, 1)))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_DIM = 1024  # feature columns


def _config(d: int, elem_size: int, precision: str, interpret: bool):
    """(D_A, D_B) column pieces, and (block_rows, block_cols, num_warps, num_stages) for the forward and the
    backward sweeps (rows: the side whose statistics or gradient a program produces)."""
    d_a = max(16, 1 << (d.bit_length() - 1))
    rest = d - d_a
    d_b = 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))
    if interpret:
        return d_a, d_b, (16, 16, 4, 1), (16, 16, 4, 1)
    row_bytes = (d_a + d_b) * elem_size
    ieee = precision == "ieee"  # only fp32 inputs get it
    fwd_configs, bwd_configs = (_IEEE_FWD_CONFIGS, _IEEE_BWD_CONFIGS) if ieee else (_FWD_CONFIGS, _BWD_CONFIGS)
    fwd = next(cfg for limit, cfg in fwd_configs if limit is None or row_bytes <= limit)
    bwd = next(cfg for limit, cfg in bwd_configs if limit is None or row_bytes <= limit)
    return d_a, d_b, fwd, bwd


def _splits(n_row_blocks: int, n_col_blocks: int, device: torch.device, forced: int | None) -> int:
    """Column splits per row block: enough programs for two waves on the GPU, at least 4 blocks each."""
    if forced is not None:
        return max(1, forced)
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, n_row_blocks), n_col_blocks // 4))


def _inv_norms(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).clamp_min(_EPS)


class InfoNCEState(NamedTuple):
    """What :func:`infonce_backward` reads from :func:`infonce_forward`, besides the two inputs: the sorted
    classes, the inverse norms of the sorted rows, each query's negative log-sum-exp (base 2) and g = dL/dLSE
    (O(N) in all), and the settings the sweeps ran with."""

    sides: SortedClasses
    q_r: torch.Tensor  # (Nq,) fp32: 1/|q| of each sorted query
    k_r: torch.Tensor  # (Nk,) fp32: 1/|k| of each sorted key
    lse: torch.Tensor  # (Nq,) fp32
    g: torch.Tensor  # (Nq,) fp32
    temperature: float
    precision: str  # tl.dot's input_precision
    splits: int | None  # forced column splits per row block (None: chosen for the device)


def infonce_forward(features: torch.Tensor, keys: torch.Tensor, sides: SortedClasses, temperature: float,
                    precision: str, splits: int | None = None) -> tuple[torch.Tensor, InfoNCEState]:
    """The loss (fp32 scalar) of the sorted queries among ``features`` (N, d) against ``keys`` (Nk, d), both
    contiguous, and what the backward pass needs; no autograd. 1. inverse norms of the rows taking part;
    2. kernel 1: each query's negative log-sum-exp; 3. kernel 2: its positives' loss and g."""
    q, k = sides.queries, sides.keys
    n_q, n_k, d = q.idx.numel(), k.idx.numel(), features.shape[1]
    d_a, d_b, (block_m, block_n, warps, stages), _ = _config(d, features.element_size(), precision,
                                                             features.device.type != "cuda")
    q_r = _inv_norms(features)[q.idx.long()]  # (Nq,)
    k_r = _inv_norms(keys)[k.idx.long()]  # (Nk,)
    n_qb, n_kb = triton.cdiv(n_q, block_m), triton.cdiv(n_k, block_n)
    s = _splits(n_qb, n_kb, features.device, splits)

    lse_part = torch.empty((s, n_q), device=features.device, dtype=torch.float32)  # (splits, Nq)
    _lse_kernel[(n_qb, s)](
        features, keys,
        q.idx, k.idx, q_r, k_r,
        q.cls, k.cls,
        k.start, k.end,
        lse_part,
        n_q, n_k, d, features.stride(0), keys.stride(0), LOG2E / temperature,
        D_A=d_a, D_B=d_b,
        BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION=precision,
        num_warps=warps, num_stages=stages,
    )
    lse = torch.logsumexp(lse_part * LN2, 0) * LOG2E if s > 1 else lse_part[0]  # (Nq,)

    loss_part = torch.empty((s, n_q), device=features.device, dtype=torch.float32)  # (splits, Nq)
    g_part = torch.empty_like(loss_part)  # (splits, Nq)
    _pos_kernel[(n_qb, s)](
        features, keys,
        q.idx, k.idx, q_r, k_r,
        q.cls, k.cls,
        k.start, k.end,
        sides.q_self, sides.q_weight,
        lse, loss_part, g_part,
        n_q, n_k, d, features.stride(0), keys.stride(0), LOG2E / temperature,
        D_A=d_a, D_B=d_b,
        BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION=precision,
        num_warps=warps, num_stages=stages,
    )
    return loss_part.sum(), InfoNCEState(sides, q_r, k_r, lse, g_part.sum(0), temperature, precision, splits)


def infonce_backward(grad_loss: torch.Tensor, features: torch.Tensor, keys: torch.Tensor, state: InfoNCEState,
                     *, want_features: bool = True, want_keys: bool = True
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dL/dfeatures, dL/dkeys) scaled by ``grad_loss`` (a scalar), each None where not wanted; no autograd.
    When ``keys is features`` the one gradient comes back as dL/dkeys (queries' rows added in). 1. the sweep
    with keys as rows; 2. the sweep with queries as rows; 3. the rows scattered back to the inputs' order."""
    go = grad_loss.detach().to(torch.float32).reshape(1).contiguous()
    shared = keys is features
    q_idx, k_idx = state.sides.queries.idx.long(), state.sides.keys.idx.long()
    dq = dk = None
    if want_keys or shared:
        dk = torch.empty_like(keys)  # (Nk, d): every key is a negative of some query, so every row is written
        dk[k_idx] = _grad_sweep(go, features, keys, state, query_rows=False)
    if want_features:
        dq_rows = _grad_sweep(go, features, keys, state, query_rows=True)  # (Nq, d)
        if shared:  # one tensor on both sides: add into its key gradient instead of a second full one
            dk.index_add_(0, q_idx, dq_rows)
        else:
            dq = torch.zeros_like(features).index_copy_(0, q_idx, dq_rows)
    return dq, dk


def _grad_sweep(go: torch.Tensor, features: torch.Tensor, keys: torch.Tensor, state: InfoNCEState,
                query_rows: bool) -> torch.Tensor:
    """dL/dx (n_x, d) for the sorted rows of x, the queries (``query_rows``) or the keys, against the other
    side y."""
    sides = state.sides
    if query_rows:
        x, y, xs, ys, x_r, y_r = features, keys, sides.queries, sides.keys, state.q_r, state.k_r
    else:
        x, y, xs, ys, x_r, y_r = keys, features, sides.keys, sides.queries, state.k_r, state.q_r
    n_x, n_y, d = xs.idx.numel(), ys.idx.numel(), x.shape[1]
    d_a, d_b, _, (block_r, block_c, warps, stages) = _config(d, x.element_size(), state.precision,
                                                             x.device.type != "cuda")
    n_rb = triton.cdiv(n_x, block_r)
    s = _splits(n_rb, triton.cdiv(n_y, block_c), x.device, state.splits)
    part = torch.empty((s, n_x, d), device=x.device, dtype=torch.float32 if s > 1 else x.dtype)  # (splits, n_x, d)
    _bwd_kernel[(n_rb, s)](
        x,
        y,
        xs.idx,
        ys.idx,
        x_r,
        y_r,
        xs.cls,
        ys.cls,
        ys.start,
        ys.end,
        sides.q_self,
        state.lse,
        state.g,
        sides.q_weight,
        go,
        part,
        n_x,
        n_y,
        d,
        x.stride(0),
        y.stride(0),
        LOG2E / state.temperature,
        1.0 / state.temperature,
        QUERY_ROWS=query_rows,
        D_A=d_a, D_B=d_b,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        PRECISION=state.precision,
        num_warps=warps, num_stages=stages,
    )
    return part[0] if s == 1 else part.sum(0).to(x.dtype)


class _SemanticInfoNCE(torch.autograd.Function):
    """:func:`infonce_forward` and :func:`infonce_backward` under autograd."""

    @staticmethod
    def forward(ctx, features, keys, sides: SortedClasses, temperature: float, precision: str,
                splits: int | None):
        loss, state = infonce_forward(features, keys, sides, temperature, precision, splits)
        ctx.save_for_backward(features, keys, state.q_r, state.k_r, state.lse, state.g)
        ctx.settings, ctx.shared = (sides, temperature, precision, splits), keys is features
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        features, keys, q_r, k_r, lse, g = ctx.saved_tensors
        keys = features if ctx.shared else keys  # one object again (unpacking may give two)
        sides, temperature, precision, splits = ctx.settings
        state = InfoNCEState(sides, q_r, k_r, lse, g, temperature, precision, splits)
        dq, dk = infonce_backward(grad_loss, features, keys, state, want_features=ctx.needs_input_grad[0],
                                  want_keys=ctx.needs_input_grad[1])
        return dq, dk, None, None, None, None


def semantic_infonce(features: torch.Tensor, keys: torch.Tensor, selection: QuerySelection, temperature: float, *,
                     input_precision: str | None = None, splits: int | None = None) -> torch.Tensor:
    """Fused loss (fp32 scalar) of the queries of ``selection`` (at least one) among ``features`` (N, d)
    against ``keys`` (Nk, d); pass the features themselves as keys to share one gradient buffer. Trusts its
    caller (:func:`nerco_dist.losses.semantic_class_infonce` checks the arguments): dtype in ``DTYPES``,
    d <= ``MAX_DIM``. ``input_precision`` for fp32 inputs: "ieee" or "tf32" (default: follows
    ``torch.backends.cuda.matmul.allow_tf32``); ``splits`` forces the column splits per row block."""
    if features.dtype != torch.float32:
        input_precision = "tf32"  # Triton's default; only fp32 operands look at it
    elif input_precision is None:
        input_precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    shared = keys is features
    features = features.contiguous()
    keys = features if shared else keys.to(features.dtype).contiguous()
    return _SemanticInfoNCE.apply(features, keys, sort_by_class(selection), float(temperature), input_precision,
                                  splits)
