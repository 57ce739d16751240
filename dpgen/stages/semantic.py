"""PrivImage's stages (Li et al., USENIX Security 2024): learn which public classes the
sensitive data resembles, at a small privacy cost, and pretrain on those classes only.

1. ``train_query_classifier``: a classifier over the public label space, trained on public
   data only (cached by config hash, no privacy cost).
2. ``dp_semantic_query``: every sensitive training image votes for the classifier's top-k public
   classes; the [sensitive class x public class] vote histogram is released with Gaussian noise
   (L2 sensitivity sqrt(k), :mod:`dpgen.privacy.queries`), charged to the ledger as one
   ``gaussian`` event. From the noisy histogram each sensitive class gets
   ``method.classes_per_label`` public classes, disjoint across sensitive classes; the
   selection (names and noisy counts) is written to ``selection.json``. Everything after the
   release is post-processing.
3. ``pretrain_selected``: the UNet trained on the selected public images, relabelled to the
   sensitive class that selected them (cached by selection + config, no privacy cost).
   ``dp_train`` then fine-tunes the whole model with DP-SGD.

``method.selection=all`` skips the query (no privacy spent on it) and pretrains on the whole
public set, labelled as ``pretrain_public`` labels it: the baseline that tells whether the
selection paid off.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dpgen.data import TensorImageDataset, build_public_dataset
from dpgen.eval.downstream import TrainSettings, train_classifier
from dpgen.eval.threads import cpu_threads
from dpgen.io import build_once, save_torch, write_json
from dpgen.models.classifiers import build_classifier
from dpgen.privacy.events import GAUSSIAN
from dpgen.privacy.queries import noisy_vote_histogram, vote_histogram_sensitivity
from dpgen.stages.training import (
    hashed_cache_path,
    pretrain_cache_path,
    pretrain_unet,
    public_config_key,
    relabel_public,
)

if TYPE_CHECKING:
    from pathlib import Path

    from omegaconf import DictConfig

    from dpgen.pipeline import RunContext

log = logging.getLogger("dpgen")

QUERY_STAGE = "dp_semantic_query"
SELECTION_FILE = "selection.json"


# -- 1. the query classifier (public data only) ---------------------------------------------
def query_classifier_cache_path(cfg: DictConfig) -> Path:
    classifier = OmegaConf.to_container(cfg.method.query_classifier)
    classifier.pop("num_threads", None)  # how fast, not what it learns
    key = {"public": public_config_key(cfg), "classifier": classifier, "seed": cfg.seed}
    return hashed_cache_path(cfg, f"query-classifier-{cfg.method.query_classifier.name}", key)


def train_query_classifier(ctx: RunContext) -> None:
    cfg = ctx.cfg
    if cfg.method.selection == "all":
        log.info("train_query_classifier: method.selection=all, nothing to do")
        return
    cache = query_classifier_cache_path(cfg)
    build_once(cache, "train_query_classifier", "query classifier", lambda: _train_query_classifier(cfg, cache))


def _train_query_classifier(cfg: DictConfig, cache: Path) -> None:
    q = cfg.method.query_classifier
    public = build_public_dataset(cfg.public)
    # The validation split (of public glyphs) picks the epoch; no sensitive data is seen.
    settings = TrainSettings(epochs=q.epochs, batch_size=q.batch_size, lr=q.lr, val_fraction=0.1)
    with cpu_threads(q.get("num_threads")):
        trained = train_classifier(public.images, public.labels, public.info.num_classes, q.name, settings,
                                   seed=cfg.seed, progress=False)
    save_torch(cache, {"state_dict": trained.model.state_dict(), "class_names": list(public.info.class_names),
                       "val_accuracy": trained.val_accuracy})
    log.info("train_query_classifier: %s over %d public classes, %.1f %% on held-out public images; cached %s",
             q.name, public.info.num_classes, 100 * trained.val_accuracy, cache)


def load_query_classifier(cfg: DictConfig) -> tuple[nn.Module, list[str]]:
    saved = torch.load(query_classifier_cache_path(cfg), map_location="cpu", weights_only=True)
    names = saved["class_names"]
    model = build_classifier(cfg.method.query_classifier.name, cfg.data.channels, len(names), cfg.data.image_size)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), names


# -- 2. the semantic query (the only stage here that reads sensitive data) ------------------
@torch.no_grad()
def top_k_votes(classifier: nn.Module, dataset: Dataset, k: int, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Each example's ``k`` most likely public classes ``[N, k]``, and its label ``[N]``.

    In eval mode, so that an example's votes depend on that example alone (BatchNorm in
    training mode would mix a batch, and one example could then move others' votes).
    """
    classifier.eval()
    votes, labels = [], []
    for images, y in DataLoader(dataset, batch_size=batch_size):
        votes.append(classifier(images).topk(k, dim=1).indices)
        labels.append(y)
    return torch.cat(votes), torch.cat(labels)


