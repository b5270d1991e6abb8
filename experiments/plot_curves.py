"""Learning curves of training runs, read from their TensorBoard events, as PNG plots and a JSON of the
numbers (committed: run folders are not): dev F1 after each fine-tuning epoch, one line per run, and where a
run has stage 1, its dev InfoNCE after each stage-1 epoch. Runs still training are read as they stand.

    python3 experiments/plot_curves.py --run baseline=runs/accuracy/msra/baseline_to_patience_seed1 \
        --run NerCo=runs/accuracy/msra/NerCo_to_patience_seed1 --out experiments/results/msra_to_patience_curves

writes ``OUT.json``, ``OUT_dev_f1.png`` and (when some run has stage 1) ``OUT_stage1_dev_infonce.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nerco_dist.atomic import write_json
from nerco_dist.errors import InputError
from nerco_dist.eval.plots import plot_lines
from nerco_dist.train.monitor import read_scalars


def curves(run: Path) -> dict[str, list[float]]:
    """A run folder's dev F1 (in %, 2 decimals) per fine-tuning epoch and, where it has stage 1, its dev InfoNCE
    per epoch (4 decimals)."""
    stage2, stage1 = run / "tensorboard", run / "contrastive" / "tensorboard"
    if not stage2.is_dir() and not stage1.is_dir():
        raise InputError(run, "neither tensorboard/ nor contrastive/tensorboard/: not a run folder (run.out_dir)")
    out = {"dev_f1": [round(100 * v, 2) for v in read_scalars(stage2, "dev/f1").values()] if stage2.is_dir() else []}
    if stage1.is_dir():
        out["stage1_dev_infonce"] = [round(v, 4) for v in read_scalars(stage1, "contrastive/dev_loss").values()]
    return out


def write_curves(folders: dict[str, Path], stem: Path, title: str = "") -> dict[str, dict[str, list[float]]]:
    """Each named run folder's curves, written to ``STEM.json`` and plotted (``STEM_dev_f1.png``, and
    ``STEM_stage1_dev_infonce.png`` where some run has stage 1); the curves."""
    runs = {name: curves(Path(folder)) for name, folder in folders.items()}
    prefix = f"{title}: " if title else ""
    numbers = {name: dict(folder=str(folders[name]), **c) for name, c in runs.items()}
    write_json(stem.with_suffix(".json"), dict(runs=numbers, date=time.strftime("%Y-%m-%d %H:%M:%S")), indent=1)
    dev_f1 = {name: c["dev_f1"] for name, c in runs.items() if c["dev_f1"]}
    if dev_f1:
        plot_lines(dev_f1, f"{stem}_dev_f1.png", f"{prefix}dev F1 after each fine-tuning epoch", "epoch",
                   "dev F1 (%)")
    infonce = {name: c["stage1_dev_infonce"] for name, c in runs.items() if c.get("stage1_dev_infonce")}
    if infonce:
        plot_lines(infonce, f"{stem}_stage1_dev_infonce.png", f"{prefix}stage 1, dev InfoNCE after each epoch",
                   "stage-1 epoch", "dev InfoNCE")
    return runs


def named_values(items: list[str], flag: str) -> dict[str, str]:
    """``FLAG NAME=VALUE`` arguments as {name: value}."""
    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise InputError(flag, f"expected NAME=VALUE, got {item!r}")
        values[name] = value
    return values


def named_folders(items: list[str]) -> dict[str, Path]:
    """``--run NAME=FOLDER`` arguments as {name: folder}."""
    return {name: Path(folder) for name, folder in named_values(items, "--run").items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="NAME=FOLDER",
                        help="a run's name in the plots and its folder (run.out_dir); once per run")
    parser.add_argument("--out", required=True, help="path stem of the JSON and PNG files")
    parser.add_argument("--title", default="", help="what the plots' titles start with (e.g. the corpus)")
    args = parser.parse_args(argv)
    try:
        runs = write_curves(named_folders(args.run), Path(args.out), args.title)
    except InputError as err:
        print(f"nerco: error: {err}", file=sys.stderr)
        return 2
    for name, c in runs.items():
        print(f"{name}: {len(c['dev_f1'])} fine-tuning epochs"
              + (f", best dev F1 {max(c['dev_f1']):.2f}" if c["dev_f1"] else "")
              + (f"; {len(c['stage1_dev_infonce'])} stage-1 epochs" if "stage1_dev_infonce" in c else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
