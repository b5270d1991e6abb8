"""One ``nerco train`` invocation: its config, data, device and output folder, shared by both stages."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import random
import re
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .. import distributed as dist
from ..checkpoint import save_checkpoint
from ..config import Config
from ..data.dataset import LatticeEncoder, LengthBucketBatchSampler, Piece
from ..data.splits import Splits
from ..data.vocab import PretrainedVectors
from ..errors import InputError
from ..eval.metrics import NerReport, evaluate
from ..inference import predict
from ..machine import apply_threads, flush_denormals, keep_freed_memory
from ..model.build import build_tagger
from ..model.tagger import NerTagger
from .engines import uses_deepspeed
from .inputs import read_training_inputs
from .phases import load_encoder, stage_phases

log = logging.getLogger("nerco_dist")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def refuse_unrunnable(cfg: Config, stages: list[str]) -> None:
    """Stop before any work when the config cannot run here: a device or kernel this machine lacks, an
    output folder that is a file, a stage with nothing to train. Ranges of single values are checked when
    the config is read (``config.py``)."""
    if not cfg.data.train:
        raise InputError("config", "data.train: required (the training corpus, a path under the data root)")
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise InputError("config", "run.device=cuda: torch sees no CUDA device here (allowed here: auto, cpu)")
    uses_infonce = cfg.contrastive.enabled or cfg.ablation.joint
    on_gpu = cfg.run.device != "cpu" and torch.cuda.is_available()
    if uses_infonce and cfg.contrastive.backend == "triton" and not on_gpu:
        raise InputError("config", "contrastive.backend=triton: the Triton kernel needs a CUDA device "
                                   "(allowed here: auto, torch)")
    out = Path(cfg.run.out_dir)
    if out.exists() and not out.is_dir():
        raise InputError("config", f"run.out_dir={cfg.run.out_dir}: a file, not a folder")
    for stage in stages:
        stage_phases(cfg, stage)  # refuses a stage whose phases all have 0 epochs


def join_ranks(cfg: Config) -> torch.device:
    """This rank's device, the process group joined when DeepSpeed is used (a second call does nothing)."""
    device = dist.device_for_rank(cfg.run.device, "run.device")
    if uses_deepspeed(cfg.distributed):
        dist.init(device, cfg.distributed.timeout_s)
    return device


LOCK_FILE = ".nerco-train.lock"
LEFTOVER = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # atomic_path's temporary files: .NAME.XXXXXXXX.tmp


@contextlib.contextmanager
def exclusive_output(out: Path) -> Iterator[None]:
    """Hold the output folder for one run: rank 0 keeps an exclusive lock on ``out/.nerco-train.lock`` until
    the run ends, and a second ``nerco train`` on the folder stops at once (two runs there deleted each
    other's resume checkpoints and each took the other's best.pt for its own). The kernel drops the lock of a
    process that dies, so a killed run's lock is simply taken over; the pid in the file is for the message.
    Holding it, rank 0 removes the temporary files a killed write left. A folder that cannot be made or
    written stops the run here. Collective, after :func:`join_ranks`: every rank learns whether rank 0 got
    the lock."""
    handle, problem = None, None
    if dist.is_main():
        try:
            handle, problem = _lock(out)
            if handle is not None:
                _remove_leftovers(out)
        except OSError as err:
            problem = f"cannot be written: {err.strerror or err}"
    problem = dist.gather_objects(problem)[0]
    if problem is not None:
        raise InputError(out, problem)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # and the lock with it


def _lock(out: Path):
    """``(handle holding the lock, None)``, or ``(None, why not)`` when another run holds it."""
    if out.is_symlink() and not out.exists():
        return None, f"a symbolic link to {os.readlink(out)}, which does not exist"
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "pid not written yet"
        handle.close()
        return None, f"in use by another nerco train ({holder}): wait for it to end, or choose another run.out_dir"
    except OSError as err:  # a file system without locks (NFS mounted nolock, Lustre without flock)
        log.warning("%s: cannot be locked (%s): a second run on this folder would not be stopped", out, err)
        return handle, None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle, None


