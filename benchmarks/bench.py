"""How fast is fedsweep against the clients' own training, in the layouts simulators use?
(issues 7, 15 and the engine issue)

For each case the same client work runs five ways, in turn, `--repeats` times:
  default     - fedsweep as a user gets it (trainer.processes=auto: one process with the cores as
                threads, or one forked process per core; the layout it chose is reported);
  fedsweep    - fedsweep in one process, one client after the other (trainer.processes=1);
  bare loop   - the same model, data, client batches (same seeds), optimizer and steps in one
                process with plain PyTorch, nothing else: no download, upload, aggregation;
  bare procs  - the bare loop in one separate process per core (one thread each), every process
                loading the data and training its share of the round's clients: the layout of
                process-per-client simulators;
  vectorised  - fedsweep with fl.parallel_clients=auto (the group size it chose is reported).
Median round times (the first round of each run dropped as warm-up, evaluation excluded), the
default against the best bare layout, peak memory (PSS, shared pages split) of the default layout
and of the separate processes, and the FLOP/s of the clients' training (FLOPs of one step counted
with torch.utils.flop_counter, scaled by the samples of a round) beside what this device's
float32 matrix multiply reaches. Then the K scaling row: 20 clients per round trained K at a time.

    python -m benchmarks.bench            # vit_small32 fedavg/fedlora on 28 px (compute bound)
                                          # and 16 px batch 16 (overhead bound), qwen_tiny fedlora
    python -m benchmarks.bench --quick    # seconds: small shapes, for the test suite
    python -m benchmarks.shared_machine   # trainer.threads under a busy neighbour
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing
import os
import queue
import statistics
import threading
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from src.contract.objective import mean_loss
from src.contract.ranks import shard_clients
from src.engine.distributed import end_process_group
from src.engine.sampling import client_generator, client_seed, sample_clients
from src.run import build_module, build_trainer, set_layout, set_threads

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


def time_fedsweep(
    cfg,
    out: Path,
    parallel_clients: int | str = 1,
    processes: int | str = 1,
    precision: str = "32-true",
) -> tuple[list[float], int, str, float]:
    """Round times of the real machinery, the group size it trained clients in, the layout
    (`processes`: trainer.processes, auto = the default layout, src/engine/layout.py) and the last
    round's val/global_acc."""
    cfg = copy.deepcopy(cfg)
    cfg.fl.parallel_clients = parallel_clients
    cfg.trainer.processes = processes
    cfg.trainer.precision = precision
    set_threads(cfg)
    module = build_module(cfg, out)
    with LayoutLog() as layout_log:
        layout = set_layout(cfg, module)
        chosen = f"{layout['devices']} x 1" if layout else f"1 x {torch.get_num_threads()}"
        rounds = RoundTimes()
        trainer = build_trainer(
            cfg, logger=False, callbacks=[rounds], enable_checkpointing=False, **layout
        )
        trainer.fit(module)
        end_process_group()
    if processes == "auto":
        chosen += f" ({'; '.join(layout_log.lines)})"
    accuracy = module._round_metrics.get("val/global_acc", float("nan"))
    return rounds.times, int(module.client_loop.parallel_clients), chosen, accuracy


