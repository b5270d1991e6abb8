"""Triton kernels (installed as ``nerco_dist.kernels``). They know nothing of the trainer or the data."""
from .infonce import semantic_infonce
from .crf import CRF

__all__ = ["CRF", "semantic_infonce"]
