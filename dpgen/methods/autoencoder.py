"""Non-private training of a KL autoencoder on public images (the first stage of DP-LDM).

The objective is the VAE's: reconstruct a posterior sample, plus a small KL pull towards
N(0, I) that keeps the latent space smooth enough to diffuse in. The weight is per pixel and
small, as in latent diffusion: the latents must stay informative, and their overall scale is
fixed afterwards by the scaling factor (1 / std of the public latents).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL
from lightning.pytorch import LightningModule
from torch import Tensor


class KLAutoencoderModule(LightningModule):
    def __init__(self, autoencoder: AutoencoderKL, lr: float, kl_weight: float) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.lr = lr
        self.kl_weight = kl_weight

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0]
        posterior = self.autoencoder.encode(x).latent_dist
        recon = self.autoencoder.decode(posterior.sample()).sample
        # L1 keeps strokes sharper than L2 at this size.
        rec = (recon - x).abs().mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + self.kl_weight * kl
        self.log_dict({"train/recon_l1": rec, "train/kl": kl}, prog_bar=True, batch_size=len(x))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.autoencoder.parameters(), lr=self.lr)
