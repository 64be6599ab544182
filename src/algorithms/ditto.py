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

from torch import nn

from src.algorithms.adapters import ModelOrAdapters
from src.algorithms.base import Algorithm, ClientRun, ClientState, TensorDict
from src.algorithms.proximal import add_proximal, snapshot
from src.errors import ConfigError


class Ditto(ModelOrAdapters):
    privacy = False

    def __init__(
        self,
        name: str,
        lam: float = 1.0,
        use_lora: bool = False,
        lora: dict | None = None,
        trainable: Sequence[str] = ("head",),
        weighting: str = "samples",
    ):
        if lam < 0:
            raise ConfigError(f"alg.lam must be >= 0, got {lam}")
        super().__init__(
            name, lora if use_lora else None, trainable, weighting=weighting
        )  # one rank
        self.lam = float(lam)

    @property
    def personalized(self) -> bool:
        return True

    def initial_private_state(self, model: nn.Module) -> TensorDict:
        """v_k starts as the initial model's shared tensors."""
        return self.shared_views(model, None)

    # ------------------------------------------------------------------ client
    def download(self, model: nn.Module, received: TensorDict, private: TensorDict, client_id):
        """w_t into the resident model (to train the global part first); v_k waits in the
        state. notes["anchor"]: w_t as loaded (a fresh LoRA init included)."""
        self.load(model, received, client_id)
        state = ClientState(client_id, received, private)
        state.notes["anchor"] = snapshot(model, self.shared_names(model))
        return state

    def deploy(self, model: nn.Module, received: TensorDict, private: TensorDict, client_id):
        self.load(model, received | private, client_id)  # v_k overrides w_t

    def local_update(self, model: nn.Module, state: ClientState, run: ClientRun):
        """w_k as FedAvg trains it (the upload), then v_k pulled towards w_t (work: w_t)."""
        trained = [p for p in model.parameters() if p.requires_grad]
        loss_sum, seen, _ = self.train(
            model, run.make_optimizer(trained), run.batches(), run.backward, {}
        )
        state.notes["trained_global"] = snapshot(model, self.shared_names(model))
        Algorithm.load(self, model, state.private, state.client_id)  # v_k, as stored
        # the personal model's loss is not the federation's: not counted in train/loss
        anchor = state.notes["anchor"]
        self.train(model, run.make_optimizer(trained), run.batches(), run.backward, anchor)
        return loss_sum, seen

    def adjust_gradients(self, params: TensorDict, work: TensorDict) -> None:
        """While v trains (work: w_t): grad += lam (v - w_t); nothing while w trains."""
        add_proximal(params, work, self.lam)

    def finish(self, model: nn.Module, state: ClientState) -> tuple[TensorDict, TensorDict]:
        """Uploads w_k; keeps v_k, every shared tensor (the resident model now holds v_k)."""
        return state.notes["trained_global"], self.shared_views(model, state.client_id)
