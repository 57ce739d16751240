"""Class-conditional denoising diffusion as a LightningModule.

``per_example_loss`` is the one contract with the DP strategy: a loss of shape ``[B, K]``,
one row per example and one column per augmentation/noise copy, computed from ``B*K`` model
rows in copy-major order (row ``k*B + b`` is copy k of example b). The non-private ``training_step`` is
just its mean, so private and non-private training optimise the same objective.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DModel
from lightning.pytorch import LightningModule
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from dpgen.diffusion.sampling import (
    EpsCorrection,
    make_sample_scheduler,
    make_train_scheduler,
    sample_images,
)
from dpgen.diffusion.timesteps import build_timestep_sampler
from dpgen.models.unet import build_unet


class DiffusionModule(LightningModule):
    def __init__(
        self,
        unet: UNet2DModel,
        num_classes: int,
        diffusion: dict,
        timesteps: dict,
        lr: float,
        multiplicity: int = 1,
        label_dropout: float = 0.1,
        hflip: bool = False,
    ) -> None:
        super().__init__()
        if multiplicity < 1:
            raise ValueError(f"method.multiplicity={multiplicity}: must be >= 1")
        self.unet = unet
        self.num_classes = num_classes
        self.null_label = num_classes  # the extra class embedding used for guidance
        self.diffusion_cfg = dict(diffusion)
        self.train_scheduler = make_train_scheduler(self.diffusion_cfg)
        self.timestep_sampler = build_timestep_sampler(dict(timesteps), self.train_scheduler.alphas_cumprod)
        self.lr = lr
        self.multiplicity = multiplicity
        self.label_dropout = label_dropout
        self.hflip = hflip

    @classmethod
    def from_config(cls, cfg: DictConfig) -> DiffusionModule:
        """The untrained module a run's config describes."""
        data, m = cfg.data, cfg.method
        unet = build_unet(OmegaConf.to_container(cfg.model), data.image_size, data.channels, data.num_classes)
        return cls(
            unet=unet, num_classes=data.num_classes, diffusion=OmegaConf.to_container(cfg.diffusion),
            timesteps=OmegaConf.to_container(m.timesteps), lr=m.train.lr, multiplicity=m.multiplicity,
            label_dropout=m.label_dropout, hflip=m.hflip,
        )

    def generator_state_dict(self) -> dict[str, Tensor]:
        """What ``model.pt`` holds: every weight that sampling needs."""
        return self.unet.state_dict()

    def load_generator_state_dict(self, state: dict[str, Tensor]) -> None:
        self.unet.load_state_dict(state)

    def per_example_loss(self, batch: Any) -> Tensor:
        x, y = batch[0], batch[1]
        b, k = len(x), self.multiplicity
        # Label dropout once per *example*: all K copies share the label, so the copies
        # average a single conditional objective rather than a mix.
        drop = torch.rand(b, device=x.device) < self.label_dropout
        y = torch.where(drop, torch.full_like(y, self.null_label), y)
        x = x.repeat(k, 1, 1, 1)
        y = y.repeat(k)
        if self.hflip:
            flip = torch.rand(len(x), device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        noise = torch.randn_like(x)
        t = self.timestep_sampler.sample(len(x)).to(x.device)
        return self.denoising_error(x, y, t, noise).view(k, b).T

    def denoising_error(self, x: Tensor, y: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Per-row squared error of the noise prediction for ``x`` noised to timestep ``t``:
        the training objective, and the score a loss-based membership attack reads."""
        x_t = self.train_scheduler.add_noise(x, noise, t)
        pred = self.unet(x_t, t, class_labels=y).sample
        return (pred - noise).pow(2).flatten(1).mean(1)

    def diffusion_inputs(self, images: Tensor) -> Tensor:
        """Images as the diffusion model sees them (pixels here; latents for latent models)."""
        return images

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.per_example_loss(batch).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch[0]))
        return loss

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.trainable_parameters(), lr=self.lr)

    def sample(self, labels: Tensor, num_inference_steps: int, guidance_scale: float,
               generator: torch.Generator | None = None, batch_size: int = 250,
               progress: bool = True, eps_correction: EpsCorrection | None = None, solver: str = "ddim") -> Tensor:
        cfg = self.unet.config
        return sample_images(
            self.unet, make_sample_scheduler(self.diffusion_cfg, solver), labels, num_inference_steps,
            guidance_scale, self.null_label, (cfg.in_channels, cfg.sample_size, cfg.sample_size),
            generator=generator, batch_size=batch_size, progress=progress, eps_correction=eps_correction,
        )
