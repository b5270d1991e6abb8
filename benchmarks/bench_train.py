"""Training throughput: tokens/s and peak memory per GPU for both stages, and the MSRA stage-2 epoch time.

    python3 benchmarks/bench_train.py                 # GPU: the grid below, then one full MSRA epoch
    python3 benchmarks/bench_train.py --no-epoch      # the grid only
    python3 benchmarks/bench_train.py --quick         # CPU: a few steps on the tiny config (script check)

Runs the trainer's own phase loop (``trainer.StageLoop``: its engine and ``train_epoch`` with the phase's loss)
on the DeepSpeed engine (one rank, bf16 on GPU, the ZeRO JSON of ``--ds``) over MSRA's training split, for two
encoders: FLAT as in ``configs/msra.yaml`` and FLAT + a BERT-base-shaped model (12 x 768, random weights,
bert-base-chinese's vocabulary; nothing is downloaded), each read and encoded for its own model (the BERT
one with BERT's input ids); FLAT's full phase also with the embedding tables' other update (dense / rows).
The lattice embeddings start random: timings do not depend on their values, and the generated bigram and
word vectors (about 230 MB) are too big to send to a GPU machine; the data root needs ``msra/`` and ``vocab/``
only. Tokens are characters (the lattice's words are not counted). Peak
memory is ``torch.cuda.max_memory_allocated`` over the measured steps.

The epoch: every MSRA training piece once, stage 2's ``full`` phase with the BERT-base-shaped encoder, at
``--epoch-batch`` sentences per step, excluding data loading and evaluation. Target: <= 60 s on one H100.
Each row is written to the results JSON as soon as it is measured.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # a row per measurement is the progress report

import torch

from common import ResultsFile, machine_info, parse_args

from nerco_dist.config import default_data_root, load_config
from nerco_dist.train.monitor import Scalars
from nerco_dist.train.phases import Phase, stage_phases
from nerco_dist.train.resume import BestWeights, Progress
from nerco_dist.train.run import TrainingRun
from nerco_dist.train.trainer import StageLoop

REPO = Path(__file__).resolve().parents[1]
TARGET_EPOCH_S = 60.0
BERT_BASE = (12, 768, 12, 3072)  # layers, hidden, heads, feed-forward: bert-base-chinese's shape
BERT_TINY = (2, 32, 2, 64)  # --quick
NO_VECTORS = ["data.char_vectors=null", "data.bigram_vectors=null", "data.word_vectors=null"]


def random_bert(directory: Path, vocab: Path, layers: int, hidden: int, heads: int, ffn: int) -> Path:
    """A BERT with random weights and bert-base-chinese's vocabulary, saved where ``model.bert`` can point."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=sum(1 for _ in open(vocab, encoding="utf-8")), hidden_size=hidden,
                        num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
                        max_position_embeddings=512)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    (directory / "vocab.txt").write_bytes(vocab.read_bytes())
    return directory


def encoders(bert: Path, quick: bool) -> list[tuple[str, list[str]]]:
    """The encoders timed, as (name, config overrides): FLAT + the random BERT saved at ``bert``, then FLAT alone
    (the BERT one first: its MSRA epoch is the target, so a run cut short loses FLAT's rows rather than that)."""
    return [(f"flat+bert-{'tiny' if quick else 'base-shaped'}", [f"model.bert={bert}"]), ("flat", [])]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def with_batch(phase: Phase, batch_size: int) -> Phase:
    return dataclasses.replace(phase, optim=dataclasses.replace(phase.optim, batch_size=batch_size))


def timed_steps(run: TrainingRun, phase: Phase, batches: list, warmup: int) -> dict:
    """``warmup`` micro-batches, then the rest timed, through the trainer's epoch loop."""
    loop = StageLoop(run, [phase], Progress(), BestWeights(), None, Scalars(None))
    loop.start_phase(run.initial_model(None), 0)
    loss = loop.phase_loss()
    loop.train_epoch(batches[:warmup], loss)
    sync(run.device)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    progress, timed = Progress(), batches[warmup:]
    loop.progress = progress
    tick = time.perf_counter()
    loop.train_epoch(timed, loss)
    sync(run.device)
    seconds = time.perf_counter() - tick
    loop.engine.close()
    tokens = sum(int(b["char_mask"].sum()) for b in timed)
    peak = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None
    return dict(steps=len(timed), tokens=tokens, seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 1),
                peak_mem_gib=None if peak is None else round(peak, 3), nonfinite_skipped=progress.nonfinite)


