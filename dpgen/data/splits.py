"""Deterministic stratified train/test split."""

from __future__ import annotations

import numpy as np


def stratified_split(
    labels: np.ndarray, test_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) index arrays; each class keeps its share of the test set.

    Class quotas are ``test_size * class_count / N`` rounded by largest remainder, so they sum
    to exactly ``test_size``. Within a class the test items are a seeded random choice; numpy's
    PCG64 generator gives the same split on every platform and numpy version.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 < test_size < n:
        raise ValueError(f"test_size must be in (0, {n}), got {test_size}")
    classes, counts = np.unique(labels, return_counts=True)
    quota = test_size * counts / n
    take = np.floor(quota).astype(int)
    leftover = test_size - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:leftover]] += 1

    rng = np.random.default_rng(seed)
    test = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(n), test_idx, assume_unique=True)
    return train_idx, test_idx
