"""LoRA adapters through peft on any plain ``nn.Module`` (timm ViT, Qwen, ...).

Convention (peft's, no rslora): a targeted layer computes ``W x + s * B A x`` with
``A in R^{r x d_in}`` (kaiming init), ``B in R^{d_out x r}`` (zeros, so the model is unchanged at
init) and scale ``s = alpha / r``. Parameter names are stable and used as upload keys, e.g.
``blocks.0.attn.proj.lora_A.default.weight``, ``blocks.0.attn.proj.lora_B.default.weight``; the
frozen base weight becomes ``blocks.0.attn.proj.base_layer.weight``.
"""

from __future__ import annotations

from collections.abc import Sequence

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import cast_adapter_dtype
from torch import nn

from src.errors import ConfigError

# layer types peft's LoRA can wrap (what a target module must be)
_LORA_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)


def _matches(name: str, pattern: str) -> bool:
    """peft's rule for a list of target modules: the name is the pattern or ends with '.pattern'."""
    return name == pattern or name.endswith("." + pattern)


def _under(name: str, prefix: str) -> bool:
    """'head' covers 'head.weight' and 'head.bias' but not 'heads.0.weight' or 'x.head.weight'."""
    return name == prefix or name.startswith(prefix + ".")


def add_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    trainable: Sequence[str] = ("head",),
) -> nn.Module:
    """Put LoRA on every module whose name ends with one of ``target_modules``; freeze the rest.

    Trainable afterwards: the LoRA A/B matrices and parameters under a ``trainable`` prefix
    (``"head"`` -> ``head.weight``, ``head.bias``). Returns the same object, modified in place:
    ``peft.inject_adapter_in_model`` is used rather than ``get_peft_model`` because it keeps the
    plain module (forward ``model(images) -> logits`` and parameter names without a
    ``base_model.model.`` prefix), which is what the orchestrator copies tensors in and out of.
    """
    if int(r) != r or r <= 0:
        raise ConfigError(f"alg.lora.r must be a positive integer, got {r}")
    if alpha <= 0:
        raise ConfigError(f"alg.lora.alpha must be > 0, got {alpha}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"alg.lora.dropout must be in [0, 1), got {dropout}")
    if isinstance(target_modules, str) or not target_modules:
        raise ConfigError(
            f"alg.lora.target_modules must be a non-empty list, got {target_modules!r}"
        )
    # every layer LoRA can adapt, with its width min(in, out): the largest rank it can take
    widths = {
        n: min(m.weight.shape[:2]) for n, m in model.named_modules() if isinstance(m, _LORA_TYPES)
    }
    for t in target_modules:
        if not any(_matches(n, t) for n in widths):
            linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise ConfigError(
                f"alg.lora.target_modules: '{t}' matches no Linear/Conv2d/Embedding module; "
                f"available e.g. {linear[:6]}"
            )
    targeted = {n: w for n, w in widths.items() if any(_matches(n, t) for t in target_modules)}
    narrowest = min(targeted, key=targeted.get)
    if r > targeted[narrowest]:
        raise ConfigError(
            f"alg.lora.r={r} exceeds the width of the targeted layer {narrowest} "
            f"(min(in, out) = {targeted[narrowest]}); use alg.lora.r <= {targeted[narrowest]}"
        )
    param_names = [n for n, _ in model.named_parameters()]
    for p in trainable:
        if not any(_under(n, p) for n in param_names):
            top = [n for n, _ in model.named_children()]
            raise ConfigError(
                f"alg.trainable: '{p}' matches no parameter; top-level modules: {top}"
            )

    config = LoraConfig(
        r=int(r),
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        use_rslora=False,
        init_lora_weights=True,
    )
    model = inject_adapter_in_model(config, model)
    # the LoRA factors in float32 on a bf16/fp16 base (peft's own upcast, as get_peft_model does):
    # the optimizer then updates float32 factors and peft casts the input of each adapter
    cast_adapter_dtype(model, adapter_name="default", autocast_adapter_dtype=True)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or any(_under(name, p) for p in trainable))
    return model


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of all LoRA tensors, in module order."""
    return [n for n, _ in model.named_parameters() if "lora_" in n]
