"""Empirical privacy audits of a trained generator and its samples (``eval.audit=true``).

- *Replication*: the share of samples whose nearest training image, by cosine similarity of
  the fidelity extractor's features (centred on the training mean), exceeds a threshold: how
  often the generator copies. The same rate for the held-out real images is the reference (real
  images that are not copies but pass the threshold anyway); the most similar pairs are drawn.
- *Membership inference*: a loss attack on the diffusion model. Score = minus the denoising
  loss at fixed timesteps and fixed noise; members = the training split, non-members = the
  held-out split. AUC and TPR at 1 % and 0.1 % FPR. At ε-DP no attack can reach TPR above
  e^ε·FPR + δ, so a DP model must stay near the diagonal; a memorising one does not.

Both read the sensitive splits: they are measurements made by the evaluator, select nothing,
and are no part of a released output. The canary audit (an empirical lower bound on ε) needs
its own training run: :mod:`dpgen.audit`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torchmetrics.functional.classification import binary_auroc
from torchvision.utils import save_image

from dpgen.data.dataset import stack_items
from dpgen.eval.fidelity import FeatureExtractor, FidelityImages
from dpgen.io import atomic_write

# FPRs at which the membership attack's TPR is reported (metrics.json key suffixes).
FPR_LEVELS = {"1pct": 0.01, "0.1pct": 0.001}


# -- membership scores ------------------------------------------------------------------------
@dataclass(frozen=True)
class LossScoreSettings:
    timesteps: tuple[int, ...] = (10, 50, 100, 200, 400)
    noise_draws: int = 4
    batch_size: int = 250

    @classmethod
    def from_config(cls, cfg: Any) -> LossScoreSettings:
        return cls(tuple(int(t) for t in cfg["timesteps"]), int(cfg["noise_draws"]), int(cfg["batch_size"]))


@torch.no_grad()
def loss_scores(module: Any, images: Tensor, labels: Tensor, settings: LossScoreSettings, seed: int = 0) -> Tensor:
    """Minus the denoising loss of each (image, label), averaged over ``settings.timesteps`` and
    ``noise_draws`` noise tensors. The noise is drawn once and shared by all images, so scores
    differ by the image alone; higher = better fitted = more likely a member."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    g = torch.Generator().manual_seed(seed)
    scores = []
    for start in range(0, len(images), settings.batch_size):
        x = module.diffusion_inputs(images[start:start + settings.batch_size].to(device))
        y = labels[start:start + settings.batch_size].to(device)
        if start == 0:  # the shared noise, shaped like the diffusion inputs
            noise = torch.randn((len(settings.timesteps), settings.noise_draws, *x.shape[1:]), generator=g)
        total = torch.zeros(len(x), device=device)
        for i, t in enumerate(settings.timesteps):
            tt = torch.full((len(x),), t, device=device, dtype=torch.long)
            for d in range(settings.noise_draws):
                total += module.denoising_error(x, y, tt, noise[i, d].to(device).expand_as(x))
        scores.append(-(total / (len(settings.timesteps) * settings.noise_draws)).cpu())
    module.train(was_training)
    return torch.cat(scores) if scores else torch.empty(0)


def roc_summary(member_scores: Sequence[float], non_member_scores: Sequence[float]) -> dict[str, float]:
    """AUC (ties count half) and, per :data:`FPR_LEVELS`, the best TPR of a threshold test
    "member iff score > τ" whose FPR is at most that level."""
    pos, neg = np.asarray(member_scores, dtype=float), np.asarray(non_member_scores, dtype=float)
    scores = np.concatenate([pos, neg])
    # Ranks scaled into (0, 1): torchmetrics reads scores outside [0, 1] as logits and squashes
    # them with a sigmoid, which saturates (40 and 43 would tie); ranks keep the order and ties.
    auc = binary_auroc(torch.from_numpy(rankdata(scores) / (len(scores) + 1)),
                       torch.cat([torch.ones(len(pos), dtype=torch.long), torch.zeros(len(neg), dtype=torch.long)]))
    out = {"auc": float(auc)}
    neg_desc = np.sort(neg)[::-1]
    for name, level in FPR_LEVELS.items():
        allowed = int(np.floor(level * len(neg) + 1e-9))  # non-members allowed above τ
        tau = neg_desc[allowed] if allowed < len(neg) else -np.inf
        out[f"tpr_at_fpr_{name}"] = float((pos > tau).mean())
    return out


