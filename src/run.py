"""Entry point: compose the config -> build data, model, algorithm, aggregator -> fit -> summarize.

python -m src.run alg=fedlora model=vit_small32 data=digits
python -m src.run -m alg=fedavg,fedlora seed=0,1,2
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from src.config_checks import check_dataset_matches, validate_config
from src.engine.buffered import StalenessWeight
from src.engine.checkpoint import (
    LastRoundCheckpoint,
    check_same_config,
    read_saved_run,
    resume_path,
)
from src.engine.client_state import ClientStateStore
from src.engine.compatibility import (
    check_aggregator,
    check_attack,
    check_client_optimizer,
    check_compression,
    check_evaluable,
    check_privacy,
    check_system,
)
from src.engine.data import Federation
from src.engine.distributed import ClientShardingStrategy, end_process_group
from src.engine.layout import layout_for
from src.engine.orchestrator import FederatedModule
from src.engine.server import Server
from src.errors import ConfigError, RunInterrupted, user_error
from src.export import export_models
from src.loggers import build_loggers, finish_wandb, wandb_run_id
from src.models.build import build_base_model
from src.outputs import ClientRecorder, RoundRecorder, summarize, write_summary
from src.run_names import current_run_name, register_resolver, sweep_keys
from src.safe_load import first_line
from src.threads import thread_count, wait_note
from src.transforms.chain import TransformChain
from src.transforms.faults import ClientFaults
from src.transforms.privacy import DPFedAvg

log = logging.getLogger("fedsweep")
register_resolver()  # conf/config.yaml names sweep folders with it

# One batch per epoch and no workers are by design; Lightning's hints about them are noise here.
for pattern in (
    ".*does not have many workers.*",
    ".*number of training batches.*",
    ".*configure_optimizers.*returned.*None.*",
    ".*LeafSpec.*is deprecated.*",
    ".*sync_dist=True.*",  # under DDP every rank logs the same, already combined values
):
    warnings.filterwarnings("ignore", message=pattern)


def hydra_names(cfg: DictConfig) -> tuple[str, str, bool]:
    """(run name from the overrides, group, is this a multirun job). The group (W&B's) of a
    sweep's jobs names the sweep: its experiment preset and the keys it varies, then its folder
    (`quickstart alg,seed 2026-12-06_18-52-10`); a single run's is its folder."""
    if not HydraConfig.initialized():
        return "run", Path(cfg.paths.output_dir).name, False
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_name = current_run_name()  # src/run_names.py: the overrides that vary, no noise keys
    group = Path(hc.sweep.dir if multirun else hc.run.dir).name
    if multirun:
        experiment = hc.runtime.choices.get("experiment")
        varying = ",".join(sorted(sweep_keys() or ()))
        group = " ".join(part for part in (experiment, varying, group) if part and part != "null")
    return run_name, group, multirun


def build_module(cfg: DictConfig, output_dir: Path) -> FederatedModule:
    """Data, partition, model, algorithm, aggregator and upload transforms from the config;
    seeded, so the same config builds the same federation and the same initial model. Every
    combination is checked here, before training."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    system = instantiate(cfg.system, _convert_="all") if "_target_" in cfg.system else None
    compression = instantiate(cfg.compression) if "_target_" in cfg.compression else None
    if system is not None:  # the devices: a trace is read (and checked) before any data
        system.configure(cfg.fl.num_clients, cfg.seed)
    log.info("loading data=%s", cfg.data.name)
    dataset = instantiate(cfg.data.loader)
    check_dataset_matches(cfg, dataset)
    partitioner = instantiate(cfg.partitioner)
    federation = Federation.build(dataset, partitioner, cfg.fl.num_clients, cfg.seed)
    log.info(
        "partition=%s: %d clients, %s train samples each (min %d)",
        cfg.partitioner.name,
        federation.num_clients,
        "/".join(str(n) for n in federation.summary["train_samples"][:8])
        + ("/..." if federation.num_clients > 8 else ""),
        min(federation.summary["train_samples"]),
    )
    algorithm = instantiate(cfg.alg, _convert_="all")
    check_client_optimizer(algorithm, cfg.optim)
    model = algorithm.prepare_model(build_base_model(cfg))
    algorithm.configure(federation, output_dir, cfg.seed)
    aggregator = instantiate(cfg.aggregator)
    server_optimizer = instantiate(cfg.server_opt, _convert_="all")
    spec = algorithm.shared_spec(model, cfg.fl.clients_per_round)
    check_aggregator(spec, aggregator, server_optimizer)
    attack = instantiate(cfg.attack)
    check_attack(attack, aggregator, federation.num_clients, federation.is_text)
    attack.choose(federation.num_clients, cfg.seed)
    check_evaluable(federation, attack.malicious, cfg.fl.eval_clients)
    if attack.malicious:
        log.info("attack=%s: malicious clients %s", attack.name, sorted(attack.malicious))
    faults = ClientFaults(**cfg.fault)
    privacy = build_privacy(cfg, spec, federation.num_clients, algorithm, aggregator)
    check_system(system, algorithm, privacy, spec, aggregator, cfg.fl.sampling)
    check_compression(compression, aggregator, privacy)
    server = Server(
        algorithm,
        aggregator,
        server_optimizer,
        postprocessors=[privacy] if privacy else [],  # privacy clips uploads, noises the aggregate
        reporters=[privacy] if privacy else [],
    )
    # system.policy=async (FedBuff): each update weighed by its staleness, last of the chain
    staleness = (
        StalenessWeight(server, system.staleness_exponent)
        if system is not None and system.policy == "async"
        else None
    )
    return FederatedModule(
        model=model,
        algorithm=algorithm,
        server=server,
        federation=federation,
        optimizer=instantiate(cfg.optim),
        rounds=cfg.fl.rounds,
        clients_per_round=cfg.fl.clients_per_round,
        local_epochs=cfg.fl.local_epochs,
        batch_size=cfg.fl.batch_size,
        eval_every=cfg.fl.eval_every,
        eval_batch_size=cfg.fl.eval_batch_size,
        seed=cfg.seed,
        recorder=RoundRecorder(output_dir / "metrics.csv"),
        client_recorder=ClientRecorder(output_dir / "clients.csv"),
        # compression before privacy: DP clips the decoded update the server sums
        transforms=TransformChain(
            [faults, attack, *(t for t in (compression, privacy, staleness) if t is not None)]
        ),
        malicious=attack.malicious,
        drop_client_errors=faults.on_error == "drop",
        parallel_clients=cfg.fl.get("parallel_clients", 1),
        sampling=cfg.fl.sampling,
        eval_clients=cfg.fl.eval_clients,
        store=ClientStateStore(
            memory_gb=cfg.fl.client_state_memory_gb, folder=output_dir / "client_state"
        ),
        system=system,
    )


def build_privacy(
    cfg: DictConfig, spec, num_clients: int, algorithm, aggregator
) -> DPFedAvg | None:
    """privacy=dp_fedavg (src/transforms/privacy.py), planned for this run; None for privacy=none."""
    node = cfg.get("privacy")
    if node is None or node.name == "none":
        return None
    privacy = instantiate(node)
    check_privacy(spec, privacy, algorithm, aggregator)
    privacy.plan(cfg.seed, num_clients, cfg.fl.clients_per_round, cfg.fl.rounds, spec)
    return privacy


def privacy_fields(module: FederatedModule) -> dict:
    """summary.json's `privacy`: the final epsilon and how it was reached (privacy=dp_fedavg)."""
    found = [t for t in module.transforms.transforms if isinstance(t, DPFedAvg)]
    return {"privacy": found[0].summary()} if found else {}


def writable_output_dir(cfg: DictConfig) -> Path:
    output_dir = Path(cfg.paths.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".fedsweep-write-test-{os.getpid()}"  # one per DDP process
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"paths.output_dir={output_dir} is not writable ({error.strerror}); "
            "point hydra.run.dir (or hydra.sweep.dir) at a folder you can write"
        ) from error
    return output_dir


class RoundProgressBar(RichProgressBar):
    """Lightning's progress bar, counting rounds from 1 as the log does (an epoch is a round)."""

    def _get_train_description(self, current_epoch: int) -> str:
        total = self.trainer.max_epochs
        return f"round {current_epoch + 1}" + (f"/{total}" if total is not None else "")


def build_trainer(cfg: DictConfig, **kwargs) -> pl.Trainer:
    """The Lightning Trainer of `cfg.trainer` (less `threads` and `processes`, fedsweep's own)."""
    node = OmegaConf.to_container(cfg.trainer, resolve=True)
    node.pop("threads", None)
    node.pop("processes", None)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:  # Lightning refuses the settings (no GPU, ...)
        if not isinstance(error.__cause__, MisconfigurationException):
            raise
        given = [k for k in ("accelerator", "devices", "strategy") if k in node]
        keys = " ".join(f"trainer.{k}={node[k]}" for k in given)
        raise ConfigError(
            f"{keys}: Lightning refuses them ({first_line(error.__cause__)})"
        ) from None


def set_threads(cfg: DictConfig) -> None:
    """torch's CPU threads from `trainer.threads` (src/threads.py), logged with the reason."""
    setting = cfg.trainer.get("threads", "auto")
    jobs = 1
    if HydraConfig.initialized():  # a local launcher that runs several jobs at once
        jobs = int(HydraConfig.get().launcher.get("n_jobs", 1) or 1)
    if cfg.trainer.get("accelerator") == "cpu" and isinstance(cfg.trainer.get("devices"), int):
        jobs *= cfg.trainer.devices  # trainer=ddp on CPU: one process per device
    threads, why = thread_count(setting, jobs)
    torch.set_num_threads(threads)
    log.info("%d CPU threads (%s; %s)", threads, why, wait_note())


def set_layout(cfg: DictConfig, module: FederatedModule) -> dict:
    """`trainer.processes` (src/engine/layout.py): logged with the reason; returns the Trainer's
    arguments for forked processes (none for one process)."""
    layout = layout_for(
        cfg.trainer, torch.get_num_threads(), cfg.fl.parallel_clients, cfg.fl.rounds, module
    )
    if layout is None:
        return {}
    log.info("layout: %s (%s)", layout.describe(), layout.why)
    torch.set_num_threads(layout.threads)
    if layout.processes == 1:
        return {}
    if layout.probed:
        module.layout = layout  # checked after the first round
    strategy = ClientShardingStrategy(process_group_backend="gloo", fork=True)
    return dict(accelerator="cpu", devices=layout.processes, strategy=strategy)


def train(cfg: DictConfig) -> dict:
    """Run one federated experiment; returns (and writes) its summary."""
    validate_config(cfg)
    set_threads(cfg)
    output_dir = writable_output_dir(cfg)
    run_name, group, _ = hydra_names(cfg)
    started = time.perf_counter()
    config = OmegaConf.to_container(cfg, resolve=True)
    resume_from = resume_path(str(cfg.resume), output_dir)
    saved = read_saved_run(resume_from) if resume_from else {}
    if resume_from:
        check_same_config(saved.get("config", {}), config, resume_from)

    module = build_module(cfg, output_dir)
    module.started = started  # wall time counts from here (plus a resumed run's earlier parts)
    module.run_config = config
    # a resumed run continues its W&B run; a new one gets its id now, kept in the checkpoints
    module.wandb_id = saved.get("wandb_id") or wandb_run_id()
    loggers = build_loggers(cfg, run_name, group, run_id=module.wandb_id)
    per_client = summary = None
    checkpoint = LastRoundCheckpoint(output_dir / "checkpoints", cfg.fl.checkpoint_every)
    fields = dict(run_name=run_name, rounds=cfg.fl.rounds, config=config)
    try:
        layout = set_layout(cfg, module)
        callbacks = [checkpoint]
        if cfg.trainer.get("enable_progress_bar", True):
            callbacks.append(RoundProgressBar())  # "round 3/20", as the log counts
        trainer = build_trainer(cfg, logger=loggers or False, callbacks=callbacks, **layout)
        if resume_from:
            log.info(
                "resuming from %s (%d of %d rounds done)",
                resume_from,
                saved.get("rounds_done", 0),
                cfg.fl.rounds,
            )
        log.info(
            "fitting alg=%s model=%s aggregator=%s for %d rounds on %s",
            cfg.alg.name,
            cfg.model.name,
            cfg.aggregator.name,
            cfg.fl.rounds,
            trainer.strategy.root_device,
        )
        # weights only: read_saved_run has already refused a checkpoint that holds anything else
        try:
            trainer.fit(module, ckpt_path=resume_from, weights_only=True)
        except (RunInterrupted, SIGTERMException) as stop:
            interrupted = (
                stop if isinstance(stop, RunInterrupted) else RunInterrupted("SIGTERM", 143)
            )
            kept = checkpoint.saved_round or saved.get("rounds_done", 0)
            if trainer.is_global_zero:
                write_summary(
                    output_dir / "summary.json",
                    status="interrupted",
                    signal=interrupted.signal_name,
                    rounds_done=kept,
                    dropped_clients=module.dropped,
                    **fields,
                )
            log.error(
                "interrupted by %s in round %d: checkpoints/last.ckpt holds %d completed rounds; "
                "run the same command to resume",
                interrupted.signal_name,
                module.current_epoch + 1,
                kept,
            )
            raise interrupted from None
        if not trainer.is_global_zero:  # under DDP, rank 0 writes the outputs
            return {}

        if cfg.export:
            folders = export_models(module, output_dir / "export")
            log.info("exported %d models to %s", len(folders), output_dir / "export")
        fed = module.federation
        malicious = module.evaluator.malicious
        per_client = [
            {
                "client": i,
                "train_samples": fed.summary["train_samples"][i],
                "test_samples": fed.summary["test_samples"][i],
                "label_histogram": fed.summary["label_histogram"][i],
                "personal_acc": acc,
                "malicious": i in malicious,
            }
            for i, acc in enumerate(module.per_client_acc)
        ]
        summary = write_summary(
            output_dir / "summary.json",
            status="completed",
            rounds_done=module.current_epoch,
            wall_time_s=module.wall_time_s(),  # with the parts before a resume
            cpu_threads=torch.get_num_threads(),  # float results depend on it (trainer.threads)
            total_bytes=module.total_bytes,
            **summarize(module.recorder.rows),
            dropped_clients=module.dropped,
            per_client=per_client,
            partition=fed.summary,
            malicious_clients=sorted(malicious),
            **privacy_fields(module),
            **fields,
        )
    finally:
        finish_wandb(loggers, per_client, summary, output_dir / "clients.csv")
        end_process_group()  # a sweep's next job starts its own

    final = summary["final"]
    log.info(
        "done in %.1fs: val/global_acc %.4f, val/personal_acc %.4f; results in %s",
        summary["wall_time_s"],
        final.get("val/global_acc", float("nan")),
        final.get("val/personal_acc", float("nan")),
        output_dir,
    )
    return summary


# an absolute config path: works for `python -m src.run` and when main() is called in-process
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    _, _, multirun = hydra_names(cfg)
    try:
        summary = train(cfg)
        if not summary:  # a DDP rank other than 0
            return None
    except RunInterrupted as stop:  # pre-emption: the whole sweep stops too
        sys.exit(stop.exit_code)
    except Exception as error:
        bad_input = user_error(error)
        if multirun:
            # In a sweep one failing job must not stop the others: record it and move on.
            if bad_input is None:
                log.exception("job failed: %s", error)
            else:
                log.error("job failed: %s", bad_input)
            reason = repr(bad_input or error)
            write_summary(
                Path(cfg.paths.output_dir) / "summary.json", status="failed", error=reason
            )
            return math.nan  # an optimising sweeper records a failed trial
        if bad_input is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", bad_input)  # bad input: one clear line, no traceback
        sys.exit(2)
    # what an optimising sweeper (hparams_search=optuna) maximises
    return summary["final"].get(cfg.optimized_metric, math.nan)


if __name__ == "__main__":
    main()
