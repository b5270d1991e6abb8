"""Is one finished run better than another on the same test sentences? The paired bootstrap over test sentences
(Berg-Kirkpatrick et al.) of two runs' stored summaries: ``nerco_vs_baseline.py --store`` keeps each run's
predicted test entities, so two variants of one system (another lexicon, another rate) are compared from the
committed files, without their run folders or a model.

    python3 experiments/paired_bootstrap.py \
        --run jieba=experiments/results/runs/msra/baseline_to_patience_lr1e3_seed1.json \
        --run union=experiments/results/runs/msra/baseline_union_lexicon_lr1e3_seed1.json \
        --out experiments/results/msra_union_vs_jieba_lexicon

reads the test split the two runs were scored on (their configs must name the same file and read it alike)
under ``--data-root``, and writes ``OUT.json`` and ``OUT.md``: each run's test F1, the second's lead, its 95%
interval and the share of resamples where it does not lead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nerco_dist.atomic import write_json, write_text
from nerco_dist.config import Config, default_data_root
from nerco_dist.data.tags import from_entities
from nerco_dist.errors import InputError
from nerco_dist.eval.metrics import evaluate
from nerco_dist.eval.significance import paired_bootstrap
from nerco_dist.train.inputs import read_config_splits
from plot_curves import named_values


def predicted_tags(summary: Path) -> tuple[Config, list[list[tuple[int, int, str]]]]:
    """A stored summary's config and its run's predicted test entities, ``(start, end, type)`` per sentence."""
    if not summary.is_file():
        raise InputError(summary, "not found: a finished run's summary (nerco_vs_baseline.py --store) is expected")
    record = json.loads(summary.read_text())
    found = record.get("diagnostics", {}).get("test_predicted_entities")
    if "config" not in record or found is None:
        raise InputError(summary, "holds no predicted test entities: not a summary nerco_vs_baseline.py stored")
    return Config.from_record(record["config"], str(summary)), [[tuple(e) for e in sentence] for sentence in found]


def compare(summaries: dict[str, Path], data_root: Path, samples: int) -> dict:
    """Both runs' test F1 and the paired bootstrap of the second's lead over the first."""
    (name_a, path_a), (name_b, path_b) = summaries.items()
    (cfg_a, found_a), (cfg_b, found_b) = predicted_tags(path_a), predicted_tags(path_b)
    read_as = [(c.data.test, c.data.format, c.data.limit) for c in (cfg_a, cfg_b)]
    if read_as[0] != read_as[1]:
        raise InputError(path_b, f"scored on another test split than {path_a} (data.test, format, limit: "
                                 f"{read_as[1]} against {read_as[0]})")
    cfg_a.data.root = str(data_root)
    gold = [s.tags for s in read_config_splits(cfg_a).test]
    if not len(gold) == len(found_a) == len(found_b):
        raise InputError(path_b, f"{len(found_a)} and {len(found_b)} predicted sentences against the test "
                                 f"split's {len(gold)}: the file under --data-root is not the one they were scored on")
    for path, found in ((path_a, found_a), (path_b, found_b)):
        for i, (tags, spans) in enumerate(zip(gold, found)):
            if any(not 0 <= start < end <= len(tags) for start, end, _ in spans):
                raise InputError(path, f"test sentence {i + 1}: an entity outside its {len(tags)} characters: the "
                                       "file under --data-root is not the one the run was scored on")
    pred_a, pred_b = ([from_entities(len(g), s) for g, s in zip(gold, found)] for found in (found_a, found_b))
    return dict(runs={name_a: dict(summary=str(path_a), test_f1=evaluate(gold, pred_a).f1),
                      name_b: dict(summary=str(path_b), test_f1=evaluate(gold, pred_b).f1)},
                test=cfg_a.data.test, bootstrap=paired_bootstrap(gold, pred_a, pred_b, samples=samples),
                date=time.strftime("%Y-%m-%d %H:%M:%S"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="NAME=SUMMARY",
                        help="a run's name and its stored summary (JSON); twice: the second's lead is tested")
    parser.add_argument("--out", required=True, help="path stem of the JSON and Markdown files")
    parser.add_argument("--samples", type=int, default=10_000, help="bootstrap resamples (default 10,000)")
    parser.add_argument("--data-root")
    args = parser.parse_args(argv)
    try:
        summaries = {name: Path(path) for name, path in named_values(args.run, "--run").items()}
        if len(summaries) != 2:
            raise InputError("--run", f"two runs are compared, got {len(summaries)}")
        if args.samples < 1:
            raise InputError("--samples", f"at least 1, got {args.samples}")
        result = compare(summaries, default_data_root(args.data_root), args.samples)
    except InputError as err:
        print(f"nerco: error: {err}", file=sys.stderr)
        return 2
    (name_a, a), (name_b, b) = result["runs"].items()
    boot = result["bootstrap"]
    line = (f"{name_b} against {name_a} on {result['test']}: test F1 {100 * b['test_f1']:.2f} against "
            f"{100 * a['test_f1']:.2f}, {100 * boot['delta']:+.2f}, 95% interval [{100 * boot['ci95'][0]:+.2f}, "
            f"{100 * boot['ci95'][1]:+.2f}], p({name_b} not better) = {boot['p_b_not_better']:.3f} "
            f"({boot['samples']:,} paired resamples of the test sentences)")
    out = Path(args.out)
    write_json(out.with_suffix(".json"), result, indent=1)
    write_text(out.with_suffix(".md"), line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
