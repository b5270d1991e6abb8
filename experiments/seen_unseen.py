"""Where a run's dev and test scores part: each split's P/R/F1 over the mentions seen in training and over the
unseen ones, with the share of unseen mentions in each split, and each type's recall over the mentions that
touch another mention (a list of names without separators) and over the rest. MSRA's dev slice is held out
of the training file itself, so few of its mentions are new; its test set has many, and a model that scores
alike on seen mentions of both splits can still score far lower on test; a third of test's names stand in
such lists, which training and dev hardly have.

    python3 experiments/seen_unseen.py --run baseline=runs/accuracy/msra/baseline_to_patience_seed1 \
        --out experiments/results/msra_seen_unseen

reads each run folder's ``results.json`` (its config: the splits, as it trained on them) and ``best.pt``, and
writes ``OUT.json`` and ``OUT.md``. ``--lexicon NAME=LEXICON`` (once per lexicon, as ``data.lexicon``) adds how
many of the first run's new dev mentions each lexicon holds as a word: the names a lattice can mark at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from nerco_dist.atomic import write_json, write_text
from nerco_dist.config import Config, default_data_root
from nerco_dist.data.lexicon import Lexicon
from nerco_dist.data.splits import Splits
from nerco_dist.errors import InputError
from nerco_dist.eval.metrics import mentions, recall_by_touching, scores_by_seen
from nerco_dist.inference import load_for_inference, predict
from nerco_dist.train.inputs import read_config_splits
from plot_curves import named_folders, named_values


def run_config(run: Path, data_root: Path) -> Config:
    """The config a finished run trained under, reading its data under ``data_root``."""
    done = run / "results.json"
    if not done.is_file():
        raise InputError(done, "not found: not a finished run folder (run.out_dir)")
    cfg = Config.from_record(json.loads(done.read_text())["config"], str(done))
    cfg.data.root = str(data_root)
    return cfg


def split_by_seen(run: Path, splits: Splits, batch_size: int = 64) -> dict[str, dict]:
    """``{"dev"|"test": {"seen"|"unseen": {precision, recall, f1, n_gold, n_pred}, "unseen_share",
    "touching": {type: {"touching"|"alone": {n_gold, n_found, recall}}}}, "train": {"touching": ...}}`` of the
    run's best weights, "seen" meaning the mention's string occurs as a mention of the training split
    (training's "touching" counts its gold mentions, found by definition)."""
    codec, model = load_for_inference(run / "best.pt", "cpu", tagging=True)
    train_tags = [s.tags for s in splits.train]
    seen = mentions([s.chars for s in splits.train], train_tags)
    out = {}
    for name in ("dev", "test"):
        sentences = getattr(splits, name)
        if sentences is None:
            continue
        pred = predict(codec, model, sentences, batch_size)
        gold_tags = [s.tags for s in sentences]
        scores = scores_by_seen([s.chars for s in sentences], gold_tags, pred, seen)
        gold = scores["seen"]["n_gold"] + scores["unseen"]["n_gold"]
        out[name] = dict(scores, unseen_share=scores["unseen"]["n_gold"] / gold if gold else 0.0,
                         touching=recall_by_touching(gold_tags, pred))
    out["train"] = dict(touching=recall_by_touching(train_tags, train_tags))
    return out


def lexicon_coverage(cfg: Config, splits: Splits, lexicons: dict[str, str]) -> dict[str, dict]:
    """Per lexicon (a name: a ``data.lexicon`` reference), how many of the distinct mentions of a run's dev
    split that training never has as a mention it holds as a word: the new names a lattice can mark as words
    at all. Dev only, as a choice between lexicons is made on dev."""
    seen = mentions([s.chars for s in splits.train], [s.tags for s in splits.train])
    unseen = mentions([s.chars for s in splits.dev], [s.tags for s in splits.dev]) - seen
    out = {}
    for name, reference in lexicons.items():
        words = Lexicon.load(dataclasses.replace(cfg.data, lexicon=reference).lexicon_reference()).words
        held = sum(mention in words for mention in unseen)
        out[name] = dict(lexicon=reference, unseen_dev_mentions=len(unseen), held=held,
                         share=held / len(unseen) if unseen else 0.0)
    return out


def table(results: dict[str, dict]) -> list[str]:
    lines = ["| run | split | F1 seen | F1 unseen | unseen mentions (share of gold) |", "|---|---|---|---|---|"]
    for name, splits in results.items():
        for split, s in splits.items():
            if split == "train":
                continue
            lines.append(f"| {name} | {split} | {100 * s['seen']['f1']:.2f} | {100 * s['unseen']['f1']:.2f} | "
                         f"{s['unseen']['n_gold']:,} ({100 * s['unseen_share']:.1f}%) |")
    return lines


def touching_table(results: dict[str, dict]) -> list[str]:
    """Per run, split and type: the share of gold mentions that touch another, and recall on both groups
    (training's shares once for runs in a row that share them)."""
    lines = ["| run | split | type | mentions touching another (share) | recall touching | recall alone |",
             "|---|---|---|---|---|---|"]
    last_train = None
    for name, splits in results.items():
        for split, s in splits.items():
            if split == "train":
                if s == last_train:
                    continue
                last_train = s
            for etype, groups in s["touching"].items():
                touching, alone = groups["touching"], groups["alone"]
                share = touching["n_gold"] / (touching["n_gold"] + alone["n_gold"])
                recalls = ("–", "–") if split == "train" else (f"{100 * touching['recall']:.2f}",
                                                                f"{100 * alone['recall']:.2f}")
                lines.append(f"| {name} | {split} | {etype} | {touching['n_gold']:,} ({100 * share:.1f}%) | "
                             f"{recalls[0]} | {recalls[1]} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="NAME=FOLDER",
                        help="a finished run's name in the table and its folder (run.out_dir); once per run")
    parser.add_argument("--out", required=True, help="path stem of the JSON and Markdown files")
    parser.add_argument("--lexicon", action="append", default=[], metavar="NAME=LEXICON",
                        help="a lexicon (as data.lexicon: jieba, a word file, a+b) whose share of the first run's "
                             "unseen dev mentions is reported; once per lexicon")
    parser.add_argument("--data-root")
    args = parser.parse_args(argv)
    root = default_data_root(args.data_root)
    try:
        folders = named_folders(args.run)
        lexicons = named_values(args.lexicon, "--lexicon")
        configs = {name: run_config(folder, root) for name, folder in folders.items()}
        splits = {name: read_config_splits(cfg) for name, cfg in configs.items()}
        results = {name: split_by_seen(folder, splits[name]) for name, folder in folders.items()}
        first = next(iter(folders))
        coverage = lexicon_coverage(configs[first], splits[first], lexicons) if lexicons else {}
    except InputError as err:
        print(f"nerco: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    write_json(out.with_suffix(".json"), dict(runs={name: dict(folder=str(folders[name]), **splits)
                                                     for name, splits in results.items()},
                                             lexicon_coverage_of_unseen_dev_mentions=coverage,
                                             date=time.strftime("%Y-%m-%d %H:%M:%S")), indent=1)
    lines = table(results) + [""] + touching_table(results)
    if coverage:
        lines += ["", "| lexicon | unseen dev mentions it holds as a word |", "|---|---|"]
        lines += [f"| {name} | {c['held']:,} of {c['unseen_dev_mentions']:,} ({100 * c['share']:.1f}%) |"
                  for name, c in coverage.items()]
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
