"""`export=true`: the run's final models, written after the last round under <output_dir>/export/.

    global/        the global model (the server's), for every algorithm that has one
    client_XXXX/   for a personalised algorithm, each client's deployed model (the one that
                   val/personal_acc scores)

A folder holds one of two formats, whichever represents the model exactly:
- a peft adapter (adapter_config.json + adapter_model.safetensors), when the model carries LoRA
  adapters and the server never changed its base weights. A client of rank r_k gets a rank-r_k
  adapter; a module trained whole (the ViT's head) is a peft `modules_to_save` module. A second
  adapter of the same layers (FedDPA's local one) is written to the sub-folder of its name.
- the whole model otherwise (full training, or a LoRA rule that merges products into the base
  weights), with every LoRA product merged into its layer's weight: `model.safetensors` with the
  plain model's parameter names, or for a transformers model a `save_pretrained` folder.

`load_exported(run_dir, "global" | client id)` rebuilds the base model from the run's saved config
and loads either format; `PeftModel.from_pretrained` / `AutoModelForCausalLM.from_pretrained` load
them without fedsweep. Weights only (safetensors): loading runs no code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_model, save_file
from torch import nn

from src.models.build import build_base_model
from src.models.qwen import CausalLM

log = logging.getLogger(__name__)

TensorDict = dict[str, torch.Tensor]
DEFAULT = "default"  # peft's name of a model's first adapter


def export_models(module, folder: Path) -> list[Path]:
    """Write the global model and, for a personalised algorithm, each client's deployed one;
    returns the folders written. The resident model is left holding the global model."""
    model, server = module.model, module.server
    state_names = set(model.state_dict())
    clients = range(module.federation.num_clients) if module.algorithm.personalized else ()
    folder.mkdir(parents=True, exist_ok=True)
    # what load_exported rebuilds the base model from
    OmegaConf.save(OmegaConf.create(module.run_config), folder / "config.yaml")
    written = []
    for client in (None, *clients):
        # read once: a client's private state may come from disk (fl.client_state_memory_gb)
        received, private = (
            (server.payload(None), {}) if client is None else module.deployed_state(client)
        )
        # what this model deploys, of the model's own tensors (SCAFFOLD also sends its controls)
        names = (set(received) | set(private)) & state_names
        if not names:  # perfed's server holds x in R^d only: no global model to write
            log.info(
                "export: alg=%s has no global model (its server holds no model tensors)",
                module.algorithm.name,
            )
            continue
        module.algorithm.deploy(model, received, private, client)  # as module.deploy(client)
        target = folder / ("global" if client is None else f"client_{client:04d}")
        rank = server.spec.rank(client)
        write_model(model, target, names, rank)
        written.append(target)
    module.deploy(None)
    return written


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def write_model(model: nn.Module, folder: Path, names: set[str], rank: int) -> None:
    """The resident model as one exported folder; `names`: the tensors the model deploys (the
    trained ones), `rank`: its LoRA rank r_k (0: the layers' own)."""
    layers = lora_layers(model)
    merges_into_base = any(".base_layer." in name for name in names)
    if layers and not merges_into_base:
        write_adapters(model, folder, layers, names, rank)
    else:
        write_whole_model(model, folder, layers)


def _wrapper(model: nn.Module) -> str:
    """The name prefix that the plain transformers model does not have."""
    return "lm." if isinstance(model, CausalLM) else ""


def write_adapters(
    model: nn.Module, folder: Path, layers: dict[str, LoraLayer], names: set[str], rank: int
) -> None:
    """Each adapter of the LoRA layers as a peft folder (the first at `folder`, any other at
    `folder/<its name>`), cut to rank `rank`; trained tensors outside the LoRA layers (the
    head) go with the first adapter as peft `modules_to_save` modules."""
    wrapper = _wrapper(model)
    state = model.state_dict()
    first = next(iter(layers.values()))
    lora_parts = {n for n in state if ".lora_A." in n or ".lora_B." in n}
    whole = sorted({n.rsplit(".", 1)[0] for n in names - lora_parts})
    for adapter in first.r:
        if not any(f".{adapter}." in n for n in names):  # not part of this model (FedDPA's
            continue  # global model has no local adapter)
        r = rank or first.r[adapter]
        alpha = first.scaling[adapter] * r  # s = alpha / r, as this client's layers have it
        tensors = {}
        for name in sorted(lora_parts):
            if f".{adapter}." not in name:
                continue
            t = state[name]
            tensors[name] = t[:r] if ".lora_A." in name else t[:, :r]
        extra = {n: state[n] for n in names - lora_parts} if adapter == DEFAULT else {}
        target = folder if adapter == DEFAULT else folder / adapter
        target.mkdir(parents=True, exist_ok=True)
        LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=sorted(n.removeprefix(wrapper) for n in layers),
            modules_to_save=[m.removeprefix(wrapper) for m in whole] if extra else None,
            bias="none",
        ).save_pretrained(str(target))
        weights = {
            _peft_key(n, adapter, wrapper): t.detach().cpu().contiguous()
            for n, t in (tensors | extra).items()
        }
        save_file(weights, str(target / "adapter_model.safetensors"))


