"""The dev effect of each pretrained lattice input: the baseline (CONFIG.yaml's fine-tuning, the full phase
alone, a short fixed budget) with no pretrained vectors, then adding the character, bigram and word vectors
one at a time, and with the lexicon union instead of jieba's dictionary. Selection evidence only: dev F1,
never test.

    python3 benchmarks/inputs_dev.py --corpus resume                      # ~10 CPU-minutes per variant
    python3 benchmarks/inputs_dev.py --corpus weibo --set finetune.full.optim.epochs=10

Each variant's dev scores are written to the results JSON as soon as it finishes; variants already in the
file are not trained again (re-run the same command after a stop). Needs the data root with the generated
vectors (README, "Pretrained inputs").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from nerco_dist.atomic import write_json
from nerco_dist.config import data_root, load_config
from nerco_dist.distributed import device_for_rank
from nerco_dist.machine import machine_info
from nerco_dist.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
UNION = "jieba+lexicon/thuocl.words.txt+lexicon/zhwiki_titles.words.txt"
NONE = ["data.char_vectors=null", "data.bigram_vectors=null", "data.word_vectors=null"]
VARIANTS = {  # name -> overrides of the corpus config (which has all three vectors and jieba's dictionary)
    "no vectors": NONE,
    "+ char": NONE[1:],
    "+ char + bigram": NONE[2:],
    "+ char + bigram + word (jieba)": [],
    "+ char + bigram + word (union lexicon)": [f"data.lexicon={UNION}", "data.word_vectors=pretrained/union/word.vec"],
}
BUDGET = ["data.test=null", "finetune.head.optim.epochs=0", "finetune.full.optim.epochs=15", "finetune.full.patience=0",
          "run.threads=1", "run.eval_batch_size=64"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="configs/CORPUS.yaml")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="override for every variant")
    parser.add_argument("--data-root")
    parser.add_argument("--runs", default="runs/inputs_dev")
    parser.add_argument("--out", help="default benchmarks/results/accuracy/inputs_dev_CORPUS.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    root, config = data_root(args.data_root), REPO / "configs" / f"{args.corpus}.yaml"
    out = Path(args.out or REPO / "benchmarks" / "results" / "accuracy" / f"inputs_dev_{args.corpus}.json")
    shared = BUDGET + [f"run.seed={args.seed}"] + args.set
    payload = json.loads(out.read_text()) if out.is_file() else dict(
        config=str(config.relative_to(REPO)), overrides=shared, machine=machine_info(device_for_rank("cpu")),
        variants={})
    for name, overrides in VARIANTS.items():
        if name in payload["variants"]:
            continue
        run_dir = Path(args.runs) / args.corpus / name.replace(" ", "_").replace("+", "p")
        results = train(load_config(config, shared + overrides + [f"run.out_dir={run_dir}"]), root, stage="finetune")
        payload["variants"][name] = dict(overrides=overrides, best_dev_f1=results["best_dev_f1"],
                                         best_epoch=results["best_epoch"], epochs_run=results["epochs_run"],
                                         wall_time_s=results["wall_time_s"])
        write_json(out, payload, indent=1)
        print(f"{name}: dev F1 {100 * results['best_dev_f1']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
