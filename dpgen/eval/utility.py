"""The utility study: what a generator is worth beyond its first sample (Ghalebikesabi et al. 2023).

(a) downstream accuracy against the synthetic set's size (multiples of the sensitive training
    split; sampling more is post-processing and costs no privacy);
(b) an ensemble (softmax averaged over the classifier families) against its members;
(c) hyperparameter selection on synthetic data: a grid of classifier settings, each trained on
    a synthetic training split and ranked on a synthetic validation split; that ranking is
    compared (Spearman, Kendall) with the ranking by accuracy on the real held-out split.

Every choice here is made on synthetic data. The held-out split is an argument only so that
the reporting step can read it: :func:`_held_out_probabilities` is its one reader, called once
after every classifier is trained and every selection is fixed.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from scipy import stats
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dpgen.eval.downstream import (
    TrainedClassifier,
    TrainSettings,
    train_classifier,
    train_classifiers,
)

log = logging.getLogger("dpgen")

GRID_KEYS = ("lr", "epochs", "width", "augment")


@dataclass(frozen=True)
class GridPoint:
    lr: float
    epochs: int
    width: int
    augment: bool

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[GridPoint]:
    """Every combination of the grid's values, in a fixed order."""
    return [GridPoint(*values) for values in itertools.product(*(grid[k] for k in GRID_KEYS))]


def _held_out_probabilities(models: Mapping[str, nn.Module], held_out: Dataset) -> tuple[dict[str, Tensor], Tensor]:
    """Softmax outputs of every model on the held-out split, in one pass: its only reader."""
    probs: dict[str, list[Tensor]] = {k: [] for k in models}
    targets = []
    with torch.no_grad():
        for x, y in DataLoader(held_out, batch_size=256):
            for k, m in models.items():
                probs[k].append(m.eval()(x).softmax(1))
            targets.append(torch.as_tensor(y))
    return {k: torch.cat(v) for k, v in probs.items()}, torch.cat(targets)


def _accuracy(probs: Tensor, targets: Tensor) -> float:
    return (probs.argmax(1) == targets).float().mean().item()


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def rank_correlations(synthetic: Sequence[float], real: Sequence[float]) -> dict[str, float | None]:
    """Spearman's rho and Kendall's tau-b between two scorings of the same settings (None when
    one of them is constant, where a rank correlation is undefined)."""
    if len(set(synthetic)) < 2 or len(set(real)) < 2:
        return {"spearman": None, "kendall": None}
    return {"spearman": _finite(float(stats.spearmanr(synthetic, real).statistic)),
            "kendall": _finite(float(stats.kendalltau(synthetic, real).statistic))}


@dataclass
class _SizeRun:
    multiple: float
    num_samples: int
    members: list[TrainedClassifier]


def _train_sizes(images: Tensor, labels: Tensor, num_classes: int, n_train: int, multiples: Sequence[float],
                 classifiers: Sequence[str], settings: TrainSettings, seed: int) -> list[_SizeRun]:
    runs = []
    for m in multiples:
        n = int(round(m * n_train))
        log.info("utility study: %s on %d synthetic samples (%g x the training split)", ", ".join(classifiers), n, m)
        runs.append(_SizeRun(m, n, train_classifiers(images[:n], labels[:n], num_classes, classifiers, settings, seed)))
    return runs


def select_on_synthetic(images: Tensor, labels: Tensor, num_classes: int, classifier: str,
                        points: Sequence[GridPoint], base: TrainSettings, seed: int) -> tuple[list[TrainedClassifier], int]:
    """Train every grid point on the synthetic images (validation split carved from them) and
    pick the one with the best synthetic validation accuracy (the first on ties)."""
    trained = []
    for p in points:
        settings = dataclasses.replace(base, lr=p.lr, epochs=p.epochs, width=p.width, augment=p.augment)
        log.info("utility study: grid %s", p)
        trained.append(train_classifier(images, labels, num_classes, classifier, settings, seed))
    selected = max(range(len(trained)), key=lambda i: (trained[i].val_accuracy, -i))
    return trained, selected


