"""Which tokens are InfoNCE queries: the one statement of the rule, shared by the torch path, the fused
kernel's pre-pass and the trainer's logging. Pure torch (no Triton), so the CPU path needs nothing more.

A class c qualifies when it has at least two members among the keys (a positive besides the query itself),
at least one key of another class exists (a negative), and it is not the non-entity class unless
``non_entity_queries``. Every query token of a qualifying class is a query row, with weight
1/(|P_c|(|P_c|-1)), |P_c| counted over the keys.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class QueryStats(NamedTuple):
    """Logging statistics of the key batch (the global batch when the keys are gathered from all ranks)."""

    queries: float  # keys of a qualifying class (= query rows when the keys are the queries)
    positive_pairs: float  # sum over qualifying classes of |P_c|(|P_c|-1)
    negatives_per_query: float  # mean over those keys of the number of keys of another class
    class_fractions: list[float]  # share of each class among the keys


class QuerySelection(NamedTuple):
    """The query rows and what the loss needs of them."""

    rows: torch.Tensor  # (Nq,) int64: query rows among the features, ascending
    classes: torch.Tensor  # (Nq,) int64: class of each query row
    self_rows: torch.Tensor  # (Nq,) int64: key row holding the query itself (not its own positive), or -1
    weight: torch.Tensor  # (Nq,) float64: 1/(|P_c|(|P_c|-1)) of the query's class
    key_labels: torch.Tensor  # (Nk,) int64: class of each key
    key_counts: torch.Tensor  # (C,) int64: keys per class
    qualifies: torch.Tensor  # (C,) bool: whether the class is a query class
    num_queries: int  # Nq
    num_query_classes: int  # qualifying classes: 0 when the loss has no term for any query of the key batch

    @property
    def has_queries(self) -> bool:
        return self.num_queries > 0

    def stats(self) -> QueryStats:
        """Plain numbers for logging (one host sync: call it on logging steps only)."""
        counts, qualifies = torch.stack([self.key_counts, self.qualifies.long()]).tolist()
        n = sum(counts)
        sizes = [m for m, ok in zip(counts, qualifies) if ok]
        return QueryStats(queries=float(sum(sizes)), positive_pairs=float(sum(m * (m - 1) for m in sizes)),
                          negatives_per_query=sum(m * (n - m) for m in sizes) / max(sum(sizes), 1),
                          class_fractions=[m / max(n, 1) for m in counts])


def select_queries(labels: torch.Tensor, key_labels: torch.Tensor, self_index: torch.Tensor, num_classes: int,
                   *, non_entity: int = 0, non_entity_queries: bool = False) -> QuerySelection:
    """The queries among ``labels`` (N,) against keys of classes ``key_labels`` (Nk,), all in
    [0, num_classes); ``self_index[i]`` is the key row of query i or -1. One host sync (the two counts);
    the rows come from a stable sort instead of ``nonzero``, which would sync a second time."""
    labels, key_labels = labels.long(), key_labels.long()
    key_counts = torch.zeros(num_classes, dtype=torch.long, device=key_labels.device)
    key_counts.index_add_(0, key_labels, torch.ones_like(key_labels))
    qualifies = (key_counts >= 2) & (key_counts < key_labels.numel())
    if not non_entity_queries:
        qualifies &= torch.arange(num_classes, device=qualifies.device) != non_entity
    is_query = qualifies[labels]
    num_queries, num_query_classes = torch.stack([is_query.sum(), qualifies.sum()]).tolist()
    rows = torch.sort(is_query.byte(), descending=True, stable=True).indices[:num_queries]
    classes = labels[rows]
    size = key_counts[classes]
    return QuerySelection(rows=rows, classes=classes, self_rows=self_index.long()[rows],
                          weight=1.0 / (size * (size - 1)).double(), key_labels=key_labels, key_counts=key_counts,
                          qualifies=qualifies, num_queries=num_queries, num_query_classes=num_query_classes)
