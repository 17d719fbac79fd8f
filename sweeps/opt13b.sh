#!/usr/bin/env bash
# The OPT-13B table (MeZO Table 1 / LOZO paper): 11 tasks, 1000 train / 500 dev / 1000 test
# (CB and COPA: dev 100), batch 16, 20k ZO steps with dev evaluation every 4k keeping the best
# state, fp16 weights; FT: 5 epochs, batch 8, linear lr decay. Documented, not run by the tests.
# Each line is one Hydra multirun; a cell's number is results.json "test" at the best lr by dev.
# Settings come from conf/recipe/opt.yaml and conf/hparams/opt/. Override MODEL for 30B/66B.
set -euo pipefail
MODEL=${MODEL:-opt-13b}
TASKS=sst2,rte,cb,boolq,wsc,wic,multirc,copa,record,squad,drop
CELL="model=$MODEL task=$TASKS"

python -m lozo_exp -m $CELL method=zero-shot
python -m lozo_exp -m $CELL method=icl                                   # 32 demonstrations
python -m lozo_exp -m $CELL method=mezo method.lr=1e-6,1e-7              # eps 1e-3
python -m lozo_exp -m $CELL method=mezo-lora method.lr=1e-4,5e-5          # eps 1e-2
python -m lozo_exp -m $CELL method=lozo method.lr=1e-6,1e-7 method.rank=1,2 method.interval=50,100
python -m lozo_exp -m $CELL method=lozo-m method.lr=1e-6,1e-7 method.rank=1,2 method.interval=50,100
python -m lozo_exp -m $CELL method=ft method.lr=1e-5,5e-5,8e-5           # needs several GPUs' memory at 13B
python -m lozo_exp -m model=$MODEL task=squad method=mezo,lozo task.non_diff=true   # -F1 objective
