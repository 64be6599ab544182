"""Weighted means: FedAvg / FedIT (`mean`) and HetLoRA's zero-padding (`zeropad`).

mean:    theta = sum_k p_k x_k with p_k = n_k / sum n; for LoRA, A and B are averaged separately
         (FedIT; inexact: sum p_k B_k A_k - B_bar A_bar = sum p_k (B_k - B_bar)(A_k - A_bar)).
zeropad: every upload is padded with zeros to the server's r_max shape before the mean, and each
         client receives the first r_k rows/columns back. Rows only some clients own are diluted.
rank_aware: as zeropad, but index j is averaged over the clients that sent index j only (weights
         renormalised among them), and an index nobody sent keeps the server's value: no dilution.
"""

from __future__ import annotations

import torch

from src.aggregators.base import Aggregator, TensorDict
from src.errors import ConfigError


class MeanAggregator(Aggregator):
    def setup(self, model, algorithm) -> None:
        if getattr(algorithm, "heterogeneous", False):
            raise ConfigError(
                f"aggregator=mean averages A and B separately and needs equal ranks, got "
                f"alg.client_ranks={algorithm.ranks}; use aggregator=stack, svd or zeropad"
            )
        super().setup(model, algorithm)

    def _begin(self) -> None:
        self._sums = {name: torch.zeros_like(t) for name, t in self.state.items()}
        self._total_weight = 0.0

    def _add(self, upload: TensorDict, weight: float, client_id: int) -> None:
        for name, acc in self._sums.items():
            tensor = upload[name]
            # zero padding: a smaller (rank-r_k) tensor fills the leading block of the sum
            acc[tuple(slice(0, n) for n in tensor.shape)].add_(tensor.to(acc.dtype), alpha=weight)
        self._total_weight += weight

    def _result(self) -> TensorDict:
        return {name: acc / self._total_weight for name, acc in self._sums.items()}


class ZeroPadAggregator(MeanAggregator):
    def setup(self, model, algorithm) -> None:
        Aggregator.setup(self, model, algorithm)  # any mix of ranks


class RankAwareMeanAggregator(ZeroPadAggregator):
    def _begin(self) -> None:
        super()._begin()
        self._owner_weight = {name: torch.zeros_like(t) for name, t in self.state.items()}

    def _add(self, upload: TensorDict, weight: float, client_id: int) -> None:
        super()._add(upload, weight, client_id)
        for name, owned in self._owner_weight.items():
            owned[tuple(slice(0, n) for n in upload[name].shape)] += weight

    def _result(self) -> TensorDict:
        result = {}
        for name, acc in self._sums.items():
            owned = self._owner_weight[name]
            safe = torch.where(owned > 0, owned, torch.ones_like(owned))
            result[name] = torch.where(owned > 0, acc / safe, self.state[name])
        return result
