"""The federated LightningModule: one Lightning epoch is one federated round.

A round: sample clients -> for each, copy the global shared tensors and the client's private
state (from the client state store) into the one resident model in place -> local training with a
fresh client optimizer -> hand the upload to the aggregator, keep the private state -> server step
-> log. Clients never get a Trainer or a copy of the model.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torch.utils.data import DataLoader

from src.aggregators import Aggregator, nbytes
from src.algorithms import Algorithm
from src.errors import AllClientsFailedError
from src.federated.attacks import Attack
from src.federated.client_state import ClientStateStore
from src.federated.data import Federation
from src.federated.distributed import Ranks, RoundExchange
from src.federated.faults import ClientFaults
from src.federated.objective import score
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
        attack: Attack | None = None,
        faults: ClientFaults | None = None,
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
        self.attack = attack or Attack()
        self.faults = faults or ClientFaults()
        self.total_bytes = 0
        self.store = ClientStateStore()  # private tensors per client (personalised algorithms)
        self._restored: dict = {}  # server and client state from a checkpoint, applied at set-up
        # per client, of the last evaluation (NaN for a client without local test data)
        self.per_client_acc: list[float] = []
        self._round_metrics: dict[str, float] = {}
        self.ranks = Ranks()  # one process until fitting under DDP starts
        self.run_config: dict = {}  # the resolved config, kept in checkpoints to check resumes
        self.wandb_id: str | None = None  # the W&B run a resumed run continues

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
        self.ranks = Ranks()  # the process group exists now (trainer=ddp)
        if not self.trainer.is_global_zero:  # only rank 0 writes files
            self.recorder.path = None
            self.aggregator.output_dir = None
        self._ensure_setup()

    def _ensure_setup(self) -> None:
        """Data on the device, the server state and the clients' initial state (once)."""
        self.federation.to(self.device)
        if self.aggregator.state is None:
            self.aggregator.setup(self.model, self.algorithm)
            self.store.pin_memory = self.device.type == "cuda"
            self.store.set_initial(self.algorithm.private_state(self.model, None))
            if "aggregator" in self._restored:
                server = move_data_to_device(self._restored["aggregator"], self.device)
                self.aggregator.load_state_dict(server)
            if "clients" in self._restored:
                self.store.load_state_dict(self._restored["clients"])

    # ----------------------------------------------------------------- one round
    def training_step(self, batch, batch_idx):
        started = time.perf_counter()
        round_idx = self.round
        sampled = sample_clients(
            self.federation.num_clients, self.clients_per_round, self.seed, round_idx
        )
        # under DDP each rank trains its share of the clients (all of them in one process)
        clients = self.federation.clients
        mine = self.ranks.shard(sampled, [len(clients[c].train) for c in sampled])
        self.aggregator.begin(round_idx)
        exchange = RoundExchange(self.aggregator, self.store, self.ranks, self.device)
        self.faults.plan(sampled, self.seed, round_idx)
        tokens_before = getattr(self.federation.train, "served_tokens", 0)  # text only
        loss_sum, seen, up_bytes, down_bytes, failures = self._train_clients(
            mine, round_idx, exchange
        )
        exchange.finish(sampled)
        served = getattr(self.federation.train, "served_tokens", 0) - tokens_before
        totals = torch.tensor(  # summed over the ranks (one process: as they are)
            [loss_sum, seen, len(failures), up_bytes, down_bytes, served],
            dtype=torch.float64,
            device=self.device,
        )
        loss_sum, seen, *counts = self.ranks.sum_(totals).tolist()
        dropped, up_bytes, down_bytes, served = (int(n) for n in counts)
        if dropped == len(sampled):
            raise AllClientsFailedError(
                f"round {round_idx + 1}: all {dropped} sampled clients failed (e.g. "
                f"{failures[0] if failures else 'on another rank'}); the run stops, "
                "checkpoints/last.ckpt holds the last completed round"
            )

        self.total_bytes += up_bytes + down_bytes
        self._round_metrics = {
            "train/loss": loss_sum / max(seen, 1),
            "comm/up_bytes": up_bytes,
            "comm/down_bytes": down_bytes,
            "comm/total_bytes": self.total_bytes,
            "clients/sampled": len(sampled),
            "clients/dropped": dropped,
            **self.aggregator.round_metrics(),
            "time/round_s": time.perf_counter() - started,
        }
        if self.federation.is_text:
            self._round_metrics["train/tokens_per_s"] = served / self._round_metrics["time/round_s"]
        self.log("train/loss", self._round_metrics["train/loss"], prog_bar=True, logger=False)
        if not self._is_eval_round():
            self._emit(evaluated=False)

    def _train_clients(self, clients: list[int], round_idx: int, exchange: RoundExchange):
        """Train `clients` one after the other, handing each result to `exchange`; a client that
        raises or uploads non-finite values is dropped (it keeps its previous private state).
        Returns (loss sum, targets seen, up bytes, down bytes, one reason per dropped client)."""
        loss_sum, seen, up_bytes, down_bytes, failures = 0.0, 0, 0, 0, []
        for client_id in clients:
            payload = self.aggregator.broadcast(client_id)
            down_bytes += self.aggregator.download_bytes(client_id, payload)
            try:
                upload, client_loss, client_seen = self._run_client(client_id, round_idx, payload)
            except Exception as error:  # a crashed client is dropped; the round goes on
                failures.append(f"client {client_id}: {type(error).__name__}: {error}")
                log.warning("round %d: %s; dropped", round_idx + 1, failures[-1])
                continue
            up_bytes += nbytes(upload)  # sent, even if the server then rejects it
            if not torch.stack([torch.isfinite(t).all() for t in upload.values()]).all():
                failures.append(f"client {client_id} uploaded non-finite values")
                log.warning("round %d: %s; dropped", round_idx + 1, failures[-1])
                continue
            private = (
                self.algorithm.private_state(self.model, client_id)
                if self.algorithm.personalized
                else None
            )
            weight = float(len(self.federation.clients[client_id].train))
            exchange.add(client_id, upload, weight, private)
            loss_sum += client_loss
            seen += client_seen
        return loss_sum, seen, up_bytes, down_bytes, failures

    def _run_client(self, client_id: int, round_idx: int, payload: TensorDict):
        """Load the broadcast into the resident model, train locally; returns (upload, loss sum, samples).

        The upload holds views of the resident model: the aggregator reads (or copies) them
        before the next client overwrites the model.
        """
        # Seeded first: everything random on the client (a fresh LoRA init, batch order, dropout)
        # depends only on (seed, round, client), not on which clients ran before.
        generator = client_generator(client_seed(self.seed, round_idx, client_id), self.device)
        self.algorithm.download(self.model, payload | self.store.load(client_id), client_id)
        self.faults.before_training(client_id)
        train_index = self.federation.clients[client_id].train
        steps = self.algorithm.local_steps  # None: fl.local_epochs passes over the data
        batches = itertools.islice(
            (
                batch
                for _ in (range(self.local_epochs) if steps is None else itertools.count())
                for batch in self.federation.train.batches(train_index, self.batch_size, generator)
            ),
            steps,
        )
        label_map = self.attack.label_map(client_id, self.federation.num_classes)
        if label_map is not None:  # a label-flipping client
            label_map = label_map.to(self.device)
            batches = ((images, label_map[labels]) for images, labels in batches)
        optimizer = self.make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        loss_sum, seen = self.algorithm.local_update(
            self.model, optimizer, batches, self.manual_backward
        )
        upload = self.faults.after_training(client_id, self.algorithm.upload(self.model, client_id))
        return self.attack.corrupt(client_id, upload, payload, generator), loss_sum, seen

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
            shown = (
                ("val/loss", "val/token_acc") if self.federation.is_text else ("val/global_acc",)
            )
            for key in (*shown, "val/personal_acc"):
                line += f"  {key} {metrics[key]:.4f}"
        log.info("%s  (%.1fs)", line, metrics["time/round_s"])

    @torch.no_grad()
    def _predict(self, data, index: torch.Tensor):
        """Per sample of `data[index]`, for the resident model: (summed loss, correct predictions,
        counted targets); a sample is one target for images, its response tokens for text."""
        self.model.eval()
        parts = [
            score(self.model(inputs), targets)
            for inputs, targets in data.batches(index, data.eval_batch_size(self.eval_batch_size))
        ]
        if not parts:
            empty = torch.empty(0, device=self.device)
            return empty, empty.long(), empty.long()
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))

    def deployed_state(self, client_id: int) -> TensorDict:
        """What client `client_id` deploys: the server's tensors for it and its private state."""
        return self.aggregator.broadcast(client_id) | self.store.load(client_id)

    def evaluate(self) -> dict[str, float]:
        """val/global_acc and val/loss on the global test set; val/personal_acc (target-weighted
        over all clients, with its std, unweighted mean and 10th percentile) of each client's
        deployed model on its own local test split. Accuracy is per sample for images and per
        response token for text (which also gets val/ppl and val/token_acc)."""
        if self.algorithm.personalized:
            metrics, hits, counts = self._evaluate_personal_models()
        else:
            with self.aggregator.global_model(self.model):
                metrics, hits, counts = self._evaluate_global_model()
        if self.federation.is_text:
            metrics["val/ppl"] = math.exp(min(metrics["val/loss"], 50.0))
            metrics["val/token_acc"] = metrics["val/global_acc"]
        for client_id in self.attack.malicious:  # only honest clients are evaluated
            hits[client_id] = counts[client_id] = 0
        has_test = counts > 0
        per_client = hits[has_test] / counts[has_test]
        metrics["val/personal_acc"] = (hits.sum() / counts.sum()).item()
        metrics["val/personal_acc_std"] = per_client.std(unbiased=False).item()
        metrics["val/personal_acc_unweighted"] = per_client.mean().item()
        metrics["val/personal_acc_p10"] = torch.quantile(per_client, 0.1).item()  # the worst-off
        self.per_client_acc = [
            (hits[i] / counts[i]).item() if has_test[i] else math.nan for i in range(len(counts))
        ]
        return metrics

    @staticmethod
    def _global_metrics(losses, correct, counts) -> dict[str, float]:
        total = counts.sum().clamp(min=1).double()
        return {
            "val/global_acc": (correct.sum() / total).item(),
            "val/loss": (losses.double().sum() / total).item(),
        }

    def _evaluate_global_model(self):
        """Every client deploys the global model, so one pass over all local test splits."""
        test = self.federation.test
        metrics = self._global_metrics(
            *self._predict(test, torch.arange(len(test), device=self.device))
        )
        clients = self.federation.clients
        index = torch.cat([c.test for c in clients])
        owner = torch.cat([torch.full_like(c.test, i) for i, c in enumerate(clients)])
        _, correct, counted = self._predict(self.federation.train, index)
        counts = torch.bincount(owner, weights=counted.double(), minlength=len(clients))
        hits = torch.bincount(owner, weights=correct.double(), minlength=len(clients))
        return metrics, hits.cpu(), counts.cpu()

    def _evaluate_personal_models(self):
        """Client by client: load its deployed model, score its local test split and its share of
        the global test set. The global test set is cut into one fixed random share per client, so
        val/global_acc (how well the personal models do on the whole distribution, averaged over
        clients) costs one pass over the test set, not one per client. Under DDP each rank scores
        its share of the clients and the sums are combined."""
        test, clients = self.federation.test, self.federation.clients
        shares = self._global_test_shares()
        hits = torch.zeros(len(clients), dtype=torch.float64, device=self.device)
        counts = torch.zeros(len(clients), dtype=torch.float64, device=self.device)
        # summed loss, correct and counted targets of the personal models on the global test set
        on_global = torch.zeros(3, dtype=torch.float64, device=self.device)
        mine = self.ranks.shard(list(range(len(clients))), [len(c.test) for c in clients])
        for client_id in mine:
            self.algorithm.download(self.model, self.deployed_state(client_id), client_id)
            _, correct, counted = self._predict(self.federation.train, clients[client_id].test)
            hits[client_id], counts[client_id] = correct.sum(), counted.sum()
            on_global += torch.stack(
                [part.double().sum() for part in self._predict(test, shares[client_id])]
            )
        for total in (hits, counts, on_global):
            self.ranks.sum_(total)
        metrics = self._global_metrics(*on_global.unsqueeze(1))
        return metrics, hits.cpu(), counts.cpu()

    def _global_test_shares(self) -> list[torch.Tensor]:
        order = torch.randperm(
            len(self.federation.test), generator=torch.Generator().manual_seed(self.seed)
        )
        return [share.to(self.device) for share in order.tensor_split(self.federation.num_clients)]

    # ----------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The whole federation besides the model weights (which Lightning saves)."""
        checkpoint["fedsweep"] = {
            "rounds_done": self.round + 1,
            "total_bytes": self.total_bytes,
            "aggregator": self.aggregator.state_dict(),
            "clients": self.store.state_dict(),
            "history": self.recorder.rows,
            "malicious": sorted(self.attack.malicious),
            "rng": _collect_rng_states(),
            "config": self.run_config,
            "wandb_id": self.wandb_id,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("fedsweep", {})
        self.total_bytes = state.get("total_bytes", 0)
        # applied once the server is set up (see _ensure_setup)
        self._restored = {key: state[key] for key in ("aggregator", "clients") if key in state}
        self.recorder.rows = list(state.get("history", []))
        if "malicious" in state:
            self.attack.malicious = set(state["malicious"])
        if "rng" in state:
            _set_rng_states(state["rng"])
