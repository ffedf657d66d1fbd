"""Tiny timm models for the offline digits data (32x32 RGB, 10 classes).

Importing this module registers them with timm, so ``--model vit_digits`` works like any timm
name. They train to high accuracy in a minute or two on a laptop CPU, which makes them the
default for demos and end-to-end tests. Call ``compat.ensure_torchvision()`` before importing.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer

DIGITS_CFG = {
    "num_classes": 10,
    "input_size": (3, 32, 32),
    "crop_pct": 1.0,
    "interpolation": "bilinear",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "first_conv": "",
    "classifier": "head",
}


def _cfg(**overrides: Any) -> dict:
    return {**DIGITS_CFG, **overrides}


# timm's @register_model reads this module-level table (it must exist before the decorators run).
default_cfgs = generate_default_cfgs(
    {
        "vit_digits": _cfg(first_conv="patch_embed.proj"),
        "resnet_digits": _cfg(first_conv="conv1", classifier="fc"),
    }
)


@register_model
def vit_digits(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT with 4 blocks of width 96 (3 heads) on 4x4 patches of a 32x32 image (~0.31M params).

    Average pooling of the patch tokens instead of a class token: on 1.4k training images it
    converges in about half the epochs.
    """
    args = dict(
        img_size=32,
        patch_size=4,
        embed_dim=96,
        depth=4,
        num_heads=3,
        mlp_ratio=2.0,
        class_token=False,
        global_pool="avg",
        num_classes=10,
    )
    return build_model_with_cfg(
        VisionTransformer,
        "vit_digits",
        pretrained,
        **{**args, **kwargs},
    )


@register_model
def resnet_digits(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet with one basic block per stage, widths 16-128, no stem pooling (~0.36M params)."""
    args = dict(
        block=BasicBlock,
        layers=(1, 1, 1, 1),
        channels=(16, 32, 64, 128),
        stem_width=16,
        replace_stem_pool=True,
        num_classes=10,
    )
    return build_model_with_cfg(
        ResNet,
        "resnet_digits",
        pretrained,
        **{**args, **kwargs},
    )
