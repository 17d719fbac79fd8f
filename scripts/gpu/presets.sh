#!/usr/bin/env bash
# The memory table (issue 12 §4): peak GPU memory of OPT-1.3B … 66B × zero-shot, ICL, MeZO,
# LOZO, LOZO-M, LoRA FT and full FT, measured by the runner (`+experiment=memory`: random
# weights, MultiRC-length inputs, batch 1, three steps, the published dtypes), then the report.
# About 7 minutes on one H200 (37 model builds; FT of 13B+ and LoRA FT of 66B stop before
# building, their weights alone being larger than the GPU). Run from the repository root:
#   OUT=/some/dir bash scripts/gpu/presets.sh
# It writes $OUT/memory/: memory.md, memory.csv, memory.png, memory.pdf (the report's memory
# table and figure, the papers' values beside), runs.csv (every run: status, peak memory,
# error), memory.json (commands, device, versions, wall time) and sweep.log. The lead commits
# them as results/paper/memory/.
# CPU check with a tiny model: MODELS=tiny-opt DEVICE=cpu OUT=/tmp/out bash scripts/gpu/presets.sh
set -uo pipefail
OUT=${OUT:?set OUT to the folder that receives the results}
MODELS=${MODELS:-opt-1.3b,opt-2.7b,opt-6.7b,opt-13b,opt-30b,opt-66b}
DEVICE=${DEVICE:-cuda}
dest="$OUT/memory"
work=$(mktemp -d)
mkdir -p "$dest"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1

sweep=(python -m lozo_exp -m +experiment=memory "model=$MODELS" "trainer.device=$DEVICE"
       "hydra.sweep.dir=$work/sweep")
report=(python -m lozo_exp report "$work/sweep" --out "$work/report")
start=$(date +%s)
echo "== ${sweep[*]}"
"${sweep[@]}" 2>&1 | tee "$dest/sweep.log"
sweep_status=${PIPESTATUS[0]}  # 1 when a job did not fit: expected at the larger sizes
echo "== ${report[*]}"
"${report[@]}" 2>&1 | tail -n 3
cp "$work"/report/{memory.md,memory.csv,memory.png,memory.pdf,runs.csv} "$dest"/
python - "$dest/memory.json" "$sweep_status" "$(( $(date +%s) - start ))" "${sweep[*]}" \
    "${report[*]}" <<'PY'
import json, sys
import torch, transformers
path, status, seconds, sweep, report = sys.argv[1:]
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
record = {"commands": [sweep, report], "sweep_exit_status": int(status),
          "wall_time_s": int(seconds), "device": device, "torch": torch.__version__,
          "transformers": transformers.__version__}
open(path, "w").write(json.dumps(record, indent=2) + "\n")
PY
echo "== $dest:"; ls "$dest"; cat "$dest/memory.md"
