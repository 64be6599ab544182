"""How much does fedsweep add to the clients' own training? (issue 7)

For each case the same client work runs twice in this process:
  fedsweep  - the real machinery: `src.run.build_module` + a Lightning Trainer, rounds of
              sample -> download -> local training -> upload -> aggregate (evaluation excluded);
  bare loop - the same model, data on the device, client batches (same seeds), optimizer and
              steps, and nothing else: no download, upload, aggregation or bookkeeping.
It prints and writes `benchmarks/results/<case>.json` and `benchmarks/results/bench.md` with the
median round time of each (first round dropped as warm-up) and their ratio.

    python -m benchmarks.bench            # full: vit_small32 fedavg/fedlora on FMNIST-shaped data
                                          # (10 clients x 1 local epoch), qwen_tiny fedlora
    python -m benchmarks.bench --quick    # seconds: small shapes, for the test suite
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from src.federated.objective import mean_loss
from src.federated.sampling import client_generator, client_seed, sample_clients
from src.run import build_module, build_trainer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

COMMON = ["logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
CASES = {
    "fedavg_vit_small32_fmnist": ["alg=fedavg", "model=vit_small32", "data=synthetic"],
    "fedlora_vit_small32_fmnist": ["alg=fedlora", "model=vit_small32", "data=synthetic"],
    "fedlora_qwen_tiny_departments": [
        "alg=fedlora",
        "model=qwen_tiny",
        "data=departments",
        "partitioner=natural",
    ],
}
FULL = ["fl.num_clients=10", "fl.clients_per_round=10", "fl.local_epochs=1", "fl.batch_size=32"]
QUICK = [
    "fl.num_clients=4",
    "fl.clients_per_round=4",
    "fl.batch_size=32",
    "data.loader.num_train=800",
    "data.loader.num_test=100",
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


def time_fedsweep(cfg, out: Path) -> list[float]:
    module = build_module(cfg, out)
    rounds = RoundTimes()
    trainer = build_trainer(cfg, logger=False, callbacks=[rounds], enable_checkpointing=False)
    trainer.fit(module)
    return rounds.times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_bare_loop(cfg, out: Path) -> list[float]:
    """The clients' training steps only, on the same model, data, batches and optimizer."""
    module = build_module(cfg, out)  # same model init and federation; its machinery is unused
    device = torch.device("cuda" if cfg.trainer.accelerator == "gpu" else "cpu")
    model, federation = module.model.to(device), module.federation.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    make_optimizer = instantiate(cfg.optim)
    times = []
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
        _sync(device)
        times.append(time.perf_counter() - started)
    return times


def run_case(name: str, overrides: list[str], rounds: int, device: str, out: Path) -> dict:
    cfg = compose_case(overrides, rounds, device, out / name)
    fed = time_fedsweep(cfg, out / name / "fedsweep")
    bare = time_bare_loop(cfg, out / name / "bare")
    steady = slice(1, None) if rounds > 2 else slice(None)  # drop the warm-up round
    fed_s, bare_s = statistics.median(fed[steady]), statistics.median(bare[steady])
    return {
        "case": name,
        "device": device,
        "rounds": rounds,
        "clients_per_round": cfg.fl.clients_per_round,
        "local_epochs": cfg.fl.local_epochs,
        "fedsweep_round_s": fed_s,
        "bare_round_s": bare_s,
        "ratio": fed_s / bare_s,
        "fedsweep_rounds_s": fed,
        "bare_rounds_s": bare,
        "overrides": overrides,
    }


def markdown(results: list[dict]) -> str:
    lines = [
        "| case | device | fedsweep round (s) | bare loop round (s) | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['case']} | {r['device']} | {r['fedsweep_round_s']:.3f} | "
            f"{r['bare_round_s']:.3f} | {r['ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 rounds, one case")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per case (default 5)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default=None)
    parser.add_argument("--cases", nargs="*", default=None, help=f"subset of {list(CASES)}")
    parser.add_argument(
        "--train-samples", type=int, default=None, help="image cases: size of the train pool"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = args.device or ("gpu" if torch.cuda.is_available() else "cpu")
    rounds = args.rounds or (2 if args.quick else 5)
    names = args.cases or (["fedavg_vit_small32_fmnist"] if args.quick else list(CASES))
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        sizes = QUICK if args.quick else FULL
        if args.train_samples:
            sizes = [*sizes, f"data.loader.num_train={args.train_samples}"]
        if "departments" in name:  # text: the departments set has its own size keys
            sizes = [s for s in sizes if not s.startswith("data.loader.num_")]
        result = run_case(name, CASES[name] + sizes, rounds, device, args.out / "runs")
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(
            f"{name}: fedsweep {result['fedsweep_round_s']:.3f} s/round, bare loop "
            f"{result['bare_round_s']:.3f} s/round, ratio {result['ratio']:.3f}",
            flush=True,
        )
        results.append(result)
    (args.out / "bench.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
