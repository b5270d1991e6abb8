"""The DeepSpeed engine: ``deepspeed.initialize`` with a ZeRO stage 0-3 JSON (``configs/ds/``, shipped in the
package as ``nerco_dist.ds_configs``), bf16 on GPU and fp32 on CPU, gradients averaged over ranks, behind the
trainer's :class:`~.engine.Engine` interface.

Clipping here is DeepSpeed's ``gradient_clipping`` (by global norm): clipping by value is element-wise and
would need every partition of the flat ZeRO gradient buffers, which DeepSpeed does not expose, so a phase's
``optim.clip_value`` does not apply, except to the embedding tables updated row-wise, which are kept out of
DeepSpeed's sight (replicated, their touched rows exchanged by :class:`~.rows.TableRows`). The optimizer and
LR schedule are the training config's, never the JSON's. Resume files are read weights-only and written
atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.resources
import io
import json
import logging
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .. import distributed as dist
from ..checkpoint import load_tensors, save_tensors
from ..config import DistributedConfig
from ..errors import InputError
from .engine import LOCAL_FILE, Engine
from .rows import TableRows

log = logging.getLogger("nerco_dist")

TABLES_FILE = "tables.pt"  # a DeepSpeed resume checkpoint's row-wise tables and their optimizer


def resolve_ds_config(path: str | None) -> Path | None:
    """A DeepSpeed JSON: the file as given, else the packaged one of that name (``zero2``, ``zero2.json`` or
    ``configs/ds/zero2.json`` all find ``nerco_dist.ds_configs/zero2.json``, wherever the package lives)."""
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_file():
        return p
    packaged = importlib.resources.files("nerco_dist.ds_configs")
    candidate = packaged / (p.name if p.suffix == ".json" else f"{p.name}.json")
    if candidate.is_file():
        return Path(str(candidate))
    names = sorted(f.name for f in packaged.iterdir() if f.name.endswith(".json"))
    raise FileNotFoundError(f"distributed.config={path!r}: no such file, and not a packaged DeepSpeed config "
                            f"({', '.join(names)})")


def deepspeed_config(d: DistributedConfig, micro_batch: int, device: torch.device) -> dict:
    """The JSON file's ZeRO and communication settings, plus what the training config decides: batch sizes,
    accumulation, precision. Optimizer and scheduler come from the training config, never the JSON."""
    path = resolve_ds_config(d.config)
    ds = json.loads(path.read_text()) if path else {"zero_optimization": {"stage": 0}}
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(f"{path}: remove '{key}': the optimizer and LR schedule come from the training config")
    ds = {k: v for k, v in ds.items() if not k.startswith("_")}  # "_comment" keys
    ds.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=d.grad_accum,
              train_batch_size=micro_batch * d.grad_accum * dist.world_size())
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs
    precision = d.precision if d.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"distributed.precision={d.precision!r}: expected auto, bf16 or fp32")
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds.pop("fp16", None)
    return ds


class _Forward(nn.Module):
    """DeepSpeed's view of the model: ``forward(fn)`` runs the trainer's model calls as the engine's forward
    pass, so ZeRO-3 gathers each parameter as it is used (FLAT reads some weights outside their module)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable):
        return fn()


class _KeptOut:
    """Parameters taken out of their modules' parameter lists (left readable as plain attributes of the same
    name), so that DeepSpeed, which finds what it reduces, partitions and casts there, never sees them: the
    tables updated row-wise. ``restore`` puts them back."""

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter]):
        ids = {id(p) for p in params}
        self.places = [(f"{prefix}.{name}".lstrip("."), module, name) for prefix, module in model.named_modules()
                       for name, p in module._parameters.items() if p is not None and id(p) in ids]
        for _, module, name in self.places:
            module.__dict__[name] = module._parameters.pop(name)

    def named(self) -> dict[str, nn.Parameter]:
        return {full: module.__dict__[name] for full, module, name in self.places}

    def restore(self) -> None:
        for _, module, name in self.places:
            module._parameters[name] = module.__dict__.pop(name)


