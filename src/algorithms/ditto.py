"""Ditto (Li et al., "Ditto: Fair and Robust Federated Learning Through Personalization",
ICML 2021), Algorithm 1.

Each sampled client k receives the global model w_t and
1. trains it as FedAvg does (the configured optimizer, fl.local_epochs): the result w_k is its
   upload, and the server aggregates the uploads with any aggregator;
2. trains its personal model v_k (kept in the client state store, from the initial model) for
   the same number of batches on  F_k(v) + (lam / 2) ||v - w_t||^2 , i.e. with the gradient
   grad F_k(v) + lam (v - w_t).
A client deploys v_k (val/personal_acc); val/global_acc is the personal models on the global
test set, as for every personalised algorithm. lam = 0: local training only; large lam: FedAvg.
A client that was never sampled deploys the initial model. `use_lora=true`: w and v are the
LoRA factors and head (equal ranks), the frozen backbone shared by both.

Against the reference code (litian96/ditto, flearn/trainers_MTL/ditto.py): lam defaults to 1, as
in all its run scripts (its main.py default, 0, is local training only). The reference takes, per
batch, one step on v and then one on w, for `local_iters` batches with plain SGD; here w trains
first for fl.local_epochs with the configured optimizer, then v for as many batches (a fresh
shuffle), which optimises the same two objectives (v's pull is towards w_t, not w_k, in both).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from src.algorithms.base import ClientRun, TensorDict
from src.algorithms.fedlora import FedLoRA
from src.algorithms.proximal import add_proximal_gradient, snapshot
from src.errors import ConfigError


class Ditto(FedLoRA):
    privacy = False

    def __init__(
        self,
        name: str,
        lam: float = 1.0,
        use_lora: bool = False,
        lora: dict | None = None,
        trainable: Sequence[str] = ("head",),
    ):
        if lam < 0:
            raise ConfigError(f"alg.lam must be >= 0, got {lam}")
        super().__init__(name, lora if use_lora else None, trainable)  # one rank: lora.r
        self.lam = float(lam)
        self.anchor: TensorDict = {}  # w_t, as loaded
        self.personal: TensorDict = {}  # v_k, as stored
        self.trained_global: TensorDict = {}  # w_k: the upload
        self._pull = False  # the prox term is on while the personal model trains

    @property
    def personalized(self) -> bool:
        return True

    def private_state(self, model: nn.Module, client_id: int | None) -> TensorDict:
        """v_k: every shared tensor (after local_update the resident model holds v_k)."""
        tensors = self.tensors(model)
        return {name: tensors[name].detach() for name in self.shared_names(model)}

    # ------------------------------------------------------------------ client
    @torch.no_grad()
    def download(self, model: nn.Module, payload: TensorDict, private: TensorDict, client_id):
        """w_t into the resident model (to train the global part first); v_k kept aside."""
        super().download(model, payload, {}, client_id)
        self.anchor = snapshot(model, self.shared_names(model))  # w_t as loaded (fresh LoRA init)
        self.personal = private

    def deploy(self, model: nn.Module, payload: TensorDict, private: TensorDict, client_id):
        super().download(model, payload, private, client_id)  # v_k overrides w_t

    def local_update(self, model: nn.Module, run: ClientRun) -> tuple[float, int]:
        trained = [p for p in model.parameters() if p.requires_grad]
        loss_sum, seen, _ = self.train(
            model, run.make_optimizer(trained), run.batches(), run.backward
        )
        self.trained_global = snapshot(model, self.shared_names(model))
        tensors = self.tensors(model)
        with torch.no_grad():
            for name, tensor in self.personal.items():
                tensors[name].copy_(tensor)
        self._pull = True
        try:  # the personal model's loss is not the federation's: not counted in train/loss
            self.train(model, run.make_optimizer(trained), run.batches(), run.backward)
        finally:
            self._pull = False
        return loss_sum, seen

    def adjust_gradients(self, model: nn.Module) -> None:
        """While v trains: grad += lam (v - w_t)."""
        if self._pull:
            add_proximal_gradient(model, self.anchor, self.lam)

    def upload(self, model: nn.Module, client_id: int) -> TensorDict:
        return self.trained_global  # w_k (the resident model now holds v_k)

    def upload_origin(self, model: nn.Module, client_id: int) -> TensorDict:
        return {name: t.clone() for name, t in self.anchor.items()}
