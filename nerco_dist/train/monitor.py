"""What a training run shows while it works: TensorBoard scalars (rank 0, and read back afterwards) and per-step
throughput."""

from __future__ import annotations

import collections
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


def read_scalars(directory: Path, tag: str) -> dict[int, float]:
    """``tag``'s values by step in a run's TensorBoard folder, over every events file in it (a resumed run
    writes one per start; a step written twice keeps its later value), in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted(Path(directory).glob("events.out.tfevents.*")):
        reader = EventAccumulator(str(events), size_guidance={"scalars": 0})
        reader.Reload()
        if tag in reader.Tags()["scalars"]:
            values.update((e.step, e.value) for e in sorted(reader.Scalars(tag), key=lambda e: e.wall_time))
    return dict(sorted(values.items()))


class Throughput:
    """Tokens per second over the last ``window_s`` seconds (at least the last step), for this rank and for all
    ranks: a rate that does not jump with one short or long batch, and still follows a real change."""

    def __init__(self, window_s: float = 20.0):
        self.window_s, self.started = window_s, time.time()
        self.samples: collections.deque[tuple[float, int, int]] = collections.deque([(self.started, 0, 0)])
        self.tokens = self.all_tokens = 0  # since the start: the epoch's own rate

    def count(self, tokens: int, all_tokens: int) -> None:
        self.tokens, self.all_tokens = self.tokens + tokens, self.all_tokens + all_tokens
        now = time.time()
        self.samples.append((now, self.tokens, self.all_tokens))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def read(self) -> tuple[float, float]:
        (start, tokens0, all0), (end, tokens1, all1) = self.samples[0], self.samples[-1]
        elapsed = max(end - start, 1e-9)
        return (tokens1 - tokens0) / elapsed, (all1 - all0) / elapsed

    def overall(self) -> float:
        """All ranks' tokens per second since the meter started."""
        return self.all_tokens / max(time.time() - self.started, 1e-9)


class RunningMean:
    """The mean of the values seen so far (the epoch's loss on the progress bar, not one batch's)."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, value: float) -> None:
        self.total, self.count = self.total + value, self.count + 1

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else float("nan")


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
