"""scripts/gpu/multigpu.sh, the several-GPU measurements, in its CPU mode (gloo, tiny models):
every run it makes completes and the JSON holds the commands and the numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # five lozo-exp launches, four under torchrun (~2 minutes)
def test_the_gpu_script_runs_on_a_cpu(tmp_path):
    env = dict(
        os.environ,
        OUT=str(tmp_path),
        DEVICE="cpu",
        MODEL="tiny-opt",
        FT_MODELS="tiny-opt",
        LORA_MODEL="tiny-opt",
        BATCHES="8",
        STEPS="3",
        FT_STEPS="3",
    )
    script = ["bash", "scripts/gpu/multigpu.sh"]
    done = subprocess.run(script, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "multigpu.json").read_text())
    names = ["zo-1gpu-b8", "zo-2gpu-b8", "allreduce", "ft-2gpu-tiny-opt", "ft-lora-2gpu-squad"]
    assert [c["name"] for c in report["commands"]] == names
    assert all(c["exit_status"] == 0 for c in report["commands"])
    assert "--nproc_per_node=2 -m lozo_exp model=tiny-opt" in report["commands"][1]["command"]
    runs = [*report["zo"]["runs"], *report["ft"]["tried"], report["ft_lora_squad"]]
    assert [r["status"] for r in runs] == ["completed"] * 4
    assert [r["processes"] for r in runs] == [1, 2, 2, 2]
    assert all(r["step_time_s"] > 0 and r["steps_timed"] == 2 for r in runs[:3])
    (row,) = report["zo"]["scaling"]
    assert row["efficiency"] == pytest.approx(row["step_time_1gpu_s"] / row["step_time_2gpu_s"] / 2)
    assert row["loss_max_rel_diff"] < 1e-4  # the same run, in one process and in two
    assert 0 < report["allreduce"]["median_s"] < 1 and report["allreduce"]["backend"] == "gloo"
    assert math.isfinite(row["allreduce_share"]) and report["ft"]["largest_that_fits"] == "tiny-opt"
    assert (tmp_path / "multigpu.log").read_text().count("exit status 0") == 5
