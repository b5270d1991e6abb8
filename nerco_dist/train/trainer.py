"""Training, read top to bottom: data -> model -> loss -> step, in NerCo's two stages.

A stage is a list of phases (``phases.py``). Stage 1 (contrastive): the encoder on the semantic-class InfoNCE,
BERT frozen, no output head; the lowest dev loss is kept. Stage 2 (fine-tuning): from that encoder, a fresh
Linear + CRF head on the CRF NLL, in up to three phases (head alone, encoder + head, everything); the best dev
F1 is kept and scored on test. Without stage 1 this is the paper's baseline.

One loop runs every phase, for one process or several (``engine.py``): each phase gets a new engine on a fresh
model holding the weights it starts from, so its optimiser and warmup restart. Each rank trains on its share
of the length-bucketed batches; in stage 1 every rank's tokens are the negatives of every query. Rank 0 writes
checkpoints (plain fp32), results and TensorBoard. A run killed mid-stage and started again with the same
command continues inside the phase it was in (``resume.py``); so does one stopped by SIGINT or SIGTERM, which
writes a resume checkpoint after its next optimizer step (``stopping.py``).
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from tqdm import tqdm

from .. import distributed as dist
from ..atomic import write_json
from ..checkpoint import load_checkpoint
from ..config import Config
from ..data.dataset import LengthBucketBatchSampler
from ..errors import InputError
from ..machine import machine_info
from ..model.tagger import NerTagger
from .engine import build_engine
from .monitor import RunningMean, Scalars, Throughput
from .objectives import DevScore, InfoNCELoss, LossFn, head_probe_report, mean_dev_infonce, phase_loss
from .phases import Phase, stage_phases, trainable_parameters
from .resume import Progress, StageResume, fingerprint
from .run import TrainingRun, exclusive_output, join_ranks, refuse_unrunnable
from .stopping import StopRequested, StopSignals, agreed_signal

log = logging.getLogger("nerco_dist")

WrapLoss = Callable[[Phase, LossFn], LossFn]


class NonFiniteLoss(RuntimeError):
    """Too many non-finite losses in a row: training has diverged."""


def default_stage(cfg: Config) -> str:
    return "both" if cfg.contrastive.enabled and not cfg.ablation.joint else "finetune"


def train(cfg: Config, root: Path, stage: str | None = None, init: Path | None = None, resume: bool = True,
          wrap_loss: WrapLoss | None = None) -> dict:
    """Run ``stage`` ("contrastive", "finetune" or "both"; default: both for NerCo configs, fine-tuning
    otherwise). ``init``: a stage-1 checkpoint for fine-tuning to start from. ``resume``: continue from what a
    killed run of the same command left in ``run.out_dir`` (False: start afresh). ``wrap_loss(phase, loss)``
    returns the loss a phase trains on instead of ``loss``. SIGINT/SIGTERM: :class:`StopRequested` once the
    resume checkpoint is written."""
    stage = stage or default_stage(cfg)
    if stage not in ("contrastive", "finetune", "both"):
        raise ValueError(f"stage {stage!r}: expected contrastive, finetune or both")
    if cfg.contrastive.select == "head_f1" and dist.launched():
        raise ValueError("contrastive.select=head_f1 trains its probe head in one process: run without the launcher")
    refuse_unrunnable(cfg, ["contrastive", "finetune"] if stage == "both" else [stage])
    join_ranks(cfg)
    with exclusive_output(Path(cfg.run.out_dir)), StopSignals() as signals:
        run = TrainingRun.start(cfg, root)
        if dist.is_main() and not resume:
            shutil.rmtree(run.out / "resume", ignore_errors=True)
        dist.barrier()
        results: dict = dict(stage=stage, machine=machine_info(run.device), config=cfg.to_dict())
        if stage in ("contrastive", "both"):
            results["contrastive"] = run_stage(run, "contrastive", None, wrap_loss, signals)
            init = run.out / "contrastive" / "best.pt"
        if stage in ("finetune", "both"):
            results.update(run_stage(run, "finetune", init, wrap_loss, signals))
        results["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
        if dist.is_main():
            write_json(run.stage_dir("contrastive" if stage == "contrastive" else "finetune") / "results.json",
                       results)
        dist.barrier()
    return results


def run_stage(run: TrainingRun, stage: str, init: Path | None, wrap_loss: WrapLoss | None,
              signals: StopSignals) -> dict:
    """Every phase of ``stage``, from where an earlier run of this command left it; the stage's results."""
    resume = StageResume(run.out, stage, fingerprint(run.cfg, stage, init))
    finished = resume.finished()
    if finished is not None:
        return finished
    phases = stage_phases(run.cfg, stage)
    model = run.initial_model(init)
    progress = resume.progress()
    best = resumed_best(run, stage, progress)
    log.info("%s: %d training pieces, %d ranks, %d parameters, device %s; phases %s", stage, len(run.train_pieces),
             dist.world_size(), sum(p.numel() for p in model.parameters()), run.device,
             ", ".join(f"{p.name} ({p.optim.epochs} epochs)" for p in phases))
    engine = phase_engine(run, phases[progress.phase], model, progress.step)
    resume.restore(engine)
    scalars = Scalars(run.stage_dir(stage) / "tensorboard")
    try:
        while True:
            phase = phases[progress.phase]
            loss = phase_loss(run.cfg, phase, len(run.codec.labels.classes))
            train_phase(run, phase, engine, wrap_loss(phase, loss) if wrap_loss else loss, progress, best, resume,
                        scalars, signals)
            if progress.phase + 1 == len(phases):
                break
            engine = hand_off(run, phase, phases[progress.phase + 1], engine, progress, best)
            resume.save(engine, progress)
    finally:
        scalars.close()
    results = stage_results(run, stage, engine, progress, best)
    engine.close()
    resume.mark_done(results)
    return results


