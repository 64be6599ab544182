"""Vision Transformers from timm: a named timm model (optionally pretrained) or a small ViT from kwargs."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import re
import warnings
from pathlib import Path
from unittest import mock

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer

from src.errors import ConfigError, InputError
from src.safe_load import first_line, load_tensors_only

log = logging.getLogger(__name__)

_FIX = "set model.pretrained=false (train from scratch) or model.weights=PATH (a local file)"
# what the hub raises when it cannot deliver a file: OSError covers LocalEntryNotFoundError,
# HfHubHTTPError and requests' errors; httpx(2) transport errors are not OSErrors.
_HUB_ERRORS = (OSError,) + tuple(
    importlib.import_module(m).HTTPError for m in ("httpx2", "httpx") if importlib.util.find_spec(m)
)


class ModelLoadError(InputError):
    """A model or its weights cannot be built/loaded; the message names the config key to change."""


def build_vit(
    arch: str | None,
    img_size: int,
    in_chans: int,
    num_classes: int,
    pretrained: bool = False,
    weights: str | None = None,
    name: str | None = None,
    **vit_kwargs,
) -> torch.nn.Module:
    """Build a ViT whose forward is ``model(images[B, in_chans, img_size, img_size]) -> logits[B, num_classes]``.

    ``arch``: a timm model name, or None to build ``VisionTransformer(**vit_kwargs)`` directly.
    ``pretrained``: timm hub weights (cache first; fails fast with ModelLoadError when offline).
    ``weights``: a local state dict / fedsweep checkpoint; takes precedence over ``pretrained``.
    ``name``: the config option's name (``vit``, ``vit_small32``); not used to build.
    """
    size = dict(img_size=img_size, in_chans=in_chans, num_classes=num_classes)
    if arch is None:
        if pretrained and not weights:
            raise ModelLoadError(f"model.pretrained=true needs a timm model.arch; {_FIX}")
        _check_patch(img_size, vit_kwargs.get("patch_size", 16), "model.patch_size={}")
        model = VisionTransformer(**size, **vit_kwargs)
    else:
        if not timm.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=3)
            raise ModelLoadError(f"model.arch={arch} is not a timm model; close: {close}")
        if pretrained and not weights:
            model = _create_pretrained(arch, **size, **vit_kwargs)
        else:
            model = timm.create_model(arch, pretrained=False, **size, **vit_kwargs)
        if hasattr(model, "patch_embed"):
            patch = model.patch_embed.patch_size[0]
            _check_patch(img_size, patch, f"model.arch={arch}'s patch size {{}}")
    if weights:
        load_weights(model, weights)
    return model


def _check_patch(img_size: int, patch: int, what: str) -> None:
    """The patch conv's stride would drop the last pixels of every row otherwise."""
    if img_size % patch:
        raise ConfigError(f"data.image_size={img_size} is not a multiple of {what.format(patch)}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick HEAD request to the Hugging Face endpoint (respects HF_ENDPOINT, proxies, HF_HUB_OFFLINE)."""
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:  # any failure of the probe means: treat the hub as unreachable
        return False


def _create_pretrained(model_name: str, **kwargs) -> torch.nn.Module:
    # Unreachable hub: huggingface_hub would retry each file 5 times with backoff (~50 s here),
    # so we switch it to offline mode for this call: cached weights still load, else it fails at once.
    from huggingface_hub import constants

    online = _hub_reachable()
    try:
        with mock.patch.object(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE or not online):
            return timm.create_model(model_name, pretrained=True, **kwargs)
    except _HUB_ERRORS as e:
        why = (
            "not in the local cache and the hub is unreachable (offline)"
            if not online
            else str(e).splitlines()[0]
        )
        raise ModelLoadError(
            f"model.arch={model_name}: pretrained weights could not be loaded: {why}; {_FIX}"
        ) from e


def _normalize_keys(sd: dict) -> dict:
    """Plain model keys from a state dict or fedsweep/Lightning checkpoint (drops LoRA, undoes peft renames)."""
    if isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if any(k.startswith("model.") for k in sd):
        sd = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    out = {}
    for k, v in sd.items():
        if "lora_" in k or ".original_module." in k:
            continue
        k = k.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[re.sub(r"\.modules_to_save\.[^.]+\.", ".", k)] = v
    return out


def _adapt_shapes(sd: dict, model: torch.nn.Module) -> None:
    """Resample a ViT position embedding to the model's grid and adapt the patch conv to in_chans."""
    target = model.state_dict()
    pe, tpe = sd.get("pos_embed"), target.get("pos_embed")
    if (
        pe is not None
        and tpe is not None
        and pe.shape[1] != tpe.shape[1]
        and pe.shape[2] == tpe.shape[2]
    ):
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        sd["pos_embed"] = resample_abs_pos_embed(
            pe, new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix
        )
    conv, tconv = sd.get("patch_embed.proj.weight"), target.get("patch_embed.proj.weight")
    if conv is not None and tconv is not None and conv.shape[1] != tconv.shape[1]:
        sd["patch_embed.proj.weight"] = adapt_input_conv(tconv.shape[1], conv)


SAVE_WEIGHTS_HINT = (
    "Save the weights as a state dict (torch.save(model.state_dict(), path)) or a .safetensors "
    "file; from a Lightning checkpoint that pickles its hyper-parameters, keep "
    "{'state_dict': checkpoint['state_dict']} where it was made; a fedsweep checkpoint of an "
    "older version converts with python -m src.convert_checkpoint PATH"
)


def load_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Initialise ``model`` from a local file (``model.weights``); returns the model.

    Accepts ``torch.save(model.state_dict())``, a fedsweep/Lightning checkpoint (``state_dict`` with
    ``model.``-prefixed keys; LoRA tensors are ignored) or a ``.safetensors`` file. Tensors whose
    shape differs (e.g. the head for another num_classes) keep the model's fresh init, with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(
            f"model.weights={path}: no such file; give a state dict or checkpoint, or set model.weights=null"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"model.weights={path}: cannot be read ({e})") from None
    else:
        try:  # never full unpickling: a shared weights file must not run code (src/safe_load.py)
            obj = load_tensors_only(path, f"model.weights={path}", SAVE_WEIGHTS_HINT)
        except (RuntimeError, EOFError, OSError) as e:  # truncated, not a torch file
            raise ModelLoadError(
                f"model.weights={path}: cannot be read ({type(e).__name__}: {first_line(e)})"
            ) from None
    if not isinstance(obj, dict):
        raise ModelLoadError(
            f"model.weights={path}: expected a state dict, got {type(obj).__name__}"
        )

    sd = _normalize_keys(obj)
    _adapt_shapes(sd, model)
    target = model.state_dict()
    mismatched = [
        k for k, v in sd.items() if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if mismatched:
        warnings.warn(
            f"model.weights={path}: shape differs, keeping fresh init for {mismatched}",
            stacklevel=2,
        )
    for k in mismatched:
        sd.pop(k)
    res = model.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if k not in mismatched]
    if missing or res.unexpected_keys:
        raise ModelLoadError(
            f"model.weights={path} does not fit the model (model.arch / architecture keys): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {res.unexpected_keys[:5]}{'...' if len(res.unexpected_keys) > 5 else ''}"
        )
    log.info("loaded %d tensors from %s", len(sd), path)
    return model
