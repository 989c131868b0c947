"""Every model meets the contract of models/contract.py: every registered model and a timm model."""

import pytest
import torch

from imgcls.kernels.apply import configure, has_depthwise, inference_copy
from imgcls.models import create_model, list_models
from imgcls.models.contract import ImageClassifier, attention_modules, problems, token_grid, whitening
from imgcls.models.surface import layer_groups

REGISTERED = [spec.name for spec in list_models()]
TIMM = ["timm/resnet10t", "timm/vit_tiny_patch16_224"]


def _build(name: str, classes: int = 7):
    if any(big in name for big in ("vit_b16", "vit_l16", "vit_s16", "convnext_nano", "convnext_tiny")):
        with torch.device("meta"):  # the surface, without allocating hundreds of MB
            return create_model(name, classes)
    return create_model(name, classes)


@pytest.mark.parametrize("name", REGISTERED + TIMM)
def test_every_model_meets_the_contract(name):
    model = _build(name)
    assert problems(model) == []
    assert isinstance(model, ImageClassifier)
    groups = layer_groups(model)
    assert groups[-1][0] == "head" and len(groups) >= 2
    named = {n for n, _ in model.named_parameters()}
    assert sorted(n for _, members in groups for n in members) == sorted(named)  # every parameter in one group
    grid = token_grid(model)
    assert (grid is not None) == bool(attention_modules(model)) == (("vit" in name) and "timm/resnet" not in name)


@pytest.mark.parametrize("name", ["resnet18_cifar", "fastnet_cifar_small", "vit_cifar_tiny", "convnext_cifar",
                                  "timm/resnet10t"])
def test_forward_is_head_of_features_and_kernels_change_no_number(name):
    """forward(x) == forward_head(forward_features(x)); configuring the kernels (attention written out,
    float32 depthwise, another layout) and an inference copy compute the same function."""
    torch.manual_seed(0)
    model = _build(name).eval()
    size = 64 if name.startswith("timm/") else 32
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        plain = model(x)
        assert torch.allclose(plain, model.forward_head(model.forward_features(x)), atol=1e-5)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        view = inference_copy(model, "manual" if attention_modules(model) else "none",
                              "float32" if has_depthwise(model) else "none")
        assert torch.allclose(view(x), plain, atol=1e-4)
        configure(model, "manual" if attention_modules(model) else "none", "none", "contiguous")
        assert torch.allclose(model(x), plain, atol=1e-4)


def test_the_capabilities_are_where_the_models_are():
    assert whitening(create_model("fastnet_cifar_small", 10)).conv == "stem.0"
    assert whitening(create_model("resnet18_cifar", 10)) is None
    grid = token_grid(create_model("vit_cifar", 10))
    assert (grid.prefix_tokens, grid.patch_size) == (1, 4)
    timm_grid = token_grid(create_model("timm/vit_tiny_patch16_224", 10))
    assert (timm_grid.prefix_tokens, timm_grid.patch_size) == (1, 16)


def test_an_inference_copy_shares_the_weights():
    """Weights changed in the trained model show in its inference copy (validation sees the current epoch)."""
    model = create_model("vit_cifar_tiny", 3)
    view = inference_copy(model, "manual", "none")
    assert view is not model and all(a is b for a, b in zip(model.parameters(), view.parameters(), strict=True))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(view(x), model.eval()(x), atol=1e-5)
    assert {m.fused_attn for m in attention_modules(view)} == {False}
    assert {m.fused_attn for m in attention_modules(model)} == {True}  # the original keeps its own kernels
