"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020), Algorithm 1 with option II.

Server: model x and control variate c (both sent to every sampled client). Client i keeps its
own control variate c_i (from 0, in the client state store) and, from y_i = x, takes K local
steps with the corrected gradient  g_i(y_i) - c_i + c  (lr eta_l), then
    c_i+ = c_i - c + (x - y_i) / (K eta_l)                         (option II)
and uploads (dy_i, dc_i) = (y_i - x, c_i+ - c_i): twice the bytes of FedAvg, each way.
Server, over the sampled set S of N clients:
    x <- x + eta_g mean(dy_i)        (the server optimiser's step: server_opt.lr = eta_g)
    c <- c + (|S| / N) mean(dc_i)
The mean is the aggregator's: uniform by default, as in the paper (alg.weighting=uniform;
samples: weighted by n_i). The paper has no official code.
Option II assumes plain SGD steps: conf/alg/scaffold.yaml picks optim=sgd_plain, and another
client optimizer is refused before training (its `plain_sgd` declaration).
`use_lora=true` applies all of it to the LoRA factors and head (equal ranks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from src.algorithms.adapters import ModelOrAdapters
from src.algorithms.base import ClientState, TensorDict
from src.contract.sharing import Role, SharedSpec
from src.errors import ConfigError

CONTROL = "scaffold_c:"  # prefix of a control variate's name (the parameter's name follows)


class Scaffold(ModelOrAdapters):
    privacy = False
    plain_sgd = "its control variates assume them"

    def __init__(
        self,
        name: str,
        use_lora: bool = False,
        lora: dict | None = None,
        trainable: Sequence[str] = ("head",),
        weighting: str = "uniform",  # the paper's mean over the sampled clients
    ):
        super().__init__(name, lora if use_lora else None, trainable, weighting=weighting)
        self.sampling_rate = 1.0  # |S| / N, known once the federation is

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

    # ------------------------------------------------------------------ client
    # work: "x:" the model received, "c:" the server's c, "c_i:" the client's c_i (on the device)
    def download(self, model: nn.Module, received: TensorDict, private: TensorDict, client_id):
        x = {n: t for n, t in received.items() if not n.startswith(CONTROL)}
        self.load(model, x, client_id)
        device = next(model.parameters()).device  # the store keeps c_i on the host
        work = {"x:" + n: t.detach().clone() for n, t in x.items()}
        for name, c in received.items():
            if name.startswith(CONTROL):
                n = name.removeprefix(CONTROL)
                work["c:" + n], work["c_i:" + n] = c, private[name].to(device)
        return ClientState(client_id, received, private, work)

    def deploy(self, model: nn.Module, received: TensorDict, private: TensorDict, client_id):
        """x: neither control variate is part of the model."""
        x = {n: t for n, t in received.items() if not n.startswith(CONTROL)}
        self.load(model, x, client_id)

    def adjust_gradients(self, params: TensorDict, work: TensorDict) -> None:
        """g <- g - c_i + c."""
        for name, p in params.items():
            if "c:" + name in work and p.grad is not None:
                p.grad.add_(work["c:" + name] - work["c_i:" + name])

    def finish(self, model: nn.Module, state: ClientState) -> tuple[TensorDict, TensorDict]:
        """Option II, c_i+ = c_i - c + (x - y_i) / (K eta_l); uploads (dy_i, dc_i) =
        (y_i - x, c_i+ - c_i) and keeps c_i+."""
        if state.steps == 0:  # an empty client: c_i would divide by zero
            raise ConfigError(f"alg={self.name}: a sampled client has no training data")
        work, tensors = state.work, self.tensors(model)
        names = [n.removeprefix("c:") for n in work if n.startswith("c:")]
        with torch.no_grad():
            c_i_new = {
                n: work["c_i:" + n]
                - work["c:" + n]
                + (work["x:" + n] - tensors[n]) / (state.steps * state.lr)
                for n in names
            }
            dy = {
                n.removeprefix("x:"): tensors[n.removeprefix("x:")].detach() - x
                for n, x in work.items()
                if n.startswith("x:")
            }
            dc = {CONTROL + n: c_i_new[n] - work["c_i:" + n] for n in names}
        return dy | dc, {CONTROL + n: t for n, t in c_i_new.items()}

    def upload_origin(self, model: nn.Module, state: ClientState) -> TensorDict:
        """An update starts from zero."""
        work = state.work
        dy = {n.removeprefix("x:"): torch.zeros_like(t) for n, t in work.items() if n[:2] == "x:"}
        dc = {CONTROL + n[2:]: torch.zeros_like(t) for n, t in work.items() if n[:2] == "c:"}
        return dy | dc

    # ------------------------------------------------------------------ server
    def server_update(self, state: TensorDict, aggregate: TensorDict, step) -> None:
        """x <- x + eta_g mean(dy) (through the server optimiser); c <- c + |S|/N mean(dc)."""
        model = {n: t for n, t in state.items() if not n.startswith(CONTROL)}
        step(model, {n: x + aggregate[n].to(x.dtype) for n, x in model.items()})
        for n, c in state.items():
            if n.startswith(CONTROL):
                c.add_(aggregate[n].to(c.dtype), alpha=self.sampling_rate)
