"""Latent diffusion builders around diffusers: a KL autoencoder (``AutoencoderKL``) and a
class-conditional ``UNet2DConditionModel`` that cross-attends to a learned class embedding.

Both use GroupNorm/LayerNorm only (no BatchNorm), so any part of them can be DP-trained.
Their configs are validated, and their shapes computed, in ``models/config.py``.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import Tensor, nn

from dpgen.models.config import latent_shape


def build_autoencoder(model_cfg: dict, channels: int, image_size: int) -> AutoencoderKL:
    ae = model_cfg["autoencoder"]
    n = len(ae["block_out_channels"])
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(ae["block_out_channels"]),
        layers_per_block=ae["layers_per_block"],
        latent_channels=ae["latent_channels"],
        norm_num_groups=ae["norm_num_groups"],
        sample_size=image_size,
        # Self-attention at the bottleneck buys little at these sizes and costs time.
        mid_block_add_attention=ae.get("mid_block_attention", False),
    )


class LatentDenoiser(nn.Module):
    """ε-prediction on latents, conditioned on a class through cross-attention.

    The class embedding is the single token the UNet's cross-attention attends to; row
    ``num_classes`` is the null class used for classifier-free guidance. ``forward`` takes
    ``class_labels`` like ``UNet2DModel``, so the diffusion code serves both model kinds.
    """

    def __init__(self, unet: UNet2DConditionModel, num_classes: int) -> None:
        super().__init__()
        self.unet = unet
        self.class_embedder = nn.Embedding(num_classes + 1, unet.config.cross_attention_dim)

    def forward(self, sample: Tensor, timestep: Tensor | int, class_labels: Tensor) -> UNet2DConditionOutput:
        context = self.class_embedder(class_labels)[:, None, :]  # [B, 1, D]
        return self.unet(sample, timestep, encoder_hidden_states=context)


def build_latent_denoiser(model_cfg: dict, image_size: int, num_classes: int) -> LatentDenoiser:
    u = model_cfg["unet"]
    c, s, _ = latent_shape(model_cfg, image_size)
    unet = UNet2DConditionModel(
        sample_size=s,
        in_channels=c,
        out_channels=c,
        block_out_channels=tuple(u["block_out_channels"]),
        down_block_types=tuple(u["down_block_types"]),
        up_block_types=tuple(u["up_block_types"]),
        mid_block_type=u.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
        layers_per_block=u["layers_per_block"],
        norm_num_groups=u["norm_num_groups"],
        # diffusers' UNet2DConditionModel reads ``attention_head_dim`` as the number of heads.
        attention_head_dim=u["attention_heads"],
        cross_attention_dim=u["cross_attention_dim"],
    )
    return LatentDenoiser(unet, num_classes)


@torch.no_grad()
def encode_latents(autoencoder: AutoencoderKL, images: Tensor, scale: float | Tensor,
                   batch_size: int = 500) -> Tensor:
    """Scaled posterior *means* of ``images``.

    The mean rather than a posterior sample: the encoder is fixed, so the mean is a
    deterministic public map of each image and the latents can be computed once; a sample
    would only add encoder noise (its std is a few % of the latent spread at our KL weight)
    to gradients that DP-SGD already makes noisy.
    """
    was_training = autoencoder.training
    autoencoder.eval()
    out = [autoencoder.encode(x).latent_dist.mean for x in images.split(batch_size)]
    autoencoder.train(was_training)
    return torch.cat(out) * scale