def phase_engine(run: TrainingRun, phase: Phase, model: NerTagger, step: int):
    """An engine training the phase's parameters of ``model``, its LR schedule at ``step``."""
    steps_per_epoch = len(run.train_batches(phase.optim.batch_size))
    return build_engine(model, phase.optim, trainable_parameters(model, phase), steps_per_epoch,
                        distributed=run.cfg.distributed, device=run.device, start_step=step)


def hand_off(run: TrainingRun, phase: Phase, next_phase: Phase, engine, progress: Progress, best: BestWeights):
    """The next phase's engine, on a fresh model with this phase's last weights or the stage's best."""
    weights = best.state if phase.hand_off == "best" else engine.full_state_dict()
    engine.close()
    progress.start_phase(progress.phase + 1)
    return phase_engine(run, next_phase, run.model_with(weights), 0)


def train_phase(run: TrainingRun, phase: Phase, engine, loss: LossFn, progress: Progress, best: BestWeights,
                resume: StageResume, scalars: Scalars, signals: StopSignals) -> None:
    """The phase's epochs from where ``progress`` stands, each scored on dev; stops early after ``patience``
    epochs without a better dev score than the stage's best."""
    batches = run.train_batches(phase.optim.batch_size)
    log.info("%s phase %r: its own %s optimizer (lr %g, warmup over %g of its steps), %d batches per epoch and "
             "rank", phase.stage, phase.name, phase.optim.optimizer, phase.optim.lr, phase.optim.warmup, len(batches))
    epoch_seconds: list[float] = []
    while progress.epoch < phase.optim.epochs and not phase.stopped(progress.stale):
        batches.sampler.set_epoch(progress.epochs_done)
        engine.model.train()
        tick = time.time()
        trained = train_epoch(run, phase, engine, batches, progress, loss, resume, scalars, signals)
        weights = engine.inference_model()  # fp32, on every rank
        score = dev_score(run, phase, weights)
        epoch_seconds.append(time.time() - tick)
        record_epoch(run, phase, weights, score, progress, best, scalars, trained, epoch_seconds)
        progress.epoch, progress.epochs_done, progress.batch = progress.epoch + 1, progress.epochs_done + 1, 0
        resume.save(engine, progress)
        stop = agreed_signal(dist.sum_over_ranks(signals.flags()))  # a signal during the dev scoring
        if stop is not None:
            raise StopRequested(stop, f"{phase.stage} phase {phase.name!r}, the end of epoch {progress.epoch}",
                                str(resume.directory))
    if phase.stopped(progress.stale):
        log.info("%s: no dev improvement for %d epochs: phase %r ends", phase.stage, progress.stale, phase.name)


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


