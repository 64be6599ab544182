"""Write LoRA adapters in peft's on-disk format (adapter_config.json + adapter_model.safetensors),
so that `PeftModel.from_pretrained(base_model, folder)` loads them onto the same base model
(for the ViT from scratch: `src.run.build_base_model(cfg)` rebuilds it from the run's config).

peft stores a tensor named `<module>.lora_A.default.weight` in the resident model as
`base_model.model.<module>.lora_A.weight`, and a whole trained module (`modules_to_save`, e.g. the
head) under its plain name with the same prefix. For a causal LM the wrapper's `lm.` is dropped,
so the adapter loads onto the plain Hugging Face model (`AutoModelForCausalLM`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from src.algorithms.adapters import ModelOrAdapters
from src.models.qwen import CausalLM

TensorDict = dict[str, torch.Tensor]


def peft_key(name: str, wrapper: str = "") -> str:
    return "base_model.model." + name.removeprefix(wrapper).replace(".default.", ".")


def write_adapter(
    folder: Path, algorithm: ModelOrAdapters, tensors: TensorDict, rank: int, wrapper: str = ""
) -> None:
    """One adapter of rank `rank`: the LoRA factors and any other module in `tensors` (e.g. the
    head, saved as a peft `modules_to_save` module). `wrapper`: a name prefix to drop."""
    folder.mkdir(parents=True, exist_ok=True)
    modules = sorted(
        {p for p in algorithm.trainable if any(n.startswith(p + ".") for n in tensors)}
    )
    LoraConfig(
        r=rank,
        lora_alpha=algorithm.lora_ranks.alpha,
        lora_dropout=algorithm.lora.get("dropout", 0.0),
        target_modules=list(algorithm.lora["target_modules"]),
        modules_to_save=[m.removeprefix(wrapper) for m in modules] or None,
        bias="none",
    ).save_pretrained(str(folder))
    weights = {peft_key(n, wrapper): t.detach().cpu().contiguous() for n, t in tensors.items()}
    save_file(weights, str(folder / "adapter_model.safetensors"))


def export_adapters(module, folder: Path) -> None:
    """Each client's deployed adapter (`client_XXXX/`, at its rank r_k) and the global shared
    part (`global/`, at r_max, with the B's that the server does not hold left at zero)."""
    algorithm: ModelOrAdapters = module.algorithm
    wrapper = "lm." if isinstance(module.model, CausalLM) else ""
    for client_id in range(module.federation.num_clients):
        rank = algorithm.client_rank(client_id)
        payload, private = module.deployed_state(client_id)
        deployed = {
            name: algorithm.client_view(name, tensor, client_id)
            for name, tensor in (payload | private).items()
        }
        write_adapter(folder / f"client_{client_id:04d}", algorithm, deployed, rank, wrapper)
    params = dict(module.model.named_parameters())
    shared = dict(module.server.state)
    for pair in algorithm.pairs:
        if pair.b not in shared:
            shared[pair.b] = torch.zeros_like(params[pair.b])
    write_adapter(folder / "global", algorithm, shared, algorithm.r_max, wrapper)
