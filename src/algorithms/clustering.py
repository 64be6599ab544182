"""Clustering of uploads: k-means (scikit-learn) with k fixed or chosen by the elbow method.

Each upload is flattened and scaled to unit length, so k-means groups clients by the direction of
their update (for unit vectors, squared distance = 2 - 2 cos). The elbow is the k whose point on
the inertia curve lies farthest below the chord from the first to the last candidate (the
"kneedle" rule on the curve normalised to [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans


@dataclass
class Clustering:
    labels: list[int]  # cluster of each row
    k: int
    inertia: dict[int, float]  # k -> k-means inertia, for every k tried
    similarity: list[list[float]]  # cosine similarity between rows


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def elbow(inertia: dict[int, float]) -> int:
    """The elbow k of a decreasing inertia curve (the smallest k when there is no bend)."""
    ks = sorted(inertia)
    if len(ks) < 3:
        return ks[0]
    x = (np.array(ks) - ks[0]) / (ks[-1] - ks[0])
    y = np.array([inertia[k] for k in ks])
    span = y.max() - y.min()
    if span <= 0:
        return ks[0]
    y = (y - y.min()) / span
    below_chord = (1 - x) - y  # the chord runs from (0, 1) to (1, 0)
    best = int(np.argmax(below_chord))
    return ks[best] if below_chord[best] > 0 else ks[0]


def cluster_rows(
    x: np.ndarray, k: int | None = None, min_k: int = 2, max_k: int = 5, seed: int = 0
) -> Clustering:
    """Cluster the rows of `x` (one flattened upload each) into k groups (k=None: elbow)."""
    x = unit_rows(np.asarray(x, dtype=np.float64))
    n = len(x)
    candidates = [k] if k is not None else list(range(min_k, max_k + 1))
    if max(candidates) > n:
        raise ValueError(f"cannot make {max(candidates)} clusters of {n} rows")
    fits = {c: KMeans(n_clusters=c, n_init=10, random_state=seed).fit(x) for c in candidates}
    inertia = {c: float(fit.inertia_) for c, fit in fits.items()}
    chosen = elbow(inertia)
    return Clustering(
        labels=[int(label) for label in fits[chosen].labels_],
        k=chosen,
        inertia=inertia,
        similarity=(x @ x.T).round(6).tolist(),
    )
