"""The federated LightningModule: one Lightning epoch is one federated round.

A round: sample clients -> for each, copy the global shared tensors into the one resident model
in place -> local training with a fresh client optimizer -> hand the upload to the aggregator ->
server step -> log. Clients never get a Trainer or a copy of the model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torch.utils.data import DataLoader

from src.aggregators import Aggregator, nbytes
from src.algorithms import Algorithm
from src.federated.data import Federation
from src.federated.sampling import client_generator, client_seed, sample_clients
from src.outputs import RoundRecorder

log = logging.getLogger(__name__)

TensorDict = dict[str, torch.Tensor]


class FederatedModule(pl.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        algorithm: Algorithm,
        aggregator: Aggregator,
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
    ):
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.algorithm = algorithm
        self.aggregator = aggregator
        self.federation = federation
        self.make_optimizer = optimizer
        self.rounds = rounds
        self.clients_per_round = clients_per_round
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.eval_every = eval_every
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.recorder = recorder or RoundRecorder(None)
        self.total_bytes = 0
        self._restored_aggregator: dict | None = None
        # per client, of the last evaluation (NaN for a client without local test data)
        self.per_client_acc: list[float] = []
        self._round_metrics: dict[str, float] = {}

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
    def round(self) -> int:
        """Rounds completed before the current one (0-based index of the running round)."""
        return self.current_epoch

    def on_fit_start(self) -> None:
        self._ensure_setup()

    def _ensure_setup(self) -> None:
        """Data on the device and the server state built from the model (once)."""
        self.federation.to(self.device)
        if self.aggregator.state is None:
            self.aggregator.setup(self.model, self.algorithm)
            if self._restored_aggregator is not None:
                self.aggregator.load_state_dict(self._restored_aggregator)

    # ----------------------------------------------------------------- one round
    def training_step(self, batch, batch_idx):
        started = time.perf_counter()
        round_idx = self.round
        sampled = sample_clients(
            self.federation.num_clients, self.clients_per_round, self.seed, round_idx
        )
        self.aggregator.begin()
        loss_sum, seen, dropped, up_bytes, down_bytes = 0.0, 0, 0, 0, 0
        for client_id in sampled:
            payload = self.aggregator.broadcast(client_id)
            down_bytes += self.aggregator.download_bytes(client_id, payload)
            upload, client_loss, client_seen = self._run_client(client_id, round_idx, payload)
            up_bytes += nbytes(upload)  # sent, even if the server then rejects it
            if not torch.stack([torch.isfinite(t).all() for t in upload.values()]).all():
                log.warning(
                    "round %d: client %d uploaded non-finite values; dropped",
                    round_idx + 1,
                    client_id,
                )
                dropped += 1
                continue
            weight = float(len(self.federation.clients[client_id].train))
            self.aggregator.add(upload, weight, client_id)
            loss_sum += client_loss
            seen += client_seen
        self.aggregator.finish()

        self.total_bytes += up_bytes + down_bytes
        self._round_metrics = {
            "train/loss": loss_sum / max(seen, 1),
            "comm/up_bytes": up_bytes,
            "comm/down_bytes": down_bytes,
            "comm/total_bytes": self.total_bytes,
            "clients/sampled": len(sampled),
            "clients/dropped": dropped,
            "time/round_s": time.perf_counter() - started,
        }
        self.log("train/loss", self._round_metrics["train/loss"], prog_bar=True, logger=False)
        if not self._is_eval_round():
            self._emit(evaluated=False)

    def _run_client(self, client_id: int, round_idx: int, payload: TensorDict):
        """Load the broadcast into the resident model, train locally; returns (upload, loss sum, samples).

        The upload holds views of the resident model: the aggregator reads (or copies) them
        before the next client overwrites the model.
        """
        # Seeded first: everything random on the client (a fresh LoRA init, batch order, dropout)
        # depends only on (seed, round, client), not on which clients ran before.
        generator = client_generator(client_seed(self.seed, round_idx, client_id), self.device)
        self.algorithm.download(self.model, payload, client_id)
        train_index = self.federation.clients[client_id].train
        batches = (
            batch
            for _ in range(self.local_epochs)
            for batch in self.federation.train.batches(train_index, self.batch_size, generator)
        )
        optimizer = self.make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        loss_sum, seen = self.algorithm.local_update(
            self.model, optimizer, batches, self.manual_backward
        )
        return self.algorithm.upload(self.model, client_id), loss_sum, seen

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
        with self.aggregator.global_model(self.model):
            metrics = self.evaluate()
        for key in ("val/global_acc", "val/personal_acc"):
            self.log(key, metrics[key], prog_bar=True, logger=False)
        if self._fitting():
            self._round_metrics.update(metrics)
            self._emit(evaluated=True)

    def _emit(self, evaluated: bool) -> None:
        """Send this round's metrics to the loggers; evaluated rounds also go to metrics.csv."""
        metrics, done = self._round_metrics, self.round + 1
        for logger in self.loggers:
            logger.log_metrics(metrics, step=done)
        line = f"round {done}/{self.rounds}  train/loss {metrics['train/loss']:.4f}"
        if evaluated:
            self.recorder.record(done, metrics)
            line += f"  val/global_acc {metrics['val/global_acc']:.4f}"
            line += f"  val/personal_acc {metrics['val/personal_acc']:.4f}"
        log.info("%s  (%.1fs)", line, metrics["time/round_s"])

    @torch.no_grad()
    def _predict(self, data, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (loss, correct) of the resident model on `data[index]`."""
        self.model.eval()
        losses, correct = [], []
        for images, labels in data.batches(index, self.eval_batch_size):
            logits = self.model(images)
            losses.append(F.cross_entropy(logits.float(), labels, reduction="none"))
            correct.append(logits.argmax(-1) == labels)
        if not losses:
            empty = torch.empty(0, device=self.device)
            return empty, empty.bool()
        return torch.cat(losses), torch.cat(correct)

    def evaluate(self) -> dict[str, float]:
        """Global model on the global test set; each client's deployed model on its local test split."""
        test = self.federation.test
        losses, correct = self._predict(test, torch.arange(len(test), device=self.device))
        metrics = {
            "val/global_acc": correct.float().mean().item(),
            "val/loss": losses.mean().item(),
        }

        # Non-personalised: every client deploys the global model, so one pass covers them all.
        clients = self.federation.clients
        index = torch.cat([c.test for c in clients])
        owner = torch.cat([torch.full_like(c.test, i) for i, c in enumerate(clients)])
        _, correct = self._predict(self.federation.train, index)
        counts = torch.bincount(owner, minlength=len(clients)).double()
        hits = torch.bincount(owner, weights=correct.double(), minlength=len(clients))
        has_test = counts > 0
        per_client = hits[has_test] / counts[has_test]
        metrics["val/personal_acc"] = (hits.sum() / counts.sum()).item()  # sample-weighted
        metrics["val/personal_acc_std"] = per_client.std(unbiased=False).item()
        self.per_client_acc = [
            (hits[i] / counts[i]).item() if has_test[i] else math.nan for i in range(len(clients))
        ]
        return metrics

    # ----------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["fedsweep"] = {
            "rounds_done": self.round + 1,
            "total_bytes": self.total_bytes,
            "aggregator": self.aggregator.state_dict(),
            "history": self.recorder.rows,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("fedsweep", {})
        self.total_bytes = state.get("total_bytes", 0)
        self._restored_aggregator = state.get("aggregator")  # applied once the server is set up
        self.recorder.rows = list(state.get("history", []))
