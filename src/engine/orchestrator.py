"""The federated LightningModule: one Lightning epoch is one federated round.

It only plumbs (docs/architecture.md): sample clients -> for each, the server's payload and the
client's private state go into the one resident model (`Algorithm.download`) -> local training
(`Algorithm.local_update`) -> the upload passes the transform chain (faults, attacks) -> the
server (algorithm's rule around the aggregator) -> evaluate -> log. Clients never get a Trainer
or a copy of the model.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torch.utils.data import DataLoader

from src.algorithms import Algorithm
from src.contract.objective import attention_kernels
from src.contract.ranks import Ranks
from src.engine.checkpoint import (
    check_same_frozen,
    frozen_fingerprint,
    frozen_source,
    portable_rng_states,
    restore_rng_states,
)
from src.engine.client_loop import ClientLoop
from src.engine.client_state import ClientStateStore
from src.engine.data import Federation
from src.engine.distributed import RoundExchange
from src.engine.evaluation import Evaluator
from src.engine.layout import Layout, check_after_round
from src.engine.schedule import Schedule
from src.engine.server import Server
from src.engine.system import SystemModel
from src.errors import AllClientsFailedError, RunInterrupted
from src.outputs import ClientRecorder, RoundRecorder
from src.transforms.chain import TransformChain

log = logging.getLogger(__name__)

TensorDict = dict[str, torch.Tensor]


class FederatedModule(pl.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        algorithm: Algorithm,
        server: Server,
        federation: Federation,
        optimizer: Callable[..., torch.optim.Optimizer],
        rounds: int,
        clients_per_round: int,
        local_epochs: int = 1,
        batch_size: int = 32,
        eval_every: int = 1,
        eval_batch_size: int = 512,
        seed: int = 0,
        recorder: RoundRecorder | None = None,
        client_recorder: ClientRecorder | None = None,
        transforms: TransformChain | None = None,
        malicious: set[int] | frozenset[int] = frozenset(),
        drop_client_errors: bool = False,
        parallel_clients: int | str = 1,  # fl.parallel_clients: a count or auto
        sampling: str = "uniform",  # fl.sampling: uniform | by_samples
        eval_clients: int | str = "all",  # fl.eval_clients: all or a count
        store: ClientStateStore | None = None,  # fl.client_state_memory_gb: one with a budget
        system: SystemModel | None = None,  # system=...: devices and simulated time (none: None)
    ):
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.algorithm = algorithm
        self.server = server
        self.federation = federation
        self.rounds = rounds
        self.clients_per_round = clients_per_round
        self.eval_every = eval_every
        self.seed = seed
        self.recorder = recorder or RoundRecorder(None)
        self.client_recorder = client_recorder or ClientRecorder(None)
        self.transforms = transforms or TransformChain([])
        self.total_bytes = 0
        self.started = time.perf_counter()  # src/run.py sets it to when the run began
        self.earlier_wall_s = 0.0  # seconds of the run before a resume (from the checkpoint)
        # private tensors per client (personalised algorithms)
        self.store = store if store is not None else ClientStateStore()
        # which clients train each round, and (system=...) the simulated clock
        self.schedule = Schedule(
            system, federation, server, clients_per_round, local_epochs, seed, sampling
        )
        if self.schedule.queue is not None:  # FedBuff's staleness weight, last of the chain
            self.schedule.staleness = self.transforms.transforms[-1]
        self.client_loop = ClientLoop(
            model, algorithm, server, federation, self.store, self.transforms,
            optimizer, local_epochs, batch_size, seed, drop_client_errors, parallel_clients,
            system=system,
        )  # fmt: skip
        self.evaluator = Evaluator(self, eval_batch_size, malicious, eval_clients)
        self.dropped: list[dict] = []  # every dropped client: round, client, reason
        self._restored: dict = {}  # server and client state from a checkpoint, applied at set-up
        self._round_metrics: dict[str, float] = {}
        self.ranks = Ranks()  # one process until fitting under DDP starts
        self.run_config: dict = {}  # the resolved config, kept in checkpoints to check resumes
        self.wandb_id: str | None = None  # the W&B run a resumed run continues
        self.interrupt: str | None = None  # the signal that asked the run to stop
        self.layout: Layout | None = None  # trainer.processes=auto's choice, checked in round 1
        self._frozen: dict | None = None  # the frozen weights' fingerprint, taken at fit start

    # ----------------------------------------------------------------- Lightning plumbing
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def configure_optimizers(self):
        return None  # each client builds its own optimizer every round

    def train_dataloader(self) -> DataLoader:
        return DataLoader([0])  # one "batch" per epoch = one round

    def val_dataloader(self) -> DataLoader:
        return DataLoader([0])

    @property
    def aggregator(self):
        """The configured aggregation rule (inside the server)."""
        return self.server.aggregator

    @aggregator.setter
    def aggregator(self, aggregator) -> None:
        self.server.aggregator = aggregator

    @property
    def round(self) -> int:
        """Rounds completed before the current one (0-based index of the running round)."""
        return self.current_epoch

    def on_fit_start(self) -> None:
        self.ranks = Ranks()  # the process group exists now (trainer=ddp)
        if not self.trainer.is_global_zero:  # only rank 0 writes files
            self.recorder.path = self.client_recorder.path = None
        self._ensure_setup()
        # Ctrl+C stops at the next client boundary (one process) or round boundary (DDP)
        self._sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def on_train_start(self) -> None:
        # SIGTERM (pre-emption) the same way. Lightning's own handler, installed just before this
        # hook, broadcasts to the other ranks from inside the handler: a collective that
        # interrupts the one in progress, and the ranks wait for each other forever. Here the
        # handler only flags; the ranks agree at the round boundary (`stop_asked`). Lightning
        # puts its predecessor back at teardown.
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_fit_end(self) -> None:
        signal.signal(signal.SIGINT, self._sigint)

    def _on_sigint(self, signum, frame) -> None:
        signal.signal(signal.SIGINT, self._sigint)  # a second Ctrl+C stops at once
        self.interrupt = "SIGINT"

    def _on_sigterm(self, signum, frame) -> None:
        if self.interrupt is None and self.trainer.is_global_zero:
            launcher = self.trainer.strategy.launcher  # the other local ranks get it too
            if launcher is not None:
                launcher.kill(signum)
        self.interrupt = self.interrupt or "SIGTERM"

    def stop_asked(self) -> bool:
        """Was a stop asked for (SIGTERM, Ctrl+C)? Under DDP a collective: every rank answers yes
        if one was asked (a signal reaches the ranks at slightly different times, and a rank
        that went on alone would wait for the others forever). Called by every rank at the same
        points: the end of a round (the checkpoint callback) and the start of the next."""
        if self.interrupt is None and self._fitting() and self.trainer.received_sigterm:
            self.interrupt = "SIGTERM"
        if self.ranks.distributed:
            asked = torch.tensor([float(self.interrupt is not None)], device=self.device)
            if self.ranks.sum_(asked).item() > 0 and self.interrupt is None:
                self.interrupt = "SIGTERM"
        return self.interrupt is not None

    def _check_interrupt(self) -> None:
        """Raise RunInterrupted if a stop was asked for: at the start of a round (every rank),
        and between the clients of one process."""
        if self.stop_asked():
            raise RunInterrupted(self.interrupt, 143 if self.interrupt == "SIGTERM" else 130)

    def _ensure_setup(self) -> None:
        """Data on the device, the server state and the clients' initial state (once)."""
        self.federation.to(self.device)
        if not self.server.ready:
            spec = self.algorithm.shared_spec(self.model, self.clients_per_round)
            self.server.setup(self.model, spec)
            self.store.pin_memory = self.device.type == "cuda"
            self.store.use_rank(self.ranks.rank)  # DDP: each rank spills to its own folder
            self.store.set_initial(self.algorithm.initial_private_state(self.model))
            if "server" in self._restored:
                self.server.load_state_dict(
                    move_data_to_device(self._restored["server"], self.device)
                )
            if "clients" in self._restored:
                self.store.load_state_dict(self._restored["clients"])
            if "schedule" in self._restored:
                self.schedule.load_state_dict(self._restored["schedule"], self.device)

    # ----------------------------------------------------------------- one round
    def training_step(self, batch, batch_idx):
        started = time.perf_counter()
        round_idx = self.round
        self._check_interrupt()  # every rank, so that all stop at the same round
        sampled, planned_drops = self.schedule.clients(round_idx)
        training = list(sampled)
        if self.algorithm.trains_unsampled:  # all train; the sampled ones are aggregated
            chosen = set(sampled)
            training += [c for c in range(self.federation.num_clients) if c not in chosen]
        # under DDP each rank trains its share of the clients (all of them in one process)
        clients = self.federation.clients
        shard = self.ranks.shard(training, [len(clients[c].train) for c in training])
        self.server.begin(round_idx)
        exchange = RoundExchange(self.server, self.store, self.ranks, self.device, sampled)
        self.transforms.begin_round(training, self.seed, round_idx)
        tokens_before = self.federation.train.served_tokens
        # under DDP every rank stops at the round's end, not between its clients
        check = (lambda: None) if self.ranks.distributed else self._check_interrupt
        samples_before, loop_started = self.federation.train.served_samples, time.perf_counter()
        with attention_kernels(self.device):
            done = self.client_loop.train_round(
                shard, round_idx, exchange, self.manual_backward, check, self.schedule.downloads
            )
        loop_s = time.perf_counter() - loop_started
        samples = self.federation.train.served_samples - samples_before
        exchange.finish(sampled)
        served = self.federation.train.served_tokens - tokens_before
        totals = torch.tensor(
            [*done.counts(), served, samples], dtype=torch.float64, device=self.device
        )
        loss_sum, seen, *counts = self.ranks.sum_(totals).tolist()  # summed over the ranks
        failed, nonfinite, late, up_bytes, down_bytes, served, samples = (int(n) for n in counts)
        dropped = planned_drops + self.ranks.gather(done.dropped)
        self.dropped += dropped
        self._round_clients = (sampled, training, {d["client"]: d["reason"] for d in dropped})
        if training and failed + nonfinite == len(training):
            who = "sampled clients" if len(training) == len(sampled) else "training clients"
            raise AllClientsFailedError(
                f"round {round_idx + 1}: all {len(training)} {who} failed (e.g. "
                f"client {dropped[0]['client']}: {dropped[0]['reason']}); the run stops, "
                "checkpoints/last.ckpt holds the last completed round"
            )

        self.total_bytes += up_bytes + down_bytes
        seconds = time.perf_counter() - started
        if self.layout is not None:
            self._check_layout(seconds, loop_s, samples)
        self.client_loop.check_group_size(loop_s, samples)
        self._round_metrics = {
            "train/loss": loss_sum / max(seen, 1),
            "comm/up_bytes": up_bytes,
            "comm/down_bytes": down_bytes,
            "comm/total_bytes": self.total_bytes,
            "clients/sampled": len(sampled),
            "clients/dropped": failed,
            "clients/nonfinite": nonfinite,
            **self.server.round_metrics(),
            "time/round_s": seconds,
        }
        if served:  # text
            self._round_metrics["train/tokens_per_s"] = served / seconds
        arrivals = self.ranks.gather(done.arrivals) if self.schedule.system else []
        self._round_metrics |= self.schedule.finish(arrivals, late, len(planned_drops))
        self.log("train/loss", self._round_metrics["train/loss"], prog_bar=True, logger=False)
        if not self._is_eval_round():
            self._emit(evaluated=False)

    def _check_layout(self, round_s: float, loop_s: float, samples: int) -> None:
        """After the first round with the processes trainer.processes=auto chose: back to one
        process with every core as a thread if they lost (src/engine/layout.py). Every rank reaches the
        same decision from the same summed numbers."""
        layout, self.layout = self.layout, None  # checked once
        if layout.processes == 1 or not self.ranks.distributed:
            return
        times = torch.zeros(self.ranks.size + 1, dtype=torch.float64, device=self.device)
        times[self.ranks.rank] = loop_s
        if self.ranks.rank == 0:
            times[-1] = round_s
        *loops, round_s = self.ranks.sum_(times).tolist()
        fall_back, why = check_after_round(layout, round_s, max(loops), samples)
        if fall_back:
            self.ranks.first_trains_all = True
            if self.ranks.rank == 0:  # not forked: its OpenMP threads are safe
                torch.set_num_threads(layout.cores)
        log.info(
            "layout check: %s: %s", why,
            f"1 process x {layout.cores} threads trains from round 2 on" if fall_back else "kept",
        )  # fmt: skip

    # ----------------------------------------------------------------- evaluation
    def _fitting(self) -> bool:
        return self.trainer.state.fn == TrainerFn.FITTING

    def _is_eval_round(self) -> bool:
        if not self._fitting():  # trainer.validate(): always evaluate
            return True
        done = self.round + 1
        return done % self.eval_every == 0 or done == self.rounds

    def validation_step(self, batch, batch_idx):
        if not self._is_eval_round():
            return
        self._ensure_setup()  # also for trainer.validate() on a fresh module
        started = time.perf_counter()
        with attention_kernels(self.device):
            metrics = self.evaluator.evaluate()
        metrics["time/eval_s"] = time.perf_counter() - started
        for key in ("val/global_acc", "val/personal_acc"):
            self.log(key, metrics[key], prog_bar=True, logger=False)
        if self._fitting():
            self._round_metrics.update(metrics)
            self._emit(evaluated=True)

    @property
    def per_client_acc(self) -> list[float]:
        return self.evaluator.per_client_acc

    def _emit(self, evaluated: bool) -> None:
        """Send this round's metrics to the loggers; evaluated rounds also go to metrics.csv."""
        metrics, done = self._round_metrics, self.round + 1
        for logger in self.loggers:  # `round` too: W&B charts against it (src/loggers.py)
            logger.log_metrics({"round": done, **metrics}, step=done)
        line = f"round {done}/{self.rounds}  train/loss {metrics['train/loss']:.4f}"
        self.client_recorder.record(self._client_rows(done, evaluated))
        if evaluated:
            self.recorder.record(done, metrics)
            shown = ("val/loss", "val/token_acc") if "val/ppl" in metrics else ("val/global_acc",)
            for key in (*shown, "val/personal_acc"):
                line += f"  {key} {metrics[key]:.4f}"
        seconds = f"{metrics['time/round_s']:.1f}s"
        if evaluated:  # training and evaluation: the time the round took in all
            seconds = f"train {seconds} + eval {metrics['time/eval_s']:.1f}s"
        log.info("%s  (%s)", line, seconds)

    def _client_rows(self, done: int, evaluated: bool) -> list[dict]:
        """clients.csv's rows of round `done`: the clients that trained, and in an evaluated
        round also every client scored (val/personal_acc's clients)."""
        sampled, training, dropped = self._round_clients
        sampled = set(sampled)
        accuracy = self.per_client_acc if evaluated else []
        scored = {c for c, acc in enumerate(accuracy) if not math.isnan(acc)}
        sizes = self.federation.summary["train_samples"]
        malicious = self.evaluator.malicious
        return [
            {
                "round": done,
                "client": c,
                "sampled": int(c in sampled),
                "trained": int(c in training),
                "dropped": dropped.get(c, ""),
                "malicious": int(c in malicious),
                "train_samples": sizes[c],
                "personal_acc": f"{accuracy[c]:.6g}" if c in scored else "",
            }
            for c in sorted(set(training) | scored)
        ]

    def deployed_state(self, client_id: int) -> tuple[TensorDict, TensorDict]:
        """What client `client_id` deploys: the server's tensors for it and its private state."""
        return self.server.payload(client_id), self.store.load(client_id)

    def deploy(self, client_id: int | None) -> None:
        """Load client `client_id`'s deployed model (None: the global model) into the model."""
        if client_id is None:
            self.algorithm.deploy(self.model, self.server.payload(None), {}, None)
        else:
            self.algorithm.deploy(self.model, *self.deployed_state(client_id), client_id)

    # ----------------------------------------------------------------- checkpoint
    def setup(self, stage: str) -> None:
        if stage == "fit":  # before a checkpoint is restored into the model or a round changes it
            self._frozen_weights()

    def _frozen_weights(self) -> dict:
        """The fingerprint of the parameters that nothing trains, as the model was built: neither
        requires_grad nor named by the algorithm as shared or private (RoLoRA freezes a factor
        it shares in alternate rounds). Computed once (seconds for 0.5 B parameters)."""
        if self._frozen is None:
            declared = set(self.algorithm.shared_names(self.model))
            declared |= set(self.algorithm.private_names(self.model))
            frozen = {
                id(p)
                for name, p in self.model.named_parameters()
                if not p.requires_grad and name not in declared
            }
            # by identity: a tied weight is in the state dict under each of its names
            tensors = {n: t for n, t in self.state_dict(keep_vars=True).items() if id(t) in frozen}
            self._frozen = frozen_fingerprint(tensors, frozen_source(self.run_config))
        return self._frozen

    def wall_time_s(self) -> float:
        """Seconds this run has taken: this process's part since `started` and, after a resume,
        the parts before it (the time between them is not counted)."""
        return self.earlier_wall_s + (time.perf_counter() - self.started)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The whole federation besides the model weights (which Lightning saves), and of those
        only the ones that change: the frozen ones are replaced by their fingerprint."""
        checkpoint["fedsweep"] = {
            "rounds_done": self.round + 1,
            "total_bytes": self.total_bytes,
            "server": self.server.state_dict(),
            "clients": self.store.state_dict(),
            "history": self.recorder.rows,
            "dropped": self.dropped,
            "transforms": self.transforms.state_dict(),
            "rng": portable_rng_states(),
            "config": self.run_config,
            "wandb_id": self.wandb_id,
            "wall_time_s": self.wall_time_s(),
            "schedule": self.schedule.state_dict(),
        }
        frozen = self._frozen  # None outside fit: the whole model, as before
        if frozen is not None and frozen["names"]:
            # a base weight the server changes (stack, exact) is in the server state, and every
            # download loads it: its copy here would be overwritten before any use
            for name in frozen["names"]:
                del checkpoint["state_dict"][name]
            checkpoint["fedsweep"]["frozen"] = frozen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("fedsweep", {})
        if "frozen" in state:  # else an older checkpoint, or nothing frozen: the whole model
            current = self._frozen_weights()  # the rebuilt model's, not loaded into yet
            path = self._trainer.ckpt_path if self._trainer is not None else "<checkpoint>"
            check_same_frozen(state["frozen"], current, path)
            tensors = self.state_dict()
            # back in, so that Lightning's strict load of the state dict works unchanged
            checkpoint["state_dict"].update({n: tensors[n] for n in state["frozen"]["names"]})
        self.total_bytes = state.get("total_bytes", 0)
        self.earlier_wall_s = float(state.get("wall_time_s", 0.0))  # the run's earlier parts
        # applied once the server is set up (see _ensure_setup)
        self._restored = {key: state[key] for key in ("server", "clients") if key in state}
        if "schedule" in state:
            self._restored["schedule"] = state["schedule"]
        self.recorder.rows = list(state.get("history", []))
        if self._trainer is None or self._trainer.is_global_zero:  # rank 0 writes the files
            path = getattr(self._trainer, "ckpt_path", None)
            source = Path(path).parent.parent / "clients.csv" if path else None
            self.client_recorder.keep_rounds(state.get("rounds_done", 0), source)
        self.dropped = list(state.get("dropped", []))
        self.transforms.load_state_dict(state.get("transforms", {}))
        if "rng" in state:
            restore_rng_states(state["rng"])
