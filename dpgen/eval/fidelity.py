"""Fidelity through torch-fidelity: FID, KID, Inception Score and precision/recall.

One torch-fidelity call computes all requested metrics with one named feature extractor:
GlyphNet (trained on public glyphs, the offline default) or torch-fidelity's own Inception-v3
with weights from a local file (``eval.fid.weights_path``). Nothing is downloaded: torch-fidelity
only downloads Inception weights when given no path, which this module never does.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset

from dpgen.data.transforms import model_to_uint8
from dpgen.eval.config import METRICS
from dpgen.eval.glyphnet import NAME as GLYPHNET
from dpgen.eval.glyphnet import glyphnet_weights
from dpgen.io import sha256_file

INCEPTION = "inception-v3-compat"  # torch-fidelity's registered name
# torch-fidelity's result keys -> metrics.json keys
_KEYS = {
    torch_fidelity.KEY_METRIC_FID: "fid",
    torch_fidelity.KEY_METRIC_KID_MEAN: "kid_mean",
    torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
    torch_fidelity.KEY_METRIC_ISC_MEAN: "inception_score_mean",
    torch_fidelity.KEY_METRIC_ISC_STD: "inception_score_std",
    torch_fidelity.KEY_METRIC_PRECISION: "precision",
    torch_fidelity.KEY_METRIC_RECALL: "recall",
    torch_fidelity.KEY_METRIC_F_SCORE: "f_score",
}


@dataclass(frozen=True)
class FeatureExtractor:
    """A torch-fidelity extractor and the exact weights behind it: what every number names."""

    name: str
    weights_path: Path
    weights_sha256: str
    description: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "weights_path": str(self.weights_path),
                "weights_sha256": self.weights_sha256, "description": self.description}


def resolve_extractor(fid_cfg: Mapping[str, Any], cache_dir: str | Path) -> FeatureExtractor:
    """Inception-v3 with the configured local weights, else GlyphNet (trained once, cached)."""
    if fid_cfg.get("weights_path"):
        path = Path(fid_cfg["weights_path"])
        return FeatureExtractor(INCEPTION, path, sha256_file(path),
                                f"torch-fidelity Inception-v3 with local weights {path.name}")
    path = glyphnet_weights(fid_cfg["glyphs"], fid_cfg["glyphnet"], cache_dir)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return FeatureExtractor(GLYPHNET, path, sha256_file(path),
                            f"{GLYPHNET} trained on {saved['info']['trained_on']}, no sensitive data")


class FidelityImages(Dataset):
    """Images as torch-fidelity reads them: uint8 ``[3, H, W]``.

    From a uint8 ``[N, C, H, W]`` tensor (samples.npz), or from a dpgen dataset (float in
    [-1, 1]), quantised exactly as the sample stage quantises generated images.
    """

    def __init__(self, source: Tensor | Dataset) -> None:
        if isinstance(source, Tensor) and source.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {source.dtype}")
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Tensor:
        x = self.source[i] if isinstance(self.source, Tensor) else model_to_uint8(self.source[i][0])
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x


class Fidelity:
    """Compare named image sets with one extractor; each set goes through it once.

    torch-fidelity caches features by input name; the cache lives in a temporary directory
    that is removed when the session closes, so features of sensitive images never persist.
    """

    def __init__(self, extractor: FeatureExtractor, settings: Mapping[str, Any], seed: int = 0,
                 cuda: bool = False) -> None:
        self.extractor = extractor
        self.settings = settings
        self.seed = seed
        self.cuda = cuda
        self.sets: dict[str, Dataset] = {}
        self._cache = tempfile.TemporaryDirectory(prefix="dpgen-fidelity-")

    def __enter__(self) -> Fidelity:
        return self

    def __exit__(self, *exc: object) -> None:
        self._cache.cleanup()

    def add(self, name: str, images: Dataset) -> None:
        """Register an image set (uint8 ``[3, H, W]`` items, see :class:`FidelityImages`)."""
        self.sets[name] = images

    def compare(self, generated: str, real: str, metrics: Sequence[str]) -> dict[str, float]:
        """``metrics`` (from :data:`METRICS`) of set ``generated`` against set ``real``.

        Precision is the share of generated images within the real manifold, recall the share
        of real images within the generated one; KID subsets are capped at the smaller set.
        """
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown fidelity metrics {sorted(unknown)}; choose from {METRICS}")
        if not metrics:
            return {}
        g, r, s = self.sets[generated], self.sets[real], self.settings
        out = torch_fidelity.calculate_metrics(
            input1=g, input2=r, input1_cache_name=generated, input2_cache_name=real,
            cache_root=self._cache.name, cuda=self.cuda, batch_size=s["batch_size"],
            fid="fid" in metrics, kid="kid" in metrics, isc="isc" in metrics, prc="prc" in metrics,
            feature_extractor=self.extractor.name,
            feature_extractor_weights_path=str(self.extractor.weights_path),
            kid_subsets=s["kid_subsets"], kid_subset_size=min(s["kid_subset_size"], len(g), len(r)),
            isc_splits=min(10, len(g)),  # torch-fidelity's 10 splits need at least 10 images
            prc_neighborhood=s["prc_neighborhood"],
            # No worker processes for small in-memory sets, no downloads, no chatter (the stage
            # logs the results).
            save_cpu_ram=True, datasets_download=False, rng_seed=self.seed, verbose=False,
        )
        return {_KEYS[k]: float(v) for k, v in out.items() if k in _KEYS}