def _remove_leftovers(out: Path) -> None:
    """The temporary files of writes a killed run left half-done (best.pt's, the results', ...)."""
    left = [p for p in out.rglob(".*.tmp") if LEFTOVER.match(p.name) and p.is_file()]
    for path in left:
        path.unlink(missing_ok=True)
    if left:
        log.info("%s: removed %d temporary file%s left by an interrupted write", out, len(left),
                 "" if len(left) == 1 else "s")


def new_model(cfg: Config, codec: LatticeEncoder, pretrained: dict[str, PretrainedVectors | None]) -> NerTagger:
    """The tagger a run starts from: its rows from the vector files, the rest seeded by ``run.seed``."""
    return build_tagger(codec, cfg.model, pretrained, normalize=cfg.data.norm_embeddings, seed=cfg.run.seed)


@dataclass
class TrainingRun:
    """One ``nerco train``: its config, data, device and output folder, shared by both stages."""

    cfg: Config
    codec: LatticeEncoder
    pretrained: dict[str, PretrainedVectors | None]  # what a new model's rows start from
    splits: Splits
    train_pieces: list[Piece]
    device: torch.device
    out: Path

    @classmethod
    def start(cls, cfg: Config) -> "TrainingRun":
        """Seeds, the allocator, the process group when DeepSpeed is used, threads, the data and its codec."""
        seed_everything(cfg.run.seed)
        keep_freed_memory()
        flush_denormals(cfg.run.flush_denormals)  # before any parallel op starts torch's threads
        device = join_ranks(cfg)
        if not dist.is_main():
            log.setLevel(logging.WARNING)
        apply_threads(cfg.run.threads)  # after the log level: rank 0 alone says what auto chose
        splits, codec, pieces, pretrained = read_training_inputs(cfg)
        return cls(cfg, codec, pretrained, splits, pieces, device, Path(cfg.run.out_dir))

    def stage_dir(self, stage: str) -> Path:
        return self.out / "contrastive" if stage == "contrastive" else self.out

    def initial_model(self, init: Path | None) -> NerTagger:
        """The seeded model a stage starts from (stage 2: with the encoder of the stage-1 checkpoint)."""
        seed_everything(self.cfg.run.seed)
        model = new_model(self.cfg, self.codec, self.pretrained).to(self.device)
        if init is not None:
            load_encoder(model, init)
            log.info("stage 2 starts from the encoder of %s", init)
        dist.seed_rank_stream(self.cfg.run.seed)  # after the identical init, each rank its own dropout stream
        return model

    @functools.cached_property
    def dev_pieces(self) -> list[Piece]:
        """Dev pieces cut as training cuts them (stage 1 scores its dev InfoNCE on them)."""
        return self.codec.encode(self.splits.dev, split_on_entities=True, source="dev ")

    def train_batches(self, batch_size: int, grad_accum: int | None = None):
        """This rank's share of the shuffled, length-bucketed batches, in whole optimizer steps of ``grad_accum``
        (default ``distributed.grad_accum``) micro-batches a rank (``.sampler.set_epoch`` reshuffles)."""
        sampler = LengthBucketBatchSampler([p.lattice_len for p in self.train_pieces], batch_size,
                                           seed=self.cfg.run.seed, rank=dist.rank(), world_size=dist.world_size(),
                                           grad_accum=grad_accum or self.cfg.distributed.grad_accum)
        return self.codec.batches(self.train_pieces, sampler)

    def model_with(self, weights: dict) -> NerTagger:
        """A fresh model holding ``weights``; building it draws no random numbers from the training stream."""
        with torch.random.fork_rng(devices=[]):
            model = build_tagger(self.codec, self.cfg.model).to(self.device)
        model.load_state_dict(weights)
        return model

    def scores(self, model: NerTagger, sentences: list) -> NerReport:
        """Entity scores of ``model`` on labelled sentences (predicted across ranks)."""
        return evaluate([s.tags for s in sentences], predict(self.codec, model, sentences,
                                                             self.cfg.run.eval_batch_size))

    def checkpoint(self, path: Path, model: NerTagger, **extra) -> None:
        """A plain fp32 checkpoint for ``eval``/``predict`` (rank 0 writes it, atomically)."""
        if dist.is_main():
            save_checkpoint(path, model_state=model.state_dict(), model_args=asdict(self.cfg.model),
                            codec=self.codec.state_dict(), provenance=dict(config=self.cfg.to_dict()), **extra)
