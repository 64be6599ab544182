"""Qwen causal LMs through transformers: `model=qwen` (pretrained weights from `model.path`, or a
random initialisation of any size from `model.config_path`) and `model=qwen_tiny` (a small random
Qwen2 for CPU runs and tests).

`CausalLM` wraps the Hugging Face model so that it looks like every other fedsweep model:
`model(input_ids) -> logits`, one logit row per position (the data's targets are already shifted,
see src/data/text.py). Batches are right-padded and attention is causal, so no real token ever
attends to padding and no attention mask is needed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from src.models.tokenizers import from_pretrained_or_explain

log = logging.getLogger(__name__)


class CausalLM(nn.Module):
    def __init__(self, lm: nn.Module, tokenizer):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer  # kept for decoding and adapter export; not a parameter

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def _dtype(dtype: str) -> torch.dtype:
    """`auto`: bf16 where a GPU will run the model, else fp32 (bf16 matmuls are slow on CPU)."""
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def _finish(lm: nn.Module, tokenizer, gradient_checkpointing: bool) -> CausalLM:
    if gradient_checkpointing:  # non-reentrant: works with a frozen embedding (LoRA)
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    size = sum(p.numel() for p in lm.parameters())
    log.info(
        "%s: %.1f M parameters, %s", type(lm).__name__, size / 1e6, next(lm.parameters()).dtype
    )
    return CausalLM(lm, tokenizer)


def build_qwen(
    tokenizer,
    path: str = "Qwen/Qwen2.5-0.5B",
    config_path: str | None = None,
    dtype: str = "auto",
    gradient_checkpointing: bool = False,
    attn_implementation: str = "sdpa",
    name: str | None = None,
) -> CausalLM:
    """Pretrained weights from `path` (local folder, cache or hub), or, with `config_path`, a
    randomly initialised model of that config (real size, no weights needed). `name`: the
    config option (qwen); not used to build."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {"dtype": _dtype(dtype), "attn_implementation": attn_implementation}
    if config_path:
        config = from_pretrained_or_explain(
            AutoConfig.from_pretrained, config_path, "model.config_path"
        )
        lm = AutoModelForCausalLM.from_config(config, **kw)
    else:
        lm = from_pretrained_or_explain(
            AutoModelForCausalLM.from_pretrained, path, "model.path", **kw
        )
    return _finish(lm, tokenizer, gradient_checkpointing)


def build_qwen_tiny(
    tokenizer,
    config_path: str | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 1024,
    initializer_range: float = 0.02,
    dtype: str = "fp32",
    gradient_checkpointing: bool = False,
    name: str | None = None,
) -> CausalLM:
    """A randomly initialised Qwen2: the sizes below, or `config_path`'s config."""
    if config_path:
        return build_qwen(
            tokenizer,
            config_path=config_path,
            dtype=dtype,
            gradient_checkpointing=gradient_checkpointing,
        )
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    lm = AutoModelForCausalLM.from_config(config, dtype=_dtype(dtype))
    return _finish(lm, tokenizer, gradient_checkpointing)
