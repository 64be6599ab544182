"""The federated LightningModule: one Lightning epoch is one federated round.

It only plumbs (docs/architecture.md): sample clients -> for each, the server's payload and the
client's private state go into the one resident model (`Algorithm.download`) -> local training
(`Algorithm.local_update`) -> the upload passes the transform chain (faults, attacks) -> the
server (algorithm's rule around the aggregator) -> evaluate -> log. Clients never get a Trainer
or a copy of the model.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torch.utils.data import DataLoader

from src.algorithms import Algorithm
from src.errors import AllClientsFailedError, RunInterrupted
from src.federated.checkpoint import portable_rng_states, restore_rng_states
from src.federated.client_loop import ClientLoop
from src.federated.client_state import ClientStateStore
from src.federated.data import Federation
from src.federated.distributed import Ranks, RoundExchange
from src.federated.evaluation import Evaluator
from src.federated.sampling import sample_clients
from src.federated.server import Server
from src.federated.transforms import TransformChain
from src.outputs import RoundRecorder

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
        transforms: TransformChain | None = None,
        malicious: set[int] | frozenset[int] = frozenset(),
        drop_client_errors: bool = False,
        parallel_clients: int | str = 1,  # fl.parallel_clients: a count or auto
        sampling: str = "uniform",  # fl.sampling: uniform | by_samples
        eval_clients: int | str = "all",  # fl.eval_clients: all or a count
    ):
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.algorithm = algorithm
        self.server = server
        self.federation = federation
        self.rounds = rounds
        self.clients_per_round = clients_per_round
        self.sampling = sampling
        self.eval_every = eval_every
        self.seed = seed
        self.recorder = recorder or RoundRecorder(None)
        self.transforms = transforms or TransformChain([])
        self.total_bytes = 0
        self.store = ClientStateStore()  # private tensors per client (personalised algorithms)
        self.client_loop = ClientLoop(
            model, algorithm, server, federation, self.store, self.transforms,
            optimizer, local_epochs, batch_size, seed, drop_client_errors, parallel_clients,
        )  # fmt: skip
        self.evaluator = Evaluator(self, eval_batch_size, malicious, eval_clients)
        self.dropped: list[dict] = []  # every dropped client: round, client, reason
        self._restored: dict = {}  # server and client state from a checkpoint, applied at set-up
        self._round_metrics: dict[str, float] = {}
        self.ranks = Ranks()  # one process until fitting under DDP starts
        self.run_config: dict = {}  # the resolved config, kept in checkpoints to check resumes
        self.wandb_id: str | None = None  # the W&B run a resumed run continues
        self.interrupt: str | None = None  # the signal that asked the run to stop

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
            self.recorder.path = None
        self._ensure_setup()
        # Ctrl+C stops at the next client boundary like SIGTERM (which Lightning flags for us)
        self._sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def on_fit_end(self) -> None:
        signal.signal(signal.SIGINT, self._sigint)

    def _on_sigint(self, signum, frame) -> None:
        signal.signal(signal.SIGINT, self._sigint)  # a second Ctrl+C stops at once
        self.interrupt = "SIGINT"

    def _check_interrupt(self) -> None:
        if self.interrupt is None and self._fitting() and self.trainer.received_sigterm:
            self.interrupt = "SIGTERM"
        if self.interrupt is not None:
            raise RunInterrupted(self.interrupt, 143 if self.interrupt == "SIGTERM" else 130)

    def _ensure_setup(self) -> None:
        """Data on the device, the server state and the clients' initial state (once)."""
        self.federation.to(self.device)
        if not self.server.ready:
            spec = self.algorithm.shared_spec(self.model, self.clients_per_round)
            self.server.setup(self.model, spec)
            self.store.pin_memory = self.device.type == "cuda"
            self.store.set_initial(self.algorithm.initial_private_state(self.model))
            if "server" in self._restored:
                self.server.load_state_dict(
                    move_data_to_device(self._restored["server"], self.device)
                )
            if "clients" in self._restored:
                self.store.load_state_dict(self._restored["clients"])

    # ----------------------------------------------------------------- one round
    def training_step(self, batch, batch_idx):
        started = time.perf_counter()
        round_idx = self.round
        self._check_interrupt()
        sampled = sample_clients(
            self.federation.num_clients, self.clients_per_round, self.seed, round_idx,
            weights=self.federation.summary["train_samples"] if self.sampling == "by_samples" else None,
        )  # fmt: skip
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
        done = self.client_loop.train_round(shard, round_idx, exchange, self.manual_backward, check)
        exchange.finish(sampled)
        served = self.federation.train.served_tokens - tokens_before
        totals = torch.tensor([*done.counts(), served], dtype=torch.float64, device=self.device)
        loss_sum, seen, *counts = self.ranks.sum_(totals).tolist()  # summed over the ranks
        failed, nonfinite, up_bytes, down_bytes, served = (int(n) for n in counts)
        dropped = self.ranks.gather(done.dropped)
        self.dropped += dropped
        if failed + nonfinite == len(training):
            who = "sampled clients" if len(training) == len(sampled) else "training clients"
            raise AllClientsFailedError(
                f"round {round_idx + 1}: all {len(training)} {who} failed (e.g. "
                f"client {dropped[0]['client']}: {dropped[0]['reason']}); the run stops, "
                "checkpoints/last.ckpt holds the last completed round"
            )

        self.total_bytes += up_bytes + down_bytes
        seconds = time.perf_counter() - started
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
        self.log("train/loss", self._round_metrics["train/loss"], prog_bar=True, logger=False)
        if not self._is_eval_round():
            self._emit(evaluated=False)

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
        for logger in self.loggers:
            logger.log_metrics(metrics, step=done)
        line = f"round {done}/{self.rounds}  train/loss {metrics['train/loss']:.4f}"
        if evaluated:
            self.recorder.record(done, metrics)
            shown = ("val/loss", "val/token_acc") if "val/ppl" in metrics else ("val/global_acc",)
            for key in (*shown, "val/personal_acc"):
                line += f"  {key} {metrics[key]:.4f}"
        seconds = f"{metrics['time/round_s']:.1f}s"
        if evaluated:  # training and evaluation: the time the round took in all
            seconds = f"train {seconds} + eval {metrics['time/eval_s']:.1f}s"
        log.info("%s  (%s)", line, seconds)

    def deployed_state(self, client_id: int) -> tuple[TensorDict, TensorDict]:
        """What client `client_id` deploys: the server's tensors for it and its private state."""
        return self.server.payload(client_id), self.store.load(client_id)

    def deploy(self, client_id: int | None) -> None:
        """Load client `client_id`'s deployed model (None: the global model) into the model."""
        if client_id is None:
            self.algorithm.download(self.model, self.server.payload(None), {}, None)
        else:
            self.algorithm.deploy(self.model, *self.deployed_state(client_id), client_id)

    # ----------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The whole federation besides the model weights (which Lightning saves)."""
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
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("fedsweep", {})
        self.total_bytes = state.get("total_bytes", 0)
        # applied once the server is set up (see _ensure_setup)
        self._restored = {key: state[key] for key in ("server", "clients") if key in state}
        self.recorder.rows = list(state.get("history", []))
        self.dropped = list(state.get("dropped", []))
        self.transforms.load_state_dict(state.get("transforms", {}))
        if "rng" in state:
            restore_rng_states(state["rng"])
