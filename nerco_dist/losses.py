"""Semantic-class InfoNCE of the contrastive stage, and its one dispatch point.

For each class c other than the non-entity class with |P_c| >= 2 tokens and at least one token of another
class (N_c), every ordered pair (i, j) of distinct class-c tokens is its own softmax over that positive and
all negatives; pairs are averaged within the class and class terms summed:

    L = sum_c 1/(|P_c|(|P_c|-1)) sum_{i != j in P_c} softplus(LSE_{n in N_c} s_in/tau - s_ij/tau)

with s the cosine similarity. With ``keys`` (e.g. gathered from all ranks) the tokens i are the local
queries, j and n range over the keys, and class sizes are counted over the keys, so summing the local
losses over ranks gives the loss of the whole global batch. Which classes qualify is decided in one place,
:func:`nerco_dist.kernels.query_classes.select_queries`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import distributed as dist
from .kernels.query_classes import QuerySelection, select_queries

BACKENDS = ("auto", "torch", "triton")


def semantic_class_infonce(features: torch.Tensor, labels: torch.Tensor, temperature: float, *,
                           keys: torch.Tensor | None = None, key_labels: torch.Tensor | None = None,
                           self_index: torch.Tensor | None = None, selection: QuerySelection | None = None,
                           num_classes: int | None = None, non_entity_queries: bool = False,
                           backend: str = "auto") -> torch.Tensor:
    """The loss above for ``features`` (N, d) with semantic-class ``labels`` (N,), class 0 the non-entity one.

    ``keys``/``key_labels`` (Nk, d)/(Nk,) replace the batch as positives and negatives; ``self_index[i]`` is
    the key row holding query i itself (excluded from its positives) or -1 (default: ``arange(N)`` without
    keys, all -1 with keys). ``selection`` (from :func:`select_queries` on these labels) is used as given;
    otherwise it is computed here, with classes in [0, ``num_classes``) (default: from the labels, one more
    host sync). ``non_entity_queries`` is the ablation where the non-entity class is a query class like any
    other. ``backend``: "auto" runs the fused Triton kernel on CUDA tensors it supports and the dense torch
    path (query rows x keys, O(Nq * Nk) memory) otherwise; "torch"/"triton" force one. The result is fp32
    for half-precision inputs. Without queries it is 0 and still connected to the inputs, so backward runs
    and gives zero gradients.
    """
    _check_arguments(features, labels, keys, key_labels, temperature=temperature, self_index=self_index, backend=backend)
    if keys is None:
        keys, key_labels = features, labels
        if self_index is None:
            self_index = torch.arange(labels.numel(), device=labels.device)
    elif self_index is None:
        self_index = torch.full_like(labels, -1)
    if selection is None:
        if num_classes is None:
            classes = torch.cat([labels, key_labels])
            num_classes = int(classes.max()) + 1 if classes.numel() else 1
        selection = select_queries(labels, key_labels, self_index, num_classes,
                                   non_entity_queries=non_entity_queries)
    elif selection.key_labels.shape != key_labels.shape:
        raise ValueError("selection was made for other keys")
    if not selection.has_queries:
        return (features[:0].sum() + keys[:0].sum()).to(torch.promote_types(features.dtype, torch.float32))
    if _use_kernel(features, backend):
        from .kernels.infonce import semantic_infonce

        return semantic_infonce(features, keys, selection, temperature)
    return torch_infonce(features, keys, selection, temperature)


def _check_arguments(features, labels, keys, key_labels, *, temperature, self_index, backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"expected features (N, d) and labels (N,), "
                         f"got {tuple(features.shape)} and {tuple(labels.shape)}")
    if (keys is None) != (key_labels is None):
        raise ValueError("keys and key_labels go together")
    if keys is None and self_index is not None:
        raise ValueError("self_index needs keys")
    if keys is not None and (keys.dim() != 2 or keys.shape[1] != features.shape[1]
                             or key_labels.shape != keys.shape[:1]):
        raise ValueError(f"expected keys (Nk, {features.shape[1]}) and key_labels (Nk,), "
                         f"got {tuple(keys.shape)} and {tuple(key_labels.shape)}")
    if self_index is not None and self_index.shape != labels.shape:
        raise ValueError("self_index must have one entry per query")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def _use_kernel(features: torch.Tensor, backend: str) -> bool:
    """Whether the fused kernel runs: "auto" on CUDA tensors it supports; "triton" refuses the others."""
    if backend == "torch" or (backend == "auto" and not features.is_cuda):
        return False
    from .kernels import infonce

    if features.dtype in infonce.DTYPES and features.shape[1] <= infonce.MAX_DIM:
        return True
    if backend == "auto":
        return False
    if features.dtype not in infonce.DTYPES:
        raise TypeError(f"the InfoNCE kernel takes {infonce.DTYPES}, got {features.dtype}")
    raise ValueError(f"the InfoNCE kernel takes at most {infonce.MAX_DIM} feature columns, got {features.shape[1]}")


def torch_infonce(features: torch.Tensor, keys: torch.Tensor, selection: QuerySelection, temperature: float,
                  compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense torch path: the selection's query rows x all keys, O(Nq * Nk) memory. Computes in
    ``compute_dtype`` (default: the input dtype, fp32 for half precision)."""
    if compute_dtype is None:
        compute_dtype = torch.promote_types(features.dtype, torch.float32)
    q = F.normalize(features.index_select(0, selection.rows).to(compute_dtype), dim=1)
    k = F.normalize(keys.to(compute_dtype), dim=1)
    return entity_rows_loss(q, k, selection.classes, selection.key_labels, selection.self_rows,
                            selection.weight.to(compute_dtype), temperature=temperature)