class LayoutLog(logging.Handler):
    """The run's own `layout: ...` and `layout check: ...` log lines (why it chose its layout,
    and whether it fell back after round 1), collected while the `with` block runs."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.logger = logging.getLogger("fedsweep")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("layout"):
            self.lines.append(message)

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(min(self.level or logging.INFO, logging.INFO))
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_bare(module, cfg, round_idx: int, clients: list[int], make_optimizer) -> int:
    """The clients' local training with plain PyTorch, nothing else; returns samples trained."""
    model, federation = module.model, module.federation
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    samples = 0
    model.train()
    for client_id in clients:
        generator = client_generator(client_seed(cfg.seed, round_idx, client_id), device)
        optimizer = make_optimizer(params)
        index = federation.clients[client_id].train
        for _ in range(cfg.fl.local_epochs):
            for inputs, targets in federation.train.batches(index, cfg.fl.batch_size, generator):
                loss, _ = mean_loss(model(inputs), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                samples += len(inputs)
    return samples


def time_bare_loop(cfg, out: Path) -> tuple[list[float], float]:
    """The clients' training steps only, on the same model, data, batches and optimizer, one
    process with every core as a thread; also the FLOPs of one round's training (counted on one
    step, scaled by the samples trained)."""
    set_threads(cfg)
    module = build_module(cfg, out)  # same model init and federation; its machinery is unused
    device = torch.device("cuda" if cfg.trainer.accelerator == "gpu" else "cpu")
    module.model.to(device)
    federation = module.federation.to(device)
    make_optimizer = instantiate(cfg.optim)
    times, samples = [], 0
    for round_idx in range(cfg.fl.rounds):
        _sync(device)
        started = time.perf_counter()
        sampled = sample_clients(
            federation.num_clients, cfg.fl.clients_per_round, cfg.seed, round_idx
        )
        trained = train_bare(module, cfg, round_idx, sampled, make_optimizer)
        samples = samples or trained
        _sync(device)
        times.append(time.perf_counter() - started)
    inputs, targets = next(federation.train.batches(federation.clients[0].train, cfg.fl.batch_size))
    with FlopCounterMode(display=False) as counter:
        mean_loss(module.model(inputs), targets)[0].backward()
    return times, counter.get_total_flops() / len(inputs) * samples  # one round's training


def time_bare_processes(cfg, out: Path, processes: int) -> list[float]:
    """The layout of process-per-client simulators: `processes` separate processes of one thread,
    each loading the data and building the model itself, each training its share of every
    round's clients (the same shares as fedsweep's ranks); a round ends when all have finished."""
    context = multiprocessing.get_context("spawn")  # separate processes, as those simulators run
    barrier = context.Barrier(processes + 1)
    config = OmegaConf.to_container(cfg)  # unresolved: paths need Hydra's runtime, unused here
    workers = [
        context.Process(target=_bare_worker, args=(config, str(out), rank, processes, barrier))
        for rank in range(processes)
    ]
    for worker in workers:
        worker.start()
    times = []
    barrier.wait()  # every worker has built its model and data
    for _ in range(cfg.fl.rounds):
        barrier.wait()
        started = time.perf_counter()
        barrier.wait()
        times.append(time.perf_counter() - started)
    for worker in workers:
        worker.join()
        if worker.exitcode != 0:
            raise RuntimeError(f"a bare-loop process failed (exit code {worker.exitcode})")
    return times


def default_in_fresh_process(cfg, out: Path) -> tuple[list[float], str]:
    """`time_fedsweep` with the default layout in a new process (its memory is then the run's
    own, not this benchmark's): (round times, the layout it chose)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    config = OmegaConf.to_container(cfg)  # unresolved: paths need Hydra's runtime, unused here
    process = context.Process(target=_default_worker, args=(config, str(out), results))
    process.start()
    while True:
        try:
            rounds_s, layout = results.get(timeout=1)
            break
        except queue.Empty:
            if not process.is_alive():
                raise RuntimeError(
                    f"the default-layout run failed (exit code {process.exitcode})"
                ) from None
    process.join()
    return rounds_s, layout


def _default_worker(config: dict, out: str, results) -> None:
    rounds_s, _, layout, _ = time_fedsweep(OmegaConf.create(config), Path(out), 1, "auto")
    results.put((rounds_s, layout))


def _bare_worker(config: dict, out: str, rank: int, processes: int, barrier) -> None:
    torch.set_num_threads(1)
    cfg = OmegaConf.create(config)
    module = build_module(cfg, Path(out))
    make_optimizer = instantiate(cfg.optim)
    federation = module.federation
    barrier.wait()
    for round_idx in range(cfg.fl.rounds):
        sampled = sample_clients(
            federation.num_clients, cfg.fl.clients_per_round, cfg.seed, round_idx
        )
        sizes = [len(federation.clients[c].train) for c in sampled]
        mine = shard_clients(sampled, sizes, processes, rank)
        barrier.wait()
        train_bare(module, cfg, round_idx, mine, make_optimizer)
        barrier.wait()


class PeakMemory:
    """The peak of the summed proportional set size (PSS: shared pages split between the
    processes that map them) of this process and its descendants, sampled every 0.2 s while
    the `with` block runs (Linux; elsewhere 0)."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def __init__(self, include_self: bool = True):
        self.include_self = include_self  # False: the descendants only (processes it started)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            pids = _tree(os.getpid())[0 if self.include_self else 1 :]
            self.peak = max(self.peak, sum(_pss(pid) for pid in pids))


def _tree(pid: int) -> list[int]:
    found = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as children:
                found += [p for child in children.read().split() for p in _tree(int(child))]
    except OSError:  # gone meanwhile, or not Linux
        pass
    return found


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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
    name: str,
    overrides: list[str],
    rounds: int,
    device: str,
    out: Path,
    repeats: int = 2,
    layouts: bool = True,
) -> dict:
    """Five ways of training the same clients, run in turn `repeats` times (machine noise spreads
    over all of them): fedsweep's default layout (trainer.processes=auto), fedsweep in one
    process (the cores as threads), the bare loop in one process, the bare loop in one process
    per core (the process-per-client simulators' layout), fedsweep with fl.parallel_clients=auto.
    Medians of the round times, the first round of each run dropped as warm-up; peak memory
    (PSS) of the default layout and of the separate processes. `layouts=False`: without the
    default layout and the separate processes (the GPU check: one process per GPU anyway)."""
    cfg = compose_case(overrides, rounds, device, out / name)
    steady = slice(1, None) if rounds > 2 else slice(None)  # drop the warm-up round
    cores = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    names = ("default", "fedsweep", "bare", "procs", "vec", "bf16")
    times: dict[str, list[float]] = {k: [] for k in names}
    accuracy = {"32": float("nan"), "bf16": float("nan")}
    memory = {"default": 0, "procs": 0}
    chosen, layout = 1, ""
    for repeat in range(repeats):
        if layouts:
            with PeakMemory(include_self=False) as peak:  # a fresh process, as a user's run is
                rounds_s, layout = default_in_fresh_process(cfg, out / name / f"default{repeat}")
            times["default"] += rounds_s[steady]
            memory["default"] = max(memory["default"], peak.peak)
        rounds_s, _, _, accuracy["32"] = time_fedsweep(cfg, out / name / f"fedsweep{repeat}")
        times["fedsweep"] += rounds_s[steady]
        bare_times, round_flops = time_bare_loop(cfg, out / name / f"bare{repeat}")
        times["bare"] += bare_times[steady]
        if layouts and device == "cpu" and cores > 1:
            with PeakMemory(include_self=False) as peak:
                procs = time_bare_processes(cfg, out / name / f"procs{repeat}", cores)
            times["procs"] += procs[steady]
            memory["procs"] = max(memory["procs"], peak.peak)
        rounds_s, chosen, _, _ = time_fedsweep(cfg, out / name / f"vectorised{repeat}", "auto")
        times["vec"] += rounds_s[steady]
        if layouts:  # the one-process run under bf16 autocast: its speed and accuracy
            rounds_s, _, _, accuracy["bf16"] = time_fedsweep(
                cfg, out / name / f"bf16_{repeat}", precision="bf16-mixed"
            )
            times["bf16"] += rounds_s[steady]
    median = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
    best_bare = min(median["bare"], median["procs"]) if times["procs"] else median["bare"]
    return {
        "case": name,
        "device": device,
        "rounds": rounds,
        "repeats": repeats,
        "cores": cores,
        "clients_per_round": cfg.fl.clients_per_round,
        "local_epochs": cfg.fl.local_epochs,
        "default_round_s": median["default"],
        "default_layout": layout,
        "fedsweep_round_s": median["fedsweep"],
        "bare_round_s": median["bare"],
        "bare_processes_round_s": median["procs"],
        "default_vs_best_bare": median["default"] / best_bare,
        "ratio": median["fedsweep"] / median["bare"],
        "vectorised_round_s": median["vec"],
        "bf16_round_s": median["bf16"],
        "bf16_speedup": median["fedsweep"] / median["bf16"],
        "fp32_vs_bf16_accuracy": [accuracy["32"], accuracy["bf16"]],
        "auto_k": chosen,
        "speedup_over_bare": median["bare"] / median["vec"],
        "default_peak_pss_mb": memory["default"] / 2**20,
        "bare_processes_peak_pss_mb": memory["procs"] / 2**20,
        "round_gflop": round_flops / 1e9,
        "sequential_gflops": round_flops / median["fedsweep"] / 1e9,
        "vectorised_gflops": round_flops / median["vec"] / 1e9,
        **{f"{k}_rounds_s": v for k, v in times.items()},
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


def short_layout(layout: str) -> str:
    """`2 x 1` from the layout and its reasons; `2 x 1, then 1 x 2` after a fallback."""
    chosen = layout.split(" (")[0]
    fell_back = "trains from round 2 on" in layout
    return f"{chosen}, then 1 x {chosen.split(' x ')[0]} from round 2" if fell_back else chosen


def markdown(results: list[dict], peak: float, scaling: dict | None) -> str:
    lines = [
        f"Peak (float32 matmul on this device): {peak / 1e9:.0f} GFLOP/s.",
        "",
        "| case | device | default layout (s) | layout | fedsweep 1 process (s) | bare loop 1 "
        "process (s) | bare loop, 1 process per core (s) | default / best bare | peak PSS default "
        "/ separate processes (MB) | vectorised (s) | auto K | bf16-mixed, 1 process (s) | "
        "val/global_acc fp32 / bf16 | GFLOP/s 1 process / vectorised (% of peak) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        share = 100 * r["vectorised_gflops"] * 1e9 / peak
        lines.append(
            f"| {r['case']} | {r['device']} | {r['default_round_s']:.3f} | "
            f"{short_layout(r['default_layout'])} | {r['fedsweep_round_s']:.3f} | {r['bare_round_s']:.3f} | "
            f"{r['bare_processes_round_s']:.3f} | {r['default_vs_best_bare']:.2f} | "
            f"{r['default_peak_pss_mb']:.0f} / {r['bare_processes_peak_pss_mb']:.0f} | "
            f"{r['vectorised_round_s']:.3f} | {r['auto_k']} | {r['bf16_round_s']:.3f} | "
            f"{r['fp32_vs_bf16_accuracy'][0]:.3f} / {r['fp32_vs_bf16_accuracy'][1]:.3f} | "
            f"{r['sequential_gflops']:.1f} / "
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
            f"{name}: default layout ({result['default_layout']}) "
            f"{result['default_round_s']:.3f} s/round, {result['default_vs_best_bare']:.2f} x the "
            f"best bare loop (1 process {result['bare_round_s']:.3f}, 1 per core "
            f"{result['bare_processes_round_s']:.3f}); fedsweep 1 process "
            f"{result['fedsweep_round_s']:.3f}, vectorised {result['vectorised_round_s']:.3f} "
            f"(K={result['auto_k']})",
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
