"""The GPU check (`make gpu-check`): one short run on a GPU machine measures what needs a GPU.

1. the tests marked `gpu` (skipped elsewhere): `pytest -m gpu`;
2. vit_small32 on 16 px data, 50 clients per round: fedsweep one client after the other, the
   bare loop, and fl.parallel_clients=auto (target: vectorised >= 10 x sequential);
3. fedlora on vit_tiny_patch16_224 at 224 px (random weights: nothing is downloaded);
4. fedlora on a Qwen of its real size from a config folder (random weights, bf16), its tokens/s
   against the bare loop on the same peft model (target: >= 0.9 x); skipped, with the reason in
   the table, when no config folder is given (`--qwen-config`, or $FEDSWEEP_QWEN_CONFIG).
GPU utilisation is sampled with nvidia-smi while each case runs. Writes gpu_check.json and
gpu_check.md (`--out`, default benchmarks/results/gpu/).

    python -m benchmarks.gpu_check                          # on a GPU machine, < 8 minutes
    python -m benchmarks.gpu_check --quick --device cpu     # seconds: the code path, for tests
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from benchmarks.bench import IMAGES_16, ROOT, run_case

RESULTS = ROOT / "benchmarks" / "results" / "gpu"
QWEN_CONFIG = os.environ.get("FEDSWEEP_QWEN_CONFIG")  # a folder with a Qwen config.json


def cases(quick: bool, qwen_config: str | None) -> dict[str, list[str] | str]:
    """name -> overrides, or the reason the case cannot run here."""
    clients = 4 if quick else 50
    small = [f"fl.num_clients={clients}", f"fl.clients_per_round={clients}"]
    vit224 = [
        "alg=fedlora",
        "model=vit",
        "model.pretrained=false",
        "data=synthetic",
        "data.channels=3",
        f"data.image_size={32 if quick else 224}",
        f"data.loader.num_train={200 if quick else 4000}",
        "data.loader.num_test=100",
        "fl.num_clients=10",
        "fl.clients_per_round=10",
        "fl.batch_size=32",
    ]
    text = ["alg=fedlora", "data=departments", "partitioner=natural", "fl.num_clients=4"]
    text += ["fl.clients_per_round=4", "fl.batch_size=8"]
    if quick:
        qwen = [*text, "model=qwen_tiny", "data.loader.samples_per_department=20"]
    elif qwen_config and Path(qwen_config, "config.json").is_file():
        qwen = [*text, "model=qwen", f"model.config_path={qwen_config}", "model.dtype=bf16"]
        qwen += ["data.loader.samples_per_department=100", "data.max_length=256"]
    else:
        qwen = f"no Qwen config folder ({qwen_config!r}): give --qwen-config"
    images16 = [o for o in IMAGES_16 if not o.startswith("data.loader.num_train")]
    return {
        "fedavg_vit_small32_16px_50_clients": [
            "alg=fedavg",
            *images16,
            f"data.loader.num_train={400 if quick else 6000}",
            *small,
        ],
        "fedlora_vit_tiny_224px": vit224,
        "fedlora_qwen_bf16": qwen,
    }


class Utilisation:
    """GPU utilisation (%) sampled with nvidia-smi every 0.2 s while the block runs."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._smi = shutil.which("nvidia-smi")

    def _sample(self):
        query = [self._smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.wait(0.2):
            out = subprocess.run(query, capture_output=True, text=True).stdout.split()
            if out:
                self.samples.append(float(out[0]))

    def __enter__(self):
        if self._smi:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._smi:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def gpu_tests() -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-rs",
            "tests/engine/test_precision.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    return {"returncode": done.returncode, "summary": summary, "s": time.perf_counter() - started}


def markdown(report: dict) -> str:
    lines = [
        f"Device: {report['device_name']}. GPU tests (`pytest -m gpu`): "
        f"{report['tests']['summary']} (exit {report['tests']['returncode']}).",
        "",
        "| case | bare loop (s) | sequential (s) | vectorised (s) | auto K | vectorised / "
        "sequential | bare / sequential (throughput) | GPU util (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["cases"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} |||||||")
            continue
        util = "n/a" if r["gpu_util"] is None else f"{r['gpu_util']:.0f}"
        lines.append(
            f"| {name} | {r['bare_round_s']:.3f} | {r['fedsweep_round_s']:.3f} | "
            f"{r['vectorised_round_s']:.3f} | {r['auto_k']} | "
            f"{r['fedsweep_round_s'] / r['vectorised_round_s']:.2f} x | "
            f"{r['bare_round_s'] / r['fedsweep_round_s']:.2f} | {util} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: the code path only")
    parser.add_argument("--device", choices=["cpu", "gpu"], default=None)
    parser.add_argument("--qwen-config", default=QWEN_CONFIG, help="a Qwen config folder")
    parser.add_argument("--no-tests", action="store_true", help="skip `pytest -m gpu`")
    parser.add_argument("--cases", nargs="*", default=None, help="a subset of the cases")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = args.device or ("gpu" if torch.cuda.is_available() else "cpu")
    if device == "gpu" and not torch.cuda.is_available():
        parser.error("--device gpu: torch sees no CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "device_name": torch.cuda.get_device_name() if device == "gpu" else "cpu",
        "tests": {"returncode": None, "summary": "not run"} if args.no_tests else gpu_tests(),
        "cases": {},
    }
    print(f"gpu tests: {report['tests']['summary']}", flush=True)
    rounds, repeats = (2, 1) if args.quick else (3, 2)
    for name, overrides in cases(args.quick, args.qwen_config).items():
        if args.cases is not None and name not in args.cases:
            continue
        if isinstance(overrides, str):
            report["cases"][name] = {"skipped": overrides}
            print(f"{name}: skipped ({overrides})", flush=True)
            continue
        with Utilisation() as util:
            result = run_case(
                name, overrides, rounds, device, args.out / "runs", repeats, layouts=False
            )
        report["cases"][name] = result | {"gpu_util": util.mean}
        print(
            f"{name}: sequential {result['fedsweep_round_s']:.3f} s/round, vectorised "
            f"{result['vectorised_round_s']:.3f} (K={result['auto_k']}), bare loop "
            f"{result['bare_round_s']:.3f}",
            flush=True,
        )
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
