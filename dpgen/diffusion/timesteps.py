"""Distributions over diffusion timesteps for training.

Under DP every example's gradient is clipped, so where the loss puts its weight matters more
than without privacy: DPDM draws noise levels from a log-normal (as in EDM), and
Ghalebikesabi et al. (2023) bias the draw towards the timesteps that carry most of the
signal. All samplers return integer timesteps in [0, T) for a DDPM-style scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class TimestepSampler:
    """Draws training timesteps; subclasses define the distribution."""

    def __init__(self, num_train_timesteps: int) -> None:
        self.num_train_timesteps = num_train_timesteps

    def probabilities(self) -> torch.Tensor:
        """Probability of each timestep, shape [T]."""
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.multinomial(self.probabilities(), n, replacement=True, generator=generator)


class UniformTimesteps(TimestepSampler):
    def probabilities(self) -> torch.Tensor:
        return torch.full((self.num_train_timesteps,), 1.0 / self.num_train_timesteps)


class LogNormalTimesteps(TimestepSampler):
    """DPDM's noise-level distribution: log σ ~ N(p_mean, p_std²), mapped to discrete steps.

    σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) is the noise-to-signal ratio of step t; each step gets the
    log-normal mass of the σ interval it covers, so the law is exact on the discrete grid.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        super().__init__(len(alphas_cumprod))
        log_sigma = 0.5 * torch.log((1 - alphas_cumprod) / alphas_cumprod).double()
        # Interval edges halfway between neighbouring log σ values (log σ increases with t).
        edges = torch.cat([
            torch.tensor([-torch.inf], dtype=torch.float64),
            (log_sigma[1:] + log_sigma[:-1]) / 2,
            torch.tensor([torch.inf], dtype=torch.float64),
        ])
        normal = torch.distributions.Normal(torch.tensor(p_mean, dtype=torch.float64),
                                            torch.tensor(p_std, dtype=torch.float64))
        cdf = normal.cdf(edges)
        self._probs = (cdf[1:] - cdf[:-1]).clamp(min=0).float()
        self._probs /= self._probs.sum()

    def probabilities(self) -> torch.Tensor:
        return self._probs


class MixtureTimesteps(TimestepSampler):
    """Piecewise-uniform mixture: weight w_i spread uniformly over [lo_i, hi_i)."""

    def __init__(self, num_train_timesteps: int, intervals: Sequence[Sequence[float]]) -> None:
        super().__init__(num_train_timesteps)
        probs = torch.zeros(num_train_timesteps)
        for lo, hi, weight in intervals:
            lo, hi = int(lo), int(hi)
            if not 0 <= lo < hi <= num_train_timesteps or weight < 0:
                raise ValueError(f"timestep interval [{lo}, {hi}) with weight {weight} is not valid "
                                 f"for T={num_train_timesteps}")
            probs[lo:hi] += weight / (hi - lo)
        if probs.sum() <= 0:
            raise ValueError("timestep mixture has no mass")
        self._probs = probs / probs.sum()

    def probabilities(self) -> torch.Tensor:
        return self._probs


TIMESTEP_SAMPLERS = ("uniform", "lognormal", "mixture")  # method.timesteps.kind


def build_timestep_sampler(cfg: dict, alphas_cumprod: torch.Tensor) -> TimestepSampler:
    """``cfg`` is ``method.timesteps``: ``{kind: uniform|lognormal|mixture, ...}``."""
    kind = cfg.get("kind", "uniform")
    T = len(alphas_cumprod)
    if kind == "uniform":
        return UniformTimesteps(T)
    if kind == "lognormal":
        return LogNormalTimesteps(alphas_cumprod, cfg.get("p_mean", -1.2), cfg.get("p_std", 1.2))
    if kind == "mixture":
        return MixtureTimesteps(T, cfg["intervals"])
    raise ValueError(f"method.timesteps.kind={kind!r}: unknown; use {', '.join(TIMESTEP_SAMPLERS)}")
