#!/usr/bin/env bash
# Long runs (issue 13) on one H200 (nvidia-h200): every number from the runner itself
# (scripts/gpu/longruns.py runs the commands and reads their run directories):
#   startup    OPT-13B and OPT-30B, random init, 4 LOZO steps through `python -m lozo_exp`: time
#              from the command to the first step, peak host memory (~2.5 min)
#   big        OPT-66B, random init, LOZO and MeZO, 30 steps and one dev evaluation: time to the
#              first step, step time, GPU and host memory, checkpoint size (~5 min)
#   exactness  OPT-1.3B (fast engine) LOZO, LOZO-M, MeZO and FT killed with SIGKILL once step 23
#              is logged and resumed (`lozo-exp resume=DIR`) vs uninterrupted runs, all at once
#              on the GPU: bit-identical? (~2 min)
#   replay     replaying a ZO log on OPT-13B (resume): ms per step, s per 1k steps (~1.5 min)
# About 11 minutes of GPU time in all. Run from the repository root:
#   OUT=/some/dir bash scripts/gpu/longruns.sh
# It writes $OUT/longruns_{startup,big,exactness,replay}.json (commands, exit statuses, numbers)
# and $OUT/longruns.log; the lead commits the JSON under results/gpu-runs/.
# CPU check with tiny models (~3 minutes on 2 cores):
#   DEVICE=cpu STARTUP_MODELS=tiny-opt BIG_MODEL=tiny-opt EXACT_MODEL=tiny-opt \
#     REPLAY_MODEL=tiny-opt OUT=/tmp/out bash scripts/gpu/longruns.sh
set -euo pipefail
OUT=${OUT:?set OUT to the folder that receives the results}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ "${DEVICE:-cuda}" = cpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python scripts/gpu/longruns.py --out "$OUT" --device "${DEVICE:-cuda}" \
    --parts ${PARTS:-startup big exactness replay} \
    --startup-models ${STARTUP_MODELS:-opt-13b opt-30b} \
    --big-model "${BIG_MODEL:-opt-66b}" --exact-model "${EXACT_MODEL:-opt-1.3b}" \
    --replay-model "${REPLAY_MODEL:-opt-13b}" 2>&1 | tee "$OUT/longruns.log"
