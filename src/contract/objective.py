"""The training objective and evaluation scores, shared by images and text.

Targets are class labels [B] for images and next-token ids [B, L] for text, with -100 where no
loss is counted (prompt, padding); logits have one more, last, dimension (classes or vocabulary).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from src.data.text import IGNORE_INDEX


def mean_loss(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, int | torch.Tensor]:
    """(mean cross-entropy over the counted targets, how many targets were counted). The count
    of text targets stays a device tensor: reading it would stall the device every step."""
    loss = F.cross_entropy(
        logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )
    count = len(targets) if targets.ndim == 1 else (targets != IGNORE_INDEX).sum()
    return loss, count


@torch.no_grad()
def score(logits: torch.Tensor, targets: torch.Tensor):
    """Per sample: (sum of losses, correct predictions, counted targets), over its tokens for text."""
    losses = F.cross_entropy(
        logits.flatten(0, -2).float(),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    counted = targets != IGNORE_INDEX
    correct = (logits.argmax(-1) == targets) & counted
    if targets.ndim > 1:  # tokens of one sequence
        return losses.sum(1), correct.sum(1), counted.sum(1)
    return losses, correct, counted.long()


def attention_kernels(device: torch.device) -> AbstractContextManager:
    """The attention kernel for a forward pass: PyTorch's choice, except under bf16 autocast on
    the CPU, where its fused flash-attention kernel takes ~4x its float32 time (AVX-512-BF16,
    torch 2.x) and erases what the bf16 matrix multiplies gain; the math backend (matrix
    multiplies) is used there (docs/performance.md, "bf16 on the CPU")."""
    cpu_bf16 = (
        device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    return sdpa_kernel(SDPBackend.MATH) if cpu_bf16 else nullcontext()