def _subset(dataset: Dataset, max_examples: int, seed: int) -> tuple[Tensor, Tensor]:
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:max_examples]
    return stack_items(dataset, idx.tolist())


def membership_inference(module: Any, members: Dataset, non_members: Dataset, settings: LossScoreSettings,
                         max_examples: int, seed: int = 0) -> dict[str, Any]:
    """The loss attack on ``module``: at most ``max_examples`` of each split, drawn at random."""
    m_images, m_labels = _subset(members, max_examples, seed)
    n_images, n_labels = _subset(non_members, max_examples, seed + 1)
    roc = roc_summary(loss_scores(module, m_images, m_labels, settings, seed),
                      loss_scores(module, n_images, n_labels, settings, seed))
    return {**{f"mia_{k}": v for k, v in roc.items()}, "mia_members": len(m_labels),
            "mia_non_members": len(n_labels),
            "mia_score": f"minus the denoising loss at timesteps {list(settings.timesteps)}, "
                         f"{settings.noise_draws} shared noise draws each"}


# -- replication ------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: Dataset, batch_size: int = 256,
                     cuda: bool = False) -> Tensor:
    """The extractor's FID features (the space FID is computed in) of uint8 ``[3, H, W]`` items."""
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor.name]
    net = cls(extractor.name, [cls.get_default_feature_layer_for_metric("fid")],
              feature_extractor_weights_path=str(extractor.weights_path))
    net = net.cuda() if cuda else net
    out = [net(x.cuda() if cuda else x)[0].flatten(1).double().cpu()
           for x in DataLoader(images, batch_size=batch_size)]
    return torch.cat(out)


def nearest_similarity(queries: Tensor, references: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Cosine similarity of each query to its nearest reference, and that reference's index
    (rows must be unit vectors)."""
    best, index = [], []
    for q in queries.split(chunk):
        sim = q @ references.T
        values, idx = sim.max(1)
        best.append(values)
        index.append(idx)
    return torch.cat(best), torch.cat(index)


def _unit(features: Tensor, centre: Tensor) -> Tensor:
    return torch.nn.functional.normalize(features - centre, dim=1)


def replication(samples: Tensor, train: Dataset, held_out: Dataset, extractor: FeatureExtractor,
                threshold: float, pairs: int, grid_path: str | os.PathLike | None = None,
                cuda: bool = False) -> dict[str, Any]:
    """Replication rate of uint8 ``[N, C, H, W]`` samples against the training split.

    Features are centred on the training mean before the cosine: rectified features all point
    into one orthant, where raw cosines are high for any two images.
    """
    f_train = extract_features(extractor, FidelityImages(train), cuda=cuda)
    centre = f_train.mean(0)
    f_train = _unit(f_train, centre)
    sim, nearest = nearest_similarity(_unit(extract_features(extractor, FidelityImages(samples), cuda=cuda),
                                            centre), f_train)
    sim_ref, _ = nearest_similarity(_unit(extract_features(extractor, FidelityImages(held_out), cuda=cuda),
                                          centre), f_train)
    if grid_path is not None and len(sim):
        order = sim.argsort(descending=True)[:pairs]
        _save_pairs(grid_path, samples[order], [train[int(i)][0] for i in nearest[order]])
    q = torch.tensor([0.5, 0.9, 0.99], dtype=sim.dtype)
    return {
        "replication_rate": float((sim > threshold).double().mean()),
        "replication_rate_heldout_reference": float((sim_ref > threshold).double().mean()),
        "replication_threshold": threshold,
        "replication_similarity_quantiles": dict(zip(("q50", "q90", "q99"), sim.quantile(q).tolist())),
        "replication_similarity_heldout_quantiles": dict(zip(("q50", "q90", "q99"), sim_ref.quantile(q).tolist())),
        "replication_feature_extractor": extractor.name,
    }


def _save_pairs(path: str | os.PathLike, samples: Tensor, nearest: list[Tensor], per_row: int = 8) -> None:
    """Each sample (uint8) beside its nearest training image ([-1, 1]), ``per_row`` pairs a row."""
    pairs = [torch.stack([s.float() / 127.5 - 1, t]) for s, t in zip(samples, nearest)]
    grid = torch.cat(pairs)

    atomic_write(path, lambda f: save_image((grid + 1) / 2, f, nrow=2 * per_row, padding=1, format="png"))
