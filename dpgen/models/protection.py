"""CPSample's protection classifier: a small CNN on *noisy* images, conditioned on the timestep.

It sees x_t at any diffusion timestep t (sinusoidal embedding of t, as the UNets here use) and
returns one logit. CPSample trains it to memorise random binary labels of the training images,
so it is confident only near a training image; that confidence is what guided sampling steers
away from.
"""

from __future__ import annotations

from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import Tensor, nn


class _FiLMBlock(nn.Module):
    """conv → GroupNorm → scale/shift from the timestep embedding → SiLU."""

    def __init__(self, cin: int, cout: int, embed_dim: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.GroupNorm(groups, cout)
        self.film = nn.Linear(embed_dim, 2 * cout)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        return nn.functional.silu(self.norm(self.conv(x)) * (1 + scale) + shift)


class ProtectionClassifier(nn.Module):
    """``(x_t [B, C, H, W], t [B]) -> logit [B]``; works at any input size >= 4."""

    def __init__(self, channels: int, width: int = 32, groups: int = 8) -> None:
        super().__init__()
        embed_dim = 4 * width
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(width, embed_dim)
        self.blocks = nn.ModuleList([
            _FiLMBlock(channels, width, embed_dim, groups),
            _FiLMBlock(width, 2 * width, embed_dim, groups),
            _FiLMBlock(2 * width, 2 * width, embed_dim, groups),
        ])
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 4, 1))
        self.squeeze = nn.AdaptiveAvgPool2d(2)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        # The sampler's timestep is a CPU scalar (scheduler.timesteps); the embedding is built on t's device.
        emb = self.time_embed(self.time_proj(t.to(x.device).expand(len(x))).to(x.dtype))
        h = self.blocks[0](x, emb)
        h = self.blocks[1](self.pool(h), emb)
        h = self.blocks[2](h, emb)
        return self.head(self.squeeze(h)).squeeze(1)
