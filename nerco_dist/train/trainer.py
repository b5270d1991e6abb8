"""Training, read top to bottom: data -> model -> loss -> step, in NerCo's two stages.

A stage is a list of phases (``phases.py``). Stage 1 (contrastive): the encoder on the semantic-class InfoNCE,
BERT frozen, no output head; the lowest dev loss is kept. Stage 2 (fine-tuning): from that encoder, a fresh
Linear + CRF head on the CRF NLL, in up to three phases (head alone, encoder + head, everything); the best dev
F1 is kept and scored on test. Without stage 1 this is the paper's baseline.

One loop runs every phase, for one process or several (``engines.py``): each phase gets a new engine on a fresh
model holding the weights it starts from, so its optimiser and warmup restart. Each rank trains on its share
of the length-bucketed batches; in stage 1 every rank's tokens are the negatives of every query. Rank 0 writes
checkpoints (plain fp32), results and TensorBoard. A run killed mid-stage and started again with the same
command continues inside the phase it was in (``resume.py``); so does one stopped by SIGINT, SIGTERM or SIGHUP, which
writes a resume checkpoint after its next optimizer step (``stopping.py``).
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .. import distributed as dist
from ..atomic import write_json
from ..checkpoint import load_checkpoint
from ..config import Config
from ..data.dataset import BatchIterable
from ..machine import machine_info
from ..model.tagger import NerTagger
from .engine import Engine
from .engines import build_engine
from .monitor import RunningMean, Scalars, Throughput, duration
from .objectives import DevScore, LossFn, WrapLoss, dev_score, phase_loss
from .phases import Phase, default_stage, row_tables, stage_phases, trainable_parameters
from .resume import BestWeights, Progress, StageIdentity, StageResume, resumed_best
from .run import TrainingRun, exclusive_output, join_ranks, refuse_unrunnable
from .steps import EpochTrained, skip_nonfinite, step_totals
from .stopping import StopRequested, StopSignals, agreed_signal

log = logging.getLogger("nerco_dist")

def train(cfg: Config, stage: str | None = None, init: Path | None = None, resume: bool = True,
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
        run = TrainingRun.start(cfg)
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
    resume = StageResume(run.out, StageIdentity.of(run.cfg, stage, init))
    finished = resume.finished(run.stage_dir(stage) / "best.pt")
    if finished is not None:
        results, other_test = finished
        if other_test:
            results = rescored_on_test(run, results)
            resume.mark_done(results)
        return results
    progress = resume.progress()
    loop = StageLoop(run, stage_phases(run.cfg, stage), progress, resumed_best(run, stage, progress), resume,
                     Scalars(run.stage_dir(stage) / "tensorboard"), signals, wrap_loss)
    model = run.initial_model(init)
    log.info("%s: %d training pieces, %d ranks, %d parameters, device %s; phases %s", stage, len(run.train_pieces),
             dist.world_size(), sum(p.numel() for p in model.parameters()), run.device,
             ", ".join(f"{p.name} ({p.optim.epochs} epochs)" for p in loop.phases))
    loop.start_phase(model, progress.step)
    resume.restore(loop.engine)
    try:
        loop.run_phases()
    finally:
        loop.scalars.close()
    results = stage_results(run, stage, loop.engine, progress, loop.best)
    loop.engine.close()
    resume.mark_done(results)
    return results


@dataclass
class StageLoop:
    """One stage's training state, read and written by every epoch: the stage's phases (computed once), the
    engine and batches of the phase being trained, where the stage stands (``progress``, saved in resume
    checkpoints), its best weights, and where it reports (``scalars``). ``resume`` None: nothing is saved
    (the benchmarks); ``signals`` None: nothing stops it early."""

    run: TrainingRun
    phases: list[Phase]
    progress: Progress
    best: BestWeights
    resume: StageResume | None
    scalars: Scalars
    signals: StopSignals | None = None
    wrap_loss: WrapLoss | None = None
    engine: Engine | None = None
    batches: BatchIterable | None = None
    epoch_seconds: list[float] = field(default_factory=list)  # this phase's epochs: training and dev scoring
    write_seconds: list[float] = field(default_factory=list)  # ... their checkpoints written at the epoch's end

    @property
    def phase(self) -> Phase:
        return self.phases[self.progress.phase]

    def start_phase(self, model: NerTagger, step: int) -> None:
        """The current phase's batches and an engine training its parameters of ``model`` (LR schedule at
        ``step``)."""
        optim = self.phase.optim
        model.bert_trains = "bert" in self.phase.trains
        self.batches = self.run.train_batches(optim.batch_size)
        self.engine = build_engine(model, optim, trainable_parameters(model, self.phase), len(self.batches),
                                   distributed=self.run.cfg.distributed, device=self.run.device, start_step=step,
                                   row_tables=row_tables(model, self.phase))
        self.epoch_seconds, self.write_seconds = [], []

    def run_phases(self) -> None:
        """Each phase from where ``progress`` stands; between phases, the hand-off to a fresh engine."""
        while True:
            self.train_phase()
            if self.progress.phase + 1 == len(self.phases):
                return
            weights = self.best.state if self.phase.hand_off == "best" else self.engine.full_state_dict()
            self.engine.close()
            self.progress.start_phase(self.progress.phase + 1)
            self.start_phase(self.run.model_with(weights), 0)
            self.resume.save(self.engine, self.progress)

    def phase_loss(self) -> LossFn:
        loss = phase_loss(self.run.cfg, self.phase, len(self.run.codec.labels.classes))
        return self.wrap_loss(self.phase, loss) if self.wrap_loss else loss

    def train_phase(self) -> None:
        """The phase's epochs from where ``progress`` stands, each scored on dev; stops early after
        ``patience`` epochs without a better dev score than the stage's best."""
        phase, progress, loss = self.phase, self.progress, self.phase_loss()
        log.info("%s phase %r: its own %s optimizer (lr %g, warmup over %g of its steps), %d batches per epoch and "
                 "rank", phase.stage, phase.name, phase.optim.optimizer, phase.optim.lr, phase.optim.warmup,
                 len(self.batches))
        while progress.epoch < phase.optim.epochs and not phase.stopped(progress.stale):
            self.batches.sampler.set_epoch(progress.epochs_done)
            tick = time.time()
            trained = self.train_epoch(self.batches, loss)
            weights = self.engine.inference_model()  # fp32, on every rank
            score = dev_score(self.run, phase, weights)
            scored = time.time()
            self.epoch_seconds.append(scored - tick)
            improved = self.save_epoch(weights, score)
            progress.epoch, progress.epochs_done, progress.batch = progress.epoch + 1, progress.epochs_done + 1, 0
            self.resume.save(self.engine, progress)
            self.write_seconds.append(time.time() - scored)
            self.log_epoch(score, trained, improved)
            self.stop_if_signalled(agreed_signal(dist.sum_over_ranks(self.signals.flags())),
                                   f"the end of epoch {progress.epoch}")  # a signal during the dev scoring
        if phase.stopped(progress.stale):
            log.info("%s: no dev improvement for %d epochs: phase %r ends", phase.stage, progress.stale, phase.name)

    def train_epoch(self, batches, loss_fn: LossFn) -> EpochTrained:
        """This rank's ``batches`` of one epoch, from ``progress.batch`` on (a resumed run skips what it
        trained). A loss that is not finite on some rank skips the micro-batch on every rank; ``max_nonfinite``
        in a row abort. A signal stops every rank after the next optimizer step, once the resume checkpoint is
        written."""
        progress, phase = self.progress, self.phase
        quiet = {} if dist.is_main() else {"disable": True}  # rank 0 leaves it to tqdm (TQDM_DISABLE=1: off)
        bar = tqdm(total=len(batches), initial=progress.batch, leave=False, dynamic_ncols=True,
                   desc=f"{phase.name} {progress.epoch + 1}/{phase.optim.epochs}", **quiet)
        meter, mean_loss = Throughput(), RunningMean()
        self.engine.model.train()
        trained = None  # the last micro-batch trained on: see below
        try:
            for batch in itertools.islice(batches, progress.batch, None):
                batch = {k: v.to(self.run.device) for k, v in batch.items()}
                loss = self.engine.forward(lambda: loss_fn(self.engine.model, batch))
                tokens = int(batch["char_mask"].sum())
                totals = step_totals(loss, tokens, self.signals)
                meter.count(tokens, totals.all_tokens)
                progress.batch += 1
                bar.update()
                if not totals.finite:
                    skip_nonfinite(progress, self.run.cfg.distributed.max_nonfinite, self.scalars, phase)
                else:
                    progress.nonfinite_run = 0
                if totals.finite and loss is not None:  # None: no positive pair
                    stepped, trained = self.step(loss, totals.loss, mean_loss), batch
                elif self.engine.grad_accum > 1 and trained is not None:
                    # a micro-batch that trains nothing still counts toward its step, so that steps stay the
                    # sampler's (an epoch ends on one; a continued run finds whole steps): its place in the
                    # accumulation is taken by a zero-weighted pass of the last one trained on, through the
                    # engine like any other, so every rank reduces what it accumulated
                    zero = self.engine.forward(lambda: loss_fn(self.engine.model, trained)) * 0.0
                    stepped = self.step(zero, None, mean_loss)
                else:
                    continue
                saved = False
                if stepped:
                    if progress.stage_step % self.run.cfg.run.log_every == 0:
                        self.log_step(loss_fn, totals.loss, mean_loss, meter, bar)
                    saved = self.save_every_n_steps()
                if totals.stop is not None and self.engine.at_boundary:
                    if self.resume is not None and not saved:
                        self.resume.save(self.engine, progress)
                    self.stop_if_signalled(totals.stop, f"epoch {progress.epoch + 1}, batch {progress.batch}")
        finally:
            bar.close()
        return EpochTrained(mean_loss.value, meter.overall())

    def step(self, loss: torch.Tensor, value: float | None, mean_loss: RunningMean) -> bool:
        """Backward and (at an accumulation boundary) the optimizer step; whether that step was taken.
        ``value``: the loss for the epoch's mean (None: a stand-in that counts for nothing)."""
        if value is not None:
            mean_loss.add(value)
        self.engine.backward(loss)
        self.engine.step()
        if self.engine.at_boundary:
            self.progress.step, self.progress.stage_step = self.progress.step + 1, self.progress.stage_step + 1
        return self.engine.at_boundary

    def save_every_n_steps(self) -> bool:
        """A resume checkpoint every ``distributed.checkpoint_every`` optimizer steps; whether one was written."""
        every = self.run.cfg.distributed.checkpoint_every
        if self.resume is None or not every or self.progress.stage_step % every:
            return False
        self.resume.save(self.engine, self.progress)
        return True

    def stop_if_signalled(self, signal: int | None, where: str) -> None:
        if signal is not None:
            raise StopRequested(signal, f"{self.phase.stage} phase {self.phase.name!r}, {where}",
                                str(self.resume.directory) if self.resume is not None else None)

    def log_step(self, loss_fn: LossFn, step_loss: float, mean_loss: RunningMean, meter: Throughput, bar) -> None:
        """The progress bar (the epoch's mean loss, a smoothed rate) and the step's TensorBoard scalars."""
        prefix, step = ("contrastive" if self.phase.stage == "contrastive" else "train"), self.progress.stage_step
        rate, global_rate = meter.read()
        shown = dict(loss=f"{mean_loss.value:.3f}", tok_s=f"{rate:,.0f}")
        if dist.world_size() > 1:
            shown["tok_s_all"] = f"{global_rate:,.0f}"
        bar.set_postfix(shown)
        for name, value in (("loss", step_loss), ("lr", self.engine.lr), ("tokens_per_s_rank", rate),
                            ("tokens_per_s", global_rate)):
            self.scalars.add(f"{prefix}/{name}", value, step)
        statistics = loss_fn.scalars() if hasattr(loss_fn, "scalars") else {}
        fractions = statistics.pop("class_fractions", None)
        for name, value in statistics.items():
            self.scalars.add(f"contrastive/{name}", value, step)
        if fractions:
            self.scalars.add_group("contrastive/class_fraction", {str(k): v for k, v in enumerate(fractions)}, step)

    def save_epoch(self, weights: NerTagger, score: DevScore) -> bool:
        """Write ``last.pt`` and (when ``score`` beats the stage's best) ``best.pt``, keeping those weights in
        ``best``; whether it did."""
        phase, progress = self.phase, self.progress
        epoch, improved = progress.epochs_done + 1, score.beats(progress.best)
        extra = dict(stage=phase.stage, phase=phase.name, epoch=epoch, **score.record)
        out = self.run.stage_dir(phase.stage)
        self.run.checkpoint(out / "last.pt", weights, **extra)
        if improved:
            progress.best, progress.best_epoch, progress.stale = score.value, epoch, 0
            self.best.keep(weights)
            self.run.checkpoint(out / "best.pt", weights, **extra)
        else:
            progress.stale += 1
        return improved

    def log_epoch(self, score: DevScore, trained: EpochTrained, improved: bool) -> None:
        """The line of the epoch just saved (training loss and rate, dev score, the best so far, its time, the
        part of it spent writing checkpoints, the outlook) and its dev scalars."""
        phase, progress = self.phase, self.progress
        best_text = f"{progress.best:.4f}" if phase.lower_is_better else f"{100 * progress.best:.2f}"
        seconds = self.epoch_seconds[-1] + self.write_seconds[-1]
        log.info("%s %r epoch %d/%d: loss %.4f, %s tok/s, %s%s (best %s, stage epoch %d), %s (writing checkpoints "
                 "%s); %s", phase.stage, phase.name, progress.epoch, phase.optim.epochs, trained.mean_loss,
                 f"{trained.tokens_per_s:,.0f}", score.text, " *" if improved else "", best_text,
                 progress.best_epoch, duration(seconds), duration(self.write_seconds[-1]), self.outlook())
        for tag, value in score.scalars.items():
            self.scalars.add(tag, value, progress.epochs_done)

    def outlook(self) -> str:
        """The stage's time so far and an upper bound on what is left: every remaining epoch of this phase and
        of the phases after it, each at this phase's mean time to train and score an epoch plus its slowest
        epoch-end checkpoint writes (``best.pt`` is written only by an epoch that improves; patience may end
        phases sooner)."""
        later = self.phases[self.progress.phase + 1:]
        left = self.phase.optim.epochs - self.progress.epoch + sum(p.optim.epochs for p in later)
        text = f"stage {duration(self.progress.elapsed())} so far"
        if left:
            pace = sum(self.epoch_seconds) / len(self.epoch_seconds) + max(self.write_seconds)
            text += f", at most {left} more epoch{'s' * (left > 1)} ({duration(left * pace)} at this pace)"
        return text


