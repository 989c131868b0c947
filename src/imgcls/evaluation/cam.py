"""Grad-CAM and Grad-CAM++ for CNNs and ViTs, CAM_BATCH images per forward and backward pass.

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

from imgcls.errors import UserError
from imgcls.inference.engine import Engine
from imgcls.inference.files import load_images
from imgcls.kernels.apply import inference_copy
from imgcls.kernels.choice import NONE
from imgcls.models.contract import TokenGrid, token_grid
from imgcls.options import CAM_METHODS
from imgcls.progress import Phase

METHODS = CAM_METHODS
METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++"}
CAM_BATCH = 16  # images per forward and backward pass: the activations and their gradients grow with it


def _activations_and_logits(model: nn.Module, x: torch.Tensor, grid: TokenGrid | None):
    """(B x C x h x w activations that the logits depend on, logits)."""
    if grid is None:
        features = model.forward_features(x)
        return features, model.forward_head(features)
    captured = {}
    hook = grid.cam_module.register_forward_hook(lambda m, i, out: captured.setdefault("tokens", out))
    try:
        logits = model(x)
    finally:
        hook.remove()
    return captured["tokens"], logits


def _to_maps(grid: TokenGrid | None, tensor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """CNN maps as they are; ViT tokens without the CLS (and any register) tokens, as B x D x h x w."""
    if grid is None:
        return tensor
    tokens = tensor[:, grid.prefix_tokens:]
    grid_h, grid_w = x.shape[-2] // grid.patch_size, x.shape[-1] // grid.patch_size
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
    grid = token_grid(model)
    with torch.enable_grad():
        activations, logits = _activations_and_logits(model, x, grid)
        if classes is None:
            classes = logits.argmax(dim=1)
        score = logits.gather(1, classes[:, None].to(logits.device)).sum()
        grads = torch.autograd.grad(score, activations)[0]
    maps, grads = _to_maps(grid, activations.detach(), x), _to_maps(grid, grads, x)
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


def explain(engine: Engine, images: torch.Tensor, classes: torch.Tensor | None = None, method: str = "gradcam",
            progress: bool = True):
    """Grad-CAM of uint8 N x H x W x 3 `images` through `engine`'s model, in float32: (cams, classes, probs).
    The hook Grad-CAM needs goes on a private module tree over the model's weights, never on the engine's
    own, which other threads may be scoring with."""
    if engine.module is None:
        raise UserError(f"Grad-CAM needs the model's gradients; {engine.source} is an ONNX file: pass the run "
                        "folder or its safetensors export")
    model, parts = inference_copy(engine.module, NONE, NONE), []
    with Phase(METHOD_NAMES.get(method, method), len(images), enabled=progress) as phase:
        for start in range(0, max(len(images), 1), CAM_BATCH):  # an empty batch still gives empty results
            chunk = slice(start, start + CAM_BATCH)
            x = engine.model_input(images[chunk]).float()
            parts.append(grad_cam(model, x, None if classes is None else classes[chunk], method))
            phase.advance(len(x))
    return tuple(torch.cat(part) for part in zip(*parts, strict=True))


def explain_files(engine: Engine, paths: list[str], class_name: str | None = None, method: str = "gradcam"):
    """Grad-CAM for image files, as one batch. Returns (uint8 images N x H x W x 3, cams N x H x W,
    explained class per image, probabilities)."""
    if class_name is not None and class_name not in engine.classes:
        raise UserError(f"unknown class '{class_name}'; the model's classes are {', '.join(engine.classes)}")
    images = load_images(paths, engine.preprocessing)
    classes = None if class_name is None else torch.full((len(images),), engine.classes.index(class_name))
    cams, classes, probs = explain(engine, images, classes, method)
    return images.numpy(), cams.cpu().numpy(), classes.cpu(), probs.cpu()
