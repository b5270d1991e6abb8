"""One PNG of every system's per-seed test F1 on a corpus, from the sweep's results files
(``results.<system>.per_seed_test``'s F1, unrounded, so the means agree with the sweep's tables; else
``per_seed_f1``): the baseline, NerCo and each variant side by side, with the seed spread
that says how much a difference of means is worth.

    cd experiments/results
    python3 ../../plot_accuracy.py weibo.json weibo_frozen_embeddings.json weibo_low_encoder_lr_stage1_batch20.json weibo_head_f1_select.json \
        --out weibo_test_f1.png

A system in several files (the baseline and NerCo are in each variant's) must have the same scores in all of
them, or the files come from different runs and are refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nerco_dist.errors import InputError
from nerco_dist.eval.plots import plot_seed_scores


def merged_scores(files: list[Path]) -> tuple[str, dict[str, list[float]]]:
    """The corpus and each system's per-seed F1 over ``files``, in the order the systems first appear."""
    corpus, scores, source = None, {}, {}
    for path in files:
        try:
            payload = json.loads(path.read_text())
            rows = payload["results"]
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(path, f"not a sweep results file ({exc})") from None
        if corpus not in (None, payload.get("corpus")):
            raise InputError(path, f"corpus {payload.get('corpus')!r}, but {files[0]} is {corpus!r}")
        corpus = payload.get("corpus")
        for name, row in rows.items():
            f1 = [100 * t["f1"] for t in row["per_seed_test"]] if "per_seed_test" in row else row["per_seed_f1"]
            if name in scores and scores[name] != f1:
                raise InputError(path, f"{name} scores {f1}, but {source[name]} has {scores[name]}: not the same "
                                       f"runs")
            scores.setdefault(name, f1)
            source.setdefault(name, path)
    return corpus, scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="sweep results JSON files of one corpus")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    try:
        corpus, scores = merged_scores(args.files)
    except InputError as exc:
        print(f"plot_accuracy: {exc}", file=sys.stderr)
        return 1
    seeds = max(len(v) for v in scores.values())
    plot_seed_scores(scores, args.out, f"{corpus}: test F1 per seed ({seeds} seeds), mean ± std")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
