"""Sample-weighted mean (FedAvg; FedIT for LoRA factors): sum_k p_k x_k with p_k = n_k / sum n."""

from __future__ import annotations

import torch

from src.aggregators.base import Aggregator, TensorDict


class MeanAggregator(Aggregator):
    def _begin(self, global_state: TensorDict) -> None:
        self._sums = {name: torch.zeros_like(t) for name, t in global_state.items()}
        self._total_weight = 0.0

    def _add(self, upload: TensorDict, weight: float) -> None:
        for name, acc in self._sums.items():
            acc.add_(upload[name].to(acc.dtype), alpha=weight)
        self._total_weight += weight

    def _result(self) -> TensorDict:
        return {name: acc / self._total_weight for name, acc in self._sums.items()}
