"""The random projection P in R^{d x D} of lp-proj (perfed), regenerated from a seed, never stored.

Rows are Gaussian, then scaled to unit length, or (orthogonalize) made exactly orthonormal:
P = T G with G the raw Gaussian matrix and T a d x d matrix (diag(1/|g_i|), or L^{-1} with
G G^T = L L^T, Cholesky). G is generated in column blocks of at most `block_elems` numbers, each
from its own seed (seed, block), on the device, so

    P w   = T (sum_b G_b w_b)           P^T v = [G_b^T (T^T v)]_b

never hold more than one block; memory is bounded by the block size, not by d x D. When d x D fits
in `cache_elems`, G is generated once and kept (faster for small models).
"""

from __future__ import annotations

import numpy as np
import torch


class RandomProjection:
    def __init__(
        self,
        d: int,
        D: int,
        seed: int,
        orthogonalize: bool = False,
        device: torch.device | str = "cpu",
        block_elems: int = 1 << 22,
        cache_elems: int = 1 << 27,
    ):
        if d > D:
            raise ValueError(f"projection to d={d} dimensions needs D >= d parameters, got D={D}")
        self.d, self.D, self.seed = int(d), int(D), int(seed)
        self.device = torch.device(device)
        cols = max(1, block_elems // self.d)
        self.edges = list(range(0, self.D, cols)) + [self.D]
        self._cache = None
        gram = torch.zeros(self.d, self.d, dtype=torch.float64, device=self.device)
        for b in range(self.num_blocks):
            block = self._gaussian(b).double()
            gram += block @ block.T
        if orthogonalize:
            lower = torch.linalg.cholesky(gram)
            eye = torch.eye(self.d, dtype=torch.float64, device=self.device)
            self.transform = torch.linalg.solve_triangular(lower, eye, upper=False)
        else:
            self.transform = torch.diag(gram.diagonal().rsqrt())
        if self.d * self.D <= cache_elems:
            self._cache = torch.cat([self._gaussian(b) for b in range(self.num_blocks)], dim=1)

    @property
    def num_blocks(self) -> int:
        return len(self.edges) - 1

    def _gaussian(self, b: int) -> torch.Tensor:
        """Raw Gaussian block b (d x cols), the same on every party for the same seed."""
        if self._cache is not None:
            return self._cache[:, self.edges[b] : self.edges[b + 1]]
        block_seed = int(np.random.SeedSequence([self.seed, b]).generate_state(1)[0])
        gen = torch.Generator(device=self.device).manual_seed(block_seed)
        cols = self.edges[b + 1] - self.edges[b]
        return torch.randn(self.d, cols, generator=gen, device=self.device)

    def matvec(self, w: torch.Tensor) -> torch.Tensor:
        """P w for w in R^D, or for each row of w in R^{K x D} (in w's dtype)."""
        if self._cache is not None:
            raw = w @ self._cache.T.to(w.dtype)
        else:
            raw = torch.zeros((*w.shape[:-1], self.d), dtype=w.dtype, device=w.device)
            for b in range(self.num_blocks):
                raw += w[..., self.edges[b] : self.edges[b + 1]] @ self._gaussian(b).T.to(w.dtype)
        return (raw.double() @ self.transform.T).to(w.dtype)

    def rmatvec(self, v: torch.Tensor) -> torch.Tensor:
        """P^T v for v in R^d, or for each row of v in R^{K x d}."""
        u = (v.double() @ self.transform).to(v.dtype)
        if self._cache is not None:
            return u @ self._cache.to(v.dtype)
        return torch.cat([u @ self._gaussian(b).to(v.dtype) for b in range(self.num_blocks)], -1)

    def dense(self) -> torch.Tensor:
        """The whole P in float64 (for tests on small D)."""
        raw = torch.cat([self._gaussian(b) for b in range(self.num_blocks)], dim=1)
        return self.transform @ raw.double()
