"""Byzantine-robust aggregators for any tensors, as Flower's FedMedian, FedTrimmedAvg
and Krum: they see all of a round's uploads at once, so these buffer them.

median:       coordinate-wise median of the uploads (the mean of the two middle values for an
              even count); sample counts are ignored, as in the textbook rule.
trimmed_mean: coordinate-wise, drop the floor(trim * K) smallest and largest values, average the
              rest (trim 0.2 by default; sample counts are ignored, as in Yin et al. 2018).
krum:         Blanchard et al. (2017): each upload's score is the sum of squared distances to its
              K - f - 2 nearest other uploads (f = num_byzantine; at least 1); the m uploads with
              the lowest scores are averaged (m = 1: Krum, m > 1: multi-Krum), uniformly as in the
              paper.
The three treat every upload alike: the weights the server gives them (alg.weighting) do not enter.
Then the server step, as for every aggregator. Uploads must have the server's shapes (equal ranks).
"""

from __future__ import annotations

import math

import torch

from src.aggregators.base import Aggregator, TensorDict
from src.contract.sharing import Needs
from src.errors import ConfigError


class BufferedAggregator(Aggregator):
    """Keeps a copy of every upload of the round (they are views of the resident model)."""

    robust = True

    @property
    def needs(self) -> Needs:
        return Needs(
            equal_shapes=True,
            min_uploads=3,
            min_uploads_why="the median of 2 uploads is their mean",
        )

    def _begin(self) -> None:
        self._uploads: list[TensorDict] = []

    def _add(self, upload: TensorDict, weight: float, client_id: int) -> None:
        # copies in the state's dtype: float32 for a bf16 model, so the rules sum in float32
        self._uploads.append(
            {name: upload[name].detach().to(t.dtype, copy=True) for name, t in self.state.items()}
        )

    def _stacked(self, name: str) -> torch.Tensor:
        """[K, *shape]: this round's uploads of one tensor."""
        return torch.stack([upload[name] for upload in self._uploads])


class MedianAggregator(BufferedAggregator):
    coordinatewise = True

    def aggregate(self) -> TensorDict:
        out = {}
        for name in self.state:
            ordered = self._stacked(name).sort(dim=0).values
            k = len(ordered)
            out[name] = (ordered[(k - 1) // 2] + ordered[k // 2]) / 2
        return out


class TrimmedMeanAggregator(BufferedAggregator):
    coordinatewise = True

    def __init__(self, name: str, trim: float = 0.2):
        super().__init__(name)
        if not 0.0 <= trim < 0.5:
            raise ConfigError(f"aggregator.trim must be in [0, 0.5), got {trim}")
        self.trim = float(trim)

    @property
    def needs(self) -> Needs:
        # with fewer than 1 / trim uploads nothing is cut: the plain mean
        least = max(3, math.ceil(1 / self.trim - 1e-9)) if self.trim > 0 else 1
        why = f"with fewer, floor({self.trim} * K) = 0 uploads are trimmed: the plain mean"
        return Needs(equal_shapes=True, min_uploads=least, min_uploads_why=why)

    def aggregate(self) -> TensorDict:
        out = {}
        for name in self.state:
            ordered = self._stacked(name).sort(dim=0).values
            cut = int(self.trim * len(ordered))
            out[name] = ordered[cut : len(ordered) - cut].mean(dim=0)
        return out


class KrumAggregator(BufferedAggregator):
    def __init__(self, name: str, num_byzantine: int = 1, m: int = 1):
        super().__init__(name)
        if num_byzantine < 0:
            raise ConfigError(f"aggregator.num_byzantine must be >= 0, got {num_byzantine}")
        if m < 1:
            raise ConfigError(f"aggregator.m must be >= 1, got {m}")
        self.num_byzantine, self.m = int(num_byzantine), int(m)
        self.selected: list[int] = []  # positions (in arrival order) chosen in the last round

    @property
    def needs(self) -> Needs:
        f = self.num_byzantine  # Krum's guarantee needs K > 2f + 2
        why = f"Krum's guarantee with aggregator.num_byzantine={f} needs K > 2 * {f} + 2"
        if self.m > 2 * f + 3:  # Multi-Krum averages the m best: it needs m uploads
            why = f"aggregator.m={self.m} averages the {self.m} best-scored uploads"
        return Needs(equal_shapes=True, min_uploads=max(2 * f + 3, self.m), min_uploads_why=why)

    def scores(self) -> torch.Tensor:
        flat = torch.stack(
            [torch.cat([u[n].flatten().double() for n in self.state]) for u in self._uploads]
        )
        distances = torch.cdist(flat, flat).square()
        k = len(flat)
        neighbours = max(1, k - self.num_byzantine - 2)
        neighbours = min(neighbours, k - 1) if k > 1 else 0
        # the smallest distances to others: skip the zero distance to itself (first after sorting)
        return distances.sort(dim=1).values[:, 1 : 1 + neighbours].sum(dim=1)

    def aggregate(self) -> TensorDict:
        order = self.scores().argsort()
        # m <= clients_per_round is checked before training; fewer arrive only when clients drop
        self.selected = order[: self.m].tolist()
        weights = torch.ones(len(self.selected), dtype=torch.float64)
        weights = weights / weights.sum()  # the uniform mean of the selected
        return {
            name: sum(
                w.item() * self._uploads[i][name]
                for w, i in zip(weights, self.selected, strict=True)
            )
            for name in self.state
        }
