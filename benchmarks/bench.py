"""How much does fedsweep add to the clients' own training, and what does training clients
together gain? (issues 7 and 15)

For each case the same client work runs three ways in this process, A B C A B C (`--repeats`):
  fedsweep    - the real machinery, one client after the other (fl.parallel_clients=1):
                `src.run.build_module` + a Lightning Trainer, rounds of sample -> download ->
                local training -> upload -> aggregate (evaluation excluded);
  bare loop   - the same model, data on the device, client batches (same seeds), optimizer and
                steps, and nothing else: no download, upload, aggregation or bookkeeping;
  vectorised  - fedsweep with fl.parallel_clients=auto (the group size it chose is reported).
Median round times (the first round of each run dropped as warm-up), fedsweep / bare loop, bare
loop / vectorised, and the FLOP/s of the clients' training (FLOPs of one step counted with
torch.utils.flop_counter, scaled by the samples of a round) beside what this device's float32
matrix multiply reaches. Then the K scaling row: 20 clients per round trained K at a time.

    python -m benchmarks.bench            # vit_small32 fedavg/fedlora on 28 px (compute bound)
                                          # and 16 px batch 16 (overhead bound), qwen_tiny fedlora
    python -m benchmarks.bench --quick    # seconds: small shapes, for the test suite
    python -m benchmarks.shared_machine   # trainer.threads under a busy neighbour
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from src.federated.objective import mean_loss
from src.federated.sampling import client_generator, client_seed, sample_clients
from src.run import build_module, build_trainer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

COMMON = ["logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
# Fashion-MNIST-shaped (12,000 of its 60,000 samples by default: --train-samples)
IMAGES_28 = [
    "model=vit_small32",
    "data=synthetic",
    "fl.batch_size=32",
    "data.loader.num_train=12000",
]
# digits-shaped: 16 px, batch 16, about 1,800 samples: per step a few tiny kernels (overhead bound)
IMAGES_16 = [
    "model=vit_small32",
    "data=synthetic",
    "data.image_size=16",
    "data.loader.num_train=1800",
    "data.loader.num_test=400",
    "fl.batch_size=16",
]
CASES = {
    "fedavg_vit_small32_28px": ["alg=fedavg", *IMAGES_28],
    "fedlora_vit_small32_28px": ["alg=fedlora", *IMAGES_28],
    "fedavg_vit_small32_16px": ["alg=fedavg", *IMAGES_16],
    "fedlora_vit_small32_16px": ["alg=fedlora", *IMAGES_16],
    "fedlora_qwen_tiny_departments": [
        "alg=fedlora",
        "model=qwen_tiny",
        "data=departments",
        "partitioner=natural",
        "fl.batch_size=32",
    ],
}
FULL = ["fl.num_clients=10", "fl.clients_per_round=10", "fl.local_epochs=1"]
QUICK = [
    "fl.num_clients=4",
    "fl.clients_per_round=4",
    "fl.batch_size=32",
    "data.loader.num_train=800",
    "data.loader.num_test=100",
    "model.depth=1",  # the code path, not the numbers: the test suite runs it
]


def compose_case(overrides: list[str], rounds: int, device: str, out: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                *COMMON,
                f"trainer={device}",
                "optim=adamw",
                f"fl.rounds={rounds}",
                f"fl.eval_every={rounds + 1}",  # only the last round evaluates (not timed)
                f"paths.output_dir={out}",
                *overrides,
            ],
        )


class RoundTimes(pl.Callback):
    """Collects the orchestrator's own time/round_s (training only, evaluation excluded)."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.times.append(module._round_metrics["time/round_s"])