class DeepSpeedEngine(Engine):
    distributed = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, ds_config: dict, trainable: Sequence[nn.Parameter],
                 tables: TableRows | None = None):
        import deepspeed

        super().__init__()
        self.model, self.config, self.tables = model, ds_config, tables
        self.grad_accum = ds_config["gradient_accumulation_steps"]
        self._eval_model = copy.deepcopy(model).eval()  # plain fp32 copy, refreshed from the engine for eval
        for p in self._eval_model.parameters():
            p.requires_grad_(False)
        self._trainable = {id(p) for p in trainable}
        # frozen weights never change: keep their fp32 values (DeepSpeed may cast or partition them)
        self._frozen = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()
                        if id(p) not in self._trainable}
        self._kept_out = _KeptOut(model, tables.params if tables is not None else [])
        if tables is not None:
            tables.broadcast()
            tables.watch(model)  # after the copy for scoring above, which must not carry the hooks
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=_Forward(model), optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)
        self.ds.checkpoint_engine = _WeightsOnlyLoads(self.ds.checkpoint_engine)

    @property
    def steps(self) -> int:
        return self.ds.global_steps

    def forward(self, fn: Callable):
        return self.ds(fn)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.micro_steps += 1
        self.ds.step()
        if self.tables is not None and self.at_boundary:
            self.tables.step()

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def full_state_dict(self) -> dict:
        """The model's weights as plain fp32 tensors on every rank (ZeRO partitions and bf16 copies put back
        together from the fp32 master weights). Collective."""
        from deepspeed.utils import safe_get_full_fp32_param

        self.flush_tables()
        state = dict(self._frozen)
        state.update({name: p.detach().float().cpu().clone() for name, p in self._kept_out.named().items()})
        for name, p in self.model.named_parameters():
            if name in self._frozen:
                continue
            full = safe_get_full_fp32_param(p)  # from the fp32 master weights (None without ZeRO or bf16)
            shape = self._eval_model.get_parameter(name).shape
            state[name] = full.detach().float().reshape(shape).cpu() if full is not None else _gathered(p, shape)
        keys = self._eval_model.state_dict().keys()
        for name, b in self.model.named_buffers():
            if name in keys:
                state[name] = b.detach().clone().cpu()
        return {k: state[k] for k in keys}

    def inference_model(self, weights: dict | None = None) -> nn.Module:
        """An fp32 copy of the model with the current weights (or ``weights``), for evaluation without the
        engine's hooks: exactly the weights a checkpoint of this moment holds. Collective without weights."""
        self._eval_model.load_state_dict(self.full_state_dict() if weights is None else weights)
        return self._eval_model

    def save_state(self, path: Path, extra: dict) -> None:
        self.ds.save_checkpoint(str(path.parent), tag=path.name, client_state=dict(nerco=extra), save_latest=False)
        self._save_tables(path)

    def load_state(self, path: Path, saved_ranks: int) -> dict:
        """DeepSpeed's checkpoint ``path``; saved by another number of ranks under ZeRO 1 or 2, through its
        universal form (:func:`_universal`); under ZeRO 3 refused (DeepSpeed 0.19 loads that form wrongly for a
        model of several parameter groups: docs/distributed.md). The tables updated row-wise are whole on
        every rank."""
        if (path / LOCAL_FILE).is_file():
            raise InputError(path, "saved by the one-process engine: continue it without the launcher and "
                                   "without distributed.config")
        _refuse_unsafe_files(path)
        zero = self.config["zero_optimization"].get("stage", 0)
        if saved_ranks != dist.world_size() and zero == 3:
            raise InputError(path, f"saved by {saved_ranks} rank(s) under ZeRO 3, which continues only on as many "
                                   f"(DeepSpeed's universal form restores several parameter groups wrongly there): "
                                   f"launch {saved_ranks}")
        universal = saved_ranks != dist.world_size() and zero > 0
        source = _universal(path) if universal else path
        # the LR schedule was built at the resumed step (``start_step``): its saved state is not loaded
        self.ds._config.load_universal_checkpoint = universal  # read by load_checkpoint alone
        try:
            loaded, client = self.ds.load_checkpoint(str(source.parent), tag=source.name,
                                                     load_lr_scheduler_states=False)
        finally:
            self.ds._config.load_universal_checkpoint = False
        if loaded is None:
            raise ValueError(f"{path}: DeepSpeed could not load this checkpoint")
        self._load_tables(path)
        self._frozen_as_loaded()
        return client["nerco"]

    def _frozen_as_loaded(self) -> None:
        """The frozen weights the checkpoint holds: a later phase's frozen weights were trained in an earlier
        one (``freeze_embeddings`` after ``frozen_bert``), while those kept at ``__init__`` are the stage's
        start. Each the checkpoint changed is taken from the module: exact in fp32; under bf16 at bf16's
        precision, as DeepSpeed keeps no fp32 copy of a frozen weight. Collective under ZeRO 3."""
        for name, p in self.model.named_parameters():
            if name not in self._frozen:
                continue
            kept = self._frozen[name]
            loaded = _gathered(p, kept.shape)
            if not torch.equal(loaded, kept.to(p.dtype).float()):
                self._frozen[name] = loaded

    def _save_tables(self, path: Path) -> None:
        """The tables updated row-wise (replicated: rank 0's) and their optimizer, beside DeepSpeed's files."""
        if self.tables is None or not dist.is_main():
            return
        save_tensors(dict(weights={n: p.detach() for n, p in self._kept_out.named().items()},
                          optimizer=self.tables.state_dict()), path / TABLES_FILE)

    def _load_tables(self, path: Path) -> None:
        if self.tables is None:
            return
        state = load_tensors(path / TABLES_FILE)
        with torch.no_grad():
            for name, p in self._kept_out.named().items():
                p.copy_(state["weights"][name])
        self.tables.load_state_dict(state["optimizer"])

    def close(self) -> None:
        super().close()
        destroy = getattr(self.ds, "destroy", None)
        if destroy is not None:
            destroy()
        self._kept_out.restore()


