"""Aggregators of the LoRA product dW = sum_k p_k s_k B_k A_k, exact for any mix of ranks.

stack (FLoRA, Wang et al. 2024): the sampled clients' factors are stacked,
    A_s = [p_1 s_1 A_1; ...; p_K s_K A_K],  B_s = [B_1 ... B_K],  so  B_s A_s = dW  exactly;
  `broadcast=merge` (default): every client receives (A_s, B_s), i.e. sum_k r_k (d_in + d_out)
    numbers per layer, merges B_s A_s into its frozen base weights and re-initialises its LoRA.
    (In simulation all clients share one base weight, so the server merges once; the bytes
    counted are those of the stacked factors.)
  `broadcast=svd`: the server keeps dW and each client receives its truncated SVD at rank r_k.
svd (FlexLoRA, Bai et al. 2024): the same as stack with broadcast=svd; each client receives
    B_k, A_k with s_k B_k A_k = U_r S_r V_r^T of the global dW (r_k (d_in + d_out) numbers per layer).
Non-LoRA shared tensors (the head) are averaged with the sample weights.
The server optimiser acts on the base weights (merge) or on dW (svd).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from src.aggregators.base import Aggregator, TensorDict, nbytes
from src.aggregators.lora_math import factors_from_svd, stack_factors
from src.aggregators.mean import MeanAggregator
from src.errors import ConfigError


def require_lora(aggregator: str, algorithm) -> None:
    if not getattr(algorithm, "pairs", None):
        raise ConfigError(f"aggregator={aggregator} combines LoRA factors; use it with alg=fedlora")
    if not algorithm.shares_products:
        raise ConfigError(
            f"aggregator={aggregator} needs both LoRA factors, but alg={algorithm.name} keeps "
            f"{algorithm.private or 'lora_A frozen'} on the clients; use aggregator=mean, "
            "rank_aware or zeropad"
        )


class StackAggregator(Aggregator):
    checkpointed = ("stacked",)  # last round's factors: what merge-mode clients download

    def __init__(self, name: str, broadcast: str = "merge", **server):
        super().__init__(name, **server)
        if broadcast not in ("merge", "svd"):
            raise ConfigError(f"aggregator.broadcast must be one of merge, svd; got {broadcast}")
        self.mode = broadcast

    # ------------------------------------------------------------------ state
    def setup(self, model: nn.Module, algorithm) -> None:
        require_lora(self.name, algorithm)
        self.algorithm = algorithm
        self.model = model
        params = dict(model.named_parameters())
        lora = {name for pair in algorithm.pairs for name in (pair.a, pair.b)}
        self.others = [n for n in algorithm.shared_names(model) if n not in lora]  # e.g. the head
        self.state = {name: params[name].detach().clone() for name in self.others}
        for pair in algorithm.pairs:
            base = params[pair.base].detach()
            self.state[self._key(pair)] = (
                base.clone() if self.mode == "merge" else torch.zeros_like(base)
            )
        self.stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # last round's (A_s, B_s)
        self._svd_cache: dict[str, tuple] = {}

    def _key(self, pair) -> str:
        """merge: the server state is the base weight itself; svd: the global dW of the layer."""
        return pair.base if self.mode == "merge" else f"{pair.layer}.delta_W"

    # ------------------------------------------------------------------ sending
    def broadcast(self, client_id: int) -> TensorDict:
        payload = {name: self.state[name] for name in self.others}
        if self.mode == "svd":  # merge: no factors, the client re-initialises its LoRA
            rank = self.algorithm.client_rank(client_id)
            for pair in self.algorithm.pairs:
                # dW = 0 (before the first aggregation) has no SVD worth sending: zero factors
                # would never train, so the client starts from a fresh LoRA init instead
                if self.state[self._key(pair)].any():
                    payload[pair.a], payload[pair.b] = self._svd(pair, rank)
        return payload

    def download_bytes(self, client_id: int, payload: TensorDict) -> int:
        if self.mode == "svd":
            return nbytes(payload)
        sent = sum(nbytes({"A": a, "B": b}) for a, b in self.stacked.values())
        return sent + nbytes({name: payload[name] for name in self.others})

    def _svd(self, pair, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client factors (A_k, B_k) with s_k B_k A_k = the rank-r_k truncated SVD of dW."""
        if pair.layer not in self._svd_cache:  # one SVD per layer per round, sliced per rank
            self._svd_cache[pair.layer] = torch.linalg.svd(
                self.state[self._key(pair)], full_matrices=False
            )
        return factors_from_svd(self._svd_cache[pair.layer], rank, self.algorithm.scale(rank))

    @contextmanager
    def global_model(self, model: nn.Module) -> Iterator[None]:
        """merge: the base weights already hold everything (merged in `_after_step`; LoRA at zero);
        svd: base + dW, merged only while the block runs (the base is restored exactly after)."""
        params = dict(model.named_parameters())
        payload = {name: self.state[name] for name in self.others}
        saved = {}
        if self.mode == "svd":
            with torch.no_grad():
                for pair in self.algorithm.pairs:
                    base = params[pair.base]
                    saved[pair.base] = base.detach().clone()
                    base.add_(self.state[self._key(pair)].to(base.dtype))
        self.algorithm.download(model, payload, None)  # no factors in the payload: B = 0
        try:
            yield
        finally:
            with torch.no_grad():
                for name, tensor in saved.items():
                    params[name].copy_(tensor)

    # ------------------------------------------------------------------ aggregation
    def _begin(self) -> None:
        self._factors = {pair.layer: ([], [], []) for pair in self.algorithm.pairs}
        self._weights: list[float] = []
        self._sums = {name: torch.zeros_like(self.state[name]) for name in self.others}

    def _add(self, upload: TensorDict, weight: float, client_id: int) -> None:
        scale = self.algorithm.scale(self.algorithm.client_rank(client_id))
        for pair in self.algorithm.pairs:
            As, Bs, scales = self._factors[pair.layer]
            # copies: the resident model moves on to the next client
            As.append(upload[pair.a].detach().clone())
            Bs.append(upload[pair.b].detach().clone())
            scales.append(scale)
        for name, acc in self._sums.items():
            acc.add_(upload[name], alpha=weight)
        self._weights.append(weight)

    def _result(self) -> TensorDict:
        total = sum(self._weights)
        result = {name: acc / total for name, acc in self._sums.items()}
        self.stacked, self._svd_cache = {}, {}
        for pair in self.algorithm.pairs:
            As, Bs, scales = self._factors[pair.layer]
            A_s, B_s = stack_factors(As, Bs, self._weights, scales)
            self.stacked[pair.layer] = (A_s, B_s)
            delta = B_s @ A_s
            key = self._key(pair)
            result[key] = self.state[key] + delta if self.mode == "merge" else delta
        return result

    def _after_step(self, aggregate: TensorDict) -> None:
        if self.mode == "merge":
            # every client merges the broadcast product into its base weights; in simulation they
            # share one resident model, so it is merged once, here
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for pair in self.algorithm.pairs:
                    params[pair.base].copy_(self.state[pair.base])