def with_tables(phase: Phase, updates: str) -> Phase:
    return dataclasses.replace(phase, optim=dataclasses.replace(phase.optim, table_updates=updates))


def grid_phases(run: TrainingRun, flat_alone: bool) -> list[Phase]:
    """Stage 1's phase and stage 2's full phase as configured; FLAT alone also times the full phase with the
    embedding tables' other update (``dense`` / ``rows``), whose cost is the tables' share of a FLAT step."""
    contrastive, full = stage_phases(run.cfg, "contrastive")[0], stage_phases(run.cfg, "finetune")[-1]
    other = "rows" if full.optim.table_updates == "dense" else "dense"
    return [contrastive, full] + ([with_tables(full, other)] if flat_alone else [])


def grid_row(run: TrainingRun, phase: Phase, batch_size: int, warmup: int, steps: int) -> dict:
    phase = with_batch(phase, batch_size)
    batches = list(itertools.islice(iter(run.train_batches(batch_size)), warmup + steps))
    return dict(stage=phase.stage, phase=phase.name, batch=batch_size, table_updates=phase.optim.table_updates,
                **timed_steps(run, phase, batches, warmup))


def msra_epoch(run: TrainingRun, phase: Phase, batch_size: int) -> dict:
    """One stage-2 epoch over every training piece (no evaluation), timed."""
    batches = list(run.train_batches(batch_size))
    row = timed_steps(run, with_batch(phase, batch_size), batches, 0)
    return dict(batch=batch_size, pieces=len(run.train_pieces), target_s=TARGET_EPOCH_S,
                met=row["seconds"] <= TARGET_EPOCH_S, **row)


def add_arguments(parser) -> None:
    parser.add_argument("--data-root", help="default $NERCO_DATA_ROOT or data/")
    parser.add_argument("--ds", default="zero0", help="DeepSpeed config (one rank): a packaged name or a JSON")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="sentences per step in the grid")
    parser.add_argument("--epoch-batch", type=int, default=128, help="sentences per step in the MSRA epoch")
    parser.add_argument("--no-epoch", action="store_true", help="skip the full MSRA epoch")


def main() -> int:
    args = parse_args("train", __doc__, add_arguments=add_arguments, interpret_on_cpu=False)
    root = default_data_root(args.data_root)
    torch.backends.cuda.matmul.allow_tf32 = True
    base = REPO / "configs" / ("tiny.yaml" if args.quick else "msra.yaml")
    sets = [f"distributed.config={args.ds}", f"run.device={args.device}", f"run.threads={args.threads}",
            "contrastive.enabled=true",
            "run.out_dir=" + tempfile.mkdtemp(prefix="bench_train_"), *NO_VECTORS]
    if args.quick:
        sets += ["data.limit=120", "data.max_len=60"]
        args.steps, args.warmup, args.batch, args.no_epoch = 3, 1, 16, True
    results = ResultsFile(args.out, dict(benchmark="train", command=" ".join(sys.argv), config=base.name,
                                         ds_config=args.ds, machine=machine_info(args.device)))
    vocab = root / "vocab" / "bert-base-chinese-vocab.txt"
    with tempfile.TemporaryDirectory() as tmp:
        bert = random_bert(Path(tmp) / "bert", vocab, *(BERT_TINY if args.quick else BERT_BASE))
        for name, extra in encoders(bert, args.quick):
            run = TrainingRun.start(load_config(base, sets + extra, data_root=root))
            params = sum(p.numel() for p in run.initial_model(None).parameters())
            for phase in grid_phases(run, flat_alone=not extra):
                row = dict(model=name, parameters=params, **grid_row(run, phase, args.batch, args.warmup, args.steps))
                results.append(row)
                print(row, flush=True)
            if extra and not args.no_epoch:
                results.set("msra_stage2_epoch", msra_epoch(run, stage_phases(run.cfg, "finetune")[-1],
                                                            args.epoch_batch))
                print(results.payload["msra_stage2_epoch"], flush=True)
    if args.no_epoch:
        results.set("msra_stage2_epoch", "not measured (--no-epoch" + (", --quick)" if args.quick else ")"))
    epoch = results.payload["msra_stage2_epoch"]
    return 0 if not isinstance(epoch, dict) or epoch["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
