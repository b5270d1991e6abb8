"""Linear-chain CRF: a drop-in for pytorch-crf with Triton kernels on the GPU and a vectorised torch path on CPU.

The score of tags y_0..y_{n-1} is start[y_0] + sum_t em[t, y_t] + sum_{t>0} trans[y_{t-1}, y_t] + end[y_{n-1}];
``forward`` returns log p(y | em) = score(y) - log Z, ``decode`` the Viterbi path. Sequences are the prefixes
given by the mask: its first step must be on, as in pytorch-crf, and a mask with holes is refused.

Triton (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), one program per sequence with the time
loop inside the kernel and the [tags x tags] transition tile in registers (tags padded to a power of two):

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

Torch (CPU): the forward algorithm in probability space, float64 (exp underflows only for score spreads
above ~700 within a step), normalised every step by a detached constant (the gradient of log(Z / K) is
that of log Z), so a step is one small matmul instead of a (B, T, T) logsumexp; its gradient comes from
autograd. Viterbi: amax per step, vectorised backtrace.

Forbidden transitions (an optional ``allowed`` mask) score ``NEG`` = -1e4, finite so that nothing is NaN.
"""

from __future__ import annotations

import os
from typing import List, NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import nn

NEG = -1.0e4  # score of a forbidden start, end or transition
MAX_TAGS = 128  # backpointers are int8 and tags are padded to a power of two
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
def _crf_forward_kernel(em, s_eb, s_el, tags, s_tb, s_tl, lengths, start, end, trans,
                        alpha, dlog, llh, L, T, TP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(lengths + b)
    i = tl.arange(0, TP)
    j = tl.arange(0, TP)
    on = j < T
    tr = tl.load(trans + i[:, None] * T + j[None, :], mask=(i[:, None] < T) & on[None, :], other=PAD)
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
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(lengths + b)
    i = tl.arange(0, TP)
    j = tl.arange(0, TP)
    on = j < T
    tr = tl.load(trans + i[:, None] * T + j[None, :], mask=(i[:, None] < T) & on[None, :], other=PAD)
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


def _launch_meta(T: int) -> dict:
    tp = max(16, triton.next_power_of_2(T))
    return dict(TP=tp, num_warps=min(8, max(1, tp * tp // 512)))


class _TritonLogLikelihood(torch.autograd.Function):
    """Per-sequence log-likelihood (B,) fp32; the backward pass is the kernel's beta pass."""

    @staticmethod
    def forward(ctx, emissions, tags, lengths, start, end, transitions):
        if emissions.stride(2) != 1:
            emissions = emissions.contiguous()
        B, L, T = emissions.shape
        alpha = emissions.new_empty((B, L, T), dtype=torch.float32)
        dlog = emissions.new_empty((B, L), dtype=torch.float32)
        llh = emissions.new_empty((B,), dtype=torch.float32)
        _crf_forward_kernel[(B,)](emissions, emissions.stride(0), emissions.stride(1), tags, tags.stride(0),
                                  tags.stride(1), lengths, start, end, transitions, alpha, dlog, llh, L, T,
                                  **_launch_meta(T))
        ctx.save_for_backward(emissions, tags, lengths, end, transitions, alpha, dlog)
        return llh

    @staticmethod
    def backward(ctx, grad_llh):
        emissions, tags, lengths, end, transitions, alpha, dlog = ctx.saved_tensors
        B, L, T = emissions.shape
        g_em = torch.zeros_like(emissions, memory_format=torch.contiguous_format)
        g_start = alpha.new_empty((B, T))
        g_end = alpha.new_empty((B, T))
        g_trans = alpha.new_empty((B, T, T))
        _crf_backward_kernel[(B,)](emissions, emissions.stride(0), emissions.stride(1), tags, tags.stride(0),
                                   tags.stride(1), lengths, end, transitions, alpha, dlog,
                                   grad_llh.float().contiguous(), g_em, g_em.stride(0), g_em.stride(1), g_start,
                                   g_end, g_trans, L, T, **_launch_meta(T))
        return g_em, None, None, g_start.sum(0), g_end.sum(0), g_trans.sum(0)


def _triton_viterbi(emissions, lengths, start, end, transitions, pad):
    if emissions.stride(2) != 1:
        emissions = emissions.contiguous()
    B, L, T = emissions.shape
    backpointers = emissions.new_empty((B, L, T), dtype=torch.int8)
    path = torch.full((B, L), pad, dtype=torch.long, device=emissions.device)
    _crf_viterbi_kernel[(B,)](emissions, emissions.stride(0), emissions.stride(1), lengths, start, end,
                              transitions, backpointers, path, path.stride(0), L, T, **_launch_meta(T))
    return path


def _torch_log_likelihood(emissions, tags, mask, lengths, start, end, transitions):
    """Per-sequence log-likelihood (B,), float64; the scan runs past each sequence's end and the results are
    read at its last step, so the loop body has no masking."""
    B, L, T = emissions.shape
    em = emissions.double().masked_fill(~mask.unsqueeze(2), 0.0)
    start, end, transitions = start.double(), end.double(), transitions.double()
    fmask = mask.double()
    last = (lengths - 1).unsqueeze(1)
    gold = (start[tags[:, 0]] + end[tags.gather(1, last).squeeze(1)]
            + (em.gather(2, tags.unsqueeze(2)).squeeze(2) * fmask).sum(1)
            + (transitions[tags[:, :-1], tags[:, 1:]] * fmask[:, 1:]).sum(1))

    em_max = em.detach().amax(2, keepdim=True)
    trans_max = transitions.detach().max()
    q = (em - em_max).exp().unbind(1)
    e_trans = (transitions - trans_max).exp()
    a = (start - start.detach().max()).exp() * q[0]
    tiny = torch.finfo(torch.float64).tiny  # no path left (impossible constraints): finite, not NaN
    alphas, norms = [], []
    for t in range(L):
        if t:
            a = (a @ e_trans) * q[t]
        c = a.detach().sum(1, keepdim=True).clamp_min_(tiny)
        a = a / c
        alphas.append(a)
        norms.append(c)
    a_last = torch.stack(alphas, 1).gather(1, last.unsqueeze(2).expand(B, 1, T)).squeeze(1)
    log_z = ((a_last * (end - end.detach().max()).exp()).sum(1).clamp_min(tiny).log()
             + (torch.cat(norms, 1).log() * fmask).sum(1) + (em_max.squeeze(2) * fmask).sum(1)
             + (lengths - 1) * trans_max + start.detach().max() + end.detach().max())
    return gold - log_z


def _torch_viterbi(emissions, mask, start, end, transitions, pad):
    """Max-plus recursion over time with tags first, scores (T, B): the max over the previous tag is then a
    reduction over the outer dim of a contiguous (T, T, B) tensor, which is vectorised; amax only (max with
    indices is several times slower). The recursion runs past each sequence's end; the backtrace starts at
    each end and recomputes the one argmax it needs per step from the same sums."""
    B, L, T = emissions.shape
    dtype = torch.promote_types(emissions.dtype, torch.float32)
    em = emissions.to(dtype).permute(1, 2, 0).contiguous()  # (L, T, B)
    transitions = transitions.to(dtype)
    into = transitions.unsqueeze(2)  # (T, T, 1)
    score = start.to(dtype).unsqueeze(1) + em[0]
    scores = [score]
    for e in em.unbind(0)[1:]:
        score = (score.unsqueeze(1) + into).amax(0) + e
        scores.append(score)
    last = mask.sum(1) - 1
    final = torch.stack(scores).gather(0, last.view(1, 1, B).expand(1, T, B)).squeeze(0)
    best = (final + end.to(dtype).unsqueeze(1)).argmax(0)
    at_end = (torch.arange(L, device=mask.device) == last.unsqueeze(1)).unbind(1)
    cur = best
    path = [cur]
    for t in range(L - 1, 0, -1):
        cur = torch.where(at_end[t - 1], best, (scores[t - 1] + transitions.index_select(1, cur)).argmax(0))
        path.append(cur)
    return torch.stack(path[::-1], 1).masked_fill_(~mask, pad)


class AllowedTransitions(NamedTuple):
    """Which starts, ends and transitions a path may use: bool tensors [T], [T], [T, T] (from row to column)."""

    start: torch.Tensor
    end: torch.Tensor
    transitions: torch.Tensor


BACKENDS = ("auto", "torch", "triton")


class CRF(nn.Module):
    """pytorch-crf's ``CRF`` (same interface and parameter names, so state dicts load both ways), with an
    optional :class:`AllowedTransitions` constraint applied to both the likelihood and the decoding.

    ``backend``: ``"auto"`` runs the Triton kernels on CUDA tensors (up to 128 tags) and the torch path
    otherwise; ``"triton"`` forces the kernels (on CPU tensors only under ``TRITON_INTERPRET=1``); ``"torch"``
    forces the torch path.
    """

    def __init__(self, num_tags: int, batch_first: bool = False, allowed: Optional[AllowedTransitions] = None,
                 backend: str = "auto") -> None:
        if num_tags <= 0:
            raise ValueError(f"invalid number of tags: {num_tags}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        super().__init__()
        self.num_tags = num_tags
        self.batch_first = batch_first
        self.backend = backend
        self.start_transitions = nn.Parameter(torch.empty(num_tags))
        self.end_transitions = nn.Parameter(torch.empty(num_tags))
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags))
        self.constrained = allowed is not None
        if allowed is not None:
            allowed = AllowedTransitions(*(torch.as_tensor(x, dtype=torch.bool) for x in allowed))
            shapes = tuple(tuple(x.shape) for x in allowed)
            if shapes != ((num_tags,), (num_tags,), (num_tags, num_tags)):
                raise ValueError(f"allowed masks must have shapes [T], [T], [T, T] with T={num_tags}, got {shapes}")
            # not persistent: the state dict holds exactly pytorch-crf's three parameters
            self.register_buffer("start_allowed", allowed.start, persistent=False)
            self.register_buffer("end_allowed", allowed.end, persistent=False)
            self.register_buffer("transition_allowed", allowed.transitions, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in [-0.1, 0.1], as pytorch-crf."""
        nn.init.uniform_(self.start_transitions, -0.1, 0.1)
        nn.init.uniform_(self.end_transitions, -0.1, 0.1)
        nn.init.uniform_(self.transitions, -0.1, 0.1)

    def extra_repr(self) -> str:
        return f"num_tags={self.num_tags}, batch_first={self.batch_first}, backend={self.backend!r}, " \
               f"constrained={self.constrained}"

    def forward(self, emissions: torch.Tensor, tags: torch.LongTensor, mask: Optional[torch.Tensor] = None,
                reduction: str = "sum") -> torch.Tensor:
        """Log-likelihood of ``tags``: (B,) for ``reduction='none'``, else summed, averaged over sequences
        (``mean``) or over unmasked tokens (``token_mean``)."""
        if reduction not in ("none", "sum", "mean", "token_mean"):
            raise ValueError(f"invalid reduction: {reduction}")
        emissions, tags, mask = self._batch_first(emissions, tags, mask)
        mask, lengths = self._validate(emissions, tags, mask)
        start, end, transitions = self._scores()
        if self._use_triton(emissions):
            llh = _TritonLogLikelihood.apply(emissions, tags.long(), lengths, start, end, transitions)
        else:
            tags = tags.long().masked_fill(~mask, 0)  # whatever pads the tags, it is never read
            llh = _torch_log_likelihood(emissions, tags, mask, lengths.long(), start, end, transitions)
        llh = llh.to(torch.promote_types(emissions.dtype, self.transitions.dtype))
        if reduction == "none":
            return llh
        if reduction == "sum":
            return llh.sum()
        if reduction == "mean":
            return llh.mean()
        return llh.sum() / mask.sum()

    @torch.no_grad()
    def decode_padded(self, emissions: torch.Tensor, mask: Optional[torch.Tensor] = None,
                      pad: int = -1) -> torch.LongTensor:
        """Viterbi paths as one LongTensor shaped like the mask, ``pad`` past each sequence's end."""
        emissions, _, mask = self._batch_first(emissions, None, mask)
        mask, lengths = self._validate(emissions, None, mask)
        start, end, transitions = self._scores()
        if self._use_triton(emissions):
            path = _triton_viterbi(emissions, lengths, start, end, transitions, pad)
        else:
            path = _torch_viterbi(emissions, mask, start, end, transitions, pad)
        return path if self.batch_first else path.t()

    def decode(self, emissions: torch.Tensor, mask: Optional[torch.Tensor] = None) -> List[List[int]]:
        """Viterbi paths as lists of tag ids, as pytorch-crf."""
        path = self.decode_padded(emissions, mask)
        if not self.batch_first:
            path = path.t()
        return [row[: row.index(-1)] if -1 in row else row for row in path.tolist()]

    def _batch_first(self, emissions, tags, mask):
        if self.batch_first:
            return emissions, tags, mask
        t = lambda x: None if x is None else x.transpose(0, 1)  # noqa: E731
        return t(emissions), t(tags), t(mask)

    def _validate(self, emissions, tags, mask):
        """pytorch-crf's checks, plus: the mask is a prefix of ones. Returns the bool mask and the lengths."""
        if emissions.dim() != 3:
            raise ValueError(f"emissions must have dimension of 3, got {emissions.dim()}")
        if emissions.size(2) != self.num_tags:
            raise ValueError(f"expected last dimension of emissions is {self.num_tags}, got {emissions.size(2)}")
        if tags is not None and tags.shape != emissions.shape[:2]:
            raise ValueError("the first two dimensions of emissions and tags must match, "
                             f"got {tuple(emissions.shape[:2])} and {tuple(tags.shape)}")
        if mask is None:
            mask = torch.ones(emissions.shape[:2], dtype=torch.bool, device=emissions.device)
        elif mask.shape != emissions.shape[:2]:
            raise ValueError("the first two dimensions of emissions and mask must match, "
                             f"got {tuple(emissions.shape[:2])} and {tuple(mask.shape)}")
        mask = mask.bool()
        if emissions.size(1) == 0:
            raise ValueError("mask of the first timestep must all be on")
        first_off, holes = torch.stack([~mask[:, 0].all(), (mask[:, 1:] & ~mask[:, :-1]).any()]).tolist()
        if first_off:
            raise ValueError("mask of the first timestep must all be on")
        if holes:
            raise ValueError("mask must be a prefix of ones in every sequence")
        return mask, mask.sum(1, dtype=torch.int32)

    def _scores(self):
        """start, end, transitions (fp32, contiguous) with forbidden entries at NEG."""
        start, end, trans = (p.float().contiguous() for p in
                             (self.start_transitions, self.end_transitions, self.transitions))
        if not self.constrained:
            return start, end, trans
        return (start.masked_fill(~self.start_allowed, NEG), end.masked_fill(~self.end_allowed, NEG),
                trans.masked_fill(~self.transition_allowed, NEG))

    def _use_triton(self, emissions: torch.Tensor) -> bool:
        if self.backend == "auto":
            return emissions.is_cuda and self.num_tags <= MAX_TAGS
        if self.backend == "torch":
            return False
        if not emissions.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("the Triton CRF runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1")
        if emissions.size(2) > MAX_TAGS:
            raise ValueError(f"the Triton CRF supports at most {MAX_TAGS} tags, got {emissions.size(2)}")
        return True
