#!/usr/bin/env bash
# The NerCo-vs-baseline accuracy measurements on a 2-core CPU: the baseline and NerCo seeds as two lanes at
# once (one torch thread each), then one sweep call that reuses every finished run and writes
# experiments/results/CORPUS.json (+ .md, and the analysis plots when seed 1's checkpoints are there).
# Each finished run's summary goes to experiments/results/runs/ (commit it): a later sitting re-runs
# the same command and trains only what is missing (a run killed mid-way resumes from runs/accuracy/ when
# that folder is still there). Logs go to runs/accuracy/logs/.
#
# The CPU budget is an overlay config: configs/budget/cpu.yaml (stage 1 at most 30 epochs, patience 5;
# fine-tuning as the corpus configs say, the same for both arms), configs/budget/cpu_msra.yaml for MSRA (2
# stage-1 epochs, 1 head and 3 full ones, so that both runs end within one 3-hour sitting: run folders do not
# outlive a sitting here; each of its epochs took 9-17 minutes with both lanes running).
#
#   bash experiments/accuracy_cpu.sh weibo            # seeds 1 2 3
#   bash experiments/accuracy_cpu.sh msra --seeds 1   # extra arguments go to nerco_vs_baseline.py
#   SYSTEMS="frozen_embeddings low_encoder_lr" bash experiments/accuracy_cpu.sh weibo   # other lanes: variants
#   TAG=head_patience15 bash experiments/accuracy_cpu.sh weibo --set finetune.head.patience=15  # another recipe
#
# SYSTEMS (default "baseline NerCo") names one lane per system; the closing sweep reports them beside the
# baseline and NerCo (CORPUS.json, or CORPUS_SYSTEMS.json for variants). TAG names the runs of a recipe
# changed by extra --set overrides (a later --set wins), for every system, the baseline and NerCo included:
# their runs, summaries, logs and CORPUS[_SYSTEMS]_TAG.json never replace the untagged ones.
#
# Needs the data root with the generated vectors (docs/data.md); default data/.
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=$1
shift
export NERCO_DATA_ROOT=${NERCO_DATA_ROOT:-data} OMP_NUM_THREADS=1 TQDM_DISABLE=1
mkdir -p runs/accuracy/logs
budget=(--overlay configs/budget/cpu.yaml)
if [ "$corpus" = msra ]; then  # 46k sentences: both arms within one sitting
    budget=(--overlay configs/budget/cpu_msra.yaml)
fi
tag=${TAG:+_$TAG}
sweep=(python3 experiments/nerco_vs_baseline.py --corpus "$corpus" --runs runs/accuracy --store experiments/results/runs
       --set run.threads=1 "${budget[@]}" "$@" ${TAG:+--tag "$TAG"})
read -r -a lanes <<< "${SYSTEMS:-baseline NerCo}"
for system in "${lanes[@]}"; do
    "${sweep[@]}" --systems "$system" --results runs/accuracy/lanes >> "runs/accuracy/logs/${corpus}_${system}${tag}.log" 2>&1 &
done
status=0
for _ in "${lanes[@]}"; do wait -n || status=1; done
[ "$status" = 0 ] || { echo "a lane failed: see runs/accuracy/logs/${corpus}_*${tag}.log" >&2; exit 1; }
extra=()
for system in "${lanes[@]}"; do
    [[ $system = baseline || $system = NerCo ]] || extra+=("$system")
done
name=$(IFS=_; echo "${corpus}${extra[*]:+_${extra[*]}}${tag}")
"${sweep[@]}" --systems baseline NerCo "${extra[@]}" --results experiments/results --name "$name"
