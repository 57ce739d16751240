"""``data=cifar10`` from the python version of CIFAR-10 (``cifar-10-python.tar.gz``, extracted).

torchvision's reader insists on the md5 sums of the real files, so we read the batches
ourselves: each is a pickled dict with ``data`` (uint8 [N, 3072], channel-major 32×32) and
``labels``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpgen.data.dataset import DatasetInfo, TensorImageDataset
from dpgen.data.registry import DataSpec
from dpgen.data.roots import require_files, require_root
from dpgen.data.transforms import uint8_to_model

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_FIX = (
    "download and extract cifar-10-python.tar.gz (www.cs.toronto.edu/~kriz/cifar.html) into {root}"
)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches contain (numpy arrays and builtins): a pickle can
    otherwise run arbitrary code, and data.root may point at files from anywhere."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> uint8 images ``[N, 3, 32, 32]`` and int64 labels ``[N]``."""
    with open(path, "rb") as f:
        # The official files are Python 2 pickles: latin1 maps their byte strings to str keys.
        batch = _ArrayUnpickler(f, encoding="latin1").load()
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(batch["labels"], dtype=np.int64)


def check(cfg: dict[str, Any]) -> None:
    fix = _FIX.format(root=cfg.get("root"))
    root = require_root(cfg, "CIFAR-10", _FIX.format(root="it"))
    base = root / FOLDER
    expected = f"{base}/data_batch_1..5, test_batch"
    require_files(root, "CIFAR-10", [base / n for n in TRAIN_BATCHES + TEST_BATCHES], expected, fix)


def build(cfg: dict[str, Any], split: str) -> TensorImageDataset:
    base = Path(str(cfg["root"])).expanduser() / FOLDER
    parts = [read_batch(base / n) for n in (TRAIN_BATCHES if split == "train" else TEST_BATCHES)]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    info = DatasetInfo("cifar10", 10, CLASS_NAMES, cfg["channels"], cfg["image_size"])
    return TensorImageDataset(uint8_to_model(images, info.image_size, info.channels), labels, info)


SPEC = DataSpec("cifar10", check, lambda cfg: CLASS_NAMES, build)
