"""One round's client work on the one resident model: for each client of this DDP rank, load what
the server sent and its private state (`Algorithm.download`), train (`Algorithm.local_update`),
pass the upload through the transform chain and hand it to the round's exchange.

A client that raises an injected fault (or any error, with fault.on_error=drop) is dropped and
counted; any other error is a bug and stops the run (`ClientError`). A non-finite upload is
dropped and counted apart (`clients/nonfinite`): robustness, not a bug.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from src.aggregators import nbytes
from src.algorithms import Algorithm
from src.algorithms.base import ClientRun
from src.errors import ClientError
from src.federated.client_state import ClientStateStore
from src.federated.data import Federation
from src.federated.distributed import RoundExchange
from src.federated.sampling import client_generator, client_seed
from src.federated.server import Server
from src.federated.transforms import InjectedFault, TransformChain

log = logging.getLogger(__name__)

TensorDict = dict[str, torch.Tensor]


@dataclass
class RoundTotals:
    """What one rank's clients did in a round (summed over the ranks by the orchestrator)."""

    loss_sum: float = 0.0  # sum of per-target training losses
    seen: int = 0  # targets trained on: samples, or response tokens for text
    failed: int = 0  # clients that raised and were dropped
    nonfinite: int = 0  # clients whose upload was not finite
    up_bytes: int = 0
    down_bytes: int = 0
    dropped: list[dict] = field(default_factory=list)  # round, client, reason

    def counts(self) -> list[float]:
        return [
            self.loss_sum,
            self.seen,
            self.failed,
            self.nonfinite,
            self.up_bytes,
            self.down_bytes,
        ]


@dataclass
class ClientLoop:
    model: nn.Module
    algorithm: Algorithm
    server: Server
    federation: Federation
    store: ClientStateStore
    transforms: TransformChain
    make_optimizer: Callable[..., torch.optim.Optimizer]
    local_epochs: int
    batch_size: int
    seed: int
    drop_client_errors: bool  # fault.on_error=drop

    def train_round(
        self,
        clients: list[int],
        round_idx: int,
        exchange: RoundExchange,
        backward: Callable[[torch.Tensor], None],
        check_interrupt: Callable[[], None],
    ) -> RoundTotals:
        """Train `clients` one after the other, handing each upload to `exchange`;
        `check_interrupt` runs before each client (it raises when a stop was asked for)."""
        totals = RoundTotals()

        def drop(client_id: int, reason: str) -> None:
            totals.dropped.append({"round": round_idx + 1, "client": client_id, "reason": reason})
            log.warning("round %d: client %d %s; dropped", round_idx + 1, client_id, reason)

        for client_id in clients:
            check_interrupt()
            payload = self.server.payload(client_id)
            totals.down_bytes += self.server.download_bytes(client_id, payload)
            try:
                upload, loss_sum, seen = self.run_client(client_id, round_idx, payload, backward)
            except InjectedFault as fault:
                totals.failed += 1
                drop(client_id, f"raised {fault}")
                continue
            except Exception as error:  # a bug: stop, unless the user asked for tolerance
                if not self.drop_client_errors:
                    raise ClientError(
                        f"round {round_idx + 1}: client {client_id} raised "
                        f"{type(error).__name__}: {error} (fault.on_error=drop drops such "
                        "clients instead)"
                    ) from error
                totals.failed += 1
                drop(client_id, f"raised {type(error).__name__}: {error}")
                continue
            totals.up_bytes += nbytes(upload)  # sent, even if the server then rejects it
            if not torch.stack([torch.isfinite(t).all() for t in upload.values()]).all():
                totals.nonfinite += 1
                drop(client_id, "uploaded non-finite values")
                continue
            private = self.algorithm.private_state(self.model, client_id) or None
            weight = float(len(self.federation.clients[client_id].train))
            exchange.add(client_id, upload, weight, private)
            totals.loss_sum += loss_sum
            totals.seen += seen
        return totals

    def run_client(
        self,
        client_id: int,
        round_idx: int,
        payload: TensorDict,
        backward: Callable[[torch.Tensor], None],
    ) -> tuple[TensorDict, float, int]:
        """Load the payload and private state into the resident model, train locally; returns
        (upload, loss sum, targets seen). The upload may hold views of the resident model: the
        server reads (or copies) them before the next client overwrites the model."""
        # Seeded first: everything random on the client (a fresh LoRA init, batch order, dropout)
        # depends only on (seed, round, client), not on which clients ran before.
        device = next(self.model.parameters()).device
        generator = client_generator(client_seed(self.seed, round_idx, client_id), device)
        self.algorithm.download(self.model, payload, self.store.load(client_id), client_id)
        origin = (
            self.algorithm.upload_origin(self.model, client_id)
            if self.transforms.needs_origin(client_id)
            else None
        )
        self.transforms.before_training(client_id)
        train_index = self.federation.clients[client_id].train

        def one_pass():
            batches = self.federation.train.batches(train_index, self.batch_size, generator)
            return self.transforms.batches(client_id, batches, self.federation.num_classes)

        run = ClientRun(
            client_id, round_idx, self.local_epochs, self.make_optimizer, backward, one_pass
        )
        loss_sum, seen = self.algorithm.local_update(self.model, run)
        upload = self.algorithm.upload(self.model, client_id)
        return self.transforms.apply(client_id, upload, origin, generator), loss_sum, seen
