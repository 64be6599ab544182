"""Aggregators of the LoRA product dW = sum_k p_k s_k B_k A_k, exact for any mix of ranks.

stack (FLoRA, Wang et al. 2024): the sampled clients' factors are stacked,
    A_s = [p_1 s_1 A_1; ...; p_K s_K A_K],  B_s = [B_1 ... B_K],  so  B_s A_s = dW  exactly;
  `broadcast=merge` (default): every client receives (A_s, B_s), i.e. sum_k r_k (d_in + d_out)
    numbers per layer, merges B_s A_s into its frozen base weights and re-initialises its LoRA.
    (In simulation all clients share one base weight: the payload carries the merged base weight,
    which the algorithm loads; the bytes counted are those of the stacked factors.)
  `broadcast=svd`: the server keeps dW and each client receives its truncated SVD at rank r_k.
svd (FlexLoRA, Bai et al. 2024): the same as stack with broadcast=svd; each client receives
    B_k, A_k with s_k B_k A_k = U_r S_r V_r^T of the global dW (r_k (d_in + d_out) numbers per layer).
Non-LoRA shared tensors (the head) are averaged with the sample weights.
The server optimiser acts on the base weights (merge) or on dW (svd).
These rules never touch the model: base weights travel in the payload under their own names.
"""

from __future__ import annotations

import torch

from src.aggregators.base import Aggregator, TensorDict, master_copy
from src.aggregators.lora_math import factors_from_svd, stack_factors
from src.aggregators.mean import MeanAggregator
from src.contract.sharing import Needs, Role, SharedSpec, nbytes
from src.errors import ConfigError


