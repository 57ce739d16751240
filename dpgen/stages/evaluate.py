"""Evaluate the samples -> ``metrics.json``: downstream utility and fidelity, with references,
and with ``eval.utility_study`` the utility study (``utility_vs_size.png``).

Order matters for honesty. Every choice (classifier weights, early-stopping epoch) is made on
the synthetic samples first; only then is the held-out real split opened, once, and used for
final numbers that select nothing. The utility study receives the opened split and reads it
only in its reporting step, after all of its own choices (dpgen/eval/utility.py).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, Subset

from dpgen.data import describe_data
from dpgen.data.dataset import content_fingerprint, stack_items
from dpgen.distributed import sampling_device
from dpgen.eval.audit import LossScoreSettings, membership_inference, replication
from dpgen.eval.config import validate_utility_sizes
from dpgen.eval.downstream import (
    TrainedClassifier,
    TrainSettings,
    final_accuracy,
    train_classifiers,
)
from dpgen.eval.fidelity import Fidelity, FidelityImages, resolve_extractor
from dpgen.eval.plots import save_figure, utility_figure
from dpgen.eval.reference import NOTE, cached_reference
from dpgen.eval.threads import cpu_threads
from dpgen.eval.utility import size_series, utility_study
from dpgen.io import write_json
from dpgen.privacy.guarantee import (
    OUTSIDE_GUARANTEE,
    epsilon_scope,
    has_formal_guarantee,
    ledger_kept_guarantee,
)
from dpgen.stages import FINAL_WEIGHTS, PROTECTION_JSON
from dpgen.stages.protection import load_protection_guidance
from dpgen.stages.sample import from_uint8_hwc
from dpgen.stages.training import build_module, load_final_module

if TYPE_CHECKING:
    from dpgen.pipeline import RunContext

log = logging.getLogger("dpgen")

REPLICATION_PNG = "replication_pairs.png"
UTILITY_SAMPLES, UTILITY_PNG = "utility_samples", "utility_vs_size.png"


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True)


def _downstream_settings(cfg: DictConfig) -> TrainSettings:
    return TrainSettings.from_config(cfg.eval.downstream, sampling_device(cfg.trainer))


def _downstream(ctx: RunContext, images: torch.Tensor, labels: torch.Tensor) -> list[TrainedClassifier]:
    return train_classifiers(images, labels, ctx.cfg.data.num_classes, list(ctx.cfg.eval.downstream.classifiers),
                             _downstream_settings(ctx.cfg), seed=ctx.cfg.seed)


def _content(ctx: RunContext, held_out: Dataset) -> list[str]:
    """What the real-data references were computed on: the same config at another root, or
    the same root re-exported, must not reuse another sensitive set's numbers."""
    return [content_fingerprint(ctx.train_set), content_fingerprint(held_out)]


def _computed_on(device: str) -> dict[str, str]:
    """What a cached reference was computed with, for its key: the same seed trains to other
    weights (and extracts other features) on another GPU model, CUDA or torch release, or on the CPU."""
    if device == "cuda":
        device = f"cuda:{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return {"device": device, "torch": torch.__version__}


def _real_classifiers(ctx: RunContext, held_out: Dataset) -> dict[str, float]:
    """The ceiling: the same classifiers trained on the real training split."""
    cfg = ctx.cfg

    def compute() -> dict[str, float]:
        log.info("evaluate: reference classifiers on the real training split (once; cached)")
        images, labels = stack_items(ctx.train_set)
        return final_accuracy(_downstream(ctx, images, labels), held_out)

    key = {"data": _plain(cfg.data), "downstream": _plain(cfg.eval.downstream), "seed": cfg.seed,
           "content": _content(ctx, held_out), **_computed_on(sampling_device(cfg.trainer))}
    return cached_reference(cfg.eval.cache_dir, "downstream", key, compute)


