"""The project's one CRF dispatch point: every model builds its CRF through :func:`build_crf`."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..data.tags import split_tag
from ..kernels.crf import CRF, AllowedTransitions


def build_crf(num_tags: int, allowed: Optional[AllowedTransitions] = None) -> CRF:
    """A batch-first linear-chain CRF with pytorch-crf's interface and parameter names: Triton kernels on CUDA
    tensors, the vectorised torch path otherwise (importable without Triton)."""
    return CRF(num_tags, batch_first=True, allowed=allowed)


def bio_allowed_transitions(labels: Sequence[str]) -> AllowedTransitions:
    """The well-formed paths over ``labels`` (BIO, or BIOES/BMES when E- or S- tags occur).

    A continuation tag (I-, M-, E-) must follow B- or I-/M- of its own type, so it cannot start a path; in
    BIOES an open entity (B-, I-, M-) must be continued by I-/M-/E- of its type, so it cannot end a path.
    """
    parts = [split_tag(label) for label in labels]
    closing = any(prefix in ("E", "S") for prefix, _ in parts)
    cont = [prefix in ("I", "M", "E") for prefix, _ in parts]
    inside = [prefix in ("B", "I", "M") for prefix, _ in parts]  # may be followed by a continuation
    open_ = [closing and x for x in inside]  # must be followed by a continuation
    types = [etype for _, etype in parts]
    n = len(labels)
    trans = torch.tensor([[(not cont[j] or (inside[i] and types[i] == types[j]))
                           and (not open_[i] or (cont[j] and types[i] == types[j]))
                           for j in range(n)] for i in range(n)], dtype=torch.bool)
    start = torch.tensor([not c for c in cont], dtype=torch.bool)
    end = torch.tensor([not o for o in open_], dtype=torch.bool)
    return AllowedTransitions(start, end, trans)