def entity_rows_loss(q, k, q_labels, k_labels, q_self, w, *, temperature: float) -> torch.Tensor:
    """Loss of unit-norm queries q (Nq, d), all of a qualifying class, against unit-norm keys k (Nk, d).
    Shape-static, so it compiles with torch.compile."""
    logits = q @ k.T / temperature
    same = q_labels[:, None] == k_labels[None, :]
    lse = torch.logsumexp(logits.masked_fill(same, float("-inf")), dim=1)
    cols = torch.arange(k.shape[0], device=k.device)
    pos = same & (cols[None, :] != q_self[:, None])
    terms = F.softplus(lse[:, None] - logits).masked_fill(~pos, 0.0)
    return (terms.sum(1) * w).sum()


def contrastive_loss(tokens: torch.Tensor, labels: torch.Tensor, *, temperature: float, num_classes: int,
                     non_entity_queries: bool = False, backend: str = "auto",
                     across_ranks: bool = True) -> tuple[torch.Tensor | None, QuerySelection]:
    """Stage-1 loss of this rank's contrastive features ``tokens`` (N, d) with semantic classes ``labels``
    (N,) in [0, num_classes), and its query selection (reused for logging).

    ``across_ranks``: the keys are every rank's tokens (gradients flow back to the rank that owns them) and
    the class sizes those of the global batch; the loss is scaled by the world size, so that DeepSpeed's
    gradient averaging yields the gradient of the global batch's loss and the mean over ranks of the value
    is that loss. With one rank the gather is the identity. The loss is None when no class of the (gathered)
    batch qualifies: the same decision on every rank, so all ranks run the backward pass and its collectives,
    or none does.
    """
    if across_ranks:
        keys, key_labels, self_index = dist.gather_rows(tokens, labels)
    else:
        keys, key_labels, self_index = tokens, labels, torch.arange(labels.numel(), device=labels.device)
    selection = select_queries(labels, key_labels, self_index, num_classes, non_entity_queries=non_entity_queries)
    if selection.num_query_classes == 0:
        return None, selection
    loss = semantic_class_infonce(tokens, labels, temperature, keys=keys, key_labels=key_labels,
                                  self_index=self_index, selection=selection, backend=backend)
    return (dist.world_size() if across_ranks else 1) * loss, selection
