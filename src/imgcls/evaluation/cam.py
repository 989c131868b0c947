"""Grad-CAM and Grad-CAM++ for CNNs and ViTs, a whole batch in one forward and one backward pass.

Written here rather than taken from the `grad-cam` package, which would add OpenCV and
scikit-learn (about 100 MB) for some 40 lines of tensor code.

Where the activations come from:
  CNN  the output of forward_features: the last convolutional stage, before pooling.
  ViT  the input of the last block's attention (its norm1 output), patch tokens only, reshaped to
       the patch grid. After the last block only the CLS token feeds the head, so patch tokens
       there get no gradient; here they still do, through the attention.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("gradcam", "gradcam++")


def is_vit(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")


def _patch_size(model: nn.Module) -> int:
    size = getattr(model, "patch_size", None) or model.patch_embed.patch_size
    return size[0] if isinstance(size, tuple | list) else size


def _activations_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B x C x h x w activations that the logits depend on, logits)."""
    if not is_vit(model):
        features = model.forward_features(x)
        return features, model.forward_head(features)
    captured = {}
    hook = model.blocks[-1].norm1.register_forward_hook(lambda m, i, out: captured.setdefault("tokens", out))
    try:
        logits = model(x)
    finally:
        hook.remove()
    return captured["tokens"], logits


def _to_maps(model: nn.Module, tensor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """CNN maps as they are; ViT tokens without the CLS (and any register) tokens, as B x D x h x w."""
    if not is_vit(model):
        return tensor
    tokens = tensor[:, model.num_prefix_tokens:]
    grid_h, grid_w = x.shape[-2] // _patch_size(model), x.shape[-1] // _patch_size(model)
    if grid_h * grid_w != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} patch tokens do not form a {grid_h}x{grid_w} grid")
    return tokens.reshape(len(tokens), grid_h, grid_w, -1).permute(0, 3, 1, 2)


def grad_cam(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None, method: str = "gradcam"):
    """Heat-maps for a normalised batch `x`: (cams B x H x W in [0, 1], target classes, probabilities).

    `classes` picks the class explained per image; by default the predicted one.
    """
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method}; use one of {', '.join(METHODS)}")
    model.eval()
    with torch.enable_grad():
        activations, logits = _activations_and_logits(model, x)
        if classes is None:
            classes = logits.argmax(dim=1)
        score = logits.gather(1, classes[:, None].to(logits.device)).sum()
        grads = torch.autograd.grad(score, activations)[0]
    maps, grads = _to_maps(model, activations.detach(), x), _to_maps(model, grads, x)
    if method == "gradcam":
        weights = grads.mean(dim=(2, 3), keepdim=True)
    else:  # Grad-CAM++ (Chattopadhay et al., 2018), with the exponential of the score
        g2, g3 = grads**2, grads**3
        alpha = g2 / (2 * g2 + maps.sum(dim=(2, 3), keepdim=True) * g3).where(g2 > 0, torch.ones_like(g2))
        weights = (alpha.where(grads != 0, torch.zeros_like(alpha)) * grads.clamp(min=0)).sum(dim=(2, 3), keepdim=True)
    cams = (weights * maps).sum(dim=1).clamp(min=0)
    cams = F.interpolate(cams[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cams.flatten(1).max(dim=1).values.clamp(min=1e-12)
    return cams / peak[:, None, None], classes, logits.detach().softmax(dim=1)


def explain_files(trained, paths: list[str], class_name: str | None = None, method: str = "gradcam"):
    """Grad-CAM for image files with a trained run's preprocessing, as one batch.
    Returns (uint8 images N x H x W x 3, cams N x H x W, explained class per image, probabilities)."""
    from imgcls.data import normalize
    from imgcls.errors import UserError
    from imgcls.evaluation.predict import load_images

    if class_name is not None and class_name not in trained.classes:
        raise UserError(f"unknown class '{class_name}'; the run's classes are {', '.join(trained.classes)}")
    images = load_images(paths, trained.dataset["img_size"], trained.dataset.get("crop_pct", 1.0))
    device = next(trained.model.parameters()).device
    x = normalize(images.to(device), trained.dataset["mean"], trained.dataset["std"])
    classes = None if class_name is None else torch.full((len(images),), trained.classes.index(class_name))
    cams, classes, probs = grad_cam(trained.model, x.contiguous(memory_format=torch.channels_last), classes, method)
    return images.permute(0, 2, 3, 1).numpy(), cams.cpu().numpy(), classes.cpu(), probs.cpu()
