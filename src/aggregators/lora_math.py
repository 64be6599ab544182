"""The linear algebra of combining LoRA factors of (possibly) different ranks.

Client k holds A_k in R^{r_k x d_in}, B_k in R^{d_out x r_k}, scale s_k = alpha / r_k, and its
update is dW_k = s_k B_k A_k. `p` are the aggregation weights (sample counts, normalised here).
Every aggregator and the rank-study command call these functions; nothing is computed twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def normalized(weights: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    return w / w.sum()


def stack_factors(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights, scales: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """FLoRA stacking: A_s = [p_1 s_1 A_1; ...; p_K s_K A_K], B_s = [B_1 ... B_K].

    B_s A_s = sum_k p_k s_k B_k A_k exactly, for any mix of ranks (the stacked rank is sum r_k).
    """
    p = normalized(weights, As[0])
    A_s = torch.cat([p[k] * scales[k] * A for k, A in enumerate(As)], dim=0)
    B_s = torch.cat(list(Bs), dim=1)
    return A_s, B_s


def weighted_delta(As: Sequence[Tensor], Bs: Sequence[Tensor], weights, scales) -> Tensor:
    """dW = sum_k p_k s_k B_k A_k (the quantity FLoRA stacks and FlexLoRA factorises)."""
    A_s, B_s = stack_factors(As, Bs, weights, scales)
    return B_s @ A_s


def svd_factors(delta: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` LoRA factors of `delta` at scale s: s * B @ A = U_r S_r V_r^T.

    Eckart-Young: ||delta - s B A||_F = sqrt(sum_{j > r} sigma_j^2).
    """
    return factors_from_svd(torch.linalg.svd(delta, full_matrices=False), rank, scale)


def factors_from_svd(
    usv: tuple[Tensor, Tensor, Tensor], rank: int, scale: float
) -> tuple[Tensor, Tensor]:
    """(A [rank, d_in], B [d_out, rank]) from a thin SVD (U, S, Vh), the singular values split
    evenly: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T. Rows/columns beyond the number of
    singular values (rank > min(d_out, d_in)) are zero: those dimensions are wasted."""
    U, S, Vh = usv
    r = min(rank, S.numel())
    root = (S[:r] / scale).sqrt()
    A = Vh.new_zeros(rank, Vh.shape[1])
    B = U.new_zeros(U.shape[0], rank)
    A[:r] = root[:, None] * Vh[:r]
    B[:, :r] = U[:, :r] * root[None, :]
    return A, B