def _fidelity(ctx: RunContext, samples: torch.Tensor, held_out: Dataset) -> dict[str, Any]:
    cfg, e = ctx.cfg, ctx.cfg.eval
    fid_cfg = _plain(e.fid)
    metrics = list(fid_cfg["metrics"])
    pairwise = [m for m in metrics if m != "isc"]  # IS looks at the samples alone
    extractor = resolve_extractor(fid_cfg, e.cache_dir)
    out: dict[str, Any] = {"fid_feature_extractor": extractor.name, "feature_extractor": extractor.to_json()}
    cuda = sampling_device(cfg.trainer) == "cuda"
    with Fidelity(extractor, fid_cfg, seed=cfg.seed, cuda=cuda) as fid:
        fid.add("samples", FidelityImages(samples))
        fid.add("train", FidelityImages(ctx.train_set))
        fid.add("heldout", FidelityImages(held_out))
        log.info("evaluate: %s of the samples vs the real training split (%s)", ", ".join(metrics), extractor.name)
        out.update(fid.compare("samples", "train", metrics))
        if fid_cfg["heldout"]:
            log.info("evaluate: %s of the samples vs the held-out real split", ", ".join(pairwise))
            out.update({f"{k}_heldout": v for k, v in fid.compare("samples", "heldout", pairwise).items()})
        if e.reference:
            # FID and precision/recall depend on the set sizes, so the reference (real held-out
            # images against the training split) and the generator's counterpart use the same
            # number n of images each: the smaller of the two sets, drawn once by the seed.
            n = min(len(samples), len(held_out))
            g = torch.Generator().manual_seed(cfg.seed)
            fid.add("samples_n", FidelityImages(samples[torch.randperm(len(samples), generator=g)[:n]]))
            fid.add("heldout_n", Subset(FidelityImages(held_out), torch.randperm(len(held_out), generator=g)[:n].tolist()))
            key = {"data": _plain(cfg.data), "content": _content(ctx, held_out), "n": n,
                   "extractor": extractor.weights_sha256, "seed": cfg.seed, **_computed_on("cuda" if cuda else "cpu"),
                   "settings": {k: v for k, v in fid_cfg.items() if k not in ("glyphs", "glyphnet", "weights_path")}}
            out["fidelity_reference"] = cached_reference(e.cache_dir, "fidelity", key, lambda: {
                "compares": f"{n} real held-out images vs the real training split",
                "feature_extractor": extractor.name, **fid.compare("heldout_n", "train", pairwise)})
            log.info("evaluate: %s of %d samples vs the real training split, the reference's sample size",
                     ", ".join(pairwise), n)
            out.update({f"{k}_at_reference_size": v for k, v in fid.compare("samples_n", "train", pairwise).items()})
            out["fidelity_set_sizes"] = {"samples": len(samples), "train": len(ctx.train_set),
                                         "heldout": len(held_out), "reference": n}
    return out


def _audit(ctx: RunContext, samples: torch.Tensor, held_out: Dataset) -> dict[str, Any]:
    """Replication and membership inference (``eval.audit``): see :mod:`dpgen.eval.audit`."""
    cfg, a = ctx.cfg, ctx.cfg.audit
    extractor = resolve_extractor(_plain(cfg.eval.fid), cfg.eval.cache_dir)
    cuda = sampling_device(cfg.trainer) == "cuda"
    log.info("evaluate: audit: replication of the samples in the %s feature space", extractor.name)
    out = replication(samples, ctx.train_set, held_out, extractor, a.replication.threshold, a.replication.pairs,
                      ctx.path(REPLICATION_PNG), cuda=cuda)
    log.info("evaluate: audit: loss-based membership inference (training split vs held-out split)")
    module = load_final_module(ctx)
    if cuda:
        module = module.cuda()
    out.update(membership_inference(module, ctx.train_set, held_out, LossScoreSettings.from_config(a.loss_score),
                                    a.mia.max_examples, seed=cfg.seed))
    log.info("evaluate: audit: replication rate %.3f (held-out reference %.3f), MIA AUC %.3f, TPR@1%%FPR %.3f",
             out["replication_rate"], out["replication_rate_heldout_reference"], out["mia_auc"],
             out["mia_tpr_at_fpr_1pct"])
    return out


def _utility_samples(ctx: RunContext) -> tuple[np.ndarray, np.ndarray]:
    """The utility study's synthetic set: more samples of the trained generator (post-processing,
    no privacy cost), written as resumable npz shards in ``<run>/utility_samples/``: the same
    images as ``python -m dpgen.release <run> --format npz --seed <seed> --shard-size <size>``."""
    # dpgen.release builds on the stages (it opens finished runs): imported here, not at the top.
    from dpgen.release import ReleaseSpec
    from dpgen.release.make import generator_identity, read_npz_shards, write_shards

    cfg, u = ctx.cfg, ctx.cfg.eval.utility
    n = round(max([*u.size_multiples, u.selection_multiple]) * len(ctx.train_set))
    spec = ReleaseSpec(n, "npz", seed=cfg.seed, shard_size=u.sample_shard_size, batch_size=cfg.sample.batch_size)
    out = ctx.path(UTILITY_SAMPLES)
    device = sampling_device(cfg.trainer)
    log.info("evaluate: utility study: %d samples of the generator -> %s", n, out)
    write_shards(load_final_module(ctx).to(device), cfg.sample, out, spec,
                 generator_identity(ctx.path(FINAL_WEIGHTS), spec, cfg, ctx.run_dir),
                 [str(c) for c in range(cfg.data.num_classes)],
                 replace_other=True, eps_correction=load_protection_guidance(ctx.run_dir, cfg, device))
    return read_npz_shards(out, spec)


