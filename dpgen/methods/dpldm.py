"""DP-LDM (Lyu et al.): a latent diffusion model pretrained on public data, then fine-tuned
under DP-SGD in its attention modules only, which cuts both the noise dimension and the compute.

What trains under DP is ``method.trainable``, by parameter name of the :class:`LatentDenoiser`:

* ``attention`` (default): inside every ``Transformer2DModel`` (the transformers of the
  ``CrossAttnDownBlock2D`` / ``UNetMidBlock2DCrossAttn`` / ``CrossAttnUpBlock2D`` blocks) the
  input GroupNorm ``norm``, ``proj_in``, ``proj_out``, and in each transformer block the
  self-attention ``norm1`` + ``attn1.*`` and the cross-attention's value and output
  projections ``attn2.to_v`` + ``attn2.to_out``; plus the class embedder
  ``class_embedder.weight``. The transformer blocks' feed-forward (``norm3`` + ``ff.*``) stays
  frozen: it is as large as the attention itself.
* ``attention_only``: the same without the class embedder.
* ``transformer``: whole ``Transformer2DModel`` modules, feed-forward included, plus the class
  embedder: the set DP-LDM's released code fine-tunes (less the cross-attention parameters
  that cannot learn, below).
* ``all``: every denoiser parameter.

The cross-attention attends to one token, the class embedding (:class:`LatentDenoiser`): a
softmax over a single key is 1 whatever the query, so ``attn2.to_q``, ``attn2.to_k`` and the
query's pre-norm ``norm2`` cannot change the output and get no gradient (only float rounding,
about 1e-9). The three attention sets leave them frozen: under DP-SGD they would get only noise and
cost per-example work.

``method.blocks`` (e.g. ``[mid_block, up_blocks.0]``) restricts the attention sets to the
transformers inside those UNet blocks: the paper's ablation over which layers to fine-tune.
The autoencoder is always frozen. Clipping, noise and accounting are the shared strategy's job.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, Transformer2DModel
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dpgen.diffusion.sampling import EpsCorrection, make_sample_scheduler, sample_images
from dpgen.methods.base import DiffusionModule
from dpgen.methods.config import TRAINABLE
from dpgen.models.ldm import (
    LatentDenoiser,
    build_autoencoder,
    build_latent_denoiser,
    encode_latents,
)

_FEED_FORWARD = ("norm3", "ff")  # a transformer block's feed-forward and its pre-norm
# In a transformer block, what only the cross-attention's scores depend on (see above).
_ONE_TOKEN_DEAD = re.compile(r"transformer_blocks\.\d+\.(norm2|attn2\.to_q|attn2\.to_k)\.")


def denoiser_from_config(cfg: DictConfig, num_classes: int) -> LatentDenoiser:
    """The untrained denoiser ``model`` describes, for ``num_classes`` classes."""
    return build_latent_denoiser(OmegaConf.to_container(cfg.model, resolve=True), cfg.data.image_size, num_classes)


def attention_blocks(denoiser: LatentDenoiser) -> dict[str, nn.Module]:
    """The UNet blocks holding cross-attention transformers, by module path (``up_blocks.0``)."""
    unet = denoiser.unet
    blocks: dict[str, nn.Module | None] = {f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)}
    blocks["mid_block"] = unet.mid_block
    blocks.update({f"up_blocks.{i}": b for i, b in enumerate(unet.up_blocks)})
    return {name: b for name, b in blocks.items()
            if b is not None and any(isinstance(m, Transformer2DModel) for m in b.modules())}


def trainable_parameter_names(denoiser: LatentDenoiser, trainable: str,
                              blocks: Sequence[str] | None = None) -> set[str]:
    """Names (as in ``denoiser.named_parameters()``) of the parameters ``trainable`` selects."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable={trainable!r}: use one of {TRAINABLE}")
    if trainable == "all":
        return {name for name, _ in denoiser.named_parameters()}
    available = attention_blocks(denoiser)
    unknown = sorted(set(blocks or ()) - set(available))
    if unknown:
        raise ValueError(f"blocks {unknown} hold no attention; blocks with attention: {sorted(available)}")
    names = {"class_embedder.weight"} if trainable != "attention_only" else set()
    for block_name in blocks if blocks is not None else available:
        for module_name, module in available[block_name].named_modules():
            if not isinstance(module, Transformer2DModel):
                continue
            for param_name, _ in module.named_parameters():
                if _ONE_TOKEN_DEAD.match(param_name):
                    continue
                if trainable == "transformer" or not set(param_name.split(".")) & set(_FEED_FORWARD):
                    names.add(f"unet.{block_name}.{module_name}.{param_name}")
    return names