class StackAggregator(Aggregator):
    checkpointed = ("stacked",)  # last round's factors: what merge-mode clients download

    def __init__(self, name: str, broadcast: str = "merge"):
        super().__init__(name)
        if broadcast not in ("merge", "svd"):
            raise ConfigError(f"aggregator.broadcast must be one of merge, svd; got {broadcast}")
        self.mode = broadcast

    @property
    def needs(self) -> Needs:
        return Needs(both_factors=True)

    # ------------------------------------------------------------------ state
    def setup(self, spec: SharedSpec, shared: TensorDict, bases: TensorDict | None = None) -> None:
        self.spec = spec
        self.others = [n for n, role in spec.roles.items() if role is Role.OTHER]  # e.g. the head
        self.state = {name: master_copy(shared[name]) for name in self.others}
        self.bases = {name: master_copy(t) for name, t in (bases or {}).items()}
        self.wire = {n: t.dtype for n, t in (shared | (bases or {})).items()}
        for layer in spec.layers:
            if self.mode == "merge":  # the server state is the base weight itself
                self.state[layer.base] = self.bases[layer.base]
            else:  # the global dW of the layer
                self.state[self._delta(layer)] = torch.zeros_like(self.bases[layer.base])
        self.stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # last round's (A_s, B_s)
        self._svd_cache: dict[str, tuple] = {}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.mode == "merge":  # the state's base weights are the ones broadcast
            self.bases = {layer.base: self.state[layer.base] for layer in self.spec.layers}

    @staticmethod
    def _delta(layer) -> str:
        return f"{layer.name}.delta_W"

    # ------------------------------------------------------------------ sending
    def broadcast(self, client_id: int | None) -> TensorDict:
        payload = {name: self.state[name] for name in self.others}
        payload |= self.bases  # merge: the merged base weights; svd: the base as it is
        if self.mode == "svd" and client_id is not None:  # merge: no factors, a fresh LoRA init
            rank = self.spec.rank(client_id)
            for layer in self.spec.layers:
                # dW = 0 (before the first aggregation) has no SVD worth sending: zero factors
                # would never train, so the client starts from a fresh LoRA init instead
                if self.state[self._delta(layer)].any():
                    payload[layer.a], payload[layer.b] = self._svd(layer, rank)
        return payload

    def global_payload(self) -> TensorDict:
        """merge: the base weights hold everything (and LoRA is at zero); svd: base + dW."""
        payload = self.broadcast(None)
        if self.mode == "svd":
            for layer in self.spec.layers:
                base = self.bases[layer.base]
                payload[layer.base] = base + self.state[self._delta(layer)].to(base.dtype)
        return payload

    def download_bytes(self, client_id: int, payload: TensorDict) -> int:
        if self.mode == "svd":
            return super().download_bytes(client_id, payload)
        sent = sum(nbytes({"A": a, "B": b}) for a, b in self.stacked.values())
        return sent + nbytes({name: payload[name] for name in self.others}, self.wire)

    def _svd(self, layer, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client factors (A_k, B_k) with s_k B_k A_k = the rank-r_k truncated SVD of dW."""
        if layer.name not in self._svd_cache:  # one SVD per layer per round, sliced per rank
            self._svd_cache[layer.name] = torch.linalg.svd(
                self.state[self._delta(layer)], full_matrices=False
            )
        return factors_from_svd(self._svd_cache[layer.name], rank, self.spec.scale(rank))

    # ------------------------------------------------------------------ aggregation
    def _begin(self) -> None:
        self._factors = {layer.name: ([], [], []) for layer in self.spec.layers}
        self._weights: list[float] = []
        self._sums = {name: torch.zeros_like(self.state[name]) for name in self.others}

    def _add(self, upload: TensorDict, weight: float, client_id: int) -> None:
        scale = self.spec.scale(self.spec.rank(client_id))
        for layer in self.spec.layers:
            As, Bs, scales = self._factors[layer.name]
            # copies: the resident model moves on to the next client
            As.append(upload[layer.a].detach().clone())
            Bs.append(upload[layer.b].detach().clone())
            scales.append(scale)
        for name, acc in self._sums.items():
            acc.add_(upload[name], alpha=weight)
        self._weights.append(weight)

    def aggregate(self) -> TensorDict:
        total = sum(self._weights)
        result = {name: acc / total for name, acc in self._sums.items()}
        self.stacked, self._svd_cache = {}, {}
        for layer in self.spec.layers:
            As, Bs, scales = self._factors[layer.name]
            A_s, B_s = stack_factors(As, Bs, self._weights, scales)
            self.stacked[layer.name] = (A_s, B_s)
            delta = B_s @ A_s
            if self.mode == "merge":
                result[layer.base] = self.state[layer.base] + delta
            else:
                result[self._delta(layer)] = delta
        return result


class SvdAggregator(StackAggregator):
    def __init__(self, name: str):
        super().__init__(name, broadcast="svd")


class ExactAggregator(MeanAggregator):
    """FedEx-LoRA (Singhal et al., 2025): A and B are averaged as in FedIT, and the residual is
    folded into the frozen base weights, so that the global model W + s B A is exactly
        (1 - lr) (W_old + s B_old A_old) + lr (W_old + sum_k p_k s B_k A_k),
    i.e. the server step theta + lr (average - theta) on the effective weights (lr = server_opt.lr;
    lr = 1: the exact average of the client models, the paper's rule). With A and B moved by the
    same step, the residual is R = (1 - lr) s B_old A_old + lr sum_k p_k s B_k A_k - s B A.
    Equal ranks only; momentum and adaptive server optimisers are refused (their state lives on A
    and B, so no step of the effective weights corresponds). Clients receive A, B, the head and R
    (d_out x d_in per layer: dense, so costly)."""

    privacy = False
    mean_of_uploads = False  # the base weights take the mean of the products, not of the uploads
    plain_step = "its residual makes the step one on the effective weights W + s B A"

    checkpointed = ("residuals",)

    @property
    def needs(self) -> Needs:
        return Needs(both_factors=True, equal_shapes=True)

    def setup(self, spec: SharedSpec, shared: TensorDict, bases: TensorDict | None = None) -> None:
        super().setup(spec, shared)
        self.bases = {name: t.detach().clone() for name, t in (bases or {}).items()}
        self.residuals: dict[str, torch.Tensor] = {}  # last round's, as sent

    def broadcast(self, client_id: int | None) -> TensorDict:
        return super().broadcast(client_id) | self.bases

    def download_bytes(self, client_id: int, payload: TensorDict) -> int:
        return super().download_bytes(client_id, payload) + nbytes(self.residuals)

    def _product(self, layer, factors: TensorDict) -> torch.Tensor:
        return self.spec.scale(self.spec.r_max) * factors[layer.b] @ factors[layer.a]

    def _begin(self) -> None:
        super()._begin()
        self._products = {
            layer.name: torch.zeros_like(self.bases[layer.base]) for layer in self.spec.layers
        }
        # s B_old A_old: the part of the effective weights the step moves away from
        self._previous = {
            layer.name: self._product(layer, self.state) for layer in self.spec.layers
        }

    def _add(self, upload: TensorDict, weight: float, client_id: int) -> None:
        super()._add(upload, weight, client_id)
        scale = self.spec.scale(self.spec.rank(client_id))
        for layer in self.spec.layers:
            self._products[layer.name].add_(scale * upload[layer.b] @ upload[layer.a], alpha=weight)

    def _partial_sums(self) -> list[torch.Tensor]:
        return super()._partial_sums() + list(self._products.values())

    def after_step(self, aggregate: TensorDict, server_lr: float) -> None:
        lr = server_lr
        for layer in self.spec.layers:
            average = self._products[layer.name] / self._total_weight
            target = (1 - lr) * self._previous[layer.name] + lr * average
            residual = target - self._product(layer, self.state)  # the state has taken the step
            self.bases[layer.base].add_(residual.to(self.bases[layer.base].dtype))
            self.residuals[layer.name] = residual
