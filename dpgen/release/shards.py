"""What a release holds and how it is cut into shards: labels, per-shard seeds, file writers.

Shard ``i`` holds samples ``[i·S, (i+1)·S)``; its noise comes from a generator seeded by
``(seed, i)`` alone, so a shard is the same whether it is written in one go or after a resume.
A shard counts as done only once the manifest lists it, and the manifest is updated only after
every file of the shard is in place (each written to a temporary name, then renamed).
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dpgen.io import atomic_write
from dpgen.release.source import ReleaseError

FORMATS = ("imagefolder", "npz")
PRECISIONS = ("32", "bf16")  # bf16: autocast, ~1.7x faster on CPUs with bf16 units (README)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ReleaseSpec:
    num_samples: int
    format: str
    seed: int = 0
    shard_size: int = 1000
    batch_size: int = 250
    class_prior: tuple[float, ...] | None = None  # public class weights; None = class-balanced
    precision: str = "32"

    def check(self, num_classes: int) -> None:
        if self.format == "imagefolder" and self.class_prior is not None and 0 in self.class_prior:
            # A class without images has no folder, and the loaders would renumber every later class.
            raise ReleaseError(f"--class-prior={','.join(map(str, self.class_prior))}: a zero weight leaves its "
                               "class folder out of an image-folder release, and the loaders would number later "
                               "classes one lower. Fix: use --format npz, or a small positive weight")
        if self.num_samples <= 0:
            raise ReleaseError(f"--num-samples={self.num_samples}: must be > 0. Fix: ask for at least one sample")
        if self.format not in FORMATS:
            raise ReleaseError(f"--format={self.format}: unknown format. Fix: use one of {', '.join(FORMATS)}")
        if self.precision not in PRECISIONS:
            raise ReleaseError(f"--precision={self.precision}: unknown. Fix: use one of {', '.join(PRECISIONS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            # numpy's SeedSequence (shard_seed) takes non-negative integers only; it would fail at
            # the first shard, after the manifest made --out a release of this seed.
            raise ReleaseError(f"--seed={self.seed}: must be an integer >= 0. Fix: pass e.g. --seed 0")
        for flag, value in (("--shard-size", self.shard_size), ("--batch-size", self.batch_size)):
            if value <= 0:
                raise ReleaseError(f"{flag}={value}: must be > 0. Fix: use e.g. 1000")
        prior = self.class_prior
        if prior is not None and (len(prior) != num_classes or not all(math.isfinite(p) and p >= 0 for p in prior)
                                  or sum(prior) <= 0):
            raise ReleaseError(f"--class-prior={','.join(map(str, prior))}: needs {num_classes} finite, "
                               "non-negative weights, not all zero. Fix: give one public weight per class, or none")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_prior"] = list(self.class_prior) if self.class_prior is not None else None
        return d

    @property
    def shards(self) -> list[tuple[int, int]]:
        """``[start, stop)`` of every shard."""
        n, s = self.num_samples, self.shard_size
        return [(a, min(a + s, n)) for a in range(0, n, s)]


def class_counts(num_samples: int, num_classes: int, prior: Sequence[float] | None = None) -> list[int]:
    """Samples per class: equal shares (or the public prior's) rounded by largest remainder,
    ties to the lower class index. The sensitive class proportions are never used: they are
    private, and using them would need a charged, planned query."""
    weights = np.ones(num_classes) if prior is None else np.asarray(prior, dtype=float)
    exact = num_samples * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    short = num_samples - counts.sum()
    order = sorted(range(num_classes), key=lambda c: (counts[c] - exact[c], c))
    counts[order[:short]] += 1
    return counts.tolist()


def release_labels(num_samples: int, num_classes: int, prior: Sequence[float] | None = None) -> np.ndarray:
    """Labels of the whole release, each class spread evenly over it (for a uniform prior and
    N divisible by the class count: 0, 1, …, C-1, 0, 1, …), so every shard is near balanced."""
    counts = class_counts(num_samples, num_classes, prior)
    position = np.concatenate([(np.arange(n) + 0.5) / n for n in counts if n])
    labels = np.repeat(np.arange(num_classes), counts)
    return labels[np.argsort(position, kind="stable")].astype(np.int64)


def shard_seed(seed: int, index: int) -> int:
    """The seed of shard ``index``'s noise, from (release seed, shard index) only."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="png")
    return buf.getvalue()


def _replace_into(path: Path, data: bytes) -> None:
    """Write to a hidden temporary name beside ``path`` (no image loader lists it), then rename:
    an interrupted release never leaves a truncated PNG. No fsync per file (20000 of them would
    dominate the release's time): the manifest, which says what is done, is fsynced."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def imagefolder_name(index: int, num_samples: int) -> str:
    return f"{index:0{max(6, len(str(num_samples - 1)))}d}.png"


def class_folders(class_names: Sequence[str]) -> list[str]:
    """One folder per class, ``<index>_<name>``. ``ImageFolder`` and the Hugging Face loader
    number classes in the folders' sorted order: the zero-padded index makes that the dataset's
    label order (CelebA's ``not_Male``, ``Male`` would otherwise load swapped). The name keeps
    only characters any file system takes (Fashion-MNIST's ``T-shirt/top`` -> ``T-shirt_top``)."""
    width = len(str(len(class_names) - 1))
    return [f"{i:0{width}d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', str(name))}" for i, name in enumerate(class_names)]


def write_imagefolder_shard(out: Path, start: int, images: np.ndarray, labels: np.ndarray,
                            folders: Sequence[str], num_samples: int) -> None:
    """``out/<class folder>/<sample index>.png``: what torchvision's ``ImageFolder`` and the
    Hugging Face ``imagefolder`` loader read as they are, with dpgen's label numbers."""
    for offset, (image, label) in enumerate(zip(images, labels)):
        folder = out / folders[label]
        folder.mkdir(exist_ok=True)
        _replace_into(folder / imagefolder_name(start + offset, num_samples), _png(image))


def npz_name(index: int, num_shards: int) -> str:
    return f"samples-{index:05d}-of-{num_shards:05d}.npz"


def write_npz_shard(out: Path, index: int, num_shards: int, images: np.ndarray, labels: np.ndarray) -> None:
    """One file per shard in the ``samples.npz`` contract: ``images`` uint8 [n, H, W, C],
    ``labels`` int64 [n]."""
    atomic_write(out / npz_name(index, num_shards),
                 lambda f: np.savez_compressed(f, images=images, labels=labels.astype(np.int64)))


def remove_partial_files(out: Path) -> None:
    """Temporary files an interrupted release left behind (their shard is redone)."""
    for tmp in out.rglob(".*.tmp"):
        tmp.unlink()
