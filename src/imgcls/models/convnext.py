"""ConvNeXt (Liu et al., 2022) through timm's implementation: patchify stem, 7x7 depthwise conv,
LayerNorm, 4x inverted bottleneck with one GELU, layer scale and stochastic depth.

`convnext_cifar` changes only the layout for 32x32 inputs: the standard 4x stem followed by three
2x downsamplings leaves 1x1 maps at 32 px, so here a 2x stem gives 16/8/4/2 maps.
"""

from __future__ import annotations

from timm.models.convnext import ConvNeXt

from imgcls.models.registry import register, timm_hub_weights, timm_preprocessing


@register("convnext_cifar", img_size=32, family="cnn",
          description="ConvNeXt for 32x32: 2x stem, depths 2/2/6/2, dims 64/128/256/512")
def convnext_cifar(num_classes: int = 10, drop_path_rate: float = 0.1, **kw) -> ConvNeXt:
    return ConvNeXt(num_classes=num_classes, depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), patch_size=2,
                    drop_path_rate=drop_path_rate, ls_init_value=1e-6, **kw)


def _timm_convnext(arch: str):
    def build(num_classes: int = 1000, **kw):
        import timm

        return timm.create_model(arch, num_classes=num_classes, **kw)

    return build


# The standard ImageNet-size ConvNeXts, by their usual names (timm builds them).
for _arch, _desc in (("convnext_atto", "3.7M"), ("convnext_femto", "5.2M"), ("convnext_pico", "9.0M"),
                     ("convnext_nano", "15.6M"), ("convnext_tiny", "28.6M")):
    register(_arch, img_size=224, family="cnn", description=f"timm's {_arch} ({_desc} params at 1000 classes)",
             preprocessing=timm_preprocessing(_arch),
             pretrained=timm_hub_weights(_arch))(_timm_convnext(_arch))
