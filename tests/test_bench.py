"""The benchmark harness (issue 7) runs in its quick mode and writes its results."""

import json

from benchmarks import bench


def test_quick_benchmark_writes_round_times_and_their_ratio(tmp_path):
    (result,) = bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "fedavg_vit_small32_fmnist.json").read_text())
    assert written["ratio"] == result["ratio"] > 0
    assert written["ratio"] == written["fedsweep_round_s"] / written["bare_round_s"]
    assert len(written["fedsweep_rounds_s"]) == len(written["bare_rounds_s"]) == 2
    assert "| fedavg_vit_small32_fmnist | cpu |" in (tmp_path / "bench.md").read_text()