def _gathered(p: nn.Parameter, shape: torch.Size) -> torch.Tensor:
    """A CPU fp32 copy of the whole parameter ``p`` (gathered from its ZeRO-3 partitions: collective there)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
        return p.detach().float().cpu().clone().reshape(shape)


def _universal(path: Path) -> Path:
    """DeepSpeed's universal form of the ZeRO checkpoint ``path``: every parameter's weights and optimizer
    moments whole (``zero/<name>/``), which DeepSpeed partitions anew for any number of ranks. Rank 0 makes it
    beside ``path`` from the files :func:`_refuse_unsafe_files` has read, anew at every resume (DeepSpeed reads
    it unchecked, so a folder found there is never trusted), in a ``.partial`` folder renamed when complete;
    the next save removes it. Collective: whatever stops the conversion stops every rank with its reason."""
    target = path.with_name(f"{path.name}-universal")
    refused = None
    if dist.is_main():
        from deepspeed.checkpoint import ds_to_universal

        partial = target.with_name(f"{target.name}.partial")
        for old in (target, partial):
            shutil.rmtree(old, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(path), output_folder=str(partial), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its prints
                ds_to_universal.main(args)
            partial.rename(target)
            log.info("%s: saved by another number of ranks: converted to DeepSpeed's universal form, %s", path, target)
        except Exception as err:  # a third-party converter: any failure is this checkpoint's, said on every rank
            refused = (f"saved by another number of ranks, and DeepSpeed cannot convert it for this one "
                       f"({type(err).__name__}: {err})")
    refused = dist.gather_objects(refused)[0]
    if refused is not None:
        raise InputError(path, refused)
    return target


def _deepspeed_classes() -> list[type]:
    """What DeepSpeed (0.19) pickles into its ZeRO optimizer files besides tensors and plain values: the ZeRO
    stage (an int enum), the static loss scaler (fp32 and bf16 alike) and the places of parameter fragments
    in the flat partitions (ZeRO 1, 2). Unpickling them sets attributes and runs none of the file's code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class _WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine, its loads made weights-only (DeepSpeed unpickles its files in full, so a
    file planted in a resume folder would run its code) and its saves atomic with a full disk named as such;
    everything else is the engine's own."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def save(self, state_dict: dict, path: str) -> None:
        save_tensors(state_dict, path)

    def load(self, path: str, map_location=None):
        return load_tensors(path, allow=_deepspeed_classes(), map_location=map_location)


def _refuse_unsafe_files(directory: Path) -> None:
    """Rank 0 reads every file of a DeepSpeed checkpoint as :class:`_WeightsOnlyLoads` will (the tensors of
    zip files mapped, not read), so that a refused file stops every rank with its name before each rank reads
    its own files inside DeepSpeed's collective ``load_checkpoint``, where one rank's error would leave the
    others waiting. Collective."""
    refused = None
    if dist.is_main():
        for path in sorted(p for p in directory.iterdir() if p.is_file()):
            try:
                load_tensors(path, allow=_deepspeed_classes(), mmap=zipfile.is_zipfile(path))
            except InputError as err:
                refused = (str(err.path), err.problem)
                break
    refused = dist.gather_objects(refused)[0]
    if refused is not None:
        raise InputError(*refused)