class SvdAggregator(StackAggregator):
    def __init__(self, name: str, **server):
        super().__init__(name, broadcast="svd", **server)


class ExactAggregator(MeanAggregator):
    """FedEx-LoRA (Singhal et al., 2025): A and B are averaged as in FedIT, and the residual
    R = sum_k p_k s B_k A_k - s B_bar A_bar is folded into the frozen base weights, so that
    W + R + s B_bar A_bar is exactly the average of the client models. Equal ranks only.
    Clients receive A_bar, B_bar, the head and R (d_out x d_in per layer: dense, so costly).
    With a server optimiser the residual of the plain average is folded."""

    checkpointed = ("residuals",)

    def setup(self, model: nn.Module, algorithm) -> None:
        require_lora(self.name, algorithm)
        super().setup(model, algorithm)  # refuses heterogeneous ranks
        self.model = model
        self.residuals: dict[str, torch.Tensor] = {}  # last round's, as sent

    def download_bytes(self, client_id: int, payload: TensorDict) -> int:
        return nbytes(payload) + nbytes(self.residuals)

    def _begin(self) -> None:
        super()._begin()
        params = dict(self.model.named_parameters())
        self._products = {
            pair.layer: torch.zeros_like(params[pair.base]) for pair in self.algorithm.pairs
        }

    def _add(self, upload: TensorDict, weight: float, client_id: int) -> None:
        super()._add(upload, weight, client_id)
        scale = self.algorithm.scale(self.algorithm.client_rank(client_id))
        for pair in self.algorithm.pairs:
            self._products[pair.layer].add_(scale * upload[pair.b] @ upload[pair.a], alpha=weight)

    def _partial_sums(self) -> list[torch.Tensor]:
        return super()._partial_sums() + list(self._products.values())

    def _after_step(self, aggregate: TensorDict) -> None:
        scale = self.algorithm.scale(self.algorithm.r_max)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for pair in self.algorithm.pairs:
                exact = self._products[pair.layer] / self._total_weight
                residual = exact - scale * aggregate[pair.b] @ aggregate[pair.a]
                params[pair.base].add_(residual)
                self.residuals[pair.layer] = residual
