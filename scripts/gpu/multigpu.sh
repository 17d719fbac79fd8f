#!/usr/bin/env bash
# Several GPUs (issue 18) on the two-H200 machine (nvidia-h200-x2): data-parallel ZO step time on
# 1 vs 2 GPUs for OPT-13B (random init, fp16, stand-in tokenizer, the bundled SST-2 sample) at
# batch 16 and 64, scaling efficiency and the all-reduce's share of a step; full FT with FSDP
# (the FT recipe) of the largest OPT that fits on the two GPUs, its step time and memory; and
# FT-LoRA with FSDP on SQuAD (generation in step on both GPUs). Every number comes from the
# runner itself (`python -m lozo_exp` / `torchrun -m lozo_exp`); scripts/gpu/multigpu.py runs
# the commands and reads their run directories. About 5 minutes on the GPUs (11 launches, each
# a few seconds of model build and a dozen steps; at most 5 minutes each).
# Run from the repository root:
#   OUT=/some/dir bash scripts/gpu/multigpu.sh
# It writes $OUT/multigpu.json (the commands, their exit status, every number) and
# $OUT/multigpu.log; the lead commits the JSON as results/bench/multigpu.json.
# CPU check with a tiny model (gloo, ~2 minutes):
#   DEVICE=cpu MODEL=tiny-opt FT_MODELS=tiny-opt LORA_MODEL=tiny-opt STEPS=6 FT_STEPS=3 \
#     OUT=/tmp/out bash scripts/gpu/multigpu.sh
set -euo pipefail
OUT=${OUT:?set OUT to the folder that receives the results}
mkdir -p "$OUT"
# NVLink multicast stays off (NVLS / symmetric memory): not available to these machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# On a CPU, one thread per process (torchrun's default) in the 1-process runs too: comparable.
[ "${DEVICE:-cuda}" = cpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python scripts/gpu/multigpu.py run --out "$OUT" \
    --device "${DEVICE:-cuda}" --model "${MODEL:-opt-13b}" --batches ${BATCHES:-16 64} \
    --steps "${STEPS:-12}" \
    --ft-models ${FT_MODELS:-opt-13b opt-6.7b} --ft-steps "${FT_STEPS:-6}" \
    --lora-model "${LORA_MODEL:-opt-1.3b}" 2>&1 | tee "$OUT/multigpu.log"
