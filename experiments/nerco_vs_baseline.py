"""NerCo against its fine-tuning-only baseline: the same config and budget, several seeds.

For each corpus and seed, trains the baseline (CONFIG) and NerCo (CONFIG_nerco: the same plus stage 1),
then reports mean ± std of test F1, Span F and Type Acc, and runs ``nerco analyze`` on the first seed
(F1 by length, t-SNE plots) beside its learning curves (``plot_curves.py``). ``--systems`` adds the paper's
ablations (Table 5), each the NerCo config with one switch: ``joint`` (InfoNCE + CRF NLL in one stage),
``all_queries`` (O tokens are queries too), and the variants of NerCo's training in ``VARIANTS``. A ``--tag`` names the runs of other shared ``--set`` overrides:
their folders and stored summaries carry the tag, so they never replace the untagged runs. ``--stage1-tag``
fine-tunes each NerCo system from the stage 1 of its finished run under that tag (same runs folder and seed)
instead of training stage 1 again, refused unless that stage 1 trained under the same stage-1 keys: a variant
of fine-tuning (another rate, say) costs its fine-tuning only.
Finished runs are reused, so an interrupted sweep continues where it stopped: a run's results.json in its
folder, or its summary in ``--store`` (committed, so that finished runs outlive the run folders), which is
written as each run ends.

    python3 experiments/nerco_vs_baseline.py --corpus weibo --seeds 1 2 3 --set finetune.full.optim.epochs=20
    python3 experiments/nerco_vs_baseline.py --corpus weibo --systems baseline joint --set finetune.full.optim.epochs=20
    python3 experiments/nerco_vs_baseline.py --corpus weibo --set finetune.full.optim.lr=5e-4 --tag lr5e4 --stage1-tag ""
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from nerco_dist.atomic import write_json, write_text
from nerco_dist.config import Config, default_data_root, load_config
from nerco_dist.data.dataset import LengthBucketBatchSampler
from nerco_dist import distributed as dist
from nerco_dist.distributed import device_for_rank
from nerco_dist.errors import InputError
from nerco_dist.analysis import analyze
from nerco_dist.data.tags import entities, from_entities
from nerco_dist.eval.metrics import mentions, scores_by_seen
from nerco_dist.eval.significance import paired_bootstrap, paired_t_test
from nerco_dist.inference import load_for_inference, predict
from nerco_dist.machine import machine_info
from nerco_dist.train.objectives import InfoNCELoss, mean_dev_infonce
from nerco_dist.train.phases import default_stage
from nerco_dist.train.resume import StageIdentity, listed
from nerco_dist.train.stopping import StopRequested
from nerco_dist.train.inputs import read_config_splits
from nerco_dist.train.trainer import train
from plot_curves import write_curves

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SYSTEMS = ["baseline", "NerCo"]
ABLATIONS = {"joint": ["ablation.joint=true"], "all_queries": ["ablation.non_entity_queries=true"]}
# NerCo with one change to its training, tried because it lost to the baseline
VARIANTS = {
    "frozen_embeddings": ["contrastive.phase.freeze_embeddings=true"],  # stage 1 cannot memorise mentions in the tables
    "low_encoder_lr": ["finetune.full.optim.encoder_lr_ratio=0.1"],  # fine-tuning keeps more of stage 1's encoder
    "head_f1_select": ["contrastive.select=head_f1"],  # the stage-1 epoch whose features a head tags best
    "stage1_batch20": ["contrastive.phase.optim.batch_size=20"],  # half the negatives of the reference's 40
    "stage1_batch40": ["contrastive.phase.optim.batch_size=40"],  # twice the reference's 20 (Resume)
}
SWITCHES = {**ABLATIONS, **VARIANTS}


def system_config(corpus: str, name: str) -> tuple[Path, list[str]]:
    """The config and switches of one system: the baseline, NerCo, or NerCo with one ablation switch."""
    if name == "baseline":
        return REPO / "configs" / f"{corpus}.yaml", []
    return REPO / "configs" / f"{corpus}_nerco.yaml", SWITCHES.get(name, [])


def run_one(config: Path, overrides: list[str], out: Path, root: Path, stored: Path | None,
            overlays: list[str] = (), stage1_from: Path | None = None) -> dict:
    """Train one system (both of its stages, or fine-tuning alone from the stage 1 of the finished run
    ``stage1_from``), or reuse a finished run; records the training time of both stages (summed over resumes
    when the run was killed and started again) and the diagnostics."""
    cfg = load_config(config, overrides + [f"run.out_dir={out}"], overlays, data_root=root)
    for done in ([stored] if stored else []) + [out / "results.json"]:
        if done.is_file():
            results = json.loads(done.read_text())
            if same_recipe(Config.from_record(results["config"]).to_dict(), cfg.to_dict()):
                return results
            logging.warning("%s: a run of another config; training it again", done)
    stage1 = out / "contrastive" / "best.pt"
    if stage1_from is not None and default_stage(cfg) == "both":
        source, stage1 = finished_stage1(stage1_from, cfg), stage1_from / "contrastive" / "best.pt"
        results = train(cfg, stage="finetune", init=stage1)
        results.update(contrastive=source["contrastive"], stage1_from=str(stage1_from))
    else:
        results = train(cfg)
    stage1_s = results.get("contrastive", {}).get("wall_time_s", 0)
    results["total_wall_time_s"] = round(results["wall_time_s"] + stage1_s, 1)
    results["diagnostics"] = diagnostics(cfg, out, stage1)
    write_json(out / "results.json", results)
    if stored:
        write_json(stored, results)
    return results


def finished_stage1(source: Path, cfg: Config) -> dict:
    """The results of the finished run ``source``, whose stage 1 another run fine-tunes from; refused unless
    that stage 1 trained under ``cfg``'s stage-1 keys (its number of ranks aside: a stage-1 checkpoint is plain
    fp32 weights)."""
    done = source / "results.json"
    if not done.is_file():
        raise InputError(done, "not found: the run whose stage 1 --stage1-tag names has not finished")
    results = json.loads(done.read_text())
    saved = dict(config=results["config"], stage="contrastive", init=None, world_size=dist.world_size())
    changes = StageIdentity.of(cfg, "contrastive", None).changes(saved, finished=True)
    if changes:
        raise InputError(done, f"its stage 1 trained under another config ({listed(changes)})")
    return results


NOT_RECIPE = ("out_dir", "threads", "flush_denormals")  # run keys that change where and how fast, not what is learned


def same_recipe(a: dict, b: dict) -> bool:
    """Whether two runs' configs train the same way (where they ran and read their data, with how many threads
    and whether CPU denormals were flushed aside: these change the speed and, like another summation order, nothing but
    rounding; keys added since a run read as ``Config.from_record`` says). The head probe's keys
    count only where the probe selects the stage-1 epoch (their defaults changed under finished runs)."""
    def recipe(cfg: dict) -> dict:
        kept = {**cfg, "run": {k: v for k, v in cfg["run"].items() if k not in NOT_RECIPE},
                "data": {k: v for k, v in cfg["data"].items() if k != "root"}}
        if cfg["contrastive"]["select"] != "head_f1":
            kept["contrastive"] = {k: v for k, v in cfg["contrastive"].items() if not k.startswith("head_probe_")}
        return kept
    return recipe(a) == recipe(b)


def diagnostics(cfg, out: Path, stage1: Path) -> dict:
    """Test scores over the mentions seen and unseen in training, and the dev InfoNCE of the encoder's
    features: the final model's, and for NerCo the stage-1 encoder's (``stage1``, where the run has one: does
    fine-tuning erase the structure?)."""
    splits = read_config_splits(cfg)
    codec, model = load_for_inference(out / "best.pt", "cpu")
    seen = mentions([s.chars for s in splits.train], [s.tags for s in splits.train])
    pred = predict(codec, model, splits.test, cfg.run.eval_batch_size)
    by_seen = scores_by_seen([s.chars for s in splits.test], [s.tags for s in splits.test], pred, seen)
    pieces = codec.encode(splits.dev, split_on_entities=True)
    dev = codec.batches(pieces, LengthBucketBatchSampler([p.lattice_len for p in pieces], 32, shuffle=False))
    loss = InfoNCELoss.of(cfg, len(codec.labels.classes), across_ranks=False)
    infonce = {"final model": mean_dev_infonce(loss, model, dev, torch.device("cpu"))}
    if stage1.is_file():
        infonce["after stage 1"] = mean_dev_infonce(loss, load_for_inference(stage1, "cpu")[1], dev,
                                                    torch.device("cpu"))
    return dict(test_by_seen_mention=by_seen, dev_infonce=infonce,
                test_predicted_entities=[[list(e) for e in entities(tags)] for tags in pred])


def by_mention(diags: list[dict | None]) -> dict:
    """Mean ± std test F1 over mentions seen and unseen in training, where every seed has diagnostics."""
    if not all(diags):
        return {}
    return {f"{group}_f1": mean_std([d["test_by_seen_mention"][group]["f1"] for d in diags])
            for group in ("seen", "unseen")}


def compare(scores: dict[str, list[dict]], diags: dict[str, list[dict | None]], seeds: list[int], cfg) -> dict:
    """NerCo against the baseline on the same seeds: the paired t-test over seeds' test F1 (in points), and
    the paired bootstrap over test sentences for the first seed (where both runs stored their predictions)."""
    f1 = {name: [100 * s["f1"] for s in scores[name]] for name in DEFAULT_SYSTEMS}
    first = [d and d.get("test_predicted_entities") for d in (diags["baseline"][0], diags["NerCo"][0])]
    boot = None
    if all(first):
        gold = [s.tags for s in read_config_splits(cfg).test]
        base, nerco = ([from_entities(len(g), map(tuple, found)) for g, found in zip(gold, system)] for system in first)
        boot = paired_bootstrap(gold, base, nerco)
    return dict(seeds=seeds, paired_t_test=paired_t_test(f1["baseline"], f1["NerCo"]), bootstrap_first_seed=boot)


def epoch_counts(results: dict) -> dict:
    """The epochs a run trained: stage 1's (where it has one) and fine-tuning's, each with its best epoch."""
    counts = dict(finetune=results["epochs_run"], finetune_best=results["best_epoch"])
    if "contrastive" in results:
        counts.update(stage1=results["contrastive"]["epochs_run"], stage1_best=results["contrastive"]["best_epoch"])
    return counts


def format_epochs(counts: dict) -> str:
    """``stage 1 + fine-tuning`` epochs, the best of each in parentheses: "30 (28) + 19 (4)"."""
    finetune = f"{counts['finetune']} ({counts['finetune_best']})"
    return f"{counts['stage1']} ({counts['stage1_best']}) + {finetune}" if "stage1" in counts else finetune


def input_checksums(cfg) -> dict[str, str]:
    """sha256 of the vector and lexicon files a config reads (generated files are not committed)."""
    d = cfg.data
    files = [d.char_vectors, d.bigram_vectors, d.word_vectors] + (d.lexicon or "").split("+")
    paths = [d.path(f) for f in files if f and f != "jieba"]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def mean_std(values: list[float]) -> str:
    pct = [100 * v for v in values]
    std = statistics.stdev(pct) if len(pct) > 1 else 0.0
    return f"{statistics.mean(pct):.2f} ± {std:.2f}"


def stage1_source(runs: Path, system: str, stage1_tag: str | None, seed: int) -> Path | None:
    """The run folder whose stage 1 ``system`` fine-tunes from (None: its own)."""
    if stage1_tag is None:
        return None
    return runs / ("_".join([system] + ([stage1_tag] if stage1_tag else [])) + f"_seed{seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True, help="config stem: configs/CORPUS.yaml and configs/CORPUS_nerco.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS, choices=DEFAULT_SYSTEMS + list(SWITCHES))
    parser.add_argument("--set", action="append", default=[], help="override for every system")
    parser.add_argument("--overlay", action="append", default=[],
                        help="YAML merged over every system's config (the shared budget: configs/budget/cpu.yaml)")
    parser.add_argument("--tag", default="", help="suffix of the results files (a variant run with other --set)")
    parser.add_argument("--stage1-tag", help="NerCo systems fine-tune from the stage 1 of their finished runs "
                        "under this tag ('' for the untagged runs) instead of training stage 1 again")
    parser.add_argument("--runs", default="runs/sweep", help="where the runs go")
    parser.add_argument("--data-root")
    parser.add_argument("--results", default=str(REPO / "experiments" / "results"))
    parser.add_argument("--store", help="folder of finished runs' summaries, read before training and written "
                        "after (e.g. experiments/results/runs)")
    parser.add_argument("--name", help="results file stem (default nerco_vs_baseline_CORPUS[_systems][_tag])")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    root = default_data_root(args.data_root)
    systems = {name: system_config(args.corpus, name) for name in args.systems}
    runs = Path(args.runs) / args.corpus
    scores: dict[str, list[dict]] = {name: [] for name in systems}
    wall: dict[str, list[float]] = {name: [] for name in systems}
    epochs: dict[str, list[dict]] = {name: [] for name in systems}
    diags: dict[str, list[dict | None]] = {name: [] for name in systems}
    tag = [args.tag] if args.tag else []
    for seed in args.seeds:
        for name, (config, switches) in systems.items():
            run_name = "_".join([name] + tag) + f"_seed{seed}"
            stored = Path(args.store) / args.corpus / f"{run_name}.json" if args.store else None
            res = run_one(config, switches + args.set + [f"run.seed={seed}"], runs / run_name, root, stored,
                          args.overlay, stage1_source(runs, name, args.stage1_tag, seed))
            scores[name].append(res["test"])
            wall[name].append(res["total_wall_time_s"])
            epochs[name].append(epoch_counts(res))
            diags[name].append(res.get("diagnostics"))

    results = Path(args.results)
    stem = args.name or "_".join([f"nerco_vs_baseline_{args.corpus}"]
                                 + [n for n in args.systems if n not in DEFAULT_SYSTEMS] + tag)
    plots = results / (f"{args.name}_plots" if args.name else "_".join([f"nerco_vs_baseline_{args.corpus}"] + tag))
    first = args.seeds[0]
    baseline_run, nerco_run = (runs / ("_".join([name] + tag) + f"_seed{first}") for name in DEFAULT_SYSTEMS)
    with_plots = set(DEFAULT_SYSTEMS) <= set(systems) and all(
        (run / "best.pt").is_file() for run in (baseline_run, nerco_run))
    if with_plots:
        data = load_config(systems["baseline"][0], data_root=root).data
        test_file = data.path(data.test)
        stage1 = stage1_source(runs, "NerCo", args.stage1_tag, first) or nerco_run
        analyze(baseline_run / "best.pt", nerco_run / "best.pt", test_file, plots,
                stage1=stage1 / "contrastive" / "best.pt")
        write_curves({"baseline": baseline_run, "NerCo": nerco_run}, plots / "curves", f"{args.corpus}, seed {first}")

    rows = {name: dict(f1=mean_std([s["f1"] for s in runs_]), span_f=mean_std([s["span_f1"] for s in runs_]),
                       type_acc=mean_std([s["type_acc"] for s in runs_]),
                       per_seed_f1=[round(100 * s["f1"], 2) for s in runs_], per_seed_test=runs_,
                       per_seed_wall_time_s=wall[name], mean_wall_time_s=round(statistics.mean(wall[name]), 1),
                       per_seed_epochs=epochs[name],
                       per_seed_diagnostics=diags[name], **by_mention(diags[name]))
            for name, runs_ in scores.items()}
    shared = dict(overrides=args.set, overlays=args.overlay, data_root=root)
    comparison = compare(scores, diags, args.seeds, load_config(systems["baseline"][0], **shared)) \
        if set(DEFAULT_SYSTEMS) <= set(systems) else None
    payload = dict(corpus=args.corpus, seeds=args.seeds, overrides=args.set, overlays=args.overlay,
                   nerco_vs_baseline=comparison,
                   systems={k: dict(config=str(c), switches=sw,
                                    resolved=load_config(c, sw + args.set, args.overlay, data_root=root).to_dict())
                            for k, (c, sw) in systems.items()},
                   inputs=input_checksums(load_config(next(iter(systems.values()))[0], **shared)),
                   results=rows, date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=machine_info(device_for_rank("auto")))
    write_json(results / f"{stem}.json", payload)
    plots_note = f"; plots in {plots.name}/" if plots.is_dir() else ""
    lines = [f"# {' vs '.join(systems)} on {args.corpus} (test, mean ± std over seeds {args.seeds})", "",
             f"Shared overrides: {' '.join(args.set) or '(none)'}{plots_note}", "",
             "| system | switches | F1 | Span F | Type Acc | F1 on seen / unseen mentions | F1 per seed | "
             "epochs per seed | wall time per run (s) |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {' '.join(systems[k][1]) or '-'} | {r['f1']} | {r['span_f']} | {r['type_acc']} | "
              f"{r.get('seen_f1', '-')} / {r.get('unseen_f1', '-')} | {r['per_seed_f1']} | "
              f"{'; '.join(map(format_epochs, r['per_seed_epochs']))} | {r['mean_wall_time_s']} |"
              for k, r in rows.items()]
    if comparison:
        t, boot = comparison["paired_t_test"], comparison["bootstrap_first_seed"]
        lines += ["", f"NerCo - baseline, test F1 per seed: {[round(d, 2) for d in t['differences']]}; mean "
                      f"{t['mean']:+.2f}" + (f", paired t-test t = {t['t']:.2f}, p = {t['p']:.3f}" if t["p"] is not None else "")]
        if boot:
            lines.append(f"Paired bootstrap over test sentences, seed {args.seeds[0]}: {100 * boot['delta']:+.2f} F1, "
                         f"95% interval [{100 * boot['ci95'][0]:+.2f}, {100 * boot['ci95'][1]:+.2f}], "
                         f"p(NerCo not better) = {boot['p_b_not_better']:.3f} ({boot['samples']:,} resamples)")
    write_text(results / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    try:
        main()
    except InputError as err:
        print(f"nerco: error: {err}", file=sys.stderr)
        sys.exit(2)
    except StopRequested as stop:  # Ctrl-C or SIGTERM: the run being trained resumes when the command is run again
        print(f"nerco_vs_baseline: {stop}: run the same command again to continue", file=sys.stderr)
        sys.exit(stop.exit_status)
