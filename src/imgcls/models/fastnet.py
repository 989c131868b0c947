"""A small, fast CIFAR network in the style of airbench94 (Keller Jordan, 2024).

Three conv groups (conv, max-pool, BN, GELU, conv, BN, GELU) after a 2x2 stem; about a fifth of
ResNet-18's FLOPs at 32x32, which is what makes short CPU runs worthwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from imgcls.models.registry import register
from imgcls.models.surface import ClassifierSurface


@dataclass(frozen=True)
class NormSettings:
    """BatchNorm's torch-convention momentum and eps (airbench94: momentum 0.6 in its own convention, i.e.
    0.4 here, and eps 1e-12)."""

    momentum: float = 0.1
    eps: float = 1e-5


def _conv_bn(c_in: int, c_out: int, norm: NormSettings) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out, norm.eps, norm.momentum),
            nn.GELU()]


class ConvGroup(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, norm: NormSettings = NormSettings()):
        first = _conv_bn(c_in, c_out, norm)
        # Pooling right after the first conv, before its norm, as airbench does: same accuracy,
        # a quarter of the normalisation work.
        super().__init__(first[0], nn.MaxPool2d(2), *first[1:], *_conv_bn(c_out, c_out, norm))


class FastNet(ClassifierSurface, nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256), in_chans: int = 3,
                 norm: NormSettings = NormSettings(), head_bias: bool = True, logit_scale: float = 1.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 24, kernel_size=2, padding=0), nn.GELU())
        self.group1 = ConvGroup(24, widths[0], norm)
        self.group2 = ConvGroup(widths[0], widths[1], norm)
        self.group3 = ConvGroup(widths[1], widths[2], norm)
        self.num_features = widths[2]
        self.head = nn.Linear(widths[2], num_classes, bias=head_bias)
        self.logit_scale = logit_scale  # airbench94 divides its logits by 9

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the 2x2 stem to whiten the patches of `images` (normalised N x 3 x H x W), as airbench does:
        with M the patches' second-moment matrix (uncentred, E[p p^T]) and M = sum of l u u^T its
        eigen-decomposition, the first half of the filters are the directions u / sqrt(l + eps), largest
        l first, and the second half their negatives. The network then starts from decorrelated inputs."""
        conv = self.stem[0]
        # every kh x kw patch of every image as a row, its values in the weight's (channel, y, x) order
        patches = F.unfold(images.float(), conv.kernel_size).transpose(1, 2).flatten(0, 1)
        # One matrix product over all the patches. The faintest directions are sensitive to how the sum
        # is rounded (summing per image first moves their filters by up to 2%), so the order matters.
        moment = patches.T @ patches / len(patches)
        variances, directions = torch.linalg.eigh(moment)  # ascending variances, directions as columns
        filters = (directions * variances.add(eps).rsqrt()).T.flip(0).reshape(-1, *conv.weight.shape[1:])
        half = len(filters)
        if conv.out_channels != 2 * half:
            raise ValueError(f"whitening {half}-value patches needs a stem of {2 * half} filters, not "
                             f"{conv.out_channels}")
        conv.weight[:half] = filters
        conv.weight[half:] = -filters
        if conv.bias is not None:
            conv.bias.zero_()

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem", "blocks": r"^group(\d+)"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.group3(self.group2(self.group1(self.stem(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.amax(dim=(2, 3))  # global max-pool, as airbench
        return x if pre_logits else self.head(x) * self.logit_scale

    @property
    def whitening_conv(self) -> str:
        """The name of the conv `init_whitening` sets (for --whiten-bias-epochs)."""
        return "stem.0"


@register("fastnet_cifar", img_size=32, family="cnn", description="airbench94-style CNN, widths 64/256/256")
def fastnet_cifar(num_classes: int = 10, **kw) -> FastNet:
    return FastNet(num_classes, widths=(64, 256, 256), **kw)


@register("airbench94", img_size=32, family="cnn",
          description="airbench94's network: fastnet_cifar with BatchNorm momentum 0.4 and eps 1e-12, a "
                      "bias-free head and logits/9; differs from airbench94 in how it starts: PyTorch's default "
                      "conv init, a stem neither whitened nor fixed, learnable BatchNorm scales (airbench: "
                      "identity 3x3 filters, a fixed whitening stem, scales fixed at 1; --init dirac, --whiten "
                      "--whiten-bias-epochs 3, --freeze-bn-scale)")
def airbench94(num_classes: int = 10, **kw) -> FastNet:
    return FastNet(num_classes, widths=(64, 256, 256), norm=NormSettings(momentum=0.4, eps=1e-12), head_bias=False,
                   logit_scale=1 / 9, **kw)


@register("fastnet_cifar_small", img_size=32, family="cnn", description="airbench-style CNN, widths 32/64/128")
def fastnet_cifar_small(num_classes: int = 10, **kw) -> FastNet:
    return FastNet(num_classes, widths=(32, 64, 128), **kw)
