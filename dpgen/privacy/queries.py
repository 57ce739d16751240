"""Counting queries on sensitive data, released through the Gaussian mechanism.

A *vote histogram* counts, for every group (e.g. a sensitive class) and every candidate (e.g. a
public class), how many examples of that group voted for that candidate. Each example casts
``k`` votes for ``k`` distinct candidates, all in the row of its own group, so adding or
removing one example changes ``k`` cells by one each: the L2 sensitivity is ``sqrt(k)``.
(Votes repeated within one example would put more than one count into a cell and break that
bound, so they are refused.)

The caller records the release in the PrivacyLedger as one ``"gaussian"`` event with the same
``noise_multiplier``, before it draws the noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dpgen.privacy.mechanisms import gaussian_mechanism


def vote_histogram_sensitivity(votes_per_example: int) -> float:
    """L2 sensitivity of a vote histogram whose examples cast ``votes_per_example`` distinct votes."""
    if votes_per_example < 1:
        raise ValueError(f"votes_per_example must be >= 1, got {votes_per_example}")
    return math.sqrt(votes_per_example)


def vote_histogram(votes: Tensor, groups: Tensor, num_groups: int, num_candidates: int) -> Tensor:
    """Exact counts ``[num_groups, num_candidates]`` (int64) of ``votes`` ``[N, k]`` by ``groups`` ``[N]``."""
    if votes.ndim != 2 or groups.shape != votes.shape[:1]:
        raise ValueError(f"votes must be [N, k] and groups [N], got {tuple(votes.shape)} and {tuple(groups.shape)}")
    for name, values, size in (("votes", votes, num_candidates), ("groups", groups, num_groups)):
        if values.numel() and not (values.min() >= 0 and values.max() < size):
            raise ValueError(f"{name} must lie in [0, {size})")
    sorted_votes = votes.sort(dim=1).values
    if (sorted_votes[:, 1:] == sorted_votes[:, :-1]).any():
        raise ValueError("each example's votes must be distinct (else the sensitivity exceeds sqrt(k))")
    cells = (groups[:, None] * num_candidates + votes).flatten()
    return torch.bincount(cells, minlength=num_groups * num_candidates).view(num_groups, num_candidates)


def noisy_vote_histogram(votes: Tensor, groups: Tensor, num_groups: int, num_candidates: int,
                         noise_multiplier: float, generator: torch.Generator | None = None) -> Tensor:
    """The vote histogram plus N(0, (noise_multiplier * sqrt(k))^2) in every cell (float32).

    ``generator=None`` draws the noise from fresh OS entropy; pass a seeded one only in tests.
    """
    counts = vote_histogram(votes, groups, num_groups, num_candidates)
    return gaussian_mechanism(counts, vote_histogram_sensitivity(votes.shape[1]), noise_multiplier, generator)