def _size_report(run: _SizeRun, probs: Mapping[str, Tensor], targets: Tensor) -> dict[str, Any]:
    names = [c.name for c in run.members]
    accuracy = {n: _accuracy(probs[f"{run.multiple}/{n}"], targets) for n in names}
    # The member a user could pick without real data is the best on synthetic validation; the
    # best on the held-out split is hindsight, reported as such and never used to choose.
    by_val = max(run.members, key=lambda c: c.val_accuracy).name
    hindsight = max(names, key=accuracy.get)
    report: dict[str, Any] = {
        "multiple": run.multiple, "num_samples": run.num_samples,
        "accuracy": {**accuracy, "mean": sum(accuracy.values()) / len(accuracy)},
        "synthetic_val_accuracy": {c.name: c.val_accuracy for c in run.members},
        "val_selected_member": by_val, "val_selected_member_accuracy": accuracy[by_val],
        "hindsight_best_member": hindsight, "hindsight_best_member_accuracy": accuracy[hindsight],
    }
    if len(names) > 1:
        ensemble = torch.stack([probs[f"{run.multiple}/{n}"] for n in names]).mean(0)
        report["ensemble_accuracy"] = _accuracy(ensemble, targets)
    return report


def utility_study(images: Tensor, labels: Tensor, held_out: Dataset, *, num_classes: int, n_train: int,
                  multiples: Sequence[float], classifiers: Sequence[str], settings: TrainSettings,
                  grid_classifier: str, grid: Mapping[str, Sequence[Any]], selection_multiple: float,
                  seed: int = 0) -> dict[str, Any]:
    """``images`` (float in [-1, 1]) and ``labels``: at least ``max(multiples) · n_train`` synthetic
    samples, class-balanced in every prefix. Returns the study's ``metrics.json`` entry."""
    need = int(round(max([*multiples, selection_multiple]) * n_train))
    if len(images) < need:
        raise ValueError(f"utility study needs {need} synthetic samples, got {len(images)}")
    sizes = _train_sizes(images, labels, num_classes, n_train, multiples, classifiers, settings, seed)
    n_select = int(round(selection_multiple * n_train))
    points = grid_points(grid)
    grid_models, selected = select_on_synthetic(images[:n_select], labels[:n_select], num_classes,
                                                grid_classifier, points, settings, seed)

    # Reporting: every classifier is trained and every selection fixed; read the held-out split.
    models = {f"{r.multiple}/{c.name}": c.model for r in sizes for c in r.members}
    models.update({f"grid/{i}": c.model for i, c in enumerate(grid_models)})
    probs, targets = _held_out_probabilities(models, held_out)
    real = [_accuracy(probs[f"grid/{i}"], targets) for i in range(len(points))]
    val = [c.val_accuracy for c in grid_models]
    best = max(range(len(points)), key=lambda i: (real[i], -i))
    return {
        "training_split_size": n_train,
        "sizes": [_size_report(r, probs, targets) for r in sizes],
        "ensemble": f"softmax averaged over {', '.join(classifiers)}",
        "selection": {
            "classifier": grid_classifier, "num_samples": n_select,
            "grid": [{**p.to_json(), "synthetic_val_accuracy": v, "real_accuracy": r}
                     for p, v, r in zip(points, val, real)],
            **rank_correlations(val, real),
            "selected": points[selected].to_json(), "selected_real_accuracy": real[selected],
            "best_in_hindsight": points[best].to_json(), "best_real_accuracy": real[best],
        },
        "note": "every model and selection uses synthetic data only; the held-out real split is read "
                "once, afterwards, for these numbers",
    }


def size_series(study: Mapping[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """(multiple, accuracy) per classifier family and for the ensemble, for the plot."""
    series: dict[str, list[tuple[float, float]]] = {}
    for s in study["sizes"]:
        for name, acc in s["accuracy"].items():
            if name != "mean":
                series.setdefault(name, []).append((s["multiple"], acc))
        if "ensemble_accuracy" in s:
            series.setdefault("ensemble", []).append((s["multiple"], s["ensemble_accuracy"]))
    return series