def time_fedsweep(cfg, out: Path, parallel_clients: int | str = 1) -> tuple[list[float], int]:
    """Round times of the real machinery, and the group size it trained clients in."""
    cfg = copy.deepcopy(cfg)
    cfg.fl.parallel_clients = parallel_clients
    module = build_module(cfg, out)
    rounds = RoundTimes()
    trainer = build_trainer(cfg, logger=False, callbacks=[rounds], enable_checkpointing=False)
    trainer.fit(module)
    return rounds.times, int(module.client_loop.parallel_clients)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_bare_loop(cfg, out: Path) -> tuple[list[float], float]:
    """The clients' training steps only, on the same model, data, batches and optimizer; also
    the FLOPs of one round's training (counted on one step, scaled by the samples trained)."""
    module = build_module(cfg, out)  # same model init and federation; its machinery is unused
    device = torch.device("cuda" if cfg.trainer.accelerator == "gpu" else "cpu")
    model, federation = module.model.to(device), module.federation.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    make_optimizer = instantiate(cfg.optim)
    times, samples = [], 0
    for round_idx in range(cfg.fl.rounds):
        _sync(device)
        started = time.perf_counter()
        model.train()
        for client_id in sample_clients(
            federation.num_clients, cfg.fl.clients_per_round, cfg.seed, round_idx
        ):
            generator = client_generator(client_seed(cfg.seed, round_idx, client_id), device)
            optimizer = make_optimizer(params)
            index = federation.clients[client_id].train
            for _ in range(cfg.fl.local_epochs):
                for inputs, targets in federation.train.batches(
                    index, cfg.fl.batch_size, generator
                ):
                    loss, _ = mean_loss(model(inputs), targets)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    samples += len(inputs) if round_idx == 0 else 0
        _sync(device)
        times.append(time.perf_counter() - started)
    inputs, targets = next(federation.train.batches(federation.clients[0].train, cfg.fl.batch_size))
    with FlopCounterMode(display=False) as counter:
        mean_loss(model(inputs), targets)[0].backward()
    return times, counter.get_total_flops() / len(inputs) * samples  # one round's training


