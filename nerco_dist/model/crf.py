"""The project's one CRF dispatch point: every model builds its CRF through :func:`build_crf`."""

from __future__ import annotations

from torchcrf import CRF as TorchCRF


def build_crf(num_tags: int) -> TorchCRF:
    """A linear-chain CRF with pytorch-crf's interface (batch first)."""
    return TorchCRF(num_tags, batch_first=True)
