"""Sensitive and public image sets behind one contract.

``dataset[i] -> (image, label)`` with ``image`` float32 ``[C, S, S]`` in [-1, 1] and ``label``
an int in ``[0, num_classes)``; every dataset has ``.info`` (:class:`DatasetInfo`).

Entry points take the ``data`` (or ``public``) config node, as a DictConfig or a dict.
``validate_*`` never reads images, so a run can fail fast before any work starts.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from dpgen.checks import require_choice, require_int, to_plain
from dpgen.data.dataset import DatasetInfo, FileImageDataset, TensorImageDataset
from dpgen.data.registry import DATA_NAMES, DataSpec, data_spec
from dpgen.errors import ConfigError

__all__ = [
    "DatasetInfo",
    "FileImageDataset",
    "TensorImageDataset",
    "build_dataset",
    "build_public_dataset",
    "describe_data",
    "has_public_data",
    "validate_data_config",
    "validate_public_config",
]

SPLITS = ("train", "test")
PUBLIC_NAMES = ("glyphs", "none")


def _checked_data(cfg: Any) -> tuple[dict[str, Any], DataSpec]:
    plain = to_plain(cfg, "data")
    spec = data_spec(require_choice(plain, "data", "name", DATA_NAMES))
    require_int(plain, "data", "image_size", minimum=1)
    require_choice(plain, "data", "channels", (1, 3))
    spec.check(plain)
    if plain.get("train_limit") is not None:
        require_int(plain, "data", "train_limit", minimum=1)
    expected = plain.get("num_classes")
    if expected is not None:
        actual = len(spec.class_names(plain))
        if expected != actual:
            raise ConfigError(
                "data.num_classes",
                expected,
                f"but {spec.name} has {actual} classes",
                f"set data.num_classes={actual} (or null)",
            )
    return plain, spec


def validate_data_config(cfg: Any) -> None:
    """Check the ``data`` node without reading images: name, sizes, root layout, options."""
    _checked_data(cfg)


def describe_data(cfg: Any) -> DatasetInfo:
    """The :class:`DatasetInfo` that :func:`build_dataset` will produce, without reading images.

    Model builders need ``num_classes`` and the image shape before any data is loaded.
    """
    plain, spec = _checked_data(cfg)
    names = spec.class_names(plain)
    return DatasetInfo(spec.name, len(names), names, plain["channels"], plain["image_size"])


def build_dataset(cfg: Any, split: str) -> Dataset:
    """One split (``"train"`` or ``"test"``) of the sensitive dataset."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    plain, spec = _checked_data(cfg)
    try:
        dataset = spec.build(plain, split)
    except ConfigError:
        raise
    except (AssertionError, EOFError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        # The layout check passed, so the files are there but damaged (a truncated download, an
        # archive extracted part-way): torchvision's and pickle's own errors do not say so.
        raise ConfigError("data.root", plain.get("root"), f"the {spec.name} {split} files there could not be read "
                          f"({type(err).__name__}: {err})", "download and extract the dataset again") from err
    limit = plain.get("train_limit")
    if split == "train" and limit is not None and limit < len(dataset):
        dataset = _random_subset(dataset, limit, plain.get("split_seed", 0))
    return dataset


def _random_subset(dataset: Dataset, size: int, seed: int) -> Dataset:
    """``size`` examples of ``dataset`` drawn once by ``seed`` (``data.train_limit``: a small
    training split, e.g. one to overtrain on for the replication audit)."""
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    if isinstance(dataset, TensorImageDataset):
        return TensorImageDataset(dataset.images[idx], dataset.labels[idx], dataset.info)
    subset = Subset(dataset, idx.tolist())
    subset.info = dataset.info
    return subset


def has_public_data(cfg: Any) -> bool:
    """False for ``public=none`` (runs without public data)."""
    return to_plain(cfg, "public").get("name") != "none"


def validate_public_config(cfg: Any) -> None:
    """Check the ``public`` node without rendering anything."""
    plain = to_plain(cfg, "public")
    if require_choice(plain, "public", "name", PUBLIC_NAMES) == "glyphs":
        from dpgen.data.glyphs.config import validate_glyphs_config

        validate_glyphs_config(plain)


def build_public_dataset(cfg: Any) -> TensorImageDataset:
    """The public dataset (rendered or read from cache). ``public=none`` has no dataset."""
    plain = to_plain(cfg, "public")
    name = require_choice(plain, "public", "name", PUBLIC_NAMES)
    if name == "none":
        raise ConfigError(
            "public.name",
            name,
            "this stage needs public data",
            "select a public set, e.g. public=glyphs",
        )
    from dpgen.data.glyphs.public import build_glyphs

    return build_glyphs(plain)
