"""DP central images (DP-FETA, Li et al. 2025): noisy per-class means of a Poisson subsample.

Neighbouring relation: add/remove one (image, label) example of the sensitive training split.
One round of the query, on a Poisson subsample (each example in with probability q):

1. every image is mapped from [-1, 1] to [0, 1] and *clamped* there, whatever the data holds,
   area-downsampled to ``resolution``² (an average of values in [0, 1] stays in [0, 1]) and,
   with ``clip_norm``, scaled down to L2 norm <= clip_norm;
2. the per-class sums ``S[c] = sum of the processed images of class c`` form one
   ``[classes, C, r, r]`` table;
3. ``S + N(0, (sigma * sensitivity)^2)`` elementwise, via ``gaussian_mechanism``;
4. each row is divided by the *nominal* expected count ``q * N_c`` of its class, a public
   number. The realised count is never used: it changes when one example is added or removed,
   so dividing by it would release it without noise.

Sensitivity: adding or removing one example changes exactly one row ``S[y]``, by that
example's processed image x, so the L2 change of the whole table is ``||x||_2 <= bound`` with
``bound = min(clip_norm, sqrt(C * r * r))`` (every entry of x lies in [0, 1]). Each round is
therefore one Poisson-subsampled Gaussian mechanism with noise multiplier sigma; the caller
records it in the PrivacyLedger.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpgen.privacy.mechanisms import gaussian_mechanism


def nominal_class_counts(
    dataset_size: int, sample_rate: float, class_proportions: Sequence[float]
) -> torch.Tensor:
    """Expected per-class size ``q * N * p_c`` of one Poisson subsample, from public numbers only.

    ``class_proportions`` must be public knowledge (e.g. a uniform prior, or published class
    frequencies), never measured on the sensitive split; N is public, as elsewhere in dpgen.
    """
    p = torch.as_tensor(class_proportions, dtype=torch.float64)
    if p.ndim != 1 or len(p) == 0 or bool((p <= 0).any()):
        raise ValueError(f"class_proportions must be a non-empty list of positive numbers, got {list(p)}")
    return sample_rate * dataset_size * p / p.sum()


@dataclass(frozen=True)
class CentralImageQuery:
    """One round of the central-image mechanism (see the module docstring)."""

    num_classes: int
    channels: int
    resolution: int
    noise_multiplier: float
    clip_norm: float | None = None

    @property
    def sensitivity(self) -> float:
        """L2 bound on how far one example moves the ``[classes, C, r, r]`` sum table."""
        range_bound = math.sqrt(self.channels * self.resolution**2)
        return range_bound if self.clip_norm is None else min(float(self.clip_norm), range_bound)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, C, S, S]`` model images -> float64 ``[N, C, r, r]`` in [0, 1], L2 norm <= sensitivity."""
        x = ((images.double() + 1.0) / 2.0).clamp(0.0, 1.0)
        # Clamped again: rounding in the average must not push an entry past 1.
        x = F.adaptive_avg_pool2d(x, self.resolution).clamp(0.0, 1.0)
        if self.clip_norm is not None:
            # Scaled to just inside the bound, so that rounding cannot leave a norm above it.
            target = float(self.clip_norm) * (1.0 - 1e-9)
            norms = x.flatten(1).norm(dim=1).clamp_min(1e-12)
            x = x * (target / norms).clamp(max=1.0)[:, None, None, None]
        return x

    def class_sums(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Exact (non-private) ``[classes, C, r, r]`` float64 sums of the processed images.

        Sums of disjoint chunks of a subsample add up to the subsample's sums.
        """
        x = self.preprocess(images)
        sums = torch.zeros((self.num_classes, *x.shape[1:]), dtype=torch.float64)
        return sums.index_add_(0, labels.long(), x)

    def release(
        self,
        sums: torch.Tensor,
        nominal_counts: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Noisy class means ``[classes, C, r, r]`` from the ``class_sums`` of one Poisson subsample.

        In [0, 1] units, unclamped. ``nominal_counts`` comes from :func:`nominal_class_counts`;
        ``generator=None`` draws the noise from fresh OS entropy (tests inject a seeded one).
        """
        if nominal_counts.shape != (self.num_classes,) or bool((nominal_counts <= 0).any()):
            raise ValueError(f"nominal_counts must be {self.num_classes} positive numbers")
        noisy = gaussian_mechanism(sums, self.sensitivity, self.noise_multiplier, generator)
        return (noisy / nominal_counts.to(noisy.dtype).view(-1, 1, 1, 1)).float()
