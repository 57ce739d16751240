"""Tiny copies of real datasets, written in each dataset's real on-disk format."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

CELEBA_ATTRS = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
]


def write_idx(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST idx-ubyte files (big-endian magic 2051/2049 and sizes, then raw bytes)."""
    raw.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes()
    )
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes()
    )


def make_mnist_root(root: Path, folder: str = "MNIST", n_train: int = 30, n_test: int = 10) -> None:
    rng = np.random.default_rng(0)
    raw = root / folder / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw, prefix, rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10)


def make_cifar_root(root: Path, per_batch: int = 6) -> None:
    """cifar-10-batches-py/ with Python pickles of {'data': uint8 [N, 3072], 'labels': [...]}."""
    rng = np.random.default_rng(0)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        batch = {
            "batch_label": f"fixture batch {i}",
            "labels": [(i + j) % 10 for j in range(per_batch)],
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)],
        }
        with open(base / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane"] * 10, "num_vis": 3072}, f, protocol=2)


def make_celeba_root(root: Path, n: int = 8) -> list[int]:
    """celeba/ with 178×218 JPEGs, list_attr_celeba.txt and list_eval_partition.txt.

    Returns the Male attribute (+1/-1) of each image. Partitions cycle 0, 0, 1, 2.
    """
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    male = [1 if i % 3 == 0 else -1 for i in range(n)]
    rows, parts = [], []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        pixels = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(base / "img_align_celeba" / name, quality=90)
        attrs = [-1] * len(CELEBA_ATTRS)
        attrs[CELEBA_ATTRS.index("Male")] = male[i]
        rows.append(name + " " + " ".join(f"{a:2d}" for a in attrs))
        parts.append(f"{name} {(0, 0, 1, 2)[i % 4]}")
    (base / "list_attr_celeba.txt").write_text(
        f"{n}\n" + " ".join(CELEBA_ATTRS) + " \n" + "\n".join(rows) + "\n"
    )
    (base / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return male


def make_image_folder(
    root: Path, classes: tuple[str, ...] = ("normal", "tumor"), per_class: int = 3
) -> None:
    """root/{train,test}/<class>/*.png, RGB 40×30 (not square, to exercise the crop)."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
                    d / f"{i}.png"
                )


def check_contract(ds, channels: int, size: int, max_items: int = 64) -> None:
    """The dataset contract: float32 [C, S, S] images in [-1, 1], int labels, .info agrees."""
    import torch

    info = ds.info
    assert (info.channels, info.image_size) == (channels, size)
    assert len(info.class_names) == info.num_classes
    assert len(ds) > 0
    for i in range(min(len(ds), max_items)):
        image, label = ds[i]
        assert image.dtype == torch.float32 and tuple(image.shape) == (channels, size, size)
        assert float(image.min()) >= -1.0 and float(image.max()) <= 1.0
        assert type(label) is int and 0 <= label < info.num_classes
