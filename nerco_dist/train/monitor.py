"""What a training run shows while it works: TensorBoard scalars (rank 0) and per-step throughput."""

from __future__ import annotations

import time
from pathlib import Path

from .. import distributed as dist


class Scalars:
    """TensorBoard scalars under ``directory``, written by rank 0; nothing at all when ``directory`` is None."""

    def __init__(self, directory: Path | None):
        self.writer = None
        if directory is not None and dist.is_main():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(directory))

    def add(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def add_group(self, tag: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalars(tag, values, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Throughput:
    """Tokens per second since the last reading, for this rank and for all ranks."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.since, self.tokens, self.all_tokens = time.time(), 0, 0

    def count(self, tokens: int, all_tokens: int) -> None:
        self.tokens, self.all_tokens = self.tokens + tokens, self.all_tokens + all_tokens

    def read(self) -> tuple[float, float]:
        elapsed = max(time.time() - self.since, 1e-9)
        rates = self.tokens / elapsed, self.all_tokens / elapsed
        self.reset()
        return rates
