"""The benchmark's CPU mode: small shapes, every step timed, the documented JSON fields."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from lozo_exp import cli
from lozo_exp.bench import STEPS, BenchRunConfig, register_schema, run_bench
from lozo_exp.config import ConfigError


def bench_config(*overrides: str) -> BenchRunConfig:
    register_schema()
    return cli.to_object(cli.compose("bench", overrides))


def test_cpu_bench_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "results" / "tiny.json"
    cfg = bench_config(
        "model=tiny-opt", "bench.shapes=[2x8]", "bench.warmup=0", "bench.repeats=1",
        "trainer.device=cpu", f"bench.out={out}",
    )  # fmt: skip
    report = run_bench(cfg, tmp_path / "run")
    assert json.loads(out.read_text()) == json.loads((tmp_path / "run" / "bench.json").read_text())
    assert report["model"] == "tiny-opt" and report["params"] > 0
    assert {"device", "torch", "transformers", "triton"} <= report["env"].keys()
    assert report["command"].startswith("python -m lozo_exp.bench")
    (shape,) = report["shapes"]
    assert (shape["batch"], shape["seq_len"]) == (2, 8)
    assert list(shape["timings"]) == list(STEPS)
    for t in shape["timings"].values():
        assert 0 < t["min_ms"] <= t["median_ms"] <= t["max_ms"]
    assert set(shape["floor_ms"]) == {"lozo", "mezo"}
    fwd = shape["timings"]["fwd"]["median_ms"]
    floor = shape["floor_ms"]["lozo"]
    assert floor == pytest.approx(2 * fwd + shape["timings"]["update_pass"]["median_ms"])
    ratio = shape["ratios"]["fast_lozo"]
    assert ratio["to_floor"] == pytest.approx(shape["timings"]["fast_lozo"]["median_ms"] / floor)
    assert ratio["to_ref"] > 0
    assert "fast_lozo" in capsys.readouterr().out  # the printed table


@pytest.mark.parametrize(
    "override, message",
    [
        ("bench.shapes=[32by64]", "BATCHxLENGTH"),
        ("bench.steps=[fwd,turbo]", "turbo"),
        ("method=lozo", "reads eps, rank, interval and beta from method=lozo-m"),
        ("trainer.device=gpu", "'gpu' is not a device"),
    ],
)
def test_bad_bench_settings_fail_before_the_model_is_built(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run_bench(bench_config("model=tiny-opt", override), tmp_path)


def test_a_bad_bench_setting_is_one_paragraph_from_the_command(tmp_path):
    done = run_cli(tmp_path, "bench", "model=tiny-opt", "trainer.device=gpu", timeout=120)
    assert done.returncode == 1
    assert "trainer.device='gpu' is not a device" in done.stderr
    assert "Traceback" not in done.stderr and "Error executing job" not in done.stderr
