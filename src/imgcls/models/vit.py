"""Vision Transformer (Dosovitskiy et al., 2021), written to be read in one sitting.

image -> patches (strided conv) -> [CLS] + patch tokens + learned positions
      -> depth x (pre-norm attention, pre-norm GELU MLP) -> LayerNorm -> head on [CLS]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from imgcls.models.registry import register
from imgcls.models.surface import ClassifierSurface


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attn_dropout: float = 0.0


class Attention(nn.Module):
    # True: one scaled_dot_product_attention call; False: matmul, softmax, matmul written out, as timm's
    # attention modules do with the same attribute. imgcls.kernels times both and sets it per run.
    fused_attn = True

    def __init__(self, dim: int, heads: int, attn_dropout: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout
        self.drop = nn.Dropout(dropout)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """B x N x D -> B x heads x N x D/heads: each head's slice of the features, tokens second-last."""
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the projection's outputs are the queries, then the keys, then the values, each head by head
        query, key, value = map(self._heads, self.qkv(x).chunk(3, dim=-1))
        drop = self.attn_dropout if self.training else 0.0
        if self.fused_attn:
            mixed = F.scaled_dot_product_attention(query, key, value, dropout_p=drop)
        else:
            scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
            mixed = torch.matmul(F.dropout(scores.softmax(dim=-1), drop), value)
        return self.drop(self.proj(mixed.transpose(1, 2).flatten(2)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.attn_dropout, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(hidden, cfg.dim), nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(ClassifierSurface, nn.Module):
    num_prefix_tokens = 1  # the CLS token; Grad-CAM drops prefix tokens to get the patch grid

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.grid = cfg.img_size // cfg.patch_size
        self.num_features = cfg.dim
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, cfg.dim))
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's ViT initial values ('timm' scheme): the learned positions truncated-normal with std 0.02,
        the CLS token normal with std 1e-6, every linear layer's weight truncated-normal with std 0.02;
        and the patch embedding, a linear map of each flattened patch, truncated-normal with variance
        1 / fan-in. Biases start at zero. The draws come in that order (linear layers as modules() lists
        them), which fixes the weights a given seed produces."""
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        patch = self.patch_embed.weight.flatten(1)  # a view: one row per output channel
        truncated, plain = nn.init.trunc_normal_, nn.init.normal_
        draws = [(truncated, self.pos_embed, 0.02), (plain, self.cls_token, 1e-6)]
        draws += [(truncated, m.weight, 0.02) for m in linears]
        draws += [(truncated, patch, math.sqrt(1.0 / patch.shape[1]))]
        for draw, tensor, std in draws:
            draw(tensor, std=std)
        for layer in [*linears, self.patch_embed]:
            nn.init.zeros_(layer.bias)

    def _pos_embed_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings, bicubically interpolated when the patch grid differs."""
        if grid_h == grid_w == self.grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (fnmatch patterns) the optimizer leaves undecayed, as timm's ViT: pulling the
        learned positions and the CLS token towards zero regularises nothing, it only erases them."""
        return {"pos_embed", "cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups in the matcher format timm.models.group_parameters reads (a group's patterns map a
        parameter name to a sort key): the embeddings, then block i alone, with the final LayerNorm
        given the last block's key, since it only normalises that block's output; the head is unmatched."""
        embeddings = "|".join(f"^{name}(?![^.])" for name in ("patch_embed", "cls_token", "pos_embed"))
        last = len(self.blocks) - 1
        return {"stem": embeddings, "blocks": [(r"^blocks\.(\d+)(?=\.)", None), (r"^norm(?=\.)", (last,))]}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # B x D x H/p x W/p
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # B x N x D
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self._pos_embed_for(grid_h, grid_w))
        return self.norm(self.blocks(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)


def _vit(num_classes: int, **overrides) -> VisionTransformer:
    return VisionTransformer(ViTConfig(num_classes=num_classes, **overrides))


@register("vit_cifar", img_size=32, family="vit",
          description="ViT for 32x32: patch 4, dim 256, depth 6, 8 heads; 4.77M params, not the ~8M often quoted")
def vit_cifar(num_classes: int = 10, **kw) -> VisionTransformer:
    return _vit(num_classes, img_size=32, patch_size=4, dim=256, depth=6, heads=8, **kw)


@register("vit_cifar_tiny", img_size=32, family="vit",
          description="small ViT for 32x32 CPU runs: patch 4, dim 128, depth 4, 4 heads, MLP 2x")
def vit_cifar_tiny(num_classes: int = 10, **kw) -> VisionTransformer:
    return _vit(num_classes, img_size=32, patch_size=4, dim=128, depth=4, heads=4, mlp_ratio=2.0, **kw)


@register("vit_ti16", img_size=224, family="vit", description="ViT-Ti/16: dim 192, depth 12, 3 heads")
def vit_ti16(num_classes: int = 1000, **kw) -> VisionTransformer:
    return _vit(num_classes, dim=192, depth=12, heads=3, **kw)


@register("vit_s16", img_size=224, family="vit", description="ViT-S/16: dim 384, depth 12, 6 heads")
def vit_s16(num_classes: int = 1000, **kw) -> VisionTransformer:
    return _vit(num_classes, dim=384, depth=12, heads=6, **kw)


@register("vit_b16", img_size=224, family="vit", description="ViT-B/16: dim 768, depth 12, 12 heads")
def vit_b16(num_classes: int = 1000, **kw) -> VisionTransformer:
    return _vit(num_classes, dim=768, depth=12, heads=12, **kw)


@register("vit_l16", img_size=224, family="vit", description="ViT-L/16: dim 1024, depth 24, 16 heads")
def vit_l16(num_classes: int = 1000, **kw) -> VisionTransformer:
    return _vit(num_classes, dim=1024, depth=24, heads=16, **kw)
