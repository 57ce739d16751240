"""DP-LDM's stages: a public autoencoder and a public latent diffusion model (both cached by
config hash, no privacy cost), then DP fine-tuning on the sensitive set's latents.

The encoder is fixed and public, so the sensitive images are encoded once, right before DP
fine-tuning: each latent is a deterministic function of one image and is used only through
DP-SGD, so adding or removing one image adds or removes exactly one latent, with the same N
and the same sampling rate. The guarantee is about the images; no latent is released.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dpgen.data import build_public_dataset
from dpgen.io import build_once, save_torch
from dpgen.methods.autoencoder import KLAutoencoderModule
from dpgen.methods.dpldm import DPLDMModule
from dpgen.models.ldm import build_autoencoder, encode_latents
from dpgen.stages.trainer import build_trainer, ema_callbacks, shuffled_loader
from dpgen.stages.training import (
    build_module,
    fit_dp,
    hashed_cache_path,
    public_config_key,
)

if TYPE_CHECKING:
    from pathlib import Path

    from dpgen.pipeline import RunContext

log = logging.getLogger("dpgen")


def _plain(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def _autoencoder_key(cfg: DictConfig) -> dict:
    # The public config carries the image size and channels (interpolated from data).
    return {"public": public_config_key(cfg), "autoencoder": _plain(cfg.model.autoencoder),
            "pretrain": _plain(cfg.method.pretrain_autoencoder), "seed": cfg.seed}


def autoencoder_cache_path(cfg: DictConfig) -> Path:
    return hashed_cache_path(cfg, f"autoencoder-{cfg.model.name}", _autoencoder_key(cfg))


def ldm_cache_path(cfg: DictConfig) -> Path:
    key = {"autoencoder": _autoencoder_key(cfg), "unet": _plain(cfg.model.unet), "diffusion": _plain(cfg.diffusion),
           "timesteps": _plain(cfg.method.timesteps), "label_dropout": cfg.method.label_dropout,
           "pretrain": _plain(cfg.method.pretrain_ldm), "seed": cfg.seed}
    return hashed_cache_path(cfg, f"ldm-{cfg.model.name}", key)


def _load_autoencoder(cfg: DictConfig, module: DPLDMModule) -> None:
    saved = torch.load(autoencoder_cache_path(cfg), map_location="cpu")
    module.set_autoencoder(saved["state_dict"], saved["latent_scale"], saved["latent_range"])


def pretrain_autoencoder(ctx: RunContext) -> None:
    cfg = ctx.cfg
    cache = autoencoder_cache_path(cfg)
    build_once(cache, "pretrain_autoencoder", "public autoencoder", lambda: _pretrain_autoencoder(ctx, cache))


def _pretrain_autoencoder(ctx: RunContext, cache: Path) -> None:
    cfg = ctx.cfg
    p = cfg.method.pretrain_autoencoder
    public = build_public_dataset(cfg.public)
    autoencoder = build_autoencoder(_plain(cfg.model), cfg.data.channels, cfg.data.image_size)
    trainer = build_trainer(ctx, "pretrain_autoencoder", p.steps, [])
    trainer.fit(KLAutoencoderModule(autoencoder, p.lr, p.kl_weight),
                shuffled_loader(TensorDataset(public.images), p.batch_size, cfg.seed))
    # Latent diffusion's scaling factor: unit-variance latents suit the noise schedule.
    latents = encode_latents(autoencoder, public.images, 1.0)
    scale = 1.0 / latents.std().item()
    latent_range = latents.abs().max().item() * scale  # where sampling clips its predictions
    with torch.no_grad():
        recon = autoencoder.eval().decode(latents[:1000]).sample
    mse = (recon - public.images[:1000]).pow(2).mean().item()
    save_torch(cache, {"state_dict": autoencoder.state_dict(), "latent_scale": scale, "latent_range": latent_range})
    log.info("pretrain_autoencoder: latents %s, scaling factor %.4f, scaled range +-%.2f, public reconstruction "
             "MSE %.4f; cached %s", tuple(latents.shape[1:]), scale, latent_range, mse, cache)


def pretrain_ldm(ctx: RunContext) -> None:
    cfg = ctx.cfg
    cache = ldm_cache_path(cfg)
    build_once(cache, "pretrain_ldm", "public latent diffusion model", lambda: _pretrain_ldm(ctx, cache))


def _pretrain_ldm(ctx: RunContext, cache: Path) -> None:
    cfg = ctx.cfg
    p = cfg.method.pretrain_ldm
    public = build_public_dataset(cfg.public)
    # Pretrained in the public label space; dp_finetune maps it to the sensitive one.
    module = DPLDMModule.from_config(cfg, num_classes=public.info.num_classes, pretraining=True)
    _load_autoencoder(cfg, module)
    module.lr = p.lr
    # As for pixel pretraining: without privacy, multiplicity is only a larger batch.
    module.multiplicity = 1
    data = TensorDataset(module.encode(public.images), public.labels)
    trainer = build_trainer(ctx, "pretrain_ldm", p.steps, ema_callbacks(p.get("ema_decay")))
    trainer.fit(module, shuffled_loader(data, p.batch_size, cfg.seed))
    save_torch(cache, {"state_dict": module.unet.state_dict(), "class_names": list(public.info.class_names)})
    log.info("pretrain_ldm: cached %s", cache)


def _encode(module: DPLDMModule, dataset: Dataset) -> TensorDataset:
    latents, labels = [], []
    for images, y in DataLoader(dataset, batch_size=500):
        latents.append(module.encode(images))
        labels.append(y)
    return TensorDataset(torch.cat(latents), torch.cat(labels))


def dp_finetune(ctx: RunContext) -> None:
    cfg = ctx.cfg
    module = build_module(cfg)
    _load_autoencoder(cfg, module)
    pretrained = torch.load(ldm_cache_path(cfg), map_location="cpu")
    class_names = [str(n) for n in ctx.train_set.info.class_names]
    shared = module.init_from_public(pretrained["state_dict"], pretrained["class_names"], class_names)
    log.info("dp_finetune: class embedder for %d sensitive classes, %d of them initialised from the public "
             "class of the same name", len(class_names), len(shared))
    params = list(module.unet.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    log.info("dp_finetune: training %d of %d denoiser parameters (%.1f %%), method.trainable=%s, blocks=%s",
             trainable, total, 100 * trainable / total, cfg.method.trainable, cfg.method.get("blocks"))
    fit_dp(ctx, module, _encode(module, ctx.train_set), "dp_finetune")