def train_epoch(run: TrainingRun, phase: Phase, engine, batches, progress: Progress, loss_fn: LossFn,
                resume: StageResume | None, scalars: Scalars, signals: StopSignals | None = None) -> EpochTrained:
    """This rank's batches of one epoch, from ``progress.batch`` on (a resumed run skips what it trained).
    A loss that is not finite on some rank skips the step on every rank; ``max_nonfinite`` in a row abort.
    ``resume``: where ``distributed.checkpoint_every`` saves (None: nowhere, as in the benchmarks). A signal
    in ``signals`` stops every rank after the next optimizer step, once the resume checkpoint is written."""
    d = run.cfg.distributed
    quiet = {} if dist.is_main() else {"disable": True}  # rank 0 leaves it to tqdm (TQDM_DISABLE=1 turns it off)
    bar = tqdm(total=len(batches), initial=progress.batch, leave=False, dynamic_ncols=True,
               desc=f"{phase.name} {progress.epoch + 1}/{phase.optim.epochs}", **quiet)
    meter, mean_loss = Throughput(), RunningMean()
    try:
        for batch in itertools.islice(batches, progress.batch, None):
            batch = {k: v.to(run.device) for k, v in batch.items()}
            loss = engine.forward(lambda: loss_fn(engine.model, batch))
            tokens = int(batch["char_mask"].sum())
            totals = step_totals(loss, tokens, signals)
            meter.count(tokens, totals.all_tokens)
            progress.batch += 1
            bar.update()
            saved = False
            if not totals.finite:
                skip_nonfinite(progress, d.max_nonfinite, scalars, phase)
                continue
            progress.nonfinite_run = 0
            if loss is not None:  # None in stage 1: no class of the (global) batch has a positive pair
                mean_loss.add(totals.loss)
                engine.backward(loss)
                engine.step()
                if engine.at_boundary:
                    progress.step, progress.stage_step = progress.step + 1, progress.stage_step + 1
                    if progress.stage_step % run.cfg.run.log_every == 0:
                        log_step(phase, engine, loss_fn, totals.loss, mean_loss, meter, bar, scalars,
                                 progress.stage_step)
                    if resume is not None and d.checkpoint_every and progress.stage_step % d.checkpoint_every == 0:
                        resume.save(engine, progress)
                        saved = True
            if totals.stop is not None and engine.at_boundary:
                if resume is not None and not saved:
                    resume.save(engine, progress)
                raise StopRequested(totals.stop, f"{phase.stage} phase {phase.name!r}, epoch {progress.epoch + 1}, "
                                                 f"batch {progress.batch}",
                                    str(resume.directory) if resume is not None else None)
    finally:
        bar.close()
    return EpochTrained(mean_loss.value, meter.overall())


def log_step(phase: Phase, engine, loss_fn, step_loss: float, mean_loss: RunningMean, meter: Throughput, bar,
             scalars: Scalars, step: int) -> None:
    """The progress bar (the epoch's mean loss, a smoothed rate) and the step's TensorBoard scalars."""
    prefix = "contrastive" if phase.stage == "contrastive" else "train"
    rate, global_rate = meter.read()
    shown = dict(loss=f"{mean_loss.value:.3f}", tok_s=f"{rate:,.0f}")
    if dist.world_size() > 1:
        shown["tok_s_all"] = f"{global_rate:,.0f}"
    bar.set_postfix(shown)
    for name, value in (("loss", step_loss), ("lr", engine.lr), ("tokens_per_s_rank", rate),
                        ("tokens_per_s", global_rate)):
        scalars.add(f"{prefix}/{name}", value, step)
    statistics = loss_fn.scalars() if hasattr(loss_fn, "scalars") else {}
    fractions = statistics.pop("class_fractions", None)
    for name, value in statistics.items():
        scalars.add(f"contrastive/{name}", value, step)
    if fractions:
        scalars.add_group("contrastive/class_fraction", {str(k): v for k, v in enumerate(fractions)}, step)


def step_totals(loss: torch.Tensor | None, tokens: int, signals: StopSignals | None) -> StepTotals:
    """The micro-batch's loss averaged over ranks, whether it is finite everywhere, all ranks' tokens, and
    whether a rank was asked to stop."""
    value = loss.item() if loss is not None else 0.0
    finite = math.isfinite(value)
    flags = signals.flags() if signals is not None else [0.0, 0.0]
    total, bad, all_tokens, *stops = dist.sum_over_ranks([value if finite else 0.0, 0.0 if finite else 1.0, tokens,
                                                          *flags])
    return StepTotals(total / dist.world_size(), bad == 0, int(all_tokens), agreed_signal(stops))


def skip_nonfinite(progress: Progress, limit: int, scalars: Scalars, phase: Phase) -> None:
    progress.nonfinite += 1
    progress.nonfinite_run += 1
    scalars.add(f"{phase.name}/nonfinite_skipped", progress.nonfinite, progress.stage_step)
    log.warning("non-finite loss in phase %r, epoch %d, batch %d: step skipped (%d in a row, %d in all)",
                phase.name, progress.epoch + 1, progress.batch, progress.nonfinite_run, progress.nonfinite)
    if progress.nonfinite_run >= limit:
        raise NonFiniteLoss(f"{progress.nonfinite_run} non-finite losses in a row (phase {phase.name!r}, epoch "
                            f"{progress.epoch + 1}, batch {progress.batch}, step {progress.step}): training "
                            f"diverged; lower the learning rate or check the data (distributed.max_nonfinite={limit})")


