"""Models: build_vit (configs, local weights, offline pretrained) and LoRA injection."""

import copy
import time
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch
from omegaconf import OmegaConf
from peft.tuners.lora import LoraLayer

from src.errors import ConfigError
from src.models import ModelLoadError, add_lora, build_vit, lora_parameter_names
from src.run import build_base_model

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
SMALL = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
TARGETS = ["attn.proj", "mlp.fc2"]


def small_vit(num_classes=10, seed=0, **kw):
    torch.manual_seed(seed)
    return build_vit(None, img_size=16, in_chans=1, num_classes=num_classes, **SMALL, **kw)


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("size,chans,classes", [(16, 1, 10), (32, 3, 7)])
def test_vit_small32_config_output_shape(size, chans, classes):
    cfg = OmegaConf.merge(
        {"model": OmegaConf.load(CONF / "vit_small32.yaml").model},
        {"data": {"image_size": size, "channels": chans, "num_classes": classes}, "seed": 0},
    )
    model = build_base_model(cfg)  # the model config minus its LoRA defaults
    assert model(torch.randn(2, chans, size, size)).shape == (2, classes)


def test_vit_config_resolves_data_keys():
    cfg = OmegaConf.merge(
        {"model": OmegaConf.load(CONF / "vit.yaml").model},
        {"data": {"image_size": 32, "channels": 3, "num_classes": 10}},
    )
    net = OmegaConf.to_container(cfg.model, resolve=True)
    assert net["_target_"] == "src.models.vit.build_vit"
    assert (net["img_size"], net["in_chans"], net["num_classes"]) == (32, 3, 10)


def test_weights_state_dict_round_trips_exactly(tmp_path):
    src = small_vit(seed=0)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = small_vit(seed=1, weights=str(tmp_path / "w.pt"))
    for name, value in params(src).items():
        assert torch.equal(params(dst)[name], value), name


