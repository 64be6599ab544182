"""Weighted means: FedAvg / FedIT (`mean`), `rank_aware` and HetLoRA-style
zero-padding (`zeropad`).

Uploads may be smaller than the server's tensors (a rank-r_k client sends the first r_k rows of A
and the first r_k columns of B); such an upload fills the leading block of the server's shape.

mean:       theta = sum_k p_k x_k with p_k = n_k / sum n, where each entry is averaged over the
            clients that sent it (owner-weighted) and an entry nobody sent keeps the server's value.
            With equal shapes this is the plain weighted mean. For LoRA, A and B are averaged
            separately (FedIT; inexact: sum p_k B_k A_k - B_bar A_bar =
            sum p_k (B_k - B_bar)(A_k - A_bar)), so mixed ranks are refused when the server sees
            both factors; when it sees A only (fedsa-flora) this is the rank-aware mean.
rank_aware: the same owner-weighted mean, allowed for any algorithm and any mix of ranks.
zeropad:    every upload is padded with zeros to the server's shape before the mean (the padding
            half of HetLoRA, Cho et al. 2024; HetLoRA's norm-weighted average and rank
            self-pruning are not implemented):
            rows only some clients own are diluted by the others' zeros.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from src.aggregators.base import Aggregator, TensorDict
from src.contract.means import add_to_sums, owner_mean
from src.contract.sharing import Needs


class MeanAggregator(Aggregator):
    privacy = True  # privacy=dp_fedavg's noise is calibrated to this mean
    any_ranks = False  # True: accept mixed ranks even when the server sees both LoRA factors
    sums_uploads = True
    mean_of_uploads = True

    @property
    def needs(self) -> Needs:
        # A and B averaged separately are inexact (FedIT), and with mixed ranks meaningless
        return Needs(equal_shapes_with_factors=not self.any_ranks)

    def _begin(self) -> None:
        self._sums = {name: torch.zeros_like(t) for name, t in self.state.items()}
        self._total_weight = 0.0
        # per tensor: summed weight of the uploads of each shape (a handful of distinct ranks)
        self._weight_by_shape: dict[str, dict[torch.Size, float]] = {
            name: defaultdict(float) for name in self.state
        }

    def _add(self, upload: TensorDict, weight: float, client_id: int) -> None:
        add_to_sums(self._sums, self._weight_by_shape, upload, weight)
        self._total_weight += weight

    def _partial_sums(self) -> list[torch.Tensor]:
        return list(self._sums.values())

    def all_reduce(self, ranks) -> None:
        ranks.sum_all(self._partial_sums())
        mine = {name: dict(weights) for name, weights in self._weight_by_shape.items()}
        counted = ranks.gather([(self.num_added, self._total_weight, mine)])
        self.num_added = sum(added for added, _, _ in counted)
        self._total_weight = sum(total for _, total, _ in counted)
        for name, by_shape in self._weight_by_shape.items():
            by_shape.clear()
            for _, _, rank_by_shape in counted:
                for shape, weight in rank_by_shape[name].items():
                    by_shape[shape] += weight

    def aggregate(self) -> TensorDict:
        return {
            name: owner_mean(acc, self._weight_by_shape[name], self._total_weight, self.state[name])
            for name, acc in self._sums.items()
        }


class RankAwareMeanAggregator(MeanAggregator):
    privacy = False
    any_ranks = True


class ZeroPadAggregator(MeanAggregator):
    privacy = False
    any_ranks = True

    def aggregate(self) -> TensorDict:
        return {name: acc / self._total_weight for name, acc in self._sums.items()}
