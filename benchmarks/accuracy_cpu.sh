#!/usr/bin/env bash
# The NerCo-vs-baseline accuracy measurements on a 2-core CPU: the baseline and NerCo seeds as two lanes at
# once (one torch thread each), then one sweep call that reuses every finished run and writes
# benchmarks/results/accuracy/CORPUS.json (+ .md and the analysis plots). Runs resume where a stop left them:
# re-run the same command. Logs go to runs/accuracy/logs/.
#
#   bash benchmarks/accuracy_cpu.sh weibo            # seeds 1 2 3
#   bash benchmarks/accuracy_cpu.sh msra --seeds 1   # extra arguments go to nerco_vs_baseline.py
#
# Needs the data root with the generated vectors (README, "Pretrained inputs"); default data/.
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=$1
shift
export NERCO_DATA_ROOT=${NERCO_DATA_ROOT:-data} OMP_NUM_THREADS=1 TQDM_DISABLE=1
mkdir -p runs/accuracy/logs
sweep=(python3 benchmarks/nerco_vs_baseline.py --corpus "$corpus" --runs runs/accuracy --set run.threads=1 "$@")
for system in baseline NerCo; do
    "${sweep[@]}" --systems "$system" --results runs/accuracy/lanes >> "runs/accuracy/logs/${corpus}_${system}.log" 2>&1 &
done
status=0
wait -n || status=1
wait -n || status=1
[ "$status" = 0 ] || { echo "a lane failed: see runs/accuracy/logs/${corpus}_*.log" >&2; exit 1; }
"${sweep[@]}" --results benchmarks/results/accuracy --name "$corpus"