def test_weights_from_lightning_checkpoint_with_lora_keys(tmp_path):
    src = add_lora(small_vit(seed=0), r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    for n, p in src.named_parameters():  # make LoRA non-trivial: it must be ignored, not merged
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    ckpt = {
        "state_dict": {"model." + k: v for k, v in src.state_dict().items()},
        "epoch": 3,
        "hyper_parameters": {"lr": 0.1, "alg": "fedlora"},  # plain values load as data
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    dst = small_vit(seed=1, weights=str(tmp_path / "last.ckpt"))
    saved = {k.replace(".base_layer.", "."): v for k, v in params(src).items() if "lora_" not in k}
    assert saved.keys() == params(dst).keys()
    for name, value in params(dst).items():
        assert torch.equal(value, saved[name]), name


def test_a_checkpoint_that_pickles_a_config_object_is_refused_with_the_way_out(tmp_path):
    """An OmegaConf config pickled into a Lightning checkpoint's hyper-parameters loads only by
    full unpickling: refused, naming the type and how to keep just the weights."""
    ckpt = {
        "state_dict": {"model." + k: v for k, v in small_vit(seed=0).state_dict().items()},
        "hyper_parameters": {"cfg": OmegaConf.create({"alg": "fedlora"})},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    with pytest.raises(ConfigError) as refused:
        small_vit(seed=1, weights=str(tmp_path / "last.ckpt"))
    message = str(refused.value)
    assert "holds the Python object(s) " in message and "omegaconf." in message
    assert "{'state_dict': checkpoint['state_dict']}" in message


def test_head_of_other_num_classes_is_reinitialised_with_warning(tmp_path):
    src = small_vit(num_classes=10, seed=0)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    fresh = small_vit(num_classes=5, seed=1)
    with pytest.warns(UserWarning, match=r"head\.weight.*head\.bias"):
        dst = small_vit(num_classes=5, seed=1, weights=str(tmp_path / "w.pt"))
    assert dst.head.weight.shape == (5, SMALL["embed_dim"])
    assert torch.equal(dst.head.weight, fresh.head.weight)  # the fresh init, not the saved head
    assert torch.equal(dst.head.bias, fresh.head.bias)
    for name, value in params(src).items():
        if not name.startswith("head."):
            assert torch.equal(params(dst)[name], value), name


def test_missing_weights_file_names_the_key(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model\.weights"):
        small_vit(weights=str(tmp_path / "nope.pt"))


def test_weights_of_another_architecture_list_keys(tmp_path):
    torch.save(small_vit().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ModelLoadError, match=r"unexpected \['blocks\.1\."):
        build_vit(None, 16, 1, 10, weights=str(tmp_path / "w.pt"), **{**SMALL, "depth": 1})


@pytest.fixture
def empty_hf_cache(monkeypatch, tmp_path):
    """A weights file cached on this machine must not turn the offline tests into a success."""
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def test_pretrained_offline_fails_fast_with_fix(monkeypatch, empty_hf_cache):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # guarantees no network attempt
    t0 = time.perf_counter()
    with pytest.raises(
        ModelLoadError, match=r"vit_tiny_patch16_224.*offline.*model\.pretrained=false"
    ):
        build_vit("vit_tiny_patch16_224", 32, 3, 10, pretrained=True)
    assert time.perf_counter() - t0 < 5


def test_pretrained_unreachable_hub_fails_fast_without_offline_flag(monkeypatch, empty_hf_cache):
    # nothing listens on port 9: the product must not sit in huggingface_hub's ~50 s retry loop
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"offline.*model\.weights=PATH"):
        build_vit("vit_tiny_patch16_224", 32, 3, 10, pretrained=True)
    assert time.perf_counter() - t0 < 5


def test_unknown_timm_name_names_the_key():
    with pytest.raises(
        ModelLoadError, match=r"model\.arch=vit_tiny_patch16_244.*vit_tiny_patch16_224"
    ):
        build_vit("vit_tiny_patch16_244", 32, 3, 10)


def lora_vit(r=4, alpha=6.0, dtype=torch.float32):
    base = small_vit(seed=0).to(dtype).eval()
    return base, add_lora(
        copy.deepcopy(base), r=r, alpha=alpha, dropout=0.0, target_modules=TARGETS
    )


def test_add_lora_only_lora_and_head_require_grad():
    _, model = lora_vit()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = set(lora_parameter_names(model))
    assert trainable == lora | {"head.weight", "head.bias"}
    assert len(lora) == 2 * len(TARGETS) * SMALL["depth"]
    assert all(".lora_A." in n or ".lora_B." in n for n in lora)
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_add_lora_targets_exactly_attn_proj_and_mlp_fc2_of_every_block():
    _, model = lora_vit()
    targeted = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert targeted == {f"blocks.{i}.{t}" for i in range(SMALL["depth"]) for t in TARGETS}


def test_add_lora_output_equals_base_model_at_init():
    base, model = lora_vit()
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(model.eval()(x), base(x))


def test_add_lora_scaling_is_alpha_over_r():
    _, model = lora_vit(r=4, alpha=6.0, dtype=torch.float64)
    layer = model.blocks[0].attn.proj
    assert layer.scaling["default"] == 6.0 / 4
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        B.normal_()
        x = torch.randn(5, A.shape[1], dtype=torch.float64)
        expected = layer.base_layer(x) + 1.5 * (x @ A.T @ B.T)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
        assert not torch.allclose(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("r", [0, -2])
def test_add_lora_bad_rank_names_the_key(r):
    with pytest.raises(ValueError, match=r"alg\.lora\.r"):
        add_lora(small_vit(), r=r, alpha=16, dropout=0.0, target_modules=TARGETS)


def test_add_lora_unmatched_target_names_the_key_and_lists_linears():
    with pytest.raises(
        ValueError, match=r"alg\.lora\.target_modules.*attn\.qkvz.*blocks\.0\.attn\.qkv"
    ):
        add_lora(small_vit(), r=8, alpha=16, dropout=0.0, target_modules=["attn.proj", "attn.qkvz"])


def test_a_timm_arch_whose_patch_does_not_divide_the_image_is_refused():
    """The patch conv's stride would silently drop the last 4 pixels of every row and column."""
    with pytest.raises(ConfigError, match="data.image_size=20 is not a multiple of model.arch"):
        build_vit("vit_tiny_patch16_224", img_size=20, in_chans=1, num_classes=10)