def dev_score(run: TrainingRun, phase: Phase, model: NerTagger) -> DevScore:
    if phase.select == "dev_loss":
        pieces = run.dev_pieces
        batches = run.codec.batches(pieces, LengthBucketBatchSampler(
            [p.lattice_len for p in pieces], phase.optim.batch_size, shuffle=False))
        loss = InfoNCELoss(run.cfg, len(run.codec.labels.classes), across_ranks=False)
        return DevScore.from_loss(mean_dev_infonce(loss, model, batches, run.device))
    if phase.select == "head_f1":
        return DevScore.from_report(head_probe_report(run, model, run.cfg.contrastive.head_probe_epochs,
                                                       run.cfg.contrastive.head_probe_lr))
    return DevScore.from_report(run.scores(model, run.splits.dev))


@dataclass
class BestWeights:
    """The stage's best weights, a CPU copy on every rank: the ``best`` hand-off and the final test take them
    from here, not from best.pt, which is rank 0's copy for ``eval`` (a shared file system can show the other
    nodes an older one, and another process can replace it)."""

    state: dict | None = None

    def keep(self, model: NerTagger) -> None:
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def resumed_best(run: TrainingRun, stage: str, progress: Progress) -> BestWeights:
    """A resumed stage's best weights: the best.pt of the runs it continues (the output folder's lock kept
    every other run out), refused when it is not the epoch the resume state names as the best, or the epoch
    being trained again (a run killed between writing best.pt and its resume checkpoint)."""
    if progress.best_epoch < 1:
        return BestWeights()
    path = run.stage_dir(stage) / "best.pt"
    saved = load_checkpoint(path)
    if saved.get("stage") != stage or saved.get("epoch") not in (progress.best_epoch, progress.epochs_done + 1):
        raise InputError(path, f"holds {saved.get('stage')} epoch {saved.get('epoch')}, but the {stage} stage "
                               f"being resumed had its best at epoch {progress.best_epoch}: the file was replaced; "
                               "--no-resume trains the stage again")
    return BestWeights(saved["model"])


def record_epoch(run: TrainingRun, phase: Phase, weights: NerTagger, score: DevScore, progress: Progress,
                 best: BestWeights, scalars: Scalars, trained: EpochTrained, epoch_seconds: list[float]) -> None:
    """Log the epoch's line (training loss and rate, dev score, the best so far, time), write ``last.pt`` and
    (when it beats the stage's best) ``best.pt``, keeping those weights in ``best``."""
    epoch = progress.epochs_done + 1
    improved = score.beats(progress.best)
    extra = dict(stage=phase.stage, phase=phase.name, epoch=epoch, **score.record)
    out = run.stage_dir(phase.stage)
    run.checkpoint(out / "last.pt", weights, **extra)
    if improved:
        progress.best, progress.best_epoch, progress.stale = score.value, epoch, 0
        best.keep(weights)
        run.checkpoint(out / "best.pt", weights, **extra)
    else:
        progress.stale += 1
    best_text = f"{progress.best:.4f}" if phase.lower_is_better else f"{100 * progress.best:.2f}"
    log.info("%s %r epoch %d/%d: loss %.4f, %s tok/s, %s%s (best %s, stage epoch %d), %s; %s",
             phase.stage, phase.name, progress.epoch + 1, phase.optim.epochs, trained.mean_loss,
             f"{trained.tokens_per_s:,.0f}", score.text, " *" if improved else "", best_text, progress.best_epoch,
             duration(epoch_seconds[-1]), stage_outlook(run, phase, progress, epoch_seconds))
    for tag, value in score.scalars.items():
        scalars.add(tag, value, epoch)


def stage_outlook(run: TrainingRun, phase: Phase, progress: Progress, epoch_seconds: list[float]) -> str:
    """The stage's time so far and an upper bound on what is left: every remaining epoch of this phase and of
    the phases after it, at this phase's mean epoch time (patience may end phases sooner)."""
    later = stage_phases(run.cfg, phase.stage)[progress.phase + 1:]
    left = phase.optim.epochs - progress.epoch - 1 + sum(p.optim.epochs for p in later)
    text = f"stage {duration(progress.elapsed())} so far"
    if left:
        pace = sum(epoch_seconds) / len(epoch_seconds)
        text += f", at most {left} more epoch{'s' * (left > 1)} ({duration(left * pace)} at this pace)"
    return text


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def stage_results(run: TrainingRun, stage: str, engine, progress: Progress, best: BestWeights) -> dict:
    """The stage's summary; fine-tuning also scores its best weights on test."""
    results = dict(best_epoch=progress.best_epoch, epochs_run=progress.epochs_done,
                   wall_time_s=round(progress.elapsed(), 1), nonfinite_skipped=progress.nonfinite)
    results[f"best_{stage_phases(run.cfg, stage)[-1].select}"] = progress.best  # best_dev_loss, _dev_f1, _head_f1
    if stage == "finetune" and run.splits.test is not None:
        test = run.scores(engine.inference_model(best.state), run.splits.test)
        results["test"] = test.to_dict()
        log.info("test (best dev epoch %d):\n%s", progress.best_epoch, test.format_table())
    return results
