"""Resume state: where a stage stands, which config wrote it, and the engine checkpoints that continue it.

``out_dir/resume/<stage>/`` holds the engine checkpoint named in ``latest.json`` with the :class:`Progress`
it was saved at. Every save goes to a tag of its own (``save<n>-p<phase>-step<step>``: two saves at one step,
the last step's and the epoch end's, must not share one, since DeepSpeed rewrites a tag's files in place); only
once it is complete does ``latest.json`` name it (atomically), and only then are older tags removed, so a
kill at any moment leaves ``latest.json`` naming a whole checkpoint. ``out_dir/resume/<stage>.done.json``
holds the results of a finished stage. A run started again with the same
command continues from there; a checkpoint of another config (its :class:`StageIdentity`) is not continued.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .. import distributed as dist
from ..atomic import write_json
from ..checkpoint import load_checkpoint
from ..config import Config
from ..errors import InputError
from ..model.tagger import NerTagger

log = logging.getLogger("nerco_dist")

LATEST = "latest.json"


@dataclass
class Progress:
    """Where a stage stands; saved with every resume checkpoint."""

    phase: int = 0  # index of the phase being trained
    epoch: int = 0  # the epoch being trained, within the phase
    batch: int = 0  # this rank's batches of that epoch already trained
    step: int = 0  # optimizer steps so far in this phase (where its LR schedule stands)
    stage_step: int = 0  # ... in the stage (the x axis of its TensorBoard scalars)
    epochs_done: int = 0  # epochs finished in the stage, all phases
    best: float | None = None  # the stage's best dev score (stage 1: lowest InfoNCE; stage 2: highest F1)
    best_epoch: int = -1  # the stage epoch (1-based) that scored it
    stale: int = 0  # epochs of this phase since the stage's best
    nonfinite: int = 0  # micro-batches skipped for a non-finite loss
    nonfinite_run: int = 0  # ... in a row
    identity: dict = dataclasses.field(default_factory=dict)  # the StageIdentity that saved it, as a dict
    seconds: float = 0.0  # wall time spent in this stage, summed over every run that trained it

    def __post_init__(self) -> None:
        self._since = time.time()  # not a field: a resumed run counts from its own start

    def elapsed(self) -> float:
        """``seconds`` brought up to now: a killed and resumed stage reports its whole training time."""
        now = time.time()
        self.seconds, self._since = self.seconds + now - self._since, now
        return self.seconds

    def start_phase(self, phase: int) -> None:
        self.phase, self.epoch, self.batch, self.step, self.stale = phase, 0, 0, 0, 0


@dataclass(frozen=True)
class StageIdentity:
    """What a stage's checkpoints must share with the command that continues them: the config's keys the
    stage reads, where it started from, and how many micro-batches make an optimizer step. Saved as the config
    itself, not a hash of it, so
    a checkpoint outlives a change of the config's schema (a key added since reads at the value the
    checkpoint's run trained with: :meth:`Config.from_record`) and a checkpoint not continued says which keys
    differ.

    Keys marked ``resume: False`` in the config (threads, logging, the output folder) never count; ``resume:
    "ends"`` keys (patience, the test split) count only for reusing a finished stage: a killed run continues
    under a raised patience or an added test split, having trained exactly what they would have trained (and
    a finished fine-tuning stage under another test split has its best weights scored on it:
    :meth:`StageResume.finished`).
    Stage 1 does not read the fine-tuning sections (but for ``finetune.head``, the head probe's optimiser,
    where the probe selects its epoch) nor the test split, so a changed fine-tuning key retrains stage 2 from
    the stage 1 already trained.

    Ranks: fine-tuning's loss is a sum over sentences, so a step is the same whichever ranks x accumulation
    make up its micro-batches (the sampler gives step k the same batches): it counts that product
    (``micro_batches_per_step``), and a killed run continues on another number of ranks at the same product.
    Stage 1's negatives are the ranks' micro-batches of one forward pass, so its number of ranks counts as
    such, except for reusing a finished stage 1 (a run continued on other ranks does not train it again)."""

    cfg: Config
    stage: str
    init: str | None
    world_size: int

    @classmethod
    def of(cls, cfg: Config, stage: str, init: Path | None) -> "StageIdentity":
        """``init`` inside the run's folder (stage 1's best.pt) is kept relative to it: a moved run continues."""
        if init is not None:
            out = Path(cfg.run.out_dir).resolve()
            init = Path(init).resolve()
            init = init.relative_to(out) if init.is_relative_to(out) else init
        return cls(cfg, stage, None if init is None else str(init), dist.world_size())

    def to_dict(self) -> dict:
        return dict(config=self.cfg.to_dict(), stage=self.stage, init=self.init, world_size=self.world_size)

    def keys(self, *, finished: bool) -> dict[str, object]:
        """Every key that counts, dotted (``finetune.full.optim.lr``), with its value."""
        relevant = _relevant(self.cfg, finished)
        if self.stage == "contrastive":
            probe = self.cfg.contrastive.select == "head_f1"
            relevant["finetune"] = {"head": relevant["finetune"]["head"]} if probe else {}
            relevant["data"].pop("test", None)
        keys = _dotted(relevant)
        keys.update(stage=self.stage, init=self.init)
        if self.stage == "finetune":
            keys["micro_batches_per_step"] = keys.pop("distributed.grad_accum") * self.world_size
        elif not finished:
            keys["world_size"] = self.world_size
        return keys

    def changes(self, saved: dict | None, *, finished: bool) -> dict[str, str]:
        """How the identity ``saved`` with a checkpoint differs from this one, ``{key: "then -> now"}`` (the
        key ``config`` when the saved one does not read); empty when the checkpoint may be continued
        (``finished``: its results reused)."""
        if not isinstance(saved, dict) or "config" not in saved:
            return {"config": "saved by an earlier version that did not record it"}
        try:
            then = StageIdentity(Config.from_record(saved["config"], "the saved config"), saved["stage"],
                                 saved["init"], saved["world_size"]).keys(finished=finished)
        except (InputError, KeyError) as err:
            return {"config": f"no longer reads ({err})"}
        now = self.keys(finished=finished)
        return {key: f"{then.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(then) | set(now))
                if then.get(key) != now.get(key)}


def _relevant(section, finished: bool) -> dict:
    """A config section as a dict without the fields that do not count (see :class:`StageIdentity`)."""
    out = {}
    for f in dataclasses.fields(section):
        rule = f.metadata.get("resume", True)
        if rule is False or (rule == "ends" and not finished):
            continue
        value = getattr(section, f.name)
        out[f.name] = _relevant(value, finished) if dataclasses.is_dataclass(value) else value
    return out


def _dotted(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def listed(changes: dict[str, str], most: int = 4) -> str:
    """``changes`` (of :meth:`StageIdentity.changes`) in one line: the first ``most`` of them and a count."""
    items = [f"{key}: {change}" for key, change in changes.items()]
    more = len(items) - most
    return "; ".join(items[:most]) + (f"; and {more} more" if more > 0 else "")


class StageResume:
    """The resume folder of one stage of one run."""

    def __init__(self, out_dir: Path, identity: StageIdentity):
        self.directory = Path(out_dir) / "resume" / identity.stage
        self.done_file = self.directory.with_name(f"{identity.stage}.done.json")
        self.stage, self.identity = identity.stage, identity

    def finished(self, best: Path) -> tuple[dict, bool] | None:
        """The results of this stage when an earlier run of this command finished it, and whether that run
        had another test split. Training never reads the test split, so a finished fine-tuning stage whose
        best weights ``best`` are still there is reused under any: those weights need only scoring on it."""
        if not self.done_file.is_file():
            return None
        record = json.loads(self.done_file.read_text())
        changes = self.identity.changes(record.get("identity"), finished=True)
        other_test = changes.keys() == {"data.test"} and best.is_file()
        if changes and not other_test:
            log.info("%s: finished by a run of another config (%s): training it again", self.done_file,
                     listed(changes))
            return None
        log.info("%s: finished by an earlier run (%s)%s; --no-resume trains it again", self.stage, self.done_file,
                 f", under {listed(changes)}: scoring its best weights ({best}) on this test split" * other_test)
        return record["results"], other_test

    def mark_done(self, results: dict) -> None:
        dist.barrier()
        if dist.is_main():
            write_json(self.done_file, dict(identity=self.identity.to_dict(), results=results))
            shutil.rmtree(self.directory, ignore_errors=True)
        dist.barrier()

    def latest(self) -> dict | None:
        """``{"tag", "progress"}`` of the newest checkpoint this command may continue, or None (another
        config's, with a warning). One that differs only in its ranks (stage 1), or its micro-batches a step
        on another number of ranks (fine-tuning), is refused rather than trained over: that is a launch to
        correct, not a new run."""
        path = self.directory / LATEST
        if not path.is_file():
            return None
        latest = json.loads(path.read_text())
        saved = latest["progress"].get("identity")
        changes = self.identity.changes(saved, finished=False)
        other_ranks = isinstance(saved, dict) and saved.get("world_size") != self.identity.world_size
        if other_ranks and changes.keys() in ({"world_size"}, {"micro_batches_per_step"}):
            raise InputError(self.directory, self._relaunch(saved))
        if changes:
            log.warning("%s: the resume checkpoint is of another config (%s): starting the %s "
                        "stage afresh", self.directory, listed(changes), self.stage)
            return None
        return latest

    def _relaunch(self, saved: dict) -> str:
        """How to launch so that the checkpoint ``saved`` (an identity) continues."""
        then, now, stage = saved["world_size"], self.identity.world_size, self.stage
        afresh = f"or pass --no-resume to train the {stage} stage afresh"
        if stage != "finetune":
            return (f"saved by {then} ranks, launched with {now}: stage 1's negatives are its ranks' micro-batches, "
                    f"so launch {then} to continue it, {afresh}")
        per_step = saved["config"]["distributed"]["grad_accum"] * then
        accum = f"--set distributed.grad_accum={per_step // now}" if per_step % now == 0 else None
        return (f"saved at {per_step} micro-batches a step ({then} ranks x distributed.grad_accum "
                f"{per_step // then}), launched with {now} x {self.identity.cfg.distributed.grad_accum}: "
                + (f"pass {accum} to continue it, " if accum else f"launch a divisor of {per_step} ranks to continue it, ")
                + afresh)

    def progress(self) -> Progress:
        """Where the last run of this command left the stage (a fresh start when it left nothing). On another
        number of ranks, ``batch`` (this rank's batches of the epoch) is converted: the steps taken stay."""
        latest = self.latest()
        if latest is None:
            return Progress(identity=self.identity.to_dict())
        ends = self.identity.changes(latest["progress"]["identity"], finished=True)
        state = Progress(**{**latest["progress"], "identity": self.identity.to_dict()})
        then, now = latest["progress"]["identity"]["world_size"], self.identity.world_size
        if then != now:
            state.batch = state.batch * then // now  # saved between steps: a whole number of steps' batches
            log.info("%s: continuing on %d ranks what %d ranks saved: the same micro-batches make each step; "
                     "dropout draws anew", self.stage, now, then)
        log.info("%s: resuming at phase %d, epoch %d, batch %d (step %d)", self.stage, state.phase + 1,
                 state.epoch + 1, state.batch, state.step)
        if ends:  # a patience or test split changed since the checkpoint
            log.info("%s: continuing under %s", self.stage, listed(ends))
        return state

    def save(self, engine, progress: Progress) -> None:
        """An engine checkpoint at ``progress``, between optimizer steps only (gradients being accumulated
        are not saved). Collective: every rank calls it."""
        if not engine.at_boundary:
            return
        progress.elapsed()
        state = dataclasses.asdict(progress)
        serial = dist.gather_objects(self._saves() if dist.is_main() else None)[0] + 1  # rank 0's count
        tag = f"save{serial}-p{progress.phase}-step{progress.step}"
        engine.save_state(self.directory / tag, dict(progress=state, rng=dist.gather_objects(dist.rng_state())))
        dist.barrier()
        if dist.is_main():
            write_json(self.directory / LATEST, dict(tag=tag, saves=serial, progress=state), indent=1)
            for old in self.directory.iterdir():
                if old.is_dir() and old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def _saves(self) -> int:
        """How many saves this stage's resume folder has seen (numbers every save's tag apart)."""
        path = self.directory / LATEST
        return json.loads(path.read_text()).get("saves", 0) if path.is_file() else 0

    def restore(self, engine) -> bool:
        """Weights, optimizer and RNG of the newest checkpoint into ``engine``; False when there is none. Saved
        by another number of ranks, each rank's random stream starts anew, seeded by its rank and the step."""
        latest = self.latest()
        if latest is None:
            return False
        saved_ranks = latest["progress"]["identity"]["world_size"]
        try:
            state = engine.load_state(self.directory / latest["tag"], saved_ranks)
        except InputError as err:
            raise InputError(err.path, f"{err.problem}; --no-resume trains the {self.stage} stage afresh",
                             err.line) from err
        if saved_ranks == dist.world_size():
            dist.set_rng_state(state["rng"][dist.rank()])
        else:
            dist.seed_rank_stream(self.identity.cfg.run.seed, salt=latest["progress"]["stage_step"], always=True)
        return True


@dataclass
class BestWeights:
    """The stage's best weights, a CPU copy on every rank: the ``best`` hand-off and the final test take them
    from here, not from best.pt, which is rank 0's copy for ``eval`` (a shared file system can show the other
    nodes an older one, and another process can replace it)."""

    state: dict | None = None

    def keep(self, model: NerTagger) -> None:
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def resumed_best(run, stage: str, progress: Progress) -> BestWeights:
    """A resumed stage's best weights: the best.pt of the runs it continues (the output folder's lock kept
    every other run out), refused unless it is the epoch the resume state names as the best, or the epoch
    being trained again. That one was written by a run killed between writing best.pt and its resume
    checkpoint: the earlier best's weights are gone, so the stage's best becomes that epoch, with its score
    (``progress`` updated), and the epoch trained again must beat it."""
    if progress.best_epoch < 1:  # no best yet: the epoch trained again will be one
        return BestWeights()
    path = run.stage_dir(stage) / "best.pt"
    saved = load_checkpoint(path)
    if saved.get("stage") != stage or saved.get("epoch") not in (progress.best_epoch, progress.epochs_done + 1):
        raise InputError(path, f"holds {saved.get('stage')} epoch {saved.get('epoch')}, but the {stage} stage "
                               f"being resumed had its best at epoch {progress.best_epoch}: the file was replaced; "
                               "--no-resume trains the stage again")
    if saved["epoch"] != progress.best_epoch:
        progress.best = saved["dev_loss"] if "dev_loss" in saved else saved["dev"]["f1"]
        progress.best_epoch, progress.stale = saved["epoch"], 0
    return BestWeights(saved["model"])
