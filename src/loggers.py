"""Experiment loggers: W&B (offline unless logged in), or none (logger=csv, logger=none: the run
folder's metrics.csv, written by every run, only)."""

from __future__ import annotations

import csv
import json
import logging
import netrc
import os
import uuid
from pathlib import Path

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)


def wandb_logged_in() -> bool:
    """True when W&B credentials are present (WANDB_API_KEY or ~/.netrc); never asks the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _cell(value):
    """A W&B table cell: lists (a label histogram) as text."""
    return json.dumps(value) if isinstance(value, list) else value


def _number(text: str):
    """A clients.csv cell as W&B should chart it: an int or a float, None when empty, else the
    text (a dropped client's reason)."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def wandb_run_id() -> str:
    """A fresh W&B run id (8 lowercase letters and digits, like W&B's own)."""
    return uuid.uuid4().hex[:8]


def build_loggers(
    cfg: DictConfig, run_name: str, group: str, run_id: str | None = None
) -> list[Logger]:
    """The configured logger, built from its `_target_` (none for logger=none): its own keys
    (`name` is the option's, not an argument), the run's folder and, for W&B, this run's name,
    group, id, tags and config; `run_id`: the W&B run a resumed run continues."""
    node = cfg.logger
    if node.get("_target_") is None:
        return []
    keys = {key: node[key] for key in node if key not in ("_target_", "name")}
    keys["save_dir"] = str(cfg.paths.output_dir)  # the run's folder
    factory = get_method(node._target_)
    if factory is wandb_logger:
        keys |= dict(run_name=run_name, default_group=group, run_id=run_id, cfg=cfg)
    return [factory(**keys)]


class RoundWandbLogger(WandbLogger):
    """Lightning's WandbLogger whose charts use the logged `round` as their x-axis: W&B's own
    step counts log calls from 0, `round` is 1-based as metrics.csv."""

    _round_axis = False

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        if not self._round_axis:
            self.experiment.define_metric("round")
            self.experiment.define_metric("*", step_metric="round")
            self._round_axis = True
        super().log_metrics(metrics, step)


def wandb_logger(
    project: str,
    entity: str | None,
    mode: str | None,
    group: str | None,
    tags: list,
    *,
    save_dir: str,
    run_name: str,
    default_group: str,
    run_id: str | None,
    cfg: DictConfig,
) -> WandbLogger:
    """W&B through Lightning's WandbLogger: online when logged in (or `mode`), the run tagged
    with its algorithm, model, data, partitioner, aggregator and seed, and its whole config."""
    import wandb

    mode = mode or ("online" if wandb_logged_in() else "offline")
    tags = [
        cfg.alg.name,
        cfg.model.name,
        cfg.data.name,
        cfg.partitioner.name,
        cfg.aggregator.name,
        f"seed={cfg.seed}",
        *tags,
    ]
    return RoundWandbLogger(
        project=project,
        entity=entity,
        name=run_name,
        group=group or default_group,
        job_type=cfg.alg.name,  # W&B groups a sweep's runs by algorithm within the group
        tags=tags,
        save_dir=save_dir,
        mode=mode,
        config=OmegaConf.to_container(cfg, resolve=True),
        id=run_id,
        resume="allow",  # the run id is new, or the one a resumed run continues
        # no banner, run history or summary on the console (a sweep's job lines stay readable);
        # W&B's warnings and errors still show. finish_wandb says where an offline run is.
        settings=wandb.Settings(quiet=True, show_info=False),
    )


def finish_wandb(
    loggers: list[Logger],
    per_client: list[dict] | None = None,
    summary: dict | None = None,
    clients_csv: Path | None = None,
) -> None:
    """Put the final and best metrics and the total bytes into the run summary, with two tables:
    `clients` (one row per client: its data and final accuracy) and `client_rounds` (clients.csv:
    which clients were sampled, trained or dropped in each round, and their accuracy); close the
    W&B run (always) and say how to sync an offline run."""
    import wandb

    run = wandb.run
    if run is None:
        return
    wandb_loggers = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if summary:
        run.summary.update(
            {
                **{f"final/{k}": v for k, v in summary["final"].items() if k.startswith("val/")},
                **{
                    f"best/{k}": b["value"]
                    for k, b in summary["best"].items()
                    if k.startswith("val/")
                },
                "total_bytes": summary["total_bytes"],
                "rounds_done": summary["rounds_done"],
            }
        )
    if wandb_loggers and per_client:  # in the summary: a logged table would add a step
        columns = list(per_client[0])
        rows = [[_cell(row[c]) for c in columns] for row in per_client]
        run.summary["clients"] = wandb.Table(columns=columns, data=rows)
    if wandb_loggers and clients_csv is not None and clients_csv.exists():
        with clients_csv.open(newline="") as f:
            table = list(csv.reader(f))
        if len(table) > 1:
            columns, rows = table[0], [[_number(v) for v in row] for row in table[1:]]
            run.summary["client_rounds"] = wandb.Table(columns=columns, data=rows)
    run_dir, offline = Path(run.dir).parent, run.offline
    wandb.finish()
    if offline:
        log.info("W&B run saved offline in %s; upload it with: wandb sync %s", run_dir, run_dir)
