"""trainer.threads on a shared machine: the same training step of vit_small32 (28 px,
batch 32, AdamW) timed quiet and with one busy process pinned to one of this process's cores, for
torch's defaults (one thread per core, OpenMP's own spin-wait) and for fedsweep's (bounded
spin-wait; trainer.threads=auto counts the idle cores when the run starts, so a neighbour that
is there from the start and one that arrives later are two rows). Each setting runs in a fresh
process: OpenMP reads its wait settings once, when torch loads it.

    python -m benchmarks.shared_machine    # writes benchmarks/results/shared_machine.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.bench import RESULTS
from src.threads import WAIT_KEYS

ROOT = Path(__file__).resolve().parents[1]

# One process's measurement: median seconds of `steps` training steps after a warm-up.
STEP = """
import statistics, sys, time
{prelude}
import torch
from timm.models.vision_transformer import VisionTransformer
{threads}
torch.manual_seed(0)
model = VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128,
                          depth=6, num_heads=4, mlp_ratio=2.0)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
times = []
for step in range({steps} + 3):
    started = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    times.append(time.perf_counter() - started)
print(statistics.median(times[3:]), torch.get_num_threads())
"""

SETTINGS = {
    # torch as it comes: a thread per core of the machine, OpenMP's own spin-wait
    "torch defaults": {"prelude": "", "threads": ""},
    # fedsweep (src bounds the spin before torch loads), the neighbour there when the run starts
    "fedsweep auto, neighbour from the start": {
        "prelude": "import src",
        "threads": "from src.threads import thread_count; "
        "torch.set_num_threads(thread_count('auto')[0])",
    },
    # the neighbour arrives after the start: auto has taken every core of the affinity
    "fedsweep auto, neighbour arrives later": {
        "prelude": "import os, src",
        "threads": "torch.set_num_threads(len(os.sched_getaffinity(0)))",
    },
}

BUSY = "import os; os.sched_setaffinity(0, {core})\nwhile True: pass"


def measure(setting: dict, steps: int) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k not in WAIT_KEYS}
    code = STEP.format(prelude=setting["prelude"], threads=setting["threads"], steps=steps)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    seconds, threads = out.stdout.split()
    return float(seconds), int(threads)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="quiet/busy pairs per setting")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    core = min(os.sched_getaffinity(0))
    results = {}
    for name, setting in SETTINGS.items():
        quiet, busy, counts = [], [], set()
        for _ in range(args.repeats):  # quiet, busy, quiet, busy: noise spreads over both
            seconds, threads = measure(setting, args.steps)
            quiet.append(seconds)
            counts.add(("quiet", threads))
            neighbour = subprocess.Popen([sys.executable, "-c", BUSY.format(core={core})])
            try:
                seconds, threads = measure(setting, args.steps)
                busy.append(seconds)
                counts.add(("busy", threads))
            finally:
                neighbour.kill()
                neighbour.wait()
        results[name] = {
            "threads_quiet": sorted(n for when, n in counts if when == "quiet"),
            "threads_busy": sorted(n for when, n in counts if when == "busy"),
            "quiet_step_s": statistics.median(quiet),
            "busy_step_s": statistics.median(busy),
            "slowdown": statistics.median(busy) / statistics.median(quiet),
            "quiet_steps_s": quiet,
            "busy_steps_s": busy,
        }
        print(f"{name}: {results[name]['slowdown']:.2f} x with a busy neighbour", flush=True)
    lines = [
        f"One busy process pinned to core {core}; vit_small32 training step, 28 px, batch 32.",
        "",
        "| setting | threads quiet / busy | quiet step (ms) | busy step (ms) | slowdown |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {','.join(map(str, r['threads_quiet']))} / "
            f"{','.join(map(str, r['threads_busy']))} | "
            f"{r['quiet_step_s'] * 1e3:.1f} | "
            f"{r['busy_step_s'] * 1e3:.1f} | {r['slowdown']:.2f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shared_machine.json").write_text(json.dumps(results, indent=2))
    (args.out / "shared_machine.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
