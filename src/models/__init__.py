"""Models: timm Vision Transformers and LoRA injection through peft."""

from src.models.lora import add_lora, lora_parameter_names
from src.models.vit import ModelLoadError, build_vit, load_weights

__all__ = ["ModelLoadError", "add_lora", "build_vit", "load_weights", "lora_parameter_names"]
