from conftest import read_metrics, run_overrides


def test_default_run_trains_and_tests(run_dir):
    results = run_overrides(run_dir)
    assert results["status"] == "completed"
    assert results["steps"] == 30
    assert set(results["test"]) == {"accuracy"}
    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [5, 10, 15, 20, 25, 30]
    assert all("projected_grad" in r and r["mem_peak_mb"] > 0 for r in steps)
