"""The dataset contract every loader follows: ``dataset[i] -> (image, label)`` plus ``.info``.

Images are float32 ``[C, S, S]`` in [-1, 1]; labels are python ints in ``[0, num_classes)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset


@dataclass(frozen=True)
class DatasetInfo:
    """What downstream code needs to know about a dataset without touching its images."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    channels: int
    image_size: int


def stack_items(dataset: Dataset, indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, C, S, S]`` and labels ``[N]`` of ``dataset`` (every item, or ``indices``), as
    two tensors: for code that needs a split in memory at once, whatever loader made it."""
    idx = range(len(dataset)) if indices is None else [int(i) for i in indices]
    items = [dataset[i] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


def content_fingerprint(dataset: Dataset) -> str:
    """A hash of what ``dataset`` holds: its images and labels (in memory), or its files' paths,
    sizes and modification times with the labels (read from files). Caches of numbers computed
    on a sensitive set key on it, so that another set at the same config never reads them."""
    digest = hashlib.sha256()
    if isinstance(dataset, Subset):  # data.train_limit over files: the files and which of them
        digest.update(content_fingerprint(dataset.dataset).encode())
        digest.update(torch.as_tensor(dataset.indices).numpy().tobytes())
        return digest.hexdigest()[:16]
    if isinstance(dataset, FileImageDataset):
        for path in dataset.paths:
            stat = Path(path).stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        labels = dataset.labels
    else:
        images, labels = ((dataset.images, dataset.labels) if isinstance(dataset, TensorImageDataset)
                          else stack_items(dataset))
        digest.update(images.contiguous().numpy().tobytes())
    digest.update(labels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class TensorImageDataset(Dataset):
    """An image set held in memory as one tensor.

    DP training on CPU draws Poisson batches of arbitrary indices every step; indexing one
    tensor (``ds.images[idx]``) is much faster than collating per-item tensors.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo) -> None:
        c, s = info.channels, info.image_size
        if (
            images.dtype != torch.float32
            or images.ndim != 4
            or tuple(images.shape[1:]) != (c, s, s)
        ):
            raise ValueError(
                f"images must be float32 [N, {c}, {s}, {s}], got {images.dtype} {tuple(images.shape)}"
            )
        if labels.dtype != torch.long or labels.shape != images.shape[:1]:
            raise ValueError(
                f"labels must be int64 [{len(images)}], got {labels.dtype} {tuple(labels.shape)}"
            )
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < info.num_classes:
            raise ValueError(f"labels must lie in [0, {info.num_classes})")
        self.images = images
        self.labels = labels
        self.info = info

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def subset_classes(self, classes: Sequence[int | str]) -> TensorImageDataset:
        """Keep only ``classes`` (indices or class names) and relabel them 0..k-1 in the given order.

        Later stages (e.g. PrivImage's semantic query) pick public classes by index or name;
        the new label of ``classes[j]`` is ``j`` and ``info.class_names`` follows that order.
        """
        wanted = [self._class_index(c) for c in classes]
        if len(set(wanted)) != len(wanted):
            raise ValueError(f"classes must be distinct, got {list(classes)}")
        remap = torch.full((self.info.num_classes,), -1, dtype=torch.long)
        remap[torch.tensor(wanted, dtype=torch.long)] = torch.arange(len(wanted))
        new_labels = remap[self.labels]
        keep = new_labels >= 0
        info = replace(
            self.info,
            num_classes=len(wanted),
            class_names=tuple(self.info.class_names[i] for i in wanted),
        )
        return TensorImageDataset(self.images[keep], new_labels[keep], info)

    def _class_index(self, c: int | str) -> int:
        if isinstance(c, str):
            if c not in self.info.class_names:
                raise ValueError(f"unknown class name {c!r}; known: {self.info.class_names}")
            return self.info.class_names.index(c)
        if not 0 <= int(c) < self.info.num_classes:
            raise ValueError(f"class index {c} outside [0, {self.info.num_classes})")
        return int(c)


class FileImageDataset(Dataset):
    """An image set read from files one item at a time (CelebA, image folders).

    Too large to hold in memory as float32, so each image is decoded and transformed when asked.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        info: DatasetInfo,
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.info = info
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            img = Image.open(self.paths[index])
        except OSError as err:  # PIL's UnidentifiedImageError included
            raise OSError(f"{self.paths[index]}: not a readable image ({err}). Fix: remove or replace the file, "
                          "then resume the run (+resume=<run dir>)") from err
        with img:
            return self.transform(img), int(self.labels[index])
