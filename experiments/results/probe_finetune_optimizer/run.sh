#!/usr/bin/env bash
# dev-score probes of the fine-tuning optimiser, Weibo baseline with pretrained inputs (one thread each)
cd /work/main; . .venv/bin/activate; export NERCO_DATA_ROOT=$PWD/data OMP_NUM_THREADS=1 TQDM_DISABLE=1
name=$1; shift
common=(--set run.threads=1 --set data.char_vectors=vectors/char_vec_pd2014.50d.vec --set data.bigram_vectors=pretrained/jieba/bigram.vec --set data.word_vectors=pretrained/jieba/word.vec --set model.heads=10 --set model.hidden=200 --set finetune.full.patience=0 --set finetune.full.optim.epochs=15 --set finetune.full.optim.warmup=0.05)
python -m nerco_dist.cli train configs/weibo.yaml "${common[@]}" --set run.out_dir=runs/probe/$name "$@" > runs/probe/$name.log 2>&1
