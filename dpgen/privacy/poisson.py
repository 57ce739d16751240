"""Poisson sampling of logical batches, DDP-aware.

Each example of a rank's shard joins a step's batch independently with probability q, so the
batch size is Binomial(N, q) and may be 0: this is the sampling the accountant assumes.

Opacus ships samplers for this, but its distributed one silently *skips* empty batches, which
desynchronises ranks (one rank steps while another does not) and drops steps the accountant
counted; ours always yields, empty or not. The shard split is a public, data-independent
function of the index (``rank::world_size``), so the union over ranks is one Poisson sample
of the whole training split at rate q.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from dpgen.privacy.mechanisms import fresh_generator


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields ``steps`` batches of indices, each a Poisson sample of this rank's shard."""

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int,
        rank: int = 0,
        world_size: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if generator is not None and world_size > 1:
            # A generator given here is copied into every rank: all would draw the same uniforms,
            # and their shards would be correlated instead of one Poisson sample of the whole set.
            raise ValueError("a seeded generator cannot be shared by DDP ranks; leave it None (fresh OS entropy)")
        self.indices = torch.arange(rank, num_samples, world_size)
        self.sample_rate = sample_rate
        self.steps = steps
        # Which examples are in a batch is part of the mechanism: draw it from fresh entropy,
        # not from the (public, reproducible) run seed.
        self.generator = generator if generator is not None else fresh_generator()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            # float64: a float32 uniform is below q slightly more often than q (by up to 2^-24).
            mask = torch.rand(len(self.indices), generator=self.generator, dtype=torch.float64) < self.sample_rate
            yield self.indices[mask].tolist()


class EmptySafeCollate:
    """``default_collate`` that turns an empty index list into zero-length tensors.

    The empty batch's shapes and dtypes come from one example: shapes are public (fixed by
    the config), so reading them leaks nothing.
    """

    def __init__(self, example: Sequence[Any]) -> None:
        self.template = [torch.as_tensor(x) for x in example]

    def __call__(self, items: list[Any]) -> list[torch.Tensor]:
        if not items:
            return [torch.empty((0, *t.shape), dtype=t.dtype) for t in self.template]
        return list(torch.utils.data.default_collate(items))


def poisson_dataloader(
    dataset: Dataset,
    sample_rate: float,
    steps: int,
    rank: int = 0,
    world_size: int = 1,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader whose every batch is one logical DP-SGD step of this rank."""
    sampler = PoissonBatchSampler(len(dataset), sample_rate, steps, rank, world_size, generator)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=EmptySafeCollate(dataset[0]),
        num_workers=num_workers,
    )


class PoissonDataModule(LightningDataModule):
    """Builds the Poisson loader inside each process, once the rank is known (DDP spawns)."""

    def __init__(self, dataset: Dataset, sample_rate: float, steps: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.dataset = dataset
        self.sample_rate = sample_rate
        self.steps = steps
        self.generator = generator

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return poisson_dataloader(self.dataset, self.sample_rate, self.steps, rank, world, self.generator)
