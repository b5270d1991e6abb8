"""Linear-chain CRF: a drop-in for pytorch-crf with Triton kernels on the GPU and a vectorised torch path on CPU.

The score of tags y_0..y_{n-1} is start[y_0] + sum_t em[t, y_t] + sum_{t>0} trans[y_{t-1}, y_t] + end[y_{n-1}];
``forward`` returns log p(y | em) = score(y) - log Z, ``decode`` the Viterbi path. Sequences are the prefixes
given by the mask: its first step must be on, as in pytorch-crf, and a mask with holes is refused.

Triton (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``): the kernels in crf_triton.py, imported
only when they run, so that this module and its torch path need no Triton.

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
from torch import nn

NEG = -1.0e4  # score of a forbidden start, end or transition
MAX_TAGS = 128  # the Triton kernels' backpointers are int8 and tags are padded to a power of two


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
            from .crf_triton import triton_log_likelihood

            llh = triton_log_likelihood(emissions, tags.long(), lengths, start, end, transitions)
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
            from .crf_triton import triton_viterbi

            path = triton_viterbi(emissions, lengths, start, end, transitions, pad)
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
