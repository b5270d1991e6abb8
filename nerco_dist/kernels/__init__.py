"""Triton kernels. They know nothing of the trainer or the data.

``semantic_infonce`` is imported on first use: it needs Triton, while the CRF's torch path and the InfoNCE
query selection must import without it."""
from .crf import CRF
from .query_classes import QuerySelection, select_queries

__all__ = ["CRF", "QuerySelection", "select_queries", "semantic_infonce"]


def __getattr__(name: str):
    if name == "semantic_infonce":
        from .infonce import semantic_infonce

        return semantic_infonce
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
