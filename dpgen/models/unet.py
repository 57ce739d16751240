"""Class-conditional UNet built from diffusers' UNet2DModel (GroupNorm only: DP-safe)."""

from __future__ import annotations

from diffusers import UNet2DModel

from dpgen.models.config import validate_model_config


def build_unet(model_cfg: dict, image_size: int, channels: int, num_classes: int) -> UNet2DModel:
    """UNet with ``num_classes + 1`` class embeddings: the last one is the null class for
    classifier-free guidance."""
    validate_model_config(model_cfg, image_size)
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(model_cfg["block_out_channels"]),
        down_block_types=tuple(model_cfg["down_block_types"]),
        up_block_types=tuple(model_cfg["up_block_types"]),
        layers_per_block=model_cfg["layers_per_block"],
        norm_num_groups=model_cfg["norm_num_groups"],
        attention_head_dim=model_cfg["attention_head_dim"],
        num_class_embeds=num_classes + 1,
        dropout=model_cfg.get("dropout", 0.0),
    )