def _utility_study(ctx: RunContext, images: np.ndarray, labels: np.ndarray, held_out: Dataset) -> dict[str, Any]:
    cfg, u, d = ctx.cfg, ctx.cfg.eval.utility, ctx.cfg.eval.downstream
    n_train = len(ctx.train_set)
    study = utility_study(from_uint8_hwc(images), torch.from_numpy(labels), held_out,
                          num_classes=cfg.data.num_classes, n_train=n_train, multiples=list(u.size_multiples),
                          classifiers=list(d.classifiers), settings=_downstream_settings(cfg),
                          grid_classifier=u.grid_classifier, grid=_plain(u.grid),
                          selection_multiple=u.selection_multiple, seed=cfg.seed)
    save_figure(utility_figure(size_series(study), n_train), ctx.path(UTILITY_PNG))
    sel = study["selection"]
    log.info("evaluate: utility study: mean accuracy %s; selection on synthetic data: Spearman %s, Kendall %s, "
             "selected %.3f vs best %.3f", ", ".join(f"{s['multiple']:g}x {s['accuracy']['mean']:.3f}"
                                                     for s in study["sizes"]),
             sel["spearman"], sel["kendall"], sel["selected_real_accuracy"], sel["best_real_accuracy"])
    return study


def check_utility_sizes(ctx: RunContext) -> None:
    """The utility study's sizes against N, which needs the training split read: callers run it
    before any work (the pipeline before its first stage, the command lines before theirs)."""
    cfg = ctx.cfg
    if cfg.eval.utility_study:
        validate_utility_sizes(cfg.eval, len(ctx.train_set), describe_data(cfg.data).num_classes)


def evaluate(ctx: RunContext) -> None:
    start = time.time()
    # Sampling is the generator's work: it runs before evaluation's own thread setting applies.
    synthetic = _utility_samples(ctx) if ctx.cfg.eval.utility_study else None
    with cpu_threads(ctx.cfg.eval.num_threads):
        metrics = _evaluate(ctx, synthetic)
    metrics["evaluate_wall_s"] = time.time() - start
    write_json(ctx.path("metrics.json"), metrics)


def _evaluate(ctx: RunContext, synthetic: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    cfg, e = ctx.cfg, ctx.cfg.eval
    with np.load(ctx.path("samples.npz")) as z:
        stored, labels = z["images"][: e.num_samples], torch.from_numpy(z["labels"][: e.num_samples])
    samples = torch.from_numpy(stored).permute(0, 3, 1, 2).contiguous()  # uint8 [N, C, H, W]
    classifiers = list(e.downstream.classifiers)

    log.info("evaluate: training %s on %d synthetic samples (validation split carved from them)",
             ", ".join(classifiers) or "no classifiers", len(labels))
    trained = _downstream(ctx, from_uint8_hwc(stored), labels)

    # Every model choice is made: only now is the held-out real split opened, once.
    held_out = ctx.held_out_test_set()
    privacy = json.loads(ctx.privacy_json.read_text()) if ctx.privacy_json.exists() else {}
    # As the report and a release read it: a ledger from before its formal_guarantee key kept the
    # guarantee if it spent an ε, and a run whose config reads the data outside DP has none.
    formal = has_formal_guarantee(cfg) and ledger_kept_guarantee(privacy)
    metrics: dict[str, Any] = {
        "method": cfg.method.name,
        "epsilon": privacy.get("epsilon_spent"),
        "delta": privacy.get("delta"),
        "formal_guarantee": formal,
        "epsilon_scope": epsilon_scope(cfg, privacy, formal),
        # Beside ε, always: the metrics below are computed from the sensitive splits without noise.
        "outside_dp_guarantee": OUTSIDE_GUARANTEE,
        "num_samples": len(labels),
    }
    if trained:
        metrics["downstream_accuracy"] = final_accuracy(trained, held_out)
        metrics["downstream_val_accuracy"] = {c.name: c.val_accuracy for c in trained}
        metrics["downstream_best_epoch"] = {c.name: c.best_epoch for c in trained}
        log.info("evaluate: downstream accuracy on held-out real data: %s",
                 ", ".join(f"{k} {v:.3f}" for k, v in metrics["downstream_accuracy"].items()))
    if e.fid.metrics:
        metrics.update(_fidelity(ctx, samples, held_out))
        log.info("evaluate: %s", ", ".join(f"{k} {metrics[k]:.4g}" for k in ("fid", "kid_mean", "precision",
                 "recall", "inception_score_mean") if k in metrics))
    if e.reference:
        if trained:
            metrics["downstream_accuracy_real"] = _real_classifiers(ctx, held_out)
        metrics["reference_note"] = NOTE
    if e.audit:
        metrics.update(_audit(ctx, samples, held_out))
    if privacy.get("note"):
        metrics["privacy_note"] = privacy["note"]
    if ctx.path(PROTECTION_JSON).exists():
        metrics["cpsample"] = json.loads(ctx.path(PROTECTION_JSON).read_text())
    if synthetic is not None:
        metrics["utility_study"] = _utility_study(ctx, *synthetic, held_out)

    module = build_module(cfg)
    trainable = [n for n in cfg.method.stages if n in ("train", "dp_train", "dp_finetune")]
    metrics.update({
        "trainable_parameters": sum(p.numel() for p in module.unet.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in module.unet.parameters()),
        "train_wall_s": sum(ctx.wall_s.get(n, 0.0) for n in trainable),
        "total_wall_s": sum(ctx.wall_s.values()),
    })
    return metrics
