#!/usr/bin/env bash
# The memory table (issue 12 §4): peak GPU memory of OPT-1.3B … 66B × zero-shot, ICL, FT,
# LoRA FT, MeZO, LOZO and LOZO-M, measured by the runner (`+experiment=memory`: random weights
# built on the GPU, MultiRC-length inputs, batch 1, three steps, the published dtypes), then
# `lozo-exp report` on the sweep. One H200, about 5-8 minutes: 42 jobs in one process, 37 model
# builds (FT of OPT-13B/30B/66B and LoRA FT of OPT-66B stop before building: their float32
# weights, plus gradients and AdamW moments for FT, exceed the GPU). The sweep is cut at
# SWEEP_TIMEOUT seconds (default 480) so that the report still runs.
# Needs the runner's copy-free best-dev state (issue 13, branch longruns): without it the
# OPT-66B ZO jobs copy 131 GB of weights to host memory at their dev evaluation; they run last.
#   OUT=/some/dir bash scripts/gpu/presets.sh          (from the repository root)
# Writes $OUT/memory/: memory.md, memory.csv, memory.png, memory.pdf (the report's memory table
# and figure, the papers' values beside), runs.csv (every run: status, peak memory, error),
# memory.json (commands, device, versions, exit status, wall time) and sweep.log: the files of
# results/paper/memory/.
# CPU check with a tiny model: MODELS=tiny-opt DEVICE=cpu OUT=/tmp/out bash scripts/gpu/presets.sh
set -uo pipefail
OUT=${OUT:?set OUT to the folder that receives the results}
MODELS=${MODELS:-opt-1.3b,opt-2.7b,opt-6.7b,opt-13b,opt-30b,opt-66b}
DEVICE=${DEVICE:-cuda}
SWEEP_TIMEOUT=${SWEEP_TIMEOUT:-480}
dest="$OUT/memory"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$dest"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1

sweep=(python -m lozo_exp -m +experiment=memory "model=$MODELS" "trainer.device=$DEVICE"
       "hydra.sweep.dir=$work/sweep")
report=(python -m lozo_exp report "$work/sweep" --out "$work/report")
start=$(date +%s)
echo "== ${sweep[*]}"
timeout --signal=INT --kill-after=30 "$SWEEP_TIMEOUT" "${sweep[@]}" 2>&1 | tee "$dest/sweep.log"
sweep_status=${PIPESTATUS[0]}  # 1 when a job did not fit (expected), 124 when cut
echo "== ${report[*]}"
"${report[@]}" 2>&1 | tail -n 3
cp "$work"/report/{memory.md,memory.csv,memory.png,memory.pdf,runs.csv} "$dest"/
python - "$dest/memory.json" "$sweep_status" "$(( $(date +%s) - start ))" "${sweep[*]}" \
    "${report[*]}" <<'PY'
import json
import sys

import torch
import transformers

path, status, seconds, sweep, report = sys.argv[1:]
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
record = {
    "commands": [sweep, report],
    "sweep_exit_status": int(status),
    "wall_time_s": int(seconds),
    "device": device,
    "torch": torch.__version__,
    "transformers": transformers.__version__,
}
open(path, "w").write(json.dumps(record, indent=2) + "\n")
PY
echo "== $dest:"
ls "$dest"
cat "$dest/memory.md"
