"""ResNet-18 for 32x32 inputs: torchvision's network with a CIFAR stem."""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from imgcls.models.registry import register
from imgcls.models.surface import ClassifierSurface


class ResNetCifar(ClassifierSurface, nn.Module):
    """torchvision resnet18 with a 3x3 stride-1 stem and no max-pool, so 32x32 inputs keep
    32x32 maps in the first stage (the 7x7/2 stem and pool would shrink them to 8x8)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        net = torchvision.models.resnet18(num_classes=num_classes)
        conv = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        self.stem = nn.Sequential(conv, net.bn1, net.relu)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.num_features = 512
        self.head = net.fc

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups in timm's matcher format: the stem, then each stage `layerK` (coarse) or each of
        its residual blocks `layerK.J`, sorted by the captured numbers; the head is unmatched."""
        stage = r"^layer(\d)(?=\.)"
        return {"stem": r"^stem(?=\.)", "blocks": stage if coarse else stage + r"\.(\d)(?=\.)"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)


@register("resnet18_cifar", img_size=32, family="cnn", description="ResNet-18, CIFAR stem (3x3/1, no pool)")
def resnet18_cifar(num_classes: int = 10, **kwargs) -> ResNetCifar:
    return ResNetCifar(num_classes=num_classes, **kwargs)
