"""Poisson sampling: binomial batch sizes, shards that partition the data, empty batches."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from dpgen.privacy.poisson import PoissonBatchSampler, poisson_dataloader


def test_batch_sizes_are_binomial_not_fixed():
    n, q, steps = 1000, 0.05, 2000
    sizes = torch.tensor([len(b) for b in PoissonBatchSampler(n, q, steps)], dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean().item() - mean) < 4 * (var / steps) ** 0.5
    assert abs(sizes.var().item() / var - 1) < 0.15  # a fixed batch size would have variance 0
    assert len(set(sizes.tolist())) > 10


def test_ranks_sample_disjoint_shards_covering_the_data():
    n = 103
    shards = [PoissonBatchSampler(n, 1.0, 1, rank=r, world_size=3).indices.tolist() for r in range(3)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(n))


def test_empty_batches_are_yielded_as_zero_length_tensors():
    data = TensorDataset(torch.randn(5, 1, 4, 4), torch.arange(5))
    loader = poisson_dataloader(data, 0.01, steps=50, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(batches) == 50  # every step is yielded, empty or not
    empty = [b for b in batches if len(b[0]) == 0]
    assert empty and empty[0][0].shape == (0, 1, 4, 4) and empty[0][1].dtype == torch.long


def test_sampling_is_not_reproducible_from_the_run_seed():
    torch.manual_seed(0)
    a = [len(b) for b in PoissonBatchSampler(500, 0.1, 20)]
    torch.manual_seed(0)
    b = [len(b) for b in PoissonBatchSampler(500, 0.1, 20)]
    assert a != b
