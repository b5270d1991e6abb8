"""Choices made on dev: the baseline's training recipe, and the dev effect of each lattice input, over several
seeds (dev F1 only: the test split is never read).

    python3 experiments/dev_sweep.py recipe --corpus weibo --seeds 1 2 3 --lane 0/2   # two lanes, one each
    python3 experiments/dev_sweep.py recipe --corpus weibo --seeds 1 2 3 --lane 1/2
    python3 experiments/dev_sweep.py recipe --corpus weibo --seeds 1 2 3 --report      # the table, once both end
    python3 experiments/dev_sweep.py inputs --corpus weibo --seeds 2 3 --variants 5 6   # those first
    python3 experiments/dev_sweep.py batch --corpus msra --seeds 1 --set finetune.full.optim.epochs=2
    python3 experiments/dev_sweep.py schedule --corpus msra --seeds 1 --variants 3 2 --set finetune.full.optim.epochs=30

Every (variant, seed) run is the baseline config (configs/CORPUS.yaml: fine-tuning only) with the variant's
overrides and the shared budget; its summary goes to ``experiments/results/dev_sweep/CORPUS_GROUP/``
(commit it) as it ends, and a later call skips every run whose summary is there, so a stopped sweep is
continued by the same command. ``--lane K/N`` takes every N-th run from the K-th. ``--report`` writes
``CORPUS_GROUP.json`` and ``.md``: each variant's dev F1 per seed, mean ± std, best epoch and wall time, the
dev F1 of every epoch of the first seed (the large-batch question: dev F1 after the same characters seen),
and the sha256 of the vector files it read. Needs the data root with the generated vectors (docs/data.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from nerco_dist.atomic import write_json, write_text
from nerco_dist.config import default_data_root, load_config
from nerco_dist.distributed import device_for_rank
from nerco_dist.machine import machine_info
from nerco_dist.train.monitor import read_scalars
from nerco_dist.train.stopping import StopRequested
from nerco_dist.train.trainer import train
from nerco_vs_baseline import input_checksums

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results" / "dev_sweep"

FULL = "finetune.full.optim."
SGD = [f"{FULL}optimizer=sgd", f"{FULL}lr=1e-3", f"{FULL}momentum=0.9", f"{FULL}weight_decay=0", f"{FULL}warmup=0.1"]
ADAMW = [f"{FULL}optimizer=adamw", f"{FULL}lr=1e-3", f"{FULL}weight_decay=0.01", f"{FULL}warmup=0.05"]
CONSTANT, DECAY = [f"{FULL}lr_decay=0"], [f"{FULL}lr_decay=0.05"]
HIDDEN_128 = ["model.hidden=128", "model.heads=8", "model.head_dim=16"]  # FLAT V0's Weibo and Resume models
HIDDEN_200 = ["model.hidden=200", "model.heads=10", "model.head_dim=20"]

# the lattice inputs before the fixes: stand-in vectors from 0.69M characters, <unk> for every token training
# never saw, the files' own row scales
STAND_IN = ["data.bigram_vectors=pretrained/standin/bigram.vec", "data.word_vectors=pretrained/standin/word.vec"]
NO_UNSEEN = ["data.pretrained_unseen_rows=false", "model.word_dropout=0"]
RAW_SCALES = ["data.norm_embeddings=false"]
ROWS, DENSE = [f"{FULL}table_updates=rows"], [f"{FULL}table_updates=dense"]


def large_batch(batch: int, scaling: str) -> list[str]:
    """Row-wise tables at ``batch`` sentences a step, the configured lr (tuned at 10) scaled by ``scaling``."""
    return ROWS + [f"{FULL}batch_size={batch}", f"{FULL}base_batch=10", f"distributed.lr_scaling={scaling}"]


GROUPS = {
    # one phase, every parameter from the first step (FLAT's way); the inputs as configured
    "recipe": {
        "sgd, constant, hidden 128 (FLAT V0)": SGD + CONSTANT + HIDDEN_128,
        "sgd, decay 0.05, hidden 128": SGD + DECAY + HIDDEN_128,
        "adamw, constant, hidden 128": ADAMW + CONSTANT + HIDDEN_128,
        "adamw, decay 0.05, hidden 128": ADAMW + DECAY + HIDDEN_128,
        "adamw, decay 0.05, hidden 200": ADAMW + DECAY + HIDDEN_200,
        "sgd, constant, hidden 200": SGD + CONSTANT + HIDDEN_200,
    },
    # each input fix alone, then together, on the configured recipe
    "inputs": {
        "before: stand-in vectors, <unk> for unseen tokens, raw scales": STAND_IN + NO_UNSEEN + RAW_SCALES,
        "+ pretrained rows for unseen tokens, word dropout": STAND_IN + RAW_SCALES,
        "+ unit-norm rows": STAND_IN + NO_UNSEEN,
        "+ vectors from 37M characters": NO_UNSEEN + RAW_SCALES,
        "all three (the config)": [],
        "all three, raw scales": RAW_SCALES,
        "all three, character vectors retrained on the raw text": ["data.char_vectors=pretrained/raw37m/char.vec"],
        "all three, lexicon and word vectors from jieba's segmentation": [
            "data.lexicon=pretrained/jiebaseg/word.vec", "data.word_vectors=pretrained/jiebaseg/word.vec"],
        "all three, lexicon jieba + the words of jieba's segmentation": [
            "data.lexicon=jieba+pretrained/jiebaseg/word.vec", "data.word_vectors=pretrained/jiebaseg/word.vec"],
    },
    # the embedding tables' update: every row every step (dense AdamW) or the rows a batch read (train/rows.py)
    "tables": {
        "dense tables": DENSE,
        "row-wise tables": ROWS,
    },
    # global batch 10 -> 64 -> 256 at the same characters seen (pass the epochs with --set), row-wise tables
    "batch": {
        "batch 10, dense tables": DENSE,
        "batch 10": ROWS,
        "batch 64, lr x sqrt(6.4)": large_batch(64, "sqrt"),
        "batch 256, lr x sqrt(25.6)": large_batch(256, "sqrt"),
        "batch 64, lr x 6.4": large_batch(64, "linear"),
    },
    # the full phase at global batch 64 trained to its patience, row-wise tables: the rate that batch's sweep
    # chose after 2 epochs (1e-3 x sqrt(6.4), constant), with FLAT's per-epoch decay, and the unscaled rate
    # (pass --set finetune.full.optim.epochs=30)
    "schedule": {
        "batch 64, lr 2.53e-3, constant": large_batch(64, "sqrt"),
        "batch 64, lr 2.53e-3, decay 0.05": large_batch(64, "sqrt") + DECAY,
        "batch 64, lr 1e-3, constant": ROWS + [f"{FULL}batch_size=64"],
        "batch 64, lr 1e-3, decay 0.05": ROWS + [f"{FULL}batch_size=64"] + DECAY,
    },
}
BUDGET = ["data.test=null", "finetune.head.optim.epochs=0", "finetune.full.optim.epochs=50", "finetune.full.patience=10",
          "run.threads=1", "run.eval_batch_size=64"]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def jobs(group: str, seeds: list[int], variants: list[int] | None) -> list[tuple[str, int]]:
    """(variant, seed) in the order they run: every variant for one seed, then the next seed; ``variants``
    (1-based positions in the group) picks and orders them, so the runs a decision waits on go first."""
    names = list(GROUPS[group])
    chosen = [names[i - 1] for i in variants] if variants else names
    return [(name, seed) for seed in seeds for name in chosen]


def run_job(corpus: str, group: str, name: str, seed: int, *, shared: list[str], root: Path, runs: Path) -> dict:
    """Train one (variant, seed), or read its stored summary."""
    stored = RESULTS / f"{corpus}_{group}" / f"{slug(name)}_seed{seed}.json"
    if stored.is_file():
        return json.loads(stored.read_text())
    overrides = BUDGET + shared + GROUPS[group][name] + [f"run.seed={seed}"]
    out = runs / f"{corpus}_{group}" / f"{slug(name)}_seed{seed}"
    cfg = load_config(REPO / "configs" / f"{corpus}.yaml", overrides + [f"run.out_dir={out}"], data_root=root)
    results = train(cfg, stage="finetune")
    summary = dict(variant=name, seed=seed, overrides=overrides, best_dev_f1=results["best_dev_f1"],
                   best_epoch=results["best_epoch"], epochs_run=results["epochs_run"],
                   dev_f1_by_epoch=list(read_scalars(out / "tensorboard", "dev/f1").values()),
                   wall_time_s=results["wall_time_s"], inputs=input_checksums(cfg),
                   date=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json(stored, summary, indent=1)
    return summary


def report(corpus: str, group: str, seeds: list[int], shared: list[str]) -> None:
    folder = RESULTS / f"{corpus}_{group}"
    rows = {}
    for name in GROUPS[group]:
        found = [json.loads(p.read_text()) for s in seeds if (p := folder / f"{slug(name)}_seed{s}.json").is_file()]
        if not found:
            continue
        f1 = [100 * r["best_dev_f1"] for r in found]
        rows[name] = dict(overrides=GROUPS[group][name], seeds=[r["seed"] for r in found],
                          dev_f1=[round(x, 2) for x in f1], mean=round(statistics.mean(f1), 2),
                          std=round(statistics.stdev(f1), 2) if len(f1) > 1 else None,
                          best_epoch=[r["best_epoch"] for r in found], wall_time_s=[r["wall_time_s"] for r in found],
                          first_seed_dev_f1_by_epoch=[round(100 * x, 2) for x in found[0].get("dev_f1_by_epoch", [])],
                          inputs=found[0]["inputs"])
    payload = dict(corpus=corpus, group=group, budget=BUDGET + shared, variants=rows,
                   date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=machine_info(device_for_rank("cpu")))
    write_json(RESULTS / f"{corpus}_{group}.json", payload, indent=1)
    # each epoch's dev F1 where runs are a few epochs long (the batch question); the JSON keeps it always
    by_epoch = all(0 < len(r["first_seed_dev_f1_by_epoch"]) <= 10 for r in rows.values())
    lines = [f"# {corpus} dev F1, {group} (best epoch's dev F1; budget {' '.join(BUDGET + shared)})", "",
             "| variant | dev F1 mean ± std | per seed | best epoch | wall time per run (s) |"
             + (" first seed, by epoch |" if by_epoch else ""), "|---|---|---|---|---|" + ("---|" if by_epoch else "")]
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["mean"]):
        std = f" ± {r['std']:.2f}" if r["std"] is not None else ""
        lines.append(f"| {name} | {r['mean']:.2f}{std} | {r['dev_f1']} (seeds {r['seeds']}) | {r['best_epoch']} | "
                     f"{round(statistics.mean(r['wall_time_s']))} |"
                     + (f" {r['first_seed_dev_f1_by_epoch']} |" if by_epoch else ""))
    write_text(RESULTS / f"{corpus}_{group}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("group", choices=sorted(GROUPS))
    parser.add_argument("--corpus", required=True, help="configs/CORPUS.yaml (the baseline)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--set", action="append", default=[], help="override for every variant")
    parser.add_argument("--variants", type=int, nargs="+", help="1-based positions in the group, in run order")
    parser.add_argument("--lane", default="0/1", help="K/N: this call trains every N-th run from the K-th")
    parser.add_argument("--report", action="store_true", help="write the table of the runs stored so far")
    parser.add_argument("--data-root")
    parser.add_argument("--runs", default="runs/dev_sweep")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.report:
        report(args.corpus, args.group, args.seeds, args.set)
        return 0
    lane, lanes = map(int, args.lane.split("/"))
    for name, seed in jobs(args.group, args.seeds, args.variants)[lane::lanes]:
        summary = run_job(args.corpus, args.group, name, seed, shared=args.set,
                          root=default_data_root(args.data_root), runs=Path(args.runs))
        print(f"{name}, seed {seed}: dev F1 {100 * summary['best_dev_f1']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StopRequested as stop:  # Ctrl-C or SIGTERM: the run being trained resumes when the command is run again
        print(f"dev_sweep: {stop}: run the same command again to continue", file=sys.stderr)
        sys.exit(stop.exit_status)
