"""What the lattice's token tables cost: rows, bytes in memory and the checkpoint's size on disk, with and
without the frozen pretrained rows for tokens training never saw (``data.pretrained_unseen_rows``), for each
corpus config. Each arm runs in a child process of its own, so its peak RSS (building the vocabularies, reading
the vector files, building the model, saving a checkpoint) is its own.

    python3 benchmarks/bench_tables.py                    # resume weibo msra -> results/tables_cpu.json
    python3 benchmarks/bench_tables.py --corpora msra

Needs the data root with the generated vectors (docs/data.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(corpus: str, unseen: bool, root: str | None) -> dict:
    """One arm, in this process: the codec and model a training run builds, and a checkpoint of it."""
    from nerco_dist.config import default_data_root, load_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs" / f"{corpus}.yaml", [f"data.pretrained_unseen_rows={str(unseen).lower()}",
                                                                  "run.threads=1", f"run.out_dir={tmp}"],
                          data_root=default_data_root(root))
        return measure_run(cfg, Path(tmp), corpus, unseen)


def measure_run(cfg, out: Path, corpus: str, unseen: bool) -> dict:
    import torch

    from nerco_dist.train.run import TrainingRun

    started = time.perf_counter()
    run = TrainingRun.start(cfg)
    model = run.initial_model(None)
    built_s = time.perf_counter() - started
    tables = {}
    for kind in ("char", "bigram", "word"):
        table = getattr(model, f"{kind}_embed")
        tables[kind] = dict(trained_rows=table.num_trained, frozen_rows=table.frozen.shape[0],
                            trained_mb=round(table.weight.numel() * table.weight.element_size() / 2**20, 2),
                            frozen_mb=round(table.frozen.numel() * table.frozen.element_size() / 2**20, 2))
    parameters_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    path = out / "best.pt"
    started = time.perf_counter()
    run.checkpoint(path, model)
    save_s = time.perf_counter() - started
    checkpoint_mb = path.stat().st_size / 2**20
    return dict(corpus=corpus, pretrained_unseen_rows=unseen, tables=tables, parameters_mb=round(parameters_mb, 2),
                checkpoint_mb=round(checkpoint_mb, 2), build_s=round(built_s, 1), save_s=round(save_s, 1),
                peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                torch_threads=torch.get_num_threads())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpora", nargs="+", default=["resume", "weibo", "msra"])
    parser.add_argument("--data-root")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tables_cpu.json")
    parser.add_argument("--child", nargs=2, metavar=("CORPUS", "UNSEEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1] == "true", args.data_root)))
        return 0

    import torch

    from nerco_dist.atomic import write_json
    from nerco_dist.machine import machine_info

    rows = []
    for corpus in args.corpora:
        for unseen in ("false", "true"):
            command = [sys.executable, __file__, "--child", corpus, unseen]
            command += ["--data-root", args.data_root] if args.data_root else []
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{corpus} unseen rows {unseen}: checkpoint {r['checkpoint_mb']} MB, peak RSS {r['peak_rss_mb']} MB, "
                  + ", ".join(f"{k} {t['trained_rows']:,}+{t['frozen_rows']:,} rows" for k, t in r["tables"].items()),
                  flush=True)
            write_json(args.out, dict(rows=rows, machine=machine_info(torch.device("cpu"))), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
