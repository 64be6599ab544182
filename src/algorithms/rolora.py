"""RoLoRA: Chen, Guo, Ju, Dalal, Zhu and Khisti, "Robust Federated Finetuning of LLMs via
Alternating Optimization of LoRA", NeurIPS 2025 (arXiv 2502.01755).

Rounds alternate between the two factors of every LoRA layer (t: the 0-based round index):
    t even: A frozen; clients train B_k (and the head) from (A, B); the server averages the B_k;
    t odd:  B frozen; clients train A_k (and the head) from (A, B); the server averages the A_k.
Every client of a round starts from the same frozen factor, so the average of the client
products is the product of the averages, exactly:
    sum_k p_k s B_k A = s (sum_k p_k B_k) A,      sum_k p_k s B A_k = s B (sum_k p_k A_k).
Round 0 trains B: peft starts B at zero, where A's gradient s B^T (dL/dh) x^T is zero.

Client half: only the round's factor and alg.trainable have requires_grad (so the optimizer and a
batched group of clients see only them), and only they are uploaded: half the LoRA uplink. Both
factors are sent down every round: a client sampled after missing rounds needs the current frozen
factor. Server half: each upload is completed with the server's own copy of the frozen factor for
the aggregator, and the server step moves only the trained tensors, so the frozen factor stays bit
for bit as it was. The factor comes from the round index (`server_begin`), so a resumed run
continues on the right one with no saved state.

Paper: read through its abstract and published summaries of its Algorithm 1 (its full text was
not retrievable here). Reference code: the paper's OpenReview supplementary material (RoLoRA-code,
a FederatedScope-LLM fork; no public repository of the authors was found), read in its vendored
copy in github.com/viftode4/scalable-learning (code/harness/rolora-supplement, commit 17862bb; the
authors' own trainer lines are the removed lines of code/harness/rolora-supplement.patch).
Defaults taken from it (llm/trainer/trainer.py, llm/baseline/test_glue.yaml,
core/aggregators/clients_avg_aggregator.py): B first (its step_count 0 freezes A); only the
trainable tensors are uploaded and averaged, p_k = n_k / n; LoRA r = 8, alpha = 32. Its clients
use SGD, lr 0.005, weight decay 2e-4, 20 local batches of 32 (here: optim=sgd optim.lr=0.005
optim.momentum=0 optim.weight_decay=2e-4; fl.local_epochs sets the local work).

Differences from the reference, and why:
- the factor comes from the round index, not from a per-trainer counter incremented at every fit
  start (evaluation routines included): that counter drifts off the rounds, and with partial
  participation clients would train different factors in one round, breaking the exact average.
- the head (alg.trainable) is trained and averaged every round, as in alg=fedlora; the reference
  freezes RoBERTa's classifier at its initialisation, but the ViT's head here is new and must
  learn.
- LoRA dropout is the model's default (vit: 0); the reference's 0.1 is its RoBERTa setting.
- both factors are sent down (fedsweep's clients keep no state between rounds): only the uplink
  is halved.
- any per-tensor aggregator may reduce the trained factor (median, trimmed mean, Krum: robust
  counterparts of the paper's mean); the server optimiser steps the trained factor only.

Equal ranks only (the paper's setting): with mixed ranks the average is no longer exact.
Aggregators that combine both factors themselves (stack, svd, exact) are refused: no upload holds
both, and the mean is already exact (the SharedSpec says so: `tensorwise`, checked before
training in src/engine/compatibility.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from src.algorithms.adapters import ModelOrAdapters, TensorDict
from src.contract.sharing import SharedSpec
from src.errors import ConfigError


def trains_b(round_idx: int) -> bool:
    """Round `round_idx` (0-based) trains B (A frozen) when even, A (B frozen) when odd."""
    return round_idx % 2 == 0


class RoLoRA(ModelOrAdapters):
    privacy = False

    def __init__(
        self,
        name: str,
        lora: dict | None,
        trainable: Sequence[str] = ("head",),
        client_ranks: int | Sequence[int] | None = None,
        local_buffers: bool = False,
        weighting: str = "samples",
    ):
        if not lora:
            raise ConfigError(f"alg.lora={lora}: alg={name} alternates LoRA factors; give alg.lora")
        super().__init__(name, lora, trainable, client_ranks, (), local_buffers, weighting)
        self.require_equal_ranks("every client must start a round from the same frozen factor")
        self.round_idx = 0  # the running round (server_begin); round 0 trains B

    # ------------------------------------------------------------------ model
    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = super().prepare_model(model)
        self._freeze_other_factor(model)
        return model

    def trained_names(self, model: nn.Module) -> list[str]:
        """Both factors of every layer (one per round) and alg.trainable, whatever the round."""
        factors = self._a_names | self._b_names
        return [n for n, p in model.named_parameters() if p.requires_grad or n in factors]

    def frozen_names(self) -> set[str]:
        """The factor every client keeps as received this round."""
        return self._a_names if trains_b(self.round_idx) else self._b_names

    def _freeze_other_factor(self, model: nn.Module) -> None:
        train_b = trains_b(self.round_idx)
        params = dict(model.named_parameters())
        for pair in self.pairs:
            params[pair.a].requires_grad_(not train_b)
            params[pair.b].requires_grad_(train_b)

    def shared_spec(self, model: nn.Module, clients_per_round: int) -> SharedSpec:
        spec = super().shared_spec(model, clients_per_round)
        options = f"{spec.options} (lora_B and lora_A in alternate rounds)"
        why = "uploads one LoRA factor per round, whose mean is already exact"
        self.spec = dataclasses.replace(spec, options=options, tensorwise=why)
        return self.spec

    # ------------------------------------------------------------------ client half
    def load(self, model: nn.Module, tensors: TensorDict, client_id: int | None) -> None:
        super().load(model, tensors, client_id)
        self._freeze_other_factor(model)  # so the optimizer (and a batched group) sees one factor

    def shared_views(self, model: nn.Module, client_id: int | None) -> TensorDict:
        """The round's trained factor and alg.trainable; the frozen factor is not sent."""
        frozen = self.frozen_names()
        return {n: t for n, t in super().shared_views(model, client_id).items() if n not in frozen}

    # ------------------------------------------------------------------ server half
    def server_begin(self, server, round_idx: int) -> None:
        self.round_idx = round_idx
        server.aggregator.begin(round_idx)

    def server_add(self, server, upload: TensorDict, weight: float, client_id: int) -> None:
        # the server's own frozen factor fills the place the aggregator expects; it is not stepped
        frozen = {name: server.state[name] for name in self.frozen_names()}
        server.aggregator.add(upload | frozen, weight, client_id)

    def server_update(self, state: TensorDict, aggregate: TensorDict, step) -> None:
        frozen = self.frozen_names()
        step({name: t for name, t in state.items() if name not in frozen}, aggregate)
