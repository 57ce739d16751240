"""LightningDataModule around the sensitive dataset, with an auditable held-out split."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from dpgen.data import build_dataset, validate_data_config
from dpgen.data.config import to_plain

log = logging.getLogger(__name__)


class ImageDataModule(pl.LightningDataModule):
    """Train split on ``setup()``; the held-out test split only when first asked for.

    The test split is for final evaluation only: it is never built during training, and
    ``test_split_loaded`` (plus an INFO log line) records whether and when it was touched.
    The train loader is a plain shuffled one: DP training replaces the sampler with Poisson
    sampling itself.
    """

    def __init__(self, data_cfg: Any, batch_size: int, num_workers: int = 0) -> None:
        super().__init__()
        validate_data_config(data_cfg)  # fail before any training work starts
        self.data_cfg = to_plain(data_cfg, "data")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._train: Dataset | None = None
        self._test: Dataset | None = None

    @property
    def test_split_loaded(self) -> bool:
        return self._test is not None

    def setup(self, stage: str | None = None) -> None:
        # Lightning calls setup for "test" too; the test split still waits for test_dataset.
        if self._train is None:
            self._train = build_dataset(self.data_cfg, "train")

    @property
    def train_dataset(self) -> Dataset:
        if self._train is None:
            self.setup("fit")
        assert self._train is not None
        return self._train

    @property
    def test_dataset(self) -> Dataset:
        """The held-out split, built on first access (final evaluation only)."""
        if self._test is None:
            log.info("loading the held-out test split of %s", self.data_cfg["name"])
            self._test = build_dataset(self.data_cfg, "test")
        return self._test

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
        )

    def test_dataloader(self) -> DataLoader:
        return DataLoader(
            self.test_dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )
