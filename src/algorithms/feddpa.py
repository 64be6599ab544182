"""FedDPA-T: Yang, Long, Shen, Jiang and Blumenstein, "Dual-Personalizing Adapter for Federated
Foundation Models", NeurIPS 2024; reference code https://github.com/Lydia-yang/FedDPA
(code/main.py with --local_model True, code/fed_utils/client.py, code/GlobalModel_generated.py,
and its patched peft: code/peft/tuners/lora/layer.py).

Every targeted layer carries two peft LoRA adapters of rank r and scale s = alpha / r: the global
adapter G (peft's "default"; shared with the head and averaged by the server, as FedIT does) and
the local adapter L ("local"; it never leaves the client and lives in the client state store).

Client k in round t, receiving (G_t, head_t), trains fl.local_epochs with the configured optimizer
1. the local adapter, from round 1 on (0-based; the reference skips it in round 0), on
       h = W0 x + a s B_L A_L x + (1 - a) s sg(B_G A_G x),      a = local_weight,
   G_t and the head frozen; sg: no gradient through the global branch at all (the reference
   detaches that branch's output, so not even its input gets a gradient from it);
2. then the global adapter and the head, from (G_t, head_t), on h = W0 x + s B_G A_G x (L off):
   the upload. The server averages the uploads with the configured aggregator.

A client deploys (val/personal_acc) both adapters, weighted per input x (instance-wise dynamic
weighting):
    e(.)   = the model's representation of an input with the local adapter alone (W0 + s B_L A_L),
    w(x)   = max_weight * (1/K) sum_k cos(e(x), e(x_k)),   x_1..x_K drawn from the client's
             training split afresh for every x (K = instance_num),
    h      = W0 x + w(x) s B_G A_G x + (1 - w(x)) s B_L A_L x.
w(x) multiplies the global adapter and 1 - w(x) the local one, as the reference's inference does
(get_weight, then set_local(['local'], [w, 1 - w]) with the global adapter active). The paper's
method section could not be read when this was written (only its abstract and figures): the
training rule and this weighting follow the official code, read in full.

Defaults taken from the reference: r = 8, alpha = 16, local_weight = 0.5 (--local_weight),
max_weight = 0.5 (its default `half`), instance_num = 5, cosine similarity, the last layer's
representation (emb_type='last'), local training before global training in every round after
the first, both with the same epochs and optimizer.

Differences from the reference, and why:
- image classification with a timm ViT instead of instruction tuning of LLaMA: e(x) is the ViT's
  pooled pre-logits representation (its class token after the final norm, what the head reads)
  instead of the last token's final hidden state; the LoRA targets and dropout are the model's
  defaults (timm fuses q, k, v, so the reference's q_proj / v_proj cannot be adapted alone).
  Text models are refused.
- the ViT's classification head is new and must be trained: it belongs to the global part (trained
  in phase 2, averaged with G, frozen in phase 1); the reference's LM head stays frozen.
- none in the server's mean: uniform over the sampled clients, as the reference's FedAvg
  (alg.weighting=uniform; samples: by n_k, FedIT's).
- the configured optimizer and fl.local_epochs instead of AdamW at 3e-4 for 3 epochs of batch 128.
- the anchors x_k come from a generator seeded by (seed, client) at every deployment, not from
  Python's global `random`; a client with fewer than K training samples uses all of them.
- a client's local adapter persists from its last round (the reference's `subset` path; its
  default path starts a fresh one when the client missed the previous round), and every client's
  starts from the same initialisation (A from the model seed, B = 0), not a fresh random A.
- val/global_acc is, as for every personalised algorithm here, the deployed models on the global
  test set (close to the paper's test-time personalisation), not G alone.
- FedDPA-F (the local adapter fine-tuned once after federated training) is not built.

Equal ranks only. Rules that combine LoRA products (stack, svd, exact) are refused before
training: the SharedSpec also lists the local adapter's layers, whose factors stay on the clients,
so src/engine/compatibility.py sees that not every layer's product B A is uploaded (stack and
exact would also merge the global product into the base weights under the local adapter, where it
counts at weight 1 instead of w(x)).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import cast_adapter_dtype, set_adapter
from torch import nn

from src.algorithms.adapters import ModelOrAdapters
from src.algorithms.base import ClientRun, ClientState, TensorDict
from src.contract.sharing import LoraLayer as SharedLayer
from src.contract.sharing import SharedSpec
from src.errors import ConfigError

GLOBAL, LOCAL = "default", "local"  # peft adapter names
_ANCHOR_STREAM = 0xD9A  # the seed stream of the anchors drawn at deployment


def instance_weights(
    features: torch.Tensor, anchor_features: torch.Tensor, max_weight: float
) -> torch.Tensor:
    """w(x) = max_weight * mean_k cos(e(x), e(x_k)) for each input: `features` [B, D],
    `anchor_features` [B, K, D] (each input's own K anchors) -> [B]."""
    similarity = F.cosine_similarity(features.unsqueeze(1), anchor_features, dim=-1)
    return max_weight * similarity.mean(dim=1)


class FedDPA(ModelOrAdapters):
    privacy = False

    def __init__(
        self,
        name: str,
        lora: dict | None,
        trainable: Sequence[str] = ("head",),
        local_weight: float = 0.5,
        max_weight: float = 0.5,
        instance_num: int = 5,
        weighting: str = "uniform",  # the reference's mean over the sampled clients
    ):
        if not lora:
            raise ConfigError(
                f"alg.lora must give the adapters' r, alpha, dropout and target_modules, got "
                f"{lora}: alg={name} trains two LoRA adapters"
            )
        for key, value, fits, allowed in (
            ("local_weight", local_weight, lambda v: 0 < v <= 1, "a number in (0, 1]"),
            ("max_weight", max_weight, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
            (
                "instance_num",
                instance_num,
                lambda v: isinstance(v, int) and v >= 1,
                "an integer >= 1",
            ),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not fits(value):
                raise ConfigError(f"alg.{key} must be {allowed}, got {value!r}")
        super().__init__(name, lora, trainable, weighting=weighting)  # equal ranks: no client_ranks
        self.local_weight = float(local_weight)
        self.max_weight = float(max_weight)
        self.instance_num = int(instance_num)
        self.federation = None  # the clients' training splits: the anchors of deployment
        self.seed = 0
        self._trainable: list[nn.Parameter] = []  # trained at rest: both adapters and the head
        self._weights: dict[str, float | torch.Tensor] = {}  # each adapter's output weight
        self._stopped: set[str] = set()  # adapters whose output passes no gradient
        self._deployed: int | None = None  # the client whose inputs are weighted, if any
        self._anchor_generator: torch.Generator | None = None

    @property
    def personalized(self) -> bool:
        return True

    # ------------------------------------------------------------------ set-up
    def prepare_model(self, model: nn.Module) -> nn.Module:
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise ConfigError(
                f"alg={self.name} reads each input's representation through timm's "
                f"forward_features / forward_head, which {type(model).__name__} lacks; use an "
                "image model (model=vit or vit_small32): text models are not supported"
            )
        model = super().prepare_model(model)  # the global adapter ("default") and the head
        config = LoraConfig(
            r=self.r_max,
            lora_alpha=self.lora_ranks.alpha,
            lora_dropout=self.lora.get("dropout", 0.0),
            target_modules=list(self.lora["target_modules"]),
            bias="none",
            init_lora_weights=True,
        )
        with warnings.catch_warnings():  # peft's note that the model gets a second adapter
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            model = inject_adapter_in_model(config, model, adapter_name=LOCAL)
        cast_adapter_dtype(model, adapter_name=LOCAL, autocast_adapter_dtype=True)
        for layer in self._adapted(model):
            for adapter in (GLOBAL, LOCAL):
                layer.lora_B[adapter].register_forward_hook(self._weigh_output(adapter))
        model.register_forward_pre_hook(self._weigh_inputs)
        set_adapter(model, [GLOBAL, LOCAL])  # both trainable (peft ties that to being active)
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self.private = [f"lora_A.{LOCAL}.", f"lora_B.{LOCAL}."]
        self.check_private(model)
        self._use(model, [GLOBAL])
        return model

    def configure(self, federation, output_dir, seed: int) -> None:
        if federation.is_text:
            raise ConfigError(f"alg={self.name} supports image data only; got a text data set")
        self.federation, self.seed = federation, seed

    def shared_spec(self, model: nn.Module, clients_per_round: int) -> SharedSpec:
        """The adapters' spec, with the local adapter's layers listed too: their factors never leave
        the clients, so the rules that need whole products B A refuse FedDPA up front."""
        spec = super().shared_spec(model, clients_per_round)
        local = tuple(
            SharedLayer(
                pair.name,
                pair.a.replace(f".{GLOBAL}.", f".{LOCAL}."),
                pair.b.replace(f".{GLOBAL}.", f".{LOCAL}."),
                pair.base,
            )
            for pair in self.pairs
        )
        self.spec = dataclasses.replace(
            spec,
            layers=spec.layers + local,
            options=f"alg={self.name} (its local adapter stays on each client)",
        )
        return self.spec

    @staticmethod
    def _adapted(model: nn.Module) -> list[LoraLayer]:
        return [m for m in model.modules() if isinstance(m, LoraLayer)]

    # ------------------------------------------------------------------ adapters and weights
    def _weigh_output(self, adapter: str):
        """A forward hook on an adapter's B: its output times the adapter's weight (a number, or
        one per input), detached when the adapter is stopped."""

        def hook(module, args, output):
            if adapter in self._stopped:
                output = output.detach()
            weight = self._weights.get(adapter)
            if isinstance(weight, torch.Tensor):  # one weight per input of the batch
                weight = weight.to(output.dtype).reshape(-1, *[1] * (output.dim() - 1))
            return output if weight is None else output * weight

        return hook

    def _use(
        self,
        model: nn.Module,
        adapters: list[str],
        trained: Iterable[nn.Parameter] | None = None,
        weights: dict[str, float | torch.Tensor] | None = None,
        stopped: Iterable[str] = (),
    ) -> None:
        """Activate `adapters` (peft), train only `trained` (default: everything trained at rest,
        so the shared and private names never change), weigh and stop adapters' outputs."""
        set_adapter(model, adapters)
        keep = {id(p) for p in (self._trainable if trained is None else trained)}
        for p in self._trainable:
            p.requires_grad_(id(p) in keep)
        self._weights, self._stopped = dict(weights or {}), set(stopped)

    def _params(self, model: nn.Module, names: Iterable[str]) -> list[nn.Parameter]:
        wanted = set(names)
        return [p for n, p in model.named_parameters() if n in wanted]

    # ------------------------------------------------------------------ client
    def load(self, model: nn.Module, tensors: TensorDict, client_id: int | None) -> None:
        """(G, head) from the server and the client's L into the model; G alone is active."""
        self._deployed = None
        super().load(model, tensors, client_id)
        self._use(model, [GLOBAL])

    def deploy(
        self, model: nn.Module, payload: TensorDict, private: TensorDict, client_id: int | None
    ) -> None:
        """The client's G and L, combined per input (see `_weigh_inputs`)."""
        self.load(model, payload | private, client_id)
        if client_id is None:
            return
        if self.federation is None:
            raise RuntimeError(f"alg={self.name}: configure() before deploy() (the anchors)")
        self._deployed = client_id
        seed = np.random.SeedSequence([self.seed, client_id, _ANCHOR_STREAM]).generate_state(1)
        self._anchor_generator = torch.Generator().manual_seed(int(seed[0]))
        self._use(model, [GLOBAL, LOCAL])

    def local_update(self, model: nn.Module, state: ClientState, run: ClientRun):
        """1. the local adapter (from round 1 on) against the frozen global one, 2. the global
        adapter and the head alone: the upload; returns phase 2's loss (the federation's)."""
        if run.round_idx > 0:  # as the reference: round 0 trains the global adapter only
            local = self._params(model, self.private_names(model))
            self._use(
                model,
                [GLOBAL, LOCAL],
                trained=local,
                weights={LOCAL: self.local_weight, GLOBAL: 1 - self.local_weight},
                stopped=[GLOBAL],
            )
            try:
                self.train(model, run.make_optimizer(local), run.batches(), run.backward, {})
            finally:
                self._use(model, [GLOBAL])
        shared = self._params(model, self.shared_names(model))
        self._use(model, [GLOBAL], trained=shared)
        try:
            loss_sum, seen, _ = self.train(
                model, run.make_optimizer(shared), run.batches(), run.backward, {}
            )
        finally:
            self._use(model, [GLOBAL])
        return loss_sum, seen

    # ------------------------------------------------------------------ deployment
    def _weigh_inputs(self, model: nn.Module, args: tuple) -> None:
        """Forward pre-hook: while a client is deployed, weigh G by w(x) and L by 1 - w(x)."""
        if self._deployed is None:
            return
        with torch.no_grad():
            inputs = args[0]
            self._use(model, [LOCAL])
            features = self._represent(model, inputs)
            anchors = self._anchor_features(model, len(inputs))
            weight = instance_weights(features, anchors, self.max_weight)
        self._use(model, [GLOBAL, LOCAL], weights={GLOBAL: weight, LOCAL: 1 - weight})

    @staticmethod
    def _represent(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """e(x): the pooled pre-logits representation (what the classification head reads)."""
        return model.forward_head(model.forward_features(inputs), pre_logits=True)

    def _anchor_features(self, model: nn.Module, count: int) -> torch.Tensor:
        """[count, K, D]: for each of `count` inputs, the representations of K training inputs of
        the deployed client, drawn without replacement (at most its training split)."""
        train = self.federation.clients[self._deployed].train
        k = min(self.instance_num, len(train))
        draws = torch.rand(count, len(train), generator=self._anchor_generator)
        drawn = draws.topk(k, dim=1).indices.to(train.device)
        unique, where = torch.unique(drawn, return_inverse=True)
        images, _ = self.federation.train.batch(train[unique])
        # in chunks of the evaluated batch's size: K times its inputs may not fit at once
        features = torch.cat([self._represent(model, part) for part in images.split(count)])
        return features[where]
