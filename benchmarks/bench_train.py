"""Training throughput: tokens/s and peak memory per GPU for both stages, and the MSRA stage-2 epoch time.

    python benchmarks/bench_train.py                 # GPU: the grid below, then one full MSRA epoch
    python benchmarks/bench_train.py --no-epoch      # the grid only
    python benchmarks/bench_train.py --smoke         # CPU: a few steps on the tiny config (script check)

Runs the trainer's own code — ``train_epoch`` with the DeepSpeed engine (one rank, bf16 on GPU, the ZeRO
JSON of ``--ds``), the stage losses, the length-bucketed sampler — on MSRA's training split, for two
encoders: FLAT as in ``configs/msra.yaml`` and FLAT + a BERT-base-shaped model (12 x 768, random weights,
bert-base-chinese's vocabulary; nothing is downloaded). Tokens are characters (the lattice's words are not
counted). Peak memory is ``torch.cuda.max_memory_allocated`` over the measured steps.

The epoch: every MSRA training piece once, stage 2 (CRF fine-tuning, everything trained) with the BERT-base-
shaped encoder, at ``--epoch-batch`` sentences per step (learning rate scaled linearly), excluding data
loading and evaluation. Target: <= 60 s on one H100.

Writes benchmarks/results/train_<gpu>.json (``train_cpu_smoke.json`` for --smoke, whose GPU figures are
"not measured").
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from nerco_dist.atomic import write_json  # noqa: E402
from nerco_dist.config import data_root, load_config  # noqa: E402
from nerco_dist.data.dataset import LengthBucketBatchSampler  # noqa: E402
from nerco_dist.train import distributed as dist  # noqa: E402
from nerco_dist.train import trainer  # noqa: E402
from nerco_dist.train.task import Task, read_splits  # noqa: E402

TARGET_EPOCH_S = 60.0


def bert_base_shaped(directory: Path, vocab: Path) -> Path:
    """A BERT-base-sized model with random weights, saved where ``model.bert`` can point."""
    from transformers import BertConfig, BertModel

    n_vocab = sum(1 for _ in open(vocab, encoding="utf-8"))
    config = BertConfig(vocab_size=n_vocab, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    (directory / "vocab.txt").write_bytes(vocab.read_bytes())
    return directory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run: trainer.Run, stage: str, batch_size: int, warmup: int, steps: int) -> dict:
    """``warmup`` then ``steps`` micro-batches of ``stage`` through ``train_epoch``: tokens/s and peak memory."""
    cfg = run.cfg
    trainer.seed_everything(cfg.train.seed)
    model = run.new_model()
    sampler = LengthBucketBatchSampler([p.lattice_len for p in run.train_pieces], batch_size, seed=1)
    batches = list(itertools.islice(iter(run.task.batches(run.train_pieces, sampler)), warmup + steps))
    if stage == "contrastive":
        c = cfg.contrastive
        stage_cfg = dataclasses.replace(cfg.train, optimizer=c.optimizer, lr=c.lr, batch_size=batch_size)
        engine = run.engine(model, model.encoder_parameters(), [], stage_cfg, len(batches), 1, 0)
        loss_of = lambda b: trainer.contrastive_loss(run, model, b, model.encode(b))  # noqa: E731
    else:
        run.cfg.train.batch_size = batch_size
        engine, model = trainer.finetune_engine(run, model, None, cfg.train.epochs - 1, len(batches), 0)
        loss_of = lambda b: trainer.finetune_loss(run, model, b, head_only=False)  # noqa: E731
    model.train()
    state = trainer.Progress()
    trainer.train_epoch(run, stage, engine, batches[:warmup], state, loss_of, trainer._NoWriter())
    sync(run.device)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    timed = batches[warmup:]
    tick = time.perf_counter()
    state = trainer.Progress()
    trainer.train_epoch(run, stage, engine, timed, state, loss_of, trainer._NoWriter())
    sync(run.device)
    seconds = time.perf_counter() - tick
    tokens = sum(int(b["char_mask"].sum()) for b in timed)
    peak = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None
    engine.close()
    return dict(stage=stage, batch=batch_size, steps=len(timed), tokens=tokens, seconds=round(seconds, 3),
                tokens_per_s=round(tokens / seconds, 1), tokens_per_s_global=round(tokens * dist.world_size() / seconds, 1),
                peak_mem_gib=None if peak is None else round(peak, 3))


def msra_epoch(run: trainer.Run, batch_size: int) -> dict:
    """One full stage-2 epoch over every training piece (no evaluation), timed."""
    trainer.seed_everything(run.cfg.train.seed)
    model = run.new_model()
    run.cfg.train.batch_size = batch_size
    sampler = run.sampler(run.train_pieces, batch_size)
    batches = run.task.batches(run.train_pieces, sampler)
    engine, model = trainer.finetune_engine(run, model, None, 0, len(batches), 0)
    model.train()
    state = trainer.Progress()
    sync(run.device)
    tick = time.perf_counter()
    trainer.train_epoch(run, "finetune", engine, batches, state,
                        lambda b: trainer.finetune_loss(run, model, b, head_only=False), trainer._NoWriter())
    sync(run.device)
    seconds = time.perf_counter() - tick
    engine.close()
    return dict(seconds=round(seconds, 2), batch=batch_size, steps=len(batches), pieces=len(run.train_pieces),
                chars=sum(p.num_chars for p in run.train_pieces), target_s=TARGET_EPOCH_S,
                met=seconds <= TARGET_EPOCH_S, nonfinite_skipped=state.nonfinite)


def build_run(cfg, root: Path) -> trainer.Run:
    device = dist.device_for_rank(cfg.train.device)
    dist.init(device, cfg.distributed.timeout_s)
    splits = read_splits(cfg, root)
    task = Task.from_training_data(cfg, splits.train, root)
    pieces = task.encoder.encode(splits.train, split_on_entities=True)
    return trainer.Run(cfg, root, task, splits, pieces, device, Path(cfg.train.out_dir))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", help="default $NERCO_DATA_ROOT or data/")
    ap.add_argument("--ds", default="configs/ds/zero0.json", help="DeepSpeed JSON (one rank)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64, help="sentences per step in the grid")
    ap.add_argument("--epoch-batch", type=int, default=128, help="sentences per step in the MSRA epoch")
    ap.add_argument("--no-epoch", action="store_true", help="skip the full MSRA epoch")
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny config, a few steps, no epoch")
    args = ap.parse_args()
    root = data_root(args.data_root)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    on_gpu = torch.cuda.is_available() and not args.smoke
    base = REPO / "configs" / ("msra.yaml" if not args.smoke else "tiny.yaml")
    common = [f"distributed.config={args.ds}", "train.out_dir=" + tempfile.mkdtemp(prefix="bench_train_"),
              "contrastive.enabled=true"]
    if args.smoke:
        common += ["data.limit=120", "data.max_len=60", "train.device=cpu"]
        args.steps, args.warmup, args.batch, args.no_epoch = 3, 1, 16, True
    with tempfile.TemporaryDirectory() as tmp:
        bert = None if args.smoke else bert_base_shaped(Path(tmp) / "bert", root / "vocab" / "bert-base-chinese-vocab.txt")
        models = [("flat", [])]
        models.append(("flat+bert-base-shaped" if bert else "flat+bert-tiny", [f"model.bert={bert or tiny_bert(Path(tmp), root)}"]))
        rows, epoch = [], None
        run = None
        for name, extra in models:
            cfg = load_config(base, common + extra)
            if run is None:
                run = build_run(cfg, root)  # the data and vocabularies do not depend on the encoder
            run = dataclasses.replace(run, cfg=cfg)
            for stage in ("contrastive", "finetune"):
                row = dict(model=name, **measure(run, stage, args.batch, args.warmup, args.steps))
                print(json.dumps(row), flush=True)
                rows.append(row)
            if name != "flat" and not args.no_epoch:
                epoch = msra_epoch(run, args.epoch_batch)
                print(json.dumps(dict(msra_epoch=epoch)), flush=True)
    gpu = torch.cuda.get_device_name(0) if on_gpu else None
    ds = json.loads((REPO / args.ds).read_text())
    payload = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"), gpu=gpu or "none (CPU smoke run)",
        torch=torch.__version__, python=platform.python_version(), deepspeed=__import__("deepspeed").__version__,
        ds_config=args.ds, zero_stage=ds.get("zero_optimization", {}).get("stage", 0),
        precision="bf16" if on_gpu else "fp32", world_size=dist.world_size(), data=str(base.name),
        train_pieces=len(run.train_pieces), grid=rows,
        msra_stage2_epoch=epoch if epoch else "not measured" + ("" if on_gpu else " (no GPU in this session)"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_") if gpu else "cpu_smoke"
    out = RESULTS / f"train_{slug}.json"
    write_json(out, payload, indent=1)
    print(f"wrote {out}")
    return 0 if (epoch is None or epoch["met"]) else 1


def tiny_bert(tmp: Path, root: Path) -> Path:
    """For --smoke: a 2-layer BERT, so the BERT path runs on a CPU in seconds."""
    from transformers import BertConfig, BertModel

    directory = tmp / "tiny-bert"
    vocab = root / "vocab" / "bert-base-chinese-vocab.txt"
    config = BertConfig(vocab_size=sum(1 for _ in open(vocab, encoding="utf-8")), hidden_size=32,
                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    (directory / "vocab.txt").write_bytes(vocab.read_bytes())
    return directory


if __name__ == "__main__":
    sys.exit(main())
