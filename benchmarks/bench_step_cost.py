"""The cost of a training step on CPU: this checkout against an earlier commit, on the same recipe.

Trains the Resume baseline (fine-tuning only, no pretrained vectors: the recipe both commits can express) for
two seeded epochs at one thread, alternating the two commits, ``--rounds`` times each, and reports the
training characters per CPU-second of each run and the dev F1 after the two epochs (the same recipe and
seed should give the same model, so a faster step that changed the numbers shows here).

    python3 benchmarks/bench_step_cost.py                      # against bf5daaa, 2 rounds (~15 CPU-minutes)
    python3 benchmarks/bench_step_cost.py --against HEAD~3 --rounds 3

The earlier commit runs from a git worktree in a temporary folder, with this environment's Python and its
code first on the path. CPU time is the child's user + system time (``/proc/PID/stat``) from the line that
starts the epoch loop to the line that ends epoch 2, so start-up and data loading are left out and both
epochs' dev evaluation is in, for both commits alike. Each run is a row of the results JSON as soon as it ends.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, ResultsFile, cpu_time_arguments, machine_info, parse_args, require_cpu, train_epochs

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
# the recipe of bf5daaa's configs/resume.yaml, two epochs: AdamW lr 1e-3, wd 0.01, warmup 0.05 of the steps,
# lr decay 0.05 per epoch, clipping 5, batch 10, seed 1, no vectors, jieba's dictionary
RECIPE_OLD = [f"train.epochs={EPOCHS}", "train.threads=1", "train.seed=1"]
RECIPE_NEW = ["data.char_vectors=null", "data.bigram_vectors=null", "data.word_vectors=null",
              "finetune.head.optim.epochs=0", "finetune.full.patience=0", "run.threads=1", "run.seed=1"] + [
              f"finetune.full.optim.{key}={value}" for key, value in dict(
                  optimizer="adamw", lr=1e-3, weight_decay=0.01, warmup=0.05, lr_decay=0.05, clip_value=5.0,
                  epochs=EPOCHS, batch_size=10).items()]
START = re.compile(r"training pieces, \d+ batches per epoch|finetune phase 'full'")  # the epoch loop begins


def train_run(code: Path, overrides: list[str], out: Path, data_root: str) -> dict:
    """``nerco train configs/resume.yaml`` of the code at ``code``; CPU seconds of the epochs and dev F1."""
    out_key = "train.out_dir" if overrides is RECIPE_OLD else "run.out_dir"
    argv = ["train", str(code / "configs" / "resume.yaml"), "--no-resume"]
    for item in overrides + [f"{out_key}={out}"]:
        argv += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(code), "NERCO_DATA_ROOT": data_root, "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1"}
    epochs = train_epochs([sys.executable, "-c", "import sys; from nerco_dist.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", *argv], env, code, START)
    last = next((e for e in epochs if e[0] == EPOCHS), None)
    if last is None:
        raise RuntimeError(f"the run of {code} logged no epoch {EPOCHS}")
    return dict(cpu_s=round(last[1], 2), dev_f1=last[2])


def training_characters(data_root: str) -> int:
    """Characters of Resume's training split: one line per character (BMES), trained once per epoch."""
    path = Path(data_root) / "resume" / "train.char.bmes"
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def add_arguments(parser) -> None:
    parser.add_argument("--against", default="bf5daaa", help="the earlier commit (default bf5daaa)")
    cpu_time_arguments(parser, "commit")


def main() -> int:
    args = parse_args("step_cost", __doc__, add_arguments=add_arguments, interpret_on_cpu=False)
    require_cpu(args, "bench_step_cost.py")
    if args.out.parent == RESULTS and args.out.name == "step_cost_cpu.json" and args.rounds < 2:
        raise SystemExit("--rounds must be at least 2 for the committed results file")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split("\n")
    changed = [line[3:] for line in changed if line.strip()]  # uncommitted changes the new arm runs with
    chars = EPOCHS * training_characters(args.data_root)
    arms = {args.against: RECIPE_OLD, f"{head}{'+changes' if changed else ''}": RECIPE_NEW}
    results = ResultsFile(args.out, dict(benchmark="step_cost", command=" ".join(sys.argv), epochs=EPOCHS,
                                         training_characters=chars, arms=arms, uncommitted=changed,
                                         machine=machine_info("cpu")))
    with tempfile.TemporaryDirectory(prefix="step_cost_") as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.against], cwd=REPO, check=True,
                       capture_output=True)
        try:
            codes = {args.against: old, list(arms)[1]: REPO}
            for round_ in range(args.rounds):
                for arm, recipe in arms.items():
                    row = dict(round=round_ + 1, arm=arm, **train_run(codes[arm], recipe, Path(tmp) / "out",
                                                                      args.data_root))
                    row["chars_per_cpu_s"] = round(chars / row["cpu_s"], 1)
                    results.append(row)
                    print(row, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=False)
    summary = {arm: dict(median_chars_per_cpu_s=statistics.median(r["chars_per_cpu_s"] for r in results.payload["rows"]
                                                                   if r["arm"] == arm),
                         dev_f1=[r["dev_f1"] for r in results.payload["rows"] if r["arm"] == arm])
               for arm in arms}
    (before, after) = summary.values()
    summary["speedup"] = round(after["median_chars_per_cpu_s"] / before["median_chars_per_cpu_s"], 2)
    summary["dev_f1_difference"] = round(statistics.mean(after["dev_f1"]) - statistics.mean(before["dev_f1"]), 2)
    results.set("summary", summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
