"""The benchmark harness runs in its quick mode and writes its results."""

import json

import pytest

from benchmarks import bench, gpu_check

# make test-all only: 30 s and 12 s of a developer's tool (every layout, the bare loops, bf16),
# which no run of fedsweep itself goes through


@pytest.mark.slow
def test_quick_benchmark_writes_round_times_ratios_layouts_memory_and_flops(tmp_path):
    (result,) = bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "fedavg_vit_small32_28px.json").read_text())
    assert written["ratio"] == result["ratio"] > 0
    assert written["ratio"] == written["fedsweep_round_s"] / written["bare_round_s"]
    assert written["speedup_over_bare"] == written["bare_round_s"] / written["vectorised_round_s"]
    assert written["auto_k"] >= 1 and written["round_gflop"] > 0
    rounds = ("default", "fedsweep", "bare", "vec", "bf16")
    assert all(len(written[f"{k}_rounds_s"]) == 2 for k in rounds)
    chosen, _, why = written["default_layout"].partition(" (")
    assert chosen in ("1 x 1", "1 x 2", "2 x 1")  # processes x threads
    assert why.startswith("layout: ")  # and the run's own reason for it
    assert bench.short_layout(written["default_layout"]) == chosen
    fell_back = (
        written["default_layout"]
        + "; layout check: ...: 1 process x 2 threads trains from round 2 on)"
    )
    assert bench.short_layout(fell_back) == f"{chosen}, then 1 x {chosen[0]} from round 2"
    assert written["default_peak_pss_mb"] > 100  # torch alone maps more
    best = min(written["bare_round_s"], written["bare_processes_round_s"])
    if written["cores"] > 1:  # the separate processes ran, each one holding the data
        assert len(written["procs_rounds_s"]) == 2
        assert written["bare_processes_peak_pss_mb"] > 100
    else:
        best = written["bare_round_s"]
    assert written["default_vs_best_bare"] == written["default_round_s"] / best
    assert all(0 <= acc <= 1 for acc in written["fp32_vs_bf16_accuracy"])  # both evaluated
    table = (tmp_path / "bench.md").read_text()
    assert "| fedavg_vit_small32_28px | cpu |" in table and "GFLOP/s" in table


@pytest.mark.slow
def test_gpu_check_runs_its_cases_and_writes_the_table(tmp_path):
    """The GPU check's code path, in its quick CPU form (on a GPU: `make gpu-check`)."""
    picked = ["fedlora_vit_tiny_224px", "fedlora_qwen_bf16"]
    report = gpu_check.main(
        ["--quick", "--device", "cpu", "--no-tests", "--cases", *picked, "--out", str(tmp_path)]
    )
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(written["cases"]) == picked == list(report["cases"])
    for result in written["cases"].values():
        assert result["fedsweep_round_s"] > 0 and result["vectorised_round_s"] > 0
        assert result["gpu_util"] is None  # no nvidia-smi samples on the CPU
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} |" in table for name in picked)
