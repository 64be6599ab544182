"""FedNova (Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020); reference code github.com/JYWa/FedNova
(distoptim/FedNova.py: the optimizer's step and `average`).

Clients that take different numbers of local steps (unequal data with fixed local epochs, or
stragglers doing partial work: system.partial_work) pull FedAvg's average towards the objectives of
the clients that took more; FedNova averages normalised updates instead. Client i, from x, takes
tau_i plain SGD steps (lr eta) to y_i. Its normaliser is a_i = tau_i (plain SGD: the reference's
`local_normalizing_vec`), and it uploads

    d_i = (x - y_i) / a_i      and      a_i

The server, with p_i the weights of the sampled clients (alg.weighting=samples: n_i / sum n, the
reference's data `ratio`; uniform: 1/|S|), computes

    tau_eff = sum_i p_i a_i,       x <- x - tau_eff * sum_i p_i d_i

through the server optimiser (server_opt.lr 1 without momentum: exactly this; the reference's
server momentum `gmf` is server_opt.momentum). With equal tau_i it is FedAvg.

Differences from the reference: only plain SGD clients (its momentum and proximal forms of a_i
are not built: another client optimizer is refused before training, `plain_sgd`); the clients'
weights are normalised over the sampled ones (the reference has every client in every round);
`use_lora=true` applies it to the LoRA factors and head (equal ranks). The rule is a weighted
mean: the declaration `mean_rule` refuses every aggregator that does not return one (median,
krum, ...; src/engine/compatibility.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from src.algorithms.adapters import ModelOrAdapters
from src.algorithms.base import ClientState, TensorDict
from src.contract.sharing import Role, SharedSpec

TAU = "fednova_tau"  # a_i in an upload; its weighted mean tau_eff in the server state


class FedNova(ModelOrAdapters):
    privacy = False
    plain_sgd = "its normaliser a_i counts plain SGD steps"

    def __init__(
        self,
        name: str,
        use_lora: bool = False,
        lora: dict | None = None,
        trainable: Sequence[str] = ("head",),
        weighting: str = "samples",  # the reference's ratio n_i / n
    ):
        super().__init__(name, lora if use_lora else None, trainable, weighting=weighting)

    def shared_spec(self, model: nn.Module, clients_per_round: int) -> SharedSpec:
        spec = super().shared_spec(model, clients_per_round)
        roles = {name: Role.OTHER for name in spec.roles} | {TAU: Role.OTHER}  # updates
        why = "tau_eff and the step are the weighted means of a_i and d_i"
        self.spec = dataclasses.replace(spec, roles=roles, updates=True, mean_rule=why)
        return self.spec

    def server_state(self, model: nn.Module) -> TensorDict:
        x = super().server_state(model)
        device = next(iter(x.values())).device
        return x | {TAU: torch.zeros(1, dtype=torch.float64, device=device)}

    def server_payload(self, server, client_id: int | None) -> TensorDict:
        """x (tau_eff is the server's own)."""
        payload = super().server_payload(server, client_id)
        return {n: t for n, t in payload.items() if n != TAU}

    # ------------------------------------------------------------------ client
    # work: "x:" the model received
    def download(self, model: nn.Module, received: TensorDict, private: TensorDict, client_id):
        self.load(model, received, client_id)
        work = {"x:" + n: t.detach().clone() for n, t in received.items()}
        return ClientState(client_id, received, private, work)

    def finish(self, model: nn.Module, state: ClientState) -> tuple[TensorDict, TensorDict]:
        """d_i = (x - y_i) / a_i with a_i = tau_i, and a_i (a client that took no step sends
        d_i = 0 and a_i = 0, adding nothing)."""
        tensors, steps = self.tensors(model), state.steps
        with torch.no_grad():
            d = {
                n.removeprefix("x:"): (x - tensors[n.removeprefix("x:")].detach()) / max(steps, 1)
                for n, x in state.work.items()
            }
        tau = torch.tensor(
            [float(steps)], dtype=torch.float64, device=next(iter(d.values())).device
        )
        return d | {TAU: tau}, {}

    def upload_origin(self, model: nn.Module, state: ClientState) -> TensorDict:
        """An untrained client: no step, so d_i = 0 and a_i = 0."""
        zeros = {n.removeprefix("x:"): torch.zeros_like(t) for n, t in state.work.items()}
        device = next(iter(zeros.values())).device
        return zeros | {TAU: torch.zeros(1, dtype=torch.float64, device=device)}

    # ------------------------------------------------------------------ server
    def server_update(self, state: TensorDict, aggregate: TensorDict, step) -> None:
        """x <- x - tau_eff * mean(d), through the server optimiser (tau_eff kept in the state)."""
        tau_eff = aggregate[TAU].to(torch.float64)
        state[TAU].copy_(tau_eff)
        model = {n: t for n, t in state.items() if n != TAU}
        step(
            model, {n: x - (tau_eff * aggregate[n].double()).to(x.dtype) for n, x in model.items()}
        )