def select_public_classes(noisy_counts: Tensor, per_class: int) -> list[list[int]]:
    """``per_class`` public classes for every sensitive class (row), disjoint across rows.

    Greedy by noisy count: cells are visited from the largest count down, and a cell's public
    class goes to its row unless another row took it first or the row is full. Each row's
    classes come out in decreasing count. Needs ``rows * per_class <= columns``.
    """
    rows, cols = noisy_counts.shape
    if per_class < 1 or rows * per_class > cols:
        raise ValueError(f"cannot give {per_class} of {cols} public classes to each of {rows} classes")
    chosen: list[list[int]] = [[] for _ in range(rows)]
    taken: set[int] = set()
    for cell in noisy_counts.flatten().argsort(descending=True, stable=True).tolist():
        row, col = divmod(cell, cols)
        if col not in taken and len(chosen[row]) < per_class:
            chosen[row].append(col)
            taken.add(col)
    return chosen


def dp_semantic_query(ctx: RunContext, generator: torch.Generator | None = None) -> None:
    """The noisy vote histogram and the selection made from it (``selection.json``).

    ``generator`` is for tests only; a run draws the noise from fresh OS entropy.
    """
    cfg, ledger = ctx.cfg, ctx.ledger
    m = cfg.method
    out = ctx.path(SELECTION_FILE)
    if m.selection == "all":
        public = build_public_dataset(cfg.public)
        write_json(out, {"selection": "all", "public_class_names": list(public.info.class_names),
                         "note": "the whole public set; public classes named like a sensitive class carry "
                                 "its label, the others the unconditional label"})
        log.info("dp_semantic_query: method.selection=all, no query, nothing spent")
        return
    if out.exists():  # a resumed run: the release was made and charged before the interruption
        log.info("dp_semantic_query: reusing the released selection %s", out)
        return
    assert ledger is not None, "dp_semantic_query needs a privacy plan"
    if ledger.remaining_steps(QUERY_STAGE) == 0:
        raise RuntimeError(f"{QUERY_STAGE}: the query was charged but its release ({out}) was lost; repeating it "
                           "would spend budget the plan does not have. Start a new run directory")

    classifier, public_names = load_query_classifier(cfg)
    sensitive_names = [str(n) for n in ctx.train_set.info.class_names]
    with cpu_threads(m.query_classifier.get("num_threads")):
        votes, labels = top_k_votes(classifier, ctx.train_set, m.query_top_k)
    sigma = ledger.planned_noise_multiplier(QUERY_STAGE)
    ledger.record(QUERY_STAGE, GAUSSIAN, sigma)  # charged before the noise is drawn
    ledger.write(ctx.privacy_json)
    noisy = noisy_vote_histogram(votes, labels, len(sensitive_names), len(public_names), sigma, generator)

    chosen = select_public_classes(noisy, m.classes_per_label)
    selected = {name: [{"public_class": public_names[c], "noisy_count": round(noisy[s, c].item(), 2)}
                       for c in chosen[s]] for s, name in enumerate(sensitive_names)}
    sensitivity = vote_histogram_sensitivity(m.query_top_k)
    write_json(out, {
        "selection": "semantic",
        "query": {"top_k": m.query_top_k, "noise_multiplier": sigma, "l2_sensitivity": sensitivity,
                  "noise_std": sigma * sensitivity},
        "selected": selected,
        "public_class_names": public_names,
        "sensitive_class_names": sensitive_names,
        "noisy_counts": [[round(v, 2) for v in row] for row in noisy.tolist()],
    })
    log.info("dp_semantic_query: noise std %.1f per count; selected %s", sigma * sensitivity,
             "; ".join(f"{s}: {' '.join(c['public_class'] for c in cs)}" for s, cs in selected.items()))


def load_selection(ctx: RunContext) -> list[list[str]] | None:
    """Public class names per sensitive class, or None for ``method.selection=all``."""
    saved = json.loads(ctx.path(SELECTION_FILE).read_text())
    if saved["selection"] == "all":
        return None
    return [[c["public_class"] for c in saved["selected"][name]] for name in saved["sensitive_class_names"]]


# -- 3. pretraining on the selection (public data, cached) ----------------------------------
def selected_pretraining_path(ctx: RunContext) -> Path:
    return pretrain_cache_path(ctx.cfg, load_selection(ctx))


def relabel_selection(public: TensorImageDataset, selection: list[list[str]]) -> TensorDataset:
    """The public images of the selected classes, labelled with the sensitive class that chose them."""
    subset = public.subset_classes([name for names in selection for name in names])
    owner = torch.tensor([s for s, names in enumerate(selection) for _ in names])
    return TensorDataset(subset.images, owner[subset.labels])


def pretrain_selected(ctx: RunContext) -> None:
    cache = selected_pretraining_path(ctx)
    build_once(cache, "pretrain_selected", "pretraining", lambda: _pretrain_selected(ctx, cache))


def _pretrain_selected(ctx: RunContext, cache: Path) -> None:
    selection = load_selection(ctx)
    if selection is None:
        data = relabel_public(ctx)
    else:
        data = relabel_selection(build_public_dataset(ctx.cfg.public), selection)
    log.info("pretrain_selected: %d public images (%s)", len(data),
             "the whole public set" if selection is None else f"{sum(map(len, selection))} selected classes")
    pretrain_unet(ctx, "pretrain_selected", data, cache)
