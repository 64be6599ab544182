"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020), Algorithm 1 with option II.

Server: model x and control variate c (both sent to every sampled client). Client i keeps its
own control variate c_i (from 0, in the client state store) and, from y_i = x, takes K local
steps with the corrected gradient  g_i(y_i) - c_i + c  (lr eta_l), then
    c_i+ = c_i - c + (x - y_i) / (K eta_l)                         (option II)
and uploads (dy_i, dc_i) = (y_i - x, c_i+ - c_i): twice the bytes of FedAvg, each way.
Server, over the sampled set S of N clients:
    x <- x + eta_g mean(dy_i)        (the aggregator's server step: aggregator.server_lr = eta_g)
    c <- c + (|S| / N) mean(dc_i)
The mean is the aggregator's: uniform by default, as in the paper (alg.weighting=uniform sets
aggregator.weighting; samples: weighted by n_i). The paper has no official code.
Option II assumes plain SGD steps: conf/alg/scaffold.yaml picks optim=sgd_plain, and another
client optimizer is refused before training (its `plain_sgd` declaration).
`use_lora=true` applies all of it to the LoRA factors and head (equal ranks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from src.algorithms.base import TensorDict
from src.algorithms.fedlora import FedLoRA
from src.errors import ConfigError
from src.federated.contract import Role, SharedSpec

CONTROL = "scaffold_c:"  # prefix of a control variate's name (the parameter's name follows)


class Scaffold(FedLoRA):
    privacy = False
    plain_sgd = "its control variates assume them"

    def __init__(
        self,
        name: str,
        use_lora: bool = False,
        lora: dict | None = None,
        trainable: Sequence[str] = ("head",),
        weighting: str = "uniform",  # read by the aggregator (aggregator.weighting)
    ):
        super().__init__(name, lora if use_lora else None, trainable)
        self.sampling_rate = 1.0  # |S| / N, known once the federation is
        self.x: TensorDict = {}  # the running client's received model
        self.c: TensorDict = {}  # the server's control variate, as received
        self.c_i: TensorDict = {}  # the running client's control variate
        self.c_i_new: TensorDict = {}

    # ------------------------------------------------------------------ set-up
    def configure(self, federation, output_dir, seed: int) -> None:
        self.num_clients = federation.num_clients

    def shared_spec(self, model: nn.Module, clients_per_round: int) -> SharedSpec:
        self.sampling_rate = clients_per_round / self.num_clients
        spec = super().shared_spec(model, clients_per_round)
        roles = {name: Role.OTHER for name in spec.roles}  # updates, not factors to multiply
        roles |= {CONTROL + name: Role.OTHER for name in self.controlled(model)}
        self.spec = dataclasses.replace(spec, roles=roles, updates=True)
        return self.spec

    def controlled(self, model: nn.Module) -> list[str]:
        """The shared parameters, which get control variates (a shared buffer, e.g. BatchNorm
        statistics, has no gradient to correct: it is only averaged like x)."""
        return [name for name in self.shared_names(model) if name in self.trained_names(model)]

    def server_state(self, model: nn.Module) -> TensorDict:
        x = super().server_state(model)
        return x | {CONTROL + name: torch.zeros_like(x[name]) for name in self.controlled(model)}

    def initial_private_state(self, model: nn.Module) -> TensorDict:
        params = dict(model.named_parameters())
        return {CONTROL + n: torch.zeros_like(params[n]) for n in self.controlled(model)}

    def private_state(self, model: nn.Module, client_id: int | None) -> TensorDict:
        return self.c_i_new  # c_i+, kept by the client

    # ------------------------------------------------------------------ client
    @torch.no_grad()
    def download(self, model: nn.Module, payload: TensorDict, private: TensorDict, client_id):
        received = {n: t for n, t in payload.items() if not n.startswith(CONTROL)}
        super().download(model, received, {}, client_id)
        self.x = {n: t.detach().clone() for n, t in received.items()}
        self.c = {n.removeprefix(CONTROL): t for n, t in payload.items() if n.startswith(CONTROL)}
        device = next(model.parameters()).device  # the store keeps c_i on the host
        self.c_i = {n.removeprefix(CONTROL): t.to(device) for n, t in private.items()}

    def end_local_update(self, model: nn.Module, steps: int, lr: float) -> None:
        """Option II: c_i+ = c_i - c + (x - y_i) / (K eta_l)."""
        if steps == 0:  # an empty client: c_i would divide by zero
            raise ConfigError(f"alg={self.name}: a sampled client has no training data")
        params = dict(model.named_parameters())
        with torch.no_grad():
            self.c_i_new = {
                CONTROL + n: self.c_i[n] - self.c[n] + (self.x[n] - params[n]) / (steps * lr)
                for n in self.c
            }

    @torch.no_grad()
    def adjust_gradients(self, model: nn.Module) -> None:
        """g <- g - c_i + c."""
        for name, p in model.named_parameters():
            if name in self.c and p.grad is not None:
                p.grad.add_(self.c[name] - self.c_i[name])

    # ------------------------------------------------------------------ clients trained together
    def stacked_context(self, model: nn.Module) -> TensorDict:
        """c and c_i of the client just downloaded."""
        return {"c:" + n: c for n, c in self.c.items()} | {
            "c_i:" + n: c for n, c in self.c_i.items()
        }

    def adjust_stacked_gradients(self, params, grads, start, context) -> None:
        for name in self.c:
            grads[name].add_(context["c:" + name] - context["c_i:" + name])

    def end_stacked(self, model: nn.Module, result) -> None:
        """This client's x, c and c_i, then c_i+ as sequentially."""
        self.x = {n: result.start[n] for n in self.x}
        self.c = {n: result.context["c:" + n] for n in self.c}
        self.c_i = {n: result.context["c_i:" + n] for n in self.c}
        super().end_stacked(model, result)

    def upload(self, model: nn.Module, client_id: int) -> TensorDict:
        """(dy_i, dc_i) = (y_i - x, c_i+ - c_i)."""
        tensors = self.tensors(model)
        dy = {n: tensors[n].detach() - x for n, x in self.x.items()}
        dc = {CONTROL + n: self.c_i_new[CONTROL + n] - self.c_i[n] for n in self.c}
        return dy | dc

    def upload_origin(self, model: nn.Module, client_id: int) -> TensorDict:
        """An update starts from zero."""
        return {n: torch.zeros_like(t) for n, t in self.x.items()} | {
            CONTROL + n: torch.zeros_like(t) for n, t in self.c.items()
        }

    # ------------------------------------------------------------------ server
    def server_update(self, state: TensorDict, aggregate: TensorDict, step) -> None:
        """x <- x + eta_g mean(dy) (through the server optimiser); c <- c + |S|/N mean(dc)."""
        model = {n: t for n, t in state.items() if not n.startswith(CONTROL)}
        step(model, {n: x + aggregate[n].to(x.dtype) for n, x in model.items()})
        for n, c in state.items():
            if n.startswith(CONTROL):
                c.add_(aggregate[n].to(c.dtype), alpha=self.sampling_rate)
