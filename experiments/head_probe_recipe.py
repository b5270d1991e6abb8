"""Choosing the head probe's recipe (contrastive.head_probe_epochs / head_probe_lr): the dev F1 of probes of
several peak LRs and lengths on stage-1 checkpoints of several epochs. A recipe is useful when it scores the
same checkpoint well and tells epochs apart; selection evidence only (dev F1, never test).

    python3 experiments/head_probe_recipe.py --config configs/weibo_nerco.yaml \\
        --checkpoints runs/probe/epoch{1,3,10,24,28}.pt --recipes 1e-2:3 1e-1:3 3e-2:5

A recipe is LR:EPOCHS. The checkpoints are a stage-1 run's ``last.pt`` as each epoch ended (copied aside while
it trained). Rows are appended to the results JSON as they finish (default
experiments/results/head_probe_recipe_CONFIG.json); rows already there are not run again.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from nerco_dist.atomic import write_json
from nerco_dist.config import default_data_root, load_config
from nerco_dist.machine import machine_info
from nerco_dist.train.objectives import head_probe_report
from nerco_dist.train.run import TrainingRun

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoints", nargs="+", required=True, type=Path)
    parser.add_argument("--recipes", nargs="+", required=True, help="LR:EPOCHS")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--data-root")
    parser.add_argument("--out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    recipes = []
    for text in args.recipes:
        lr, _, epochs = text.partition(":")
        try:
            recipes.append((float(lr), int(epochs)))
        except ValueError:
            parser.error(f"--recipes: {text!r} is not LR:EPOCHS (e.g. 3e-2:5)")
        if recipes[-1][0] <= 0 or recipes[-1][1] < 1:
            parser.error(f"--recipes: {text!r}: LR must be > 0 and EPOCHS >= 1")
    missing = [str(c) for c in args.checkpoints if not c.is_file()]
    if missing:
        parser.error("--checkpoints: not found: " + ", ".join(missing))
    out = Path(args.out or REPO / "experiments" / "results" / f"head_probe_recipe_{Path(args.config).stem}.json")
    cfg = load_config(args.config, ["run.threads=1", "run.out_dir=runs/head_probe_recipe"] + args.set,
                      data_root=default_data_root(args.data_root))
    run = TrainingRun.start(cfg)
    payload = json.loads(out.read_text()) if out.is_file() else dict(
        config=args.config, overrides=args.set, machine=machine_info(run.device), rows=[])
    done = {(r["checkpoint"], r["lr"], r["epochs"]) for r in payload["rows"]}
    for checkpoint in args.checkpoints:
        model = run.initial_model(checkpoint)
        for lr, epochs in recipes:
            if (str(checkpoint), lr, epochs) in done:
                continue
            start = time.perf_counter()
            report = head_probe_report(run, model, epochs, lr)
            payload["rows"].append(dict(checkpoint=str(checkpoint), lr=lr, epochs=epochs, dev_f1=report.f1,
                                        seconds=round(time.perf_counter() - start, 1)))
            write_json(out, payload, indent=1)
            print(f"{checkpoint} lr {lr:g} x {epochs} epochs: dev F1 {100 * report.f1:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
