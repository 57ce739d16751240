"""Planning the privacy budget of a whole run before any stage runs.

Every stage that touches sensitive data declares its mechanisms here (``STAGE_PLANS``); the
ledger calibrates their noise so the composition meets ``privacy.eps``, and refuses to start
when it cannot. The training-split size N is treated as public, as in Opacus and the papers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from dpgen.distributed import is_rank_zero
from dpgen.errors import ConfigError
from dpgen.io import write_json
from dpgen.privacy.accounting import compute_epsilon
from dpgen.privacy.events import POISSON_GAUSSIAN
from dpgen.privacy.guarantee import guarantee_notes, training_is_private
from dpgen.privacy.journal import JOURNAL, read_spend
from dpgen.privacy.ledger import PlannedStage, PrivacyLedger, non_private_record

if TYPE_CHECKING:
    from dpgen.pipeline import RunContext

log = logging.getLogger("dpgen")


def _plan_dp_sgd(stage: str) -> Callable[[DictConfig, int], list[PlannedStage]]:
    """A DP-SGD stage: ``method.train.steps`` Poisson-subsampled Gaussian steps at q = batch/N."""

    def plan(cfg: DictConfig, n: int) -> list[PlannedStage]:
        batch = cfg.method.train.batch_size
        if batch > n:
            raise ConfigError("method.train.batch_size", batch, f"exceeds the training split (N={n})",
                              f"use at most {n}")
        return [PlannedStage(stage=stage, mechanism=POISSON_GAUSSIAN,
                             sample_rate=batch / n, count=cfg.method.train.steps)]

    return plan


def _plan_semantic_query(cfg: DictConfig, n: int) -> list[PlannedStage]:
    """PrivImage's vote histogram: one Gaussian release, with a fixed ``method.query_sigma`` or
    calibrated alone to ``method.query_budget_fraction`` of the target; training gets the rest."""
    m = cfg.method
    if m.selection != "semantic":
        return []  # selection=all: no query, nothing to charge
    sigma = m.get("query_sigma")
    return [PlannedStage(stage="dp_semantic_query", mechanism="gaussian", count=1, noise_multiplier=sigma,
                         budget_fraction=m.query_budget_fraction if sigma is None else None)]


def _plan_central_images(cfg: DictConfig, n: int) -> list[PlannedStage]:
    """DP-FETA's central images: ``method.central.rounds`` Poisson-subsampled Gaussian queries at
    q = ``method.central.sample_rate``, with a fixed sigma or their own share of the budget."""
    c = cfg.method.central
    sigma = c.get("noise_multiplier")
    return [PlannedStage(stage="dp_central_images", mechanism=POISSON_GAUSSIAN, sample_rate=c.sample_rate,
                         count=c.rounds, noise_multiplier=sigma,
                         budget_fraction=None if sigma is not None else c.budget_fraction)]


# Stages not listed here (public pretraining, sampling, evaluation) cost nothing.
STAGE_PLANS: dict[str, Callable[[DictConfig, int], list[PlannedStage]]] = {
    "dp_train": _plan_dp_sgd("dp_train"),
    "dp_finetune": _plan_dp_sgd("dp_finetune"),
    "dp_semantic_query": _plan_semantic_query,
    "dp_central_images": _plan_central_images,
}


def plan_privacy(ctx: RunContext) -> PrivacyLedger | None:
    cfg = ctx.cfg
    note = " ".join(guarantee_notes(cfg))
    if not training_is_private(cfg):
        if is_rank_zero():
            write_json(ctx.privacy_json, non_private_record(len(ctx.train_set), cfg.method.name, note))
        log.warning(note)
        return None
    n = len(ctx.train_set)
    ledger = PrivacyLedger(epsilon_target=cfg.privacy.eps, delta=cfg.privacy.delta, dataset_size=n,
                           accountant=cfg.privacy.accountant)
    stages = [p for name in cfg.method.stages for p in STAGE_PLANS.get(name, lambda c, n: [])(cfg, n)]
    ledger.plan(stages)
    if ctx.privacy_json.exists():  # resuming: what earlier attempts spent stays spent
        ledger.load_state_dict(json.loads(ctx.privacy_json.read_text()))
    if (journaled := read_spend(ctx.path(JOURNAL))) is not None:  # DP steps since privacy.json
        ledger.load_state_dict(journaled)
    if note:  # DP training, but something else reads the sensitive images (CPSample)
        ledger.void_guarantee(note)
        log.warning(note)
    if is_rank_zero():  # one ledger file: other ranks (external launch) keep theirs in memory
        ledger.write(ctx.privacy_json)
    for ev in ledger.planned:
        log.info("privacy plan: %s %s sigma=%.4f q=%.4g count=%d", ev.stage, ev.mechanism,
                 ev.noise_multiplier, ev.sample_rate, ev.count)
    log.info("privacy plan: eps=%.4g (target %.4g, %s), delta=%g, N=%d",
             _planned_eps(ledger), cfg.privacy.eps, cfg.privacy.accountant, cfg.privacy.delta, n)
    return ledger


def _planned_eps(ledger: PrivacyLedger) -> float:
    return compute_epsilon(ledger.planned, ledger.delta, ledger.accountant)
