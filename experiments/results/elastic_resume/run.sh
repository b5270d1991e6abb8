#!/usr/bin/env bash
# Fine-tuning continued on another number of ranks, on a real corpus: Resume NER, ZeRO 2, one thread a rank,
# 10 epochs, character vectors only (the bigram and word vectors are made per machine: docs/data.md). An
# uninterrupted run on 2 ranks; the same command stopped by SIGTERM once 5 epochs are done, then continued on
# 1 rank accumulating 2 micro-batches a step (the same 20 sentences a step). Writes summary.json beside itself.
# Dropout draws anew on the other ranks, so the two runs agree as two seeds do, not to rounding.
set -euo pipefail
cd "$(dirname "$0")/../../.."
here=experiments/results/elastic_resume
out=${OUT:-runs/elastic_resume}
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TQDM_DISABLE=1 NERCO_DATA_ROOT=${NERCO_DATA_ROOT:-$PWD/data}
sets=(--set distributed.config=zero2.json --set run.threads=1 --set finetune.full.optim.epochs=10
      --set data.bigram_vectors=null --set data.word_vectors=null)
launch() {  # RANKS PORT RUN [--set ...]: launch/cpu.sh, whose launcher passes a SIGTERM on to every rank
  RANKS=$1 MASTER_PORT=$2 exec launch/cpu.sh configs/resume.yaml "${sets[@]}" --set run.out_dir="$out/$3" "${@:4}"
}
mkdir -p "$out"
(launch 2 29701 uninterrupted) > "$out/uninterrupted.log" 2>&1
(launch 2 29702 continued) > "$out/continued_2_ranks.log" 2>&1 &
runner=$!  # the launcher itself (exec'd by the subshell and by launch/cpu.sh)
latest=$out/continued/resume/finetune/latest.json
until [ -f "$latest" ] && python3 -c "import json,sys; sys.exit(json.load(open('$latest'))['progress']['epochs_done'] < 5)"; do
  sleep 5
done
kill -TERM "$runner"; wait "$runner" || true  # 143: stopped with a resume checkpoint
(launch 1 29703 continued --set distributed.grad_accum=2) > "$out/continued_1_rank.log" 2>&1
python3 - "$out" "$here/summary.json" <<'PY'
import json, sys, time
out, summary = sys.argv[1], sys.argv[2]
runs = {name: json.load(open(f"{out}/{name}/results.json")) for name in ("uninterrupted", "continued")}
rows = {name: dict(test_f1=r["test"]["f1"], test_precision=r["test"]["precision"], test_recall=r["test"]["recall"],
                   best_dev_f1=r["best_dev_f1"], best_epoch=r["best_epoch"], epochs_run=r["epochs_run"],
                   world_size_at_the_end=r["machine"]["world_size"], wall_time_s=r["wall_time_s"])
        for name, r in runs.items()}
json.dump(dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), corpus="resume", machine=runs["continued"]["machine"],
               runs=rows, test_f1_difference=rows["continued"]["test_f1"] - rows["uninterrupted"]["test_f1"]),
          open(summary, "w"), indent=1)
print(json.dumps(rows, indent=1))
PY
grep -h "resuming at\|continuing on\|universal form\|stopped by" "$out/continued_2_ranks.log" "$out/continued_1_rank.log" \
  > "$here/continued_log_lines.txt" || true
