"""Tokenizers for the causal LMs: a byte-level one that needs no files (qwen_tiny, tests) or a
Hugging Face tokenizer from a local folder, the cache, or the hub (offline: one clear error)."""

from __future__ import annotations

import os

from src.errors import ConfigError


class ByteTokenizer:
    """UTF-8 bytes are the tokens 0..255; 256 is padding and 257 ends a sequence. The subset of the
    Hugging Face tokenizer interface that fedsweep uses (`__call__`, `decode`, `len`, ids)."""

    pad_token_id = 256
    eos_token_id = 257

    def __len__(self) -> int:
        return 258

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def load_tokenizer(path: str | None = None, config_path: str | None = None):
    """`config_path` (a folder with a tokenizer, e.g. Qwen2.5-0.5B-Instruct's files) wins
    over `path` (the model's folder or hub id); neither: the byte-level tokenizer."""
    folder = config_path or path
    if folder is None:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    key = "model.config_path" if config_path else "model.path"
    tokenizer = from_pretrained_or_explain(AutoTokenizer.from_pretrained, folder, key)
    if tokenizer.pad_token_id is None:  # pad with end-of-sequence (padding is never a target)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def from_pretrained_or_explain(load, name: str, key: str, **kw):
    """`load(name)` from a local folder or the cache first, then (when online) the hub; when
    neither works, one ConfigError naming the config key instead of a traceback wall or a hang."""
    try:
        return load(name, local_files_only=True, **kw)
    except (OSError, ValueError) as local_error:
        if os.path.isdir(name) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise ConfigError(
                f"{key}={name!r}: not loadable from disk ({type(local_error).__name__}) and the "
                "hub is off (HF_HUB_OFFLINE); give a local folder, or model.config_path=<config "
                "folder> for randomly initialised weights"
            ) from None
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(name, timeout=10)  # one quick probe: no network fails in seconds
        return load(name, **kw)
    except Exception as error:  # noqa: BLE001 - any download failure gets the same one line
        raise ConfigError(
            f"{key}={name!r} is neither a local folder nor cached, and downloading it failed "
            f"({type(error).__name__}); give a local folder, or model.config_path=<config folder> "
            "for randomly initialised weights"
        ) from None