class DPLDMModule(DiffusionModule):
    """Diffusion on the latents of a fixed public autoencoder; ``self.unet`` is the denoiser
    (UNet and class embedder), so the DP strategy, EMA and parameter counts see exactly it."""

    def __init__(
        self,
        denoiser: LatentDenoiser,
        autoencoder: AutoencoderKL,
        num_classes: int,
        diffusion: dict,
        timesteps: dict,
        lr: float,
        multiplicity: int = 1,
        label_dropout: float = 0.1,
        trainable: str = "all",
        blocks: Sequence[str] | None = None,
    ) -> None:
        super().__init__(unet=denoiser, num_classes=num_classes, diffusion=diffusion, timesteps=timesteps,
                         lr=lr, multiplicity=multiplicity, label_dropout=label_dropout, hflip=False)
        self.autoencoder = autoencoder.requires_grad_(False)
        # Set from public data with the autoencoder: the scaling factor, and the largest |latent|.
        self.register_buffer("latent_scale", torch.ones(()))
        self.register_buffer("latent_range", torch.ones(()))
        names = trainable_parameter_names(denoiser, trainable, blocks)
        for name, p in denoiser.named_parameters():
            p.requires_grad_(name in names)

    @classmethod
    def from_config(cls, cfg: DictConfig, num_classes: int | None = None, pretraining: bool = False) -> DPLDMModule:
        """DP fine-tuning's module (sensitive label space, ``method.trainable``), or with
        ``pretraining`` the public one (``num_classes`` public classes, everything trains)."""
        m, data = cfg.method, cfg.data
        num_classes = data.num_classes if num_classes is None else num_classes
        model = OmegaConf.to_container(cfg.model, resolve=True)
        return cls(
            denoiser=denoiser_from_config(cfg, num_classes),
            autoencoder=build_autoencoder(model, data.channels, data.image_size),
            num_classes=num_classes, diffusion=OmegaConf.to_container(cfg.diffusion),
            timesteps=OmegaConf.to_container(m.timesteps), lr=m.train.lr, multiplicity=m.multiplicity,
            label_dropout=m.label_dropout,
            trainable="all" if pretraining else m.trainable,
            blocks=None if pretraining else (list(m.blocks) if m.get("blocks") is not None else None),
        )

    # -- weights ----------------------------------------------------------------------------
    def generator_state_dict(self) -> dict[str, Tensor]:
        # The decoder and the latent scale are part of the generator: model.pt alone samples.
        return self.state_dict()

    def load_generator_state_dict(self, state: dict[str, Tensor]) -> None:
        self.load_state_dict(state)

    def set_autoencoder(self, state: dict[str, Tensor], latent_scale: float, latent_range: float) -> None:
        self.autoencoder.load_state_dict(state)
        self.latent_scale.fill_(latent_scale)
        self.latent_range.fill_(latent_range)

    def init_from_public(self, state: dict[str, Tensor], public_class_names: Sequence[str],
                         class_names: Sequence[str]) -> list[str]:
        """Load the public latent model into a denoiser for the sensitive label space.

        The class embedder is created fresh for the sensitive classes; the rows of classes the
        public set also has (same name) and the null row start from their public embeddings,
        so identical label spaces load unchanged. Returns the classes that were carried over.
        """
        state = dict(state)
        public_emb = state.pop("class_embedder.weight")
        missing, unexpected = self.unet.load_state_dict(state, strict=False)
        assert missing == ["class_embedder.weight"] and not unexpected, (missing, unexpected)
        shared = [c for c in class_names if c in public_class_names]
        with torch.no_grad():
            weight = self.unet.class_embedder.weight
            for c in shared:
                weight[list(class_names).index(c)] = public_emb[list(public_class_names).index(c)]
            weight[self.null_label] = public_emb[len(public_class_names)]
        return shared

    # -- latents ----------------------------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        return encode_latents(self.autoencoder, images, self.latent_scale)

    def diffusion_inputs(self, images: Tensor) -> Tensor:
        return self.encode(images)

    @torch.no_grad()
    def decode(self, latents: Tensor, batch_size: int = 500) -> Tensor:
        was_training = self.autoencoder.training
        self.autoencoder.eval()
        images = [self.autoencoder.decode(z / self.latent_scale).sample for z in latents.split(batch_size)]
        self.autoencoder.train(was_training)
        return torch.cat(images).clamp(-1, 1)

    def sample(self, labels: Tensor, num_inference_steps: int, guidance_scale: float,
               generator: torch.Generator | None = None, batch_size: int = 250,
               progress: bool = True, eps_correction: EpsCorrection | None = None, solver: str = "ddim") -> Tensor:
        """Latents from the diffusion model, decoded to images by the public decoder.

        The solver clips its x0 predictions to the box the public latents occupy, as pixel models clip
        to [-1, 1]; without it, a few early predictions far outside that box decode to blobs.
        """
        cfg = self.unet.unet.config
        scheduler = make_sample_scheduler({**self.diffusion_cfg, "clip_sample_range": self.latent_range.item()}, solver)
        latents = sample_images(
            self.unet, scheduler, labels, num_inference_steps,
            guidance_scale, self.null_label, (cfg.in_channels, cfg.sample_size, cfg.sample_size),
            generator=generator, batch_size=batch_size, progress=progress, eps_correction=eps_correction,
        )
        return self.decode(latents.to(self.latent_scale.device), batch_size).cpu()