def rescored_on_test(run: TrainingRun, results: dict) -> dict:
    """A finished fine-tuning stage's ``results`` with its ``best.pt`` scored on the config's test split (or
    with no test score, where the config has none): what training the stage again would give."""
    results = {key: value for key, value in results.items() if key != "test"}
    if run.splits.test is not None:
        model = run.model_with(load_checkpoint(run.stage_dir("finetune") / "best.pt")["model"])
        test = run.scores(model, run.splits.test)
        results["test"] = test.to_dict()
        log.info("test (best dev epoch %d):\n%s", results["best_epoch"], test.format_table())
    return results


def stage_results(run: TrainingRun, stage: str, engine: Engine, progress: Progress, best: BestWeights) -> dict:
    """The stage's summary; fine-tuning also scores its best weights on test."""
    results = dict(best_epoch=progress.best_epoch, epochs_run=progress.epochs_done,
                   wall_time_s=round(progress.elapsed(), 1), nonfinite_skipped=progress.nonfinite)
    results[f"best_{stage_phases(run.cfg, stage)[-1].select}"] = progress.best  # best_dev_loss, _dev_f1, _head_f1
    if stage == "finetune" and run.splits.test is not None:
        test = run.scores(engine.inference_model(best.state), run.splits.test)
        results["test"] = test.to_dict()
        log.info("test (best dev epoch %d):\n%s", progress.best_epoch, test.format_table())
    return results
