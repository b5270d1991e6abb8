"""One micro-batch across ranks: what every rank must agree on before stepping (the loss, whether it is finite
everywhere, the tokens, a stop signal), and what a non-finite loss does."""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch

from .. import distributed as dist
from .monitor import Scalars
from .phases import Phase
from .resume import Progress
from .stopping import STOP_SIGNALS, StopSignals, agreed_signal

log = logging.getLogger("nerco_dist")


class NonFiniteLoss(RuntimeError):
    """Too many non-finite losses in a row: training has diverged."""


class EpochTrained(NamedTuple):
    """What an epoch's end-of-epoch line reports of its training part."""

    mean_loss: float  # over the steps this run trained (a resumed epoch: since the resume)
    tokens_per_s: float  # all ranks' characters per second of training, dev scoring excluded


class StepTotals(NamedTuple):
    """One micro-batch summed over ranks, in one collective."""

    loss: float  # the mean over ranks
    finite: bool  # on every rank
    all_tokens: int
    stop: int | None  # the signal some rank received, which stops every rank at this step


def step_totals(loss: torch.Tensor | None, tokens: int, signals: StopSignals | None) -> StepTotals:
    """The micro-batch's loss averaged over ranks, whether it is finite everywhere, all ranks' tokens, and
    whether a rank was asked to stop."""
    value = loss.item() if loss is not None else 0.0
    finite = math.isfinite(value)
    flags = signals.flags() if signals is not None else [0.0] * len(STOP_SIGNALS)
    total, bad, all_tokens, *stops = dist.sum_over_ranks([value if finite else 0.0, 0.0 if finite else 1.0, tokens,
                                                          *flags])
    return StepTotals(total / dist.world_size(), bad == 0, int(all_tokens), agreed_signal(stops))


def skip_nonfinite(progress: Progress, limit: int, scalars: Scalars, phase: Phase) -> None:
    progress.nonfinite += 1
    progress.nonfinite_run += 1
    scalars.add(f"{phase.name}/nonfinite_skipped", progress.nonfinite, progress.stage_step)
    log.warning("non-finite loss in phase %r, epoch %d, batch %d: not trained on (%d in a row, %d in all)",
                phase.name, progress.epoch + 1, progress.batch, progress.nonfinite_run, progress.nonfinite)
    if progress.nonfinite_run >= limit:
        raise NonFiniteLoss(f"{progress.nonfinite_run} non-finite losses in a row (phase {phase.name!r}, epoch "
                            f"{progress.epoch + 1}, batch {progress.batch}, step {progress.step}): training "
                            f"diverged; lower the learning rate or check the data (distributed.max_nonfinite={limit})")
