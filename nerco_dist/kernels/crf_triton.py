"""Triton kernels of the linear-chain CRF (see crf.py for the model and the score): one program per sequence
with the time loop inside the kernel and the [tags x tags] transition tile in registers (tags padded to a
power of two). Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.

* forward: the scaled forward algorithm in fp32 log space (max-subtracted exp/log). Each step keeps
  alpha_hat_t = alpha_t - A_t (A_t = log sum exp alpha_t) and d_t = A_t - A_{t-1} (d_0 = A_0), so every
  stored number is of order one and log Z = sum_t d_t + lse(alpha_hat_{n-1} + end). The gold score is
  summed in the same loop. O(B L T) fp32 is saved for the backward pass.
* backward: a beta pass in the same scaling (beta_hat_t = beta_t + A_t - log Z) gives the marginals
  p_t = exp(alpha_hat_t + beta_hat_t) and the pair marginals
  exp(alpha_hat_{t-1}[i] + trans[i, j] + em[t, j] + beta_hat_t[j] - d_t) without autograd through time:
  grad em = g (onehot - p), grad trans = g sum_t (gold pair - pair marginal), likewise start and end;
  transition gradients are written per sequence and summed in torch (no atomics, deterministic).
* viterbi: max-plus recursion with int8 backpointers and the backtrace in the same kernel.

Host functions: :func:`crf_forward` and :func:`crf_backward` run the first two without autograd;
:func:`triton_log_likelihood` is the differentiable log-likelihood over them, :func:`triton_viterbi` the
decoder.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PAD: tl.constexpr = tl.constexpr(-1.0e30)  # score of the padding tags inside the kernels: exp() gives 0


@triton.jit
def _lse(x):
    """log-sum-exp of a vector, max-subtracted."""
    m = tl.max(x, 0)
    return m + tl.log(tl.sum(tl.exp(x - m), 0))


@triton.jit
def _lse_tile(x, AXIS: tl.constexpr):
    """log-sum-exp of a [TP, TP] tile along AXIS, max-subtracted."""
    m = tl.max(x, AXIS)
    if AXIS == 0:
        s = tl.sum(tl.exp(x - m[None, :]), 0)
    else:
        s = tl.sum(tl.exp(x - m[:, None]), 1)
    return m + tl.log(s)


@triton.jit
def _sequence(lengths, trans, T, TP: tl.constexpr):
    """This program's sequence: its index and length, the tag ranges (rows i, columns j, valid columns) and
    the transition matrix padded to TP x TP."""
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(lengths + b)
    i = tl.arange(0, TP)
    j = tl.arange(0, TP)
    on = j < T
    tr = tl.load(trans + i[:, None] * T + j[None, :], mask=(i[:, None] < T) & on[None, :], other=PAD)
    return b, n, i, j, on, tr


@triton.jit
def _crf_forward_kernel(em, s_eb, s_el, tags, s_tb, s_tl, lengths, start, end, trans,
                        alpha, dlog, llh, L, T, TP: tl.constexpr):
    b, n, i, j, on, tr = _sequence(lengths, trans, T, TP)
    end_t = tl.load(end + j, mask=on, other=PAD)
    em_b = em + b * s_eb
    tags_b = tags + b * s_tb
    alpha_b = alpha + b * L * T

    tag = tl.load(tags_b)
    s = tl.load(start + j, mask=on, other=PAD) + tl.load(em_b + j, mask=on, other=0.0).to(tl.float32)
    gold = tl.sum(tl.where(j == tag, s, 0.0), 0)
    logz = _lse(s)
    a = s - logz
    tl.store(alpha_b + j, a, mask=on)
    tl.store(dlog + b * L, logz)
    # the loop is latency-bound: each step's loads are issued one step ahead (clamped to the last step)
    nt = tl.minimum(1, n - 1)
    e_next = tl.load(em_b + nt * s_el + j, mask=on, other=0.0)
    tag_next = tl.load(tags_b + nt * s_tl)
    for t in range(1, n):
        e = e_next.to(tl.float32)
        nxt = tag_next
        nt = tl.minimum(t + 1, n - 1)
        e_next = tl.load(em_b + nt * s_el + j, mask=on, other=0.0)
        tag_next = tl.load(tags_b + nt * s_tl)
        s = _lse_tile(a[:, None] + tr, 0) + e
        d = _lse(s)
        a = s - d
        logz += d
        tl.store(alpha_b + t * T + j, a, mask=on)
        tl.store(dlog + b * L + t, d)
        gold += tl.sum(tl.where(j == nxt, e, 0.0), 0) + tl.load(trans + tag * T + nxt)
        tag = nxt
    logz += _lse(a + end_t)
    gold += tl.load(end + tag)
    tl.store(llh + b, gold - logz)


@triton.jit
def _backward_loads(t, tags_b, s_tl, alpha_b, em_b, s_el, dlog_b, i, j, T):
    """tag[t - 1], alpha_hat[t - 1], em[t], d[t]; indices clamped in bounds (t = 0: unused values)."""
    p = tl.maximum(t - 1, 0)
    return (tl.load(tags_b + p * s_tl), tl.load(alpha_b + p * T + i, mask=i < T, other=PAD),
            tl.load(em_b + t * s_el + j, mask=j < T, other=0.0), tl.load(dlog_b + t))


@triton.jit
def _crf_backward_kernel(em, s_eb, s_el, tags, s_tb, s_tl, lengths, end, trans, alpha, dlog, grad_llh,
                         g_em, s_gb, s_gl, g_start, g_end, g_trans, L, T, TP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(lengths + b)
    g = tl.load(grad_llh + b)
    i = tl.arange(0, TP)
    j = tl.arange(0, TP)
    on = j < T
    tile = (i[:, None] < T) & on[None, :]
    tr = tl.load(trans + i[:, None] * T + j[None, :], mask=tile, other=PAD)
    end_t = tl.load(end + j, mask=on, other=PAD)
    em_b = em + b * s_eb
    tags_b = tags + b * s_tb
    alpha_b = alpha + b * L * T
    g_em_b = g_em + b * s_gb

    tag = tl.load(tags_b + (n - 1) * s_tl)
    a = tl.load(alpha_b + (n - 1) * T + j, mask=on, other=PAD)
    beta = end_t - _lse(a + end_t)
    tl.store(g_end + b * T + j, g * (tl.where(j == tag, 1.0, 0.0) - tl.exp(a + beta)), mask=on)
    acc = tl.zeros((TP, TP), dtype=tl.float32)
    # the loop is latency-bound: the loads of the next step down are issued one step ahead
    prev_next, a_next, e_next, d_next = _backward_loads(n - 1, tags_b, s_tl, alpha_b, em_b, s_el, dlog + b * L,
                                                        i, j, T)
    for k in range(1, n):
        t = n - k  # a, beta, tag are those of step t
        prev = prev_next
        a_prev = a_next
        e = e_next.to(tl.float32)
        d = d_next
        prev_next, a_next, e_next, d_next = _backward_loads(t - 1, tags_b, s_tl, alpha_b, em_b, s_el,
                                                            dlog + b * L, i, j, T)
        delta = tl.where(j == tag, 1.0, 0.0) - tl.exp(a + beta)
        tl.store(g_em_b + t * s_gl + j, (g * delta).to(g_em.dtype.element_ty), mask=on)
        w = tr + (e + beta)[None, :]  # w[i, j] = trans[i, j] + em[t, j] + beta_hat_t[j]
        pair = (i[:, None] == prev) & (j[None, :] == tag)
        acc += tl.where(pair, 1.0, 0.0) - tl.exp(a_prev[:, None] + w - d)
        beta = _lse_tile(w, 1) - d
        a = a_prev
        tag = prev
    delta = tl.where(j == tag, 1.0, 0.0) - tl.exp(a + beta)
    tl.store(g_em_b + j, (g * delta).to(g_em.dtype.element_ty), mask=on)
    tl.store(g_start + b * T + j, g * delta, mask=on)
    tl.store(g_trans + b * T * T + i[:, None] * T + j[None, :], g * acc, mask=tile)


@triton.jit
def _crf_viterbi_kernel(em, s_eb, s_el, lengths, start, end, trans, bp, path, s_pb, L, T, TP: tl.constexpr):
    b, n, i, j, on, tr = _sequence(lengths, trans, T, TP)
    em_b = em + b * s_eb
    bp_b = bp + b * L * T

    s = tl.load(start + j, mask=on, other=PAD) + tl.load(em_b + j, mask=on, other=0.0).to(tl.float32)
    e_next = tl.load(em_b + tl.minimum(1, n - 1) * s_el + j, mask=on, other=0.0)  # one step ahead, clamped
    for t in range(1, n):
        e = e_next.to(tl.float32)
        e_next = tl.load(em_b + tl.minimum(t + 1, n - 1) * s_el + j, mask=on, other=0.0)
        best, arg = tl.max(s[:, None] + tr, 0, return_indices=True)
        tl.store(bp_b + t * T + j, arg.to(tl.int8), mask=on)
        s = best + e
    _, cur = tl.max(s + tl.load(end + j, mask=on, other=PAD), 0, return_indices=True)
    tl.debug_barrier()  # the backpointers written above are read back by every thread below
    path_b = path + b * s_pb
    tl.store(path_b + n - 1, cur.to(tl.int64))
    for k in range(1, n):
        cur = tl.load(bp_b + (n - k) * T + cur).to(tl.int32)
        tl.store(path_b + n - k - 1, cur.to(tl.int64))


def _tile(T: int) -> tuple[int, int]:
    """(padded tags TP, num_warps) for T tags."""
    tp = max(16, triton.next_power_of_2(T))
    return tp, min(8, max(1, tp * tp // 512))


def _last_dim_contiguous(emissions: torch.Tensor) -> torch.Tensor:
    return emissions if emissions.stride(2) == 1 else emissions.contiguous()


def crf_forward(emissions, tags, lengths, start, end, transitions
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(tags | emissions) (B,) fp32, and what :func:`crf_backward` needs: the normalised forward
    variables alpha (B, L, T) and each step's log normaliser dlog (B, L), fp32; no autograd. Arguments as
    :func:`triton_log_likelihood` takes them."""
    emissions = _last_dim_contiguous(emissions)
    B, L, T = emissions.shape
    tp, warps = _tile(T)
    alpha = emissions.new_empty((B, L, T), dtype=torch.float32)
    dlog = emissions.new_empty((B, L), dtype=torch.float32)
    llh = emissions.new_empty((B,), dtype=torch.float32)
    _crf_forward_kernel[(B,)](
        emissions, emissions.stride(0), emissions.stride(1),
        tags, tags.stride(0), tags.stride(1),
        lengths, start, end, transitions,
        alpha, dlog,
        llh,
        L, T,
        TP=tp,
        num_warps=warps,
    )
    return llh, alpha, dlog


