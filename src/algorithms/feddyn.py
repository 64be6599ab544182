"""FedDyn (Acar et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021),
Algorithm 1, in the form of the authors' code (alpemreacar/FedDyn, utils_methods.py and
utils_general.py: train_feddyn_mdl).

Each client k keeps lambda_k (from 0), the sum of its past drifts, which is -grad L_k(theta_k)/a
in the paper's notation. Receiving the server model theta, it trains on
    L_k(w) + a_k <w, lambda_k - theta> + (a_k / 2) ||w||^2,   gradient  grad L_k + a_k (w - theta + lambda_k),
(the paper's L_k - <grad L_k(theta_k^{t-1}), w> + (a/2)||w - theta||^2 up to a constant), then
    lambda_k <- lambda_k + (w_k - theta)            and uploads w_k.
The server keeps Lambda = -h / a (from 0), the mean of all m clients' lambda_k:
    Lambda <- Lambda + (1/m) sum_{k in P} (w_k - theta) = Lambda + (|P| / m)(mean_P w_k - theta)
    theta  <- mean_P w_k + Lambda                     (the paper's mean_P w_k - h / a)
with the uniform mean over the round's clients (the code's, and the paper's). |P| / m is
fl.clients_per_round / fl.num_clients, as SCAFFOLD's |S| / N.

a_k = alg.alpha * mean(n) / n_k, as the authors' code scales it by the client's share of the data
(`weight_list`); with equal clients a_k = alpha, the paper's. alpha = 0.01 is the code's default.
Differences from the code: the client's optimizer is the configured one (the code: SGD with
weight decay 1e-3 and gradient clipping at norm 10 on the loss and linear term); the global model
evaluated is theta, which clients start from (the code also reports the plain mean of the
uploads). Clients trained together (fl.parallel_clients) apply the same rule to stacked tensors.
The declaration `mean_rule` makes every aggregator that is not the uniform mean of the
uploads refuse it before training (src/engine/compatibility.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from src.algorithms.adapters import ModelOrAdapters
from src.algorithms.base import ClientState, TensorDict, per_client
from src.contract.sharing import SharedSpec
from src.errors import ConfigError

DRIFT = "feddyn_lambda:"  # prefix of a client's lambda_k (the parameter's name follows)


class FedDyn(ModelOrAdapters):
    privacy = False

    def __init__(
        self,
        name: str,
        alpha: float = 0.01,
        use_lora: bool = False,
        lora: dict | None = None,
        trainable: Sequence[str] = ("head",),
        weighting: str = "uniform",  # the only one its rule allows (SharedSpec.mean_rule)
    ):
        if not alpha > 0:
            raise ConfigError(f"alg.alpha must be > 0, got {alpha}")
        super().__init__(name, lora if use_lora else None, trainable, weighting=weighting)
        self.alpha = float(alpha)
        self.participation = 1.0  # |P| / m
        self.alpha_of: list[float] = []  # a_k per client
        self.mean_drift: TensorDict = {}  # the server's Lambda (checkpointed)
        self.corrected: list[str] = []  # the trained shared tensors: those with a lambda

    # ------------------------------------------------------------------ set-up
    def configure(self, federation, output_dir, seed: int) -> None:
        sizes = [len(client.train) for client in federation.clients]
        mean = sum(sizes) / len(sizes)
        self.num_clients = len(sizes)
        self.alpha_of = [self.alpha * mean / n if n else self.alpha for n in sizes]

    def shared_spec(self, model: nn.Module, clients_per_round: int) -> SharedSpec:
        self.participation = clients_per_round / self.num_clients
        self.corrected = self.trained_shared(model)  # found once; buffers are only averaged
        spec = super().shared_spec(model, clients_per_round)
        why = "its correction Lambda is the mean of the clients' drifts, the model their mean"
        return dataclasses.replace(spec, mean_rule=why, uniform_mean=True)

    def initial_private_state(self, model: nn.Module) -> TensorDict:
        tensors = self.tensors(model)
        return {DRIFT + n: torch.zeros_like(tensors[n]) for n in self.trained_shared(model)}

    def trained_shared(self, model: nn.Module) -> list[str]:
        trained = set(self.trained_names(model))
        return [n for n in self.shared_names(model) if n in trained]

    # ------------------------------------------------------------------ client
    # work: "theta:" the model received, DRIFT lambda_k (on the device), "alpha" a_k
    def download(self, model: nn.Module, received: TensorDict, private: TensorDict, client_id):
        self.load(model, received, client_id)
        device = next(model.parameters()).device  # the store keeps lambda_k on the host
        work = {"theta:" + n: received[n].detach().clone() for n in self.corrected}
        work |= {DRIFT + n: private[DRIFT + n].to(device).clone() for n in self.corrected}
        alpha = self.alpha_of[client_id]
        work["alpha"] = torch.tensor(alpha, dtype=torch.float64, device=device)
        return ClientState(client_id, received, private, work)

    def deploy(self, model: nn.Module, received: TensorDict, private: TensorDict, client_id):
        """theta (lambda_k is not part of the model)."""
        self.load(model, received, client_id)

    def adjust_gradients(self, params: TensorDict, work: TensorDict) -> None:
        """grad += a_k (w - theta + lambda_k)."""
        for name, p in params.items():
            if DRIFT + name in work and p.grad is not None:
                alpha = per_client(work["alpha"], p.grad)
                p.grad.add_(alpha * (p - work["theta:" + name] + work[DRIFT + name]))

    def finish(self, model: nn.Module, state: ClientState) -> tuple[TensorDict, TensorDict]:
        """lambda_k <- lambda_k + (w_k - theta); uploads w_k, keeps lambda_k."""
        tensors, work = self.tensors(model), state.work
        with torch.no_grad():
            drift = {
                DRIFT + n: work[DRIFT + n].add_(tensors[n] - work["theta:" + n])
                for n in self.corrected
            }
        return self.shared_views(model, state.client_id), drift

    # ------------------------------------------------------------------ server
    def server_update(self, state: TensorDict, aggregate: TensorDict, step) -> None:
        """Lambda <- Lambda + |P|/m (mean w - theta); theta <- mean w + Lambda."""
        target = {}
        for name, theta in state.items():
            mean = aggregate[name].to(theta.dtype)
            if name not in self.corrected:
                target[name] = mean
                continue
            lam = self.mean_drift.get(name)
            lam = torch.zeros_like(theta) if lam is None else lam.to(theta.device)
            self.mean_drift[name] = lam.add_(mean - theta, alpha=self.participation)
            target[name] = mean + lam
        step(state, target)

    def server_state_dict(self) -> dict:
        return {"mean_drift": {n: t.detach().cpu() for n, t in self.mean_drift.items()}}

    def load_server_state_dict(self, state: dict) -> None:
        self.mean_drift = {n: t.clone() for n, t in state.get("mean_drift", {}).items()}
