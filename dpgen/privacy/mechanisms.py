"""Gaussian mechanism for queries on sensitive data (histograms, class means, ...).

The noise must not be reproducible from anything an observer might know: a run seed is
written into configs, logs and checkpoints, and noise regenerated from it can be subtracted
from a release. Generators here are therefore seeded from OS entropy, never from the run seed or
torch's global RNG. (torch's CPU/CUDA generators are not cryptographic PRNGs; Opacus's
``secure_mode`` with torchcsprng is the stronger option when that threat model matters.)

The cost of every call must be recorded in the PrivacyLedger by the caller (mechanism
``"gaussian"``, the same ``noise_multiplier``, one count per query).
"""

from __future__ import annotations

import math
import secrets

import torch


def fresh_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from OS-level entropy, independent of ``torch.manual_seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(secrets.randbits(64))
    return g


def _noise_dtype(t: torch.Tensor) -> torch.dtype:
    # Integer inputs (counts) get float noise; half precision would round the noise coarsely
    # (a known source of leakage in floating-point DP), so draw and add it in float32.
    if t.dtype in (torch.float32, torch.float64):
        return t.dtype
    return torch.float32


def gaussian_noise_like(
    t: torch.Tensor, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """N(0, std^2) noise with the shape and device of ``t`` (float32 unless ``t`` is float64).

    ``generator=None`` draws from a fresh OS-seeded generator; pass a seeded one only in tests.
    """
    std = float(std)
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be a finite number >= 0, got {std!r}")
    if generator is None:
        generator = fresh_generator(t.device)
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    noise = torch.randn(
        t.shape, generator=generator, device=generator.device, dtype=_noise_dtype(t)
    )
    return noise.mul_(std).to(t.device)


def gaussian_mechanism(
    value: torch.Tensor,
    l2_sensitivity: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Release ``value + N(0, (noise_multiplier * l2_sensitivity)^2)`` elementwise.

    ``l2_sensitivity`` bounds how far ``value`` can move (L2 norm over the whole tensor) when
    one example is added or removed; ``noise_multiplier`` is the sigma the ledger planned.
    The result is detached and float (float32 for integer or half-precision inputs).
    """
    sens = float(l2_sensitivity)
    sigma = float(noise_multiplier)
    if not (math.isfinite(sens) and sens > 0):
        raise ValueError(f"l2_sensitivity must be a finite number > 0, got {l2_sensitivity!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    noise = gaussian_noise_like(value, sigma * sens, generator)
    return value.detach().to(noise.dtype) + noise