def crf_backward(grad_llh, emissions, tags, lengths, end, transitions, alpha, dlog
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of sum(grad_llh * llh) with respect to the emissions (B, L, T; zero past each length),
    start (T,), end (T,) and transitions (T, T), from :func:`crf_forward`'s alpha and dlog (the kernel's beta
    pass); no autograd."""
    emissions = _last_dim_contiguous(emissions)
    B, L, T = emissions.shape
    tp, warps = _tile(T)
    g_em = torch.zeros_like(emissions, memory_format=torch.contiguous_format)  # (B, L, T)
    g_start = alpha.new_empty((B, T))  # per sequence, summed below
    g_end = alpha.new_empty((B, T))
    g_trans = alpha.new_empty((B, T, T))
    _crf_backward_kernel[(B,)](
        emissions, emissions.stride(0), emissions.stride(1),
        tags, tags.stride(0), tags.stride(1),
        lengths, end, transitions,
        alpha, dlog,
        grad_llh.float().contiguous(),
        g_em, g_em.stride(0), g_em.stride(1),
        g_start,
        g_end,
        g_trans,
        L, T,
        TP=tp,
        num_warps=warps,
    )
    return g_em, g_start.sum(0), g_end.sum(0), g_trans.sum(0)


class _TritonLogLikelihood(torch.autograd.Function):
    """:func:`crf_forward` and :func:`crf_backward` under autograd: per-sequence log-likelihood (B,) fp32."""

    @staticmethod
    def forward(ctx, emissions, tags, lengths, start, end, transitions):
        emissions = _last_dim_contiguous(emissions)
        llh, alpha, dlog = crf_forward(emissions, tags, lengths, start, end, transitions)
        ctx.save_for_backward(emissions, tags, lengths, end, transitions, alpha, dlog)
        return llh

    @staticmethod
    def backward(ctx, grad_llh):
        emissions, tags, lengths, end, transitions, alpha, dlog = ctx.saved_tensors
        g_em, g_start, g_end, g_trans = crf_backward(grad_llh, emissions, tags, lengths, end, transitions, alpha,
                                                     dlog)
        return g_em, None, None, g_start, g_end, g_trans


def triton_log_likelihood(emissions, tags, lengths, start, end, transitions) -> torch.Tensor:
    """log p(tags | emissions) (B,) fp32 of batch-first emissions (B, L, T), int64 tags (B, L), int32
    lengths (B,) and fp32 contiguous scores; differentiable in the emissions and the scores."""
    return _TritonLogLikelihood.apply(emissions, tags, lengths, start, end, transitions)


def triton_viterbi(emissions, lengths, start, end, transitions, pad: int) -> torch.Tensor:
    """Viterbi paths (B, L) int64 of batch-first emissions, ``pad`` past each sequence's end."""
    emissions = _last_dim_contiguous(emissions)
    B, L, T = emissions.shape
    tp, warps = _tile(T)
    backpointers = emissions.new_empty((B, L, T), dtype=torch.int8)
    path = torch.full((B, L), pad, dtype=torch.long, device=emissions.device)
    _crf_viterbi_kernel[(B,)](
        emissions, emissions.stride(0), emissions.stride(1),
        lengths,
        start,
        end,
        transitions,
        backpointers,
        path,
        path.stride(0),
        L, T,
        TP=tp,
        num_warps=warps,
    )
    return path
