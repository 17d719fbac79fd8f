#!/usr/bin/env bash
# The RoBERTa-large table (LM-BFF prompt fine-tuning; LOZO paper figure / MeZO Table 18):
# six tasks x five data seeds per method, k=16 per label (K=512 for the k=512 rows).
# Documented, not run by the tests. Each line is one Hydra multirun; the reported number of a
# cell is mean (std) over the five seeds of results.json "test" accuracy (MNLI: test_matched;
# test_mismatched is reported too), taking the best lr of a grid by mean dev accuracy.
#
# Steps and hyperparameters come from conf/recipe/roberta.yaml and conf/hparams/roberta/
# (MeZO/LOZO: batch 64, eps 1e-3, 100k steps, dev eval every 10k; FT: batch 8, 1k steps).
# Usage: bash sweeps/roberta_k16.sh            (K=512 bash sweeps/roberta_k16.sh for k=512)
set -euo pipefail
K=${K:-16}
TASKS=sst2,sst5,snli,mnli,rte,trec
SEEDS=13,21,42,87,100
CELL="model=roberta-large task=$TASKS task.k=$K task.data_seed=$SEEDS"

# k-shot splits data/k-shot-1k-test/<TASK>/<K>-<seed>/ from data/original/ (the LM-BFF archive,
# https://nlp.cs.princeton.edu/projects/lm-bff/datasets.tar) or, without it, the hub datasets.
# (Runs build a missing split on first use; building them up front avoids races between jobs.)
python -m lozo_exp kshot --k "$K" --data-dir data

python -m lozo_exp -m $CELL method=zero-shot
python -m lozo_exp -m $CELL method=ft                        # lr 1e-5 (finetune.sh)
python -m lozo_exp -m $CELL method=ft-lora                   # lr 1e-4, r 8, alpha 16
python -m lozo_exp -m $CELL method=mezo method.lr=1e-7,1e-6,1e-5   # the scripts' lr grid
python -m lozo_exp -m $CELL method=mezo-lora                 # lr 1e-4 (README example)
python -m lozo_exp -m $CELL method=lozo method.lr=1e-7,1e-6  # rank 4, interval 100 (README)
python -m lozo_exp -m $CELL method=lozo-m method.lr=1e-7,1e-6  # + momentum beta 0.9