def peak_flops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """What this device's float32 matrix multiply reaches (the practical arithmetic limit)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times)


def run_case(
    name: str, overrides: list[str], rounds: int, device: str, out: Path, repeats: int = 2
) -> dict:
    """fedsweep one client after the other (A), the bare loop (B) and fedsweep with
    fl.parallel_clients=auto (C), run A B C A B C ...: machine noise spreads over all three."""
    cfg = compose_case(overrides, rounds, device, out / name)
    steady = slice(1, None) if rounds > 2 else slice(None)  # drop the warm-up round
    fed, bare, vec, chosen = [], [], [], 1
    for repeat in range(repeats):
        fed += time_fedsweep(cfg, out / name / f"fedsweep{repeat}")[0][steady]
        bare_times, round_flops = time_bare_loop(cfg, out / name / f"bare{repeat}")
        bare += bare_times[steady]
        times, chosen = time_fedsweep(cfg, out / name / f"vectorised{repeat}", "auto")
        vec += times[steady]
    fed_s, bare_s, vec_s = (statistics.median(t) for t in (fed, bare, vec))
    return {
        "case": name,
        "device": device,
        "rounds": rounds,
        "repeats": repeats,
        "clients_per_round": cfg.fl.clients_per_round,
        "local_epochs": cfg.fl.local_epochs,
        "fedsweep_round_s": fed_s,
        "bare_round_s": bare_s,
        "ratio": fed_s / bare_s,
        "vectorised_round_s": vec_s,
        "auto_k": chosen,
        "speedup_over_bare": bare_s / vec_s,
        "round_gflop": round_flops / 1e9,
        "sequential_gflops": round_flops / fed_s / 1e9,
        "vectorised_gflops": round_flops / vec_s / 1e9,
        "fedsweep_rounds_s": fed,
        "bare_rounds_s": bare,
        "vectorised_rounds_s": vec,
        "overrides": overrides,
    }


def k_scaling(device: str, out: Path, rounds: int, ks=(1, 2, 5, 10, 20)) -> dict:
    """Round time of the overhead-bound case with 20 clients per round trained K at a time."""
    overrides = [*CASES["fedlora_vit_small32_16px"], "fl.num_clients=20", "fl.clients_per_round=20"]
    cfg = compose_case(overrides, rounds, device, out / "k_scaling")
    steady = slice(1, None) if rounds > 2 else slice(None)
    times = {}
    for k in ks:
        measured = time_fedsweep(cfg, out / "k_scaling" / f"k{k}", k)[0][steady]
        times[k] = statistics.median(measured)
    return {"case": "fedlora_vit_small32_16px, 20 clients per round", "round_s": times}


def markdown(results: list[dict], peak: float, scaling: dict | None) -> str:
    lines = [
        f"Peak (float32 matmul on this device): {peak / 1e9:.0f} GFLOP/s.",
        "",
        "| case | device | bare loop (s) | fedsweep (s) | ratio | vectorised (s) | auto K | "
        "speed-up over bare | GFLOP/s sequential / vectorised (% of peak) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        share = 100 * r["vectorised_gflops"] * 1e9 / peak
        lines.append(
            f"| {r['case']} | {r['device']} | {r['bare_round_s']:.3f} | "
            f"{r['fedsweep_round_s']:.3f} | {r['ratio']:.3f} | {r['vectorised_round_s']:.3f} | "
            f"{r['auto_k']} | {r['speedup_over_bare']:.2f} | {r['sequential_gflops']:.1f} / "
            f"{r['vectorised_gflops']:.1f} ({share:.0f} %) |"
        )
    if scaling:
        ks = list(scaling["round_s"])
        lines += [
            "",
            f"K scaling ({scaling['case']}): round time (s)",
            "",
            "| K | " + " | ".join(map(str, ks)) + " |",
            "|---|" + "---|" * len(ks),
            "| round (s) | " + " | ".join(f"{scaling['round_s'][k]:.3f}" for k in ks) + " |",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 rounds, one case")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 3)")
    parser.add_argument("--repeats", type=int, default=None, help="A B C repeats (default 2)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default=None)
    parser.add_argument("--cases", nargs="*", default=None, help=f"subset of {list(CASES)}")
    parser.add_argument(
        "--train-samples", type=int, default=None, help="28 px cases: size of the train pool"
    )
    parser.add_argument("--no-k-scaling", action="store_true", help="skip the K scaling row")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = args.device or ("gpu" if torch.cuda.is_available() else "cpu")
    rounds = args.rounds or (2 if args.quick else 3)
    repeats = args.repeats or (1 if args.quick else 2)
    names = args.cases or (["fedavg_vit_small32_28px"] if args.quick else list(CASES))
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        overrides = CASES[name] + (QUICK if args.quick else FULL)
        if args.train_samples and "28px" in name:
            overrides.append(f"data.loader.num_train={args.train_samples}")
        if "departments" in name:  # text: the departments set has its own size keys
            overrides = [o for o in overrides if not o.startswith("data.loader.num_")]
        # the last value of a key wins (Hydra refuses a key given twice)
        overrides = list({o.split("=", 1)[0]: o for o in overrides}.values())
        result = run_case(name, overrides, rounds, device, args.out / "runs", repeats)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(
            f"{name}: bare loop {result['bare_round_s']:.3f} s/round, fedsweep "
            f"{result['fedsweep_round_s']:.3f} (ratio {result['ratio']:.3f}), vectorised "
            f"{result['vectorised_round_s']:.3f} (K={result['auto_k']}, "
            f"{result['speedup_over_bare']:.2f} x the bare loop)",
            flush=True,
        )
        results.append(result)
    scaling = None
    if not args.quick and not args.no_k_scaling:
        scaling = k_scaling(device, args.out / "runs", rounds)
        (args.out / "k_scaling.json").write_text(json.dumps(scaling, indent=2))
    peak = peak_flops(torch.device("cuda" if device == "gpu" else "cpu"))
    (args.out / "bench.md").write_text(markdown(results, peak, scaling))
    print(markdown(results, peak, scaling))
    return results


if __name__ == "__main__":
    main()
