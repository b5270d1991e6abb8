"""Semantic-class InfoNCE of the contrastive stage, and its one dispatch point.

For each class c other than the non-entity class with |P_c| >= 2 tokens and at least one token of another
class (N_c), every ordered pair (i, j) of distinct class-c tokens is its own softmax over that positive and
all negatives; pairs are averaged within the class and class terms summed:

    L = sum_c 1/(|P_c|(|P_c|-1)) sum_{i != j in P_c} softplus(LSE_{n in N_c} s_in/tau - s_ij/tau)

with s the cosine similarity. With ``keys`` (e.g. gathered from all ranks) the tokens i are the local
queries, j and n range over the keys, and class sizes are counted over the keys, so summing the local
losses over ranks gives the loss of the whole global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "triton")


def semantic_class_infonce(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07,
                           non_entity: int = 0, *, keys: torch.Tensor | None = None,
                           key_labels: torch.Tensor | None = None, self_index: torch.Tensor | None = None,
                           non_entity_queries: bool = False, backend: str = "auto") -> torch.Tensor:
    """The loss above for ``features`` (N, d) with semantic-class ``labels`` (N,).

    ``keys``/``key_labels`` (Nk, d)/(Nk,) replace the batch as positives and negatives; ``self_index[i]`` is
    the key row holding query i itself (excluded from its positives) or -1 (default: ``arange(N)`` without
    keys, all -1 with keys). ``non_entity_queries`` is the ablation where the non-entity class is a query
    class like any other. ``backend``: "auto" runs the fused Triton kernel on CUDA tensors and the dense
    torch path (entity rows x keys, O(N_entity * Nk) memory) otherwise; "torch"/"triton" force one.
    The result is fp32 for half-precision inputs. When no class qualifies (see :func:`infonce_active`) it
    is 0 and still connected to the inputs, so backward runs and gives zero gradients.
    """
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
    use_kernel = backend == "triton" or (
        backend == "auto" and features.is_cuda and features.dtype in (torch.float32, torch.float16, torch.bfloat16))
    if use_kernel:
        from nerco_dist.kernels.infonce import semantic_infonce

        return semantic_infonce(features, labels, temperature, non_entity, keys, key_labels, self_index,
                                non_entity_queries)
    return torch_infonce(features, labels, temperature, non_entity, keys=keys, key_labels=key_labels,
                         self_index=self_index, non_entity_queries=non_entity_queries)


def _qualifying(labels, key_labels, non_entity, non_entity_queries):
    """Query rows whose class qualifies, and 1/(|P_c|(|P_c|-1)) for each of them."""
    classes, counts = torch.unique(key_labels, return_counts=True)
    ok = (counts >= 2) & (counts < key_labels.numel())
    if not non_entity_queries:
        ok &= classes != non_entity
    c = torch.searchsorted(classes, labels).clamp_max(classes.numel() - 1)
    rows = torch.nonzero((classes[c] == labels) & ok[c]).squeeze(1)
    n = counts[c[rows]]
    return rows, 1.0 / (n * (n - 1)).double()


def infonce_active(labels: torch.Tensor, non_entity: int = 0, *, key_labels: torch.Tensor | None = None,
                   non_entity_queries: bool = False) -> bool:
    """Whether any query class qualifies, i.e. whether the loss has a term (one host sync)."""
    key_labels = labels if key_labels is None else key_labels
    if labels.numel() == 0 or key_labels.numel() == 0:
        return False
    return _qualifying(labels, key_labels, non_entity, non_entity_queries)[0].numel() > 0


def torch_infonce(features, labels, temperature=0.07, non_entity=0, *, keys=None, key_labels=None,
                  self_index=None, non_entity_queries=False, compute_dtype=None) -> torch.Tensor:
    """Dense torch path: qualifying query rows x all keys, O(N_entity * Nk) memory. Computes in
    ``compute_dtype`` (default: the input dtype, fp32 for half precision)."""
    if compute_dtype is None:
        compute_dtype = torch.float32 if features.dtype in (torch.float16, torch.bfloat16) else features.dtype
    if keys is None:
        keys, key_labels = features, labels
        if self_index is None:
            self_index = torch.arange(labels.numel(), device=labels.device)
    elif self_index is None:
        self_index = torch.full_like(labels, -1)
    if labels.numel() == 0 or key_labels.numel() == 0:
        return (features[:0].sum() + keys[:0].sum()).to(compute_dtype)
    rows, w = _qualifying(labels, key_labels, non_entity, non_entity_queries)
    if rows.numel() == 0:
        return (features[:0].sum() + keys[:0].sum()).to(compute_dtype)
    q = F.normalize(features.index_select(0, rows).to(compute_dtype), dim=1)
    k = F.normalize(keys.to(compute_dtype), dim=1)
    return entity_rows_loss(q, k, labels[rows], key_labels, self_index[rows], w.to(compute_dtype), temperature)


def entity_rows_loss(q, k, q_labels, k_labels, q_self, w, temperature: float) -> torch.Tensor:
    """Loss of unit-norm queries q (Ne, d), all of a qualifying class, against unit-norm keys k (Nk, d).
    Shape-static, so it compiles with torch.compile."""
    logits = q @ k.T / temperature
    same = q_labels[:, None] == k_labels[None, :]
    lse = torch.logsumexp(logits.masked_fill(same, float("-inf")), dim=1)
    cols = torch.arange(k.shape[0], device=k.device)
    pos = same & (cols[None, :] != q_self[:, None])
    terms = F.softplus(lse[:, None] - logits).masked_fill(~pos, 0.0)
    return (terms.sum(1) * w).sum()