def _peft_key(name: str, adapter: str, wrapper: str) -> str:
    """peft's on-disk name: `base_model.model.<module>.lora_A.weight` (no adapter name), and the
    wrapper's prefix dropped so that the adapter loads onto the plain transformers model."""
    return "base_model.model." + name.removeprefix(wrapper).replace(f".{adapter}.", ".")


@torch.no_grad()
def merged_state(model: nn.Module, layers: dict[str, LoraLayer]) -> TensorDict:
    """The plain model's state dict: each LoRA layer's base weight plus its active adapters'
    products (peft's `get_delta_weight`), the LoRA factors dropped."""
    state = {n: t for n, t in model.state_dict().items() if ".lora_" not in n}
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight.detach().clone()
        for adapter in layer.active_adapters:
            weight += layer.get_delta_weight(adapter).to(weight.dtype)
        state[f"{name}.base_layer.weight"] = weight
    return {n.replace(".base_layer.", "."): t for n, t in state.items()}


def write_whole_model(model: nn.Module, folder: Path, layers: dict[str, LoraLayer]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = merged_state(model, layers)
    if isinstance(model, CausalLM):
        plain = {n.removeprefix("lm."): t.contiguous() for n, t in state.items()}
        model.lm.save_pretrained(str(folder), state_dict=plain)
        return
    save_file(
        {n: t.detach().cpu().contiguous() for n, t in state.items()},
        str(folder / "model.safetensors"),
    )


def load_exported(export_dir: Path | str, which: str | int = "global") -> nn.Module:
    """The exported model `which` ("global" or a client id) in `export_dir` (a run's export/),
    on the base model rebuilt from the run's config (export/config.yaml). A second adapter
    (FedDPA's local one) is loaded too, under its name; its per-input weighting is FedDPA's
    rule (src/algorithms/feddpa.py), not part of peft."""
    export_dir = Path(export_dir)
    folder = export_dir / (which if isinstance(which, str) else f"client_{which:04d}")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not exported (run with export=true)")
    base = build_base_model(OmegaConf.load(export_dir / "config.yaml"))
    if (folder / "adapter_config.json").exists():
        plain = base.lm if isinstance(base, CausalLM) else base
        loaded = PeftModel.from_pretrained(plain, str(folder))
        for extra in sorted(folder.glob("*/adapter_config.json")):
            loaded.load_adapter(str(extra.parent), adapter_name=extra.parent.name)
        return loaded.eval()
    if isinstance(base, CausalLM):
        return type(base.lm).from_pretrained(str(folder)).eval()
    load_model(base, str(folder / "model.safetensors"))
    return base.eval()
