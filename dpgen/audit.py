"""``python -m dpgen.audit [overrides]``: the canary audit, an empirical lower bound on ε.

``audit.canary.count`` canaries (rendered glyphs: letters with random digit labels, or digits
with wrong labels) are each inserted into the sensitive training split independently with
probability 1/2. The method's generator is then trained exactly as in an ordinary run with the
same overrides (its training stages, a privacy plan for the enlarged split), every canary is
scored by the trained model's denoising loss, and "guess which canaries were inserted" is turned
into ε lower bounds (:mod:`dpgen.eval.empirical_epsilon`), set against the ε the ledger claims.
A lower bound above the claim means the implementation (or its configuration) is not as private
as it says; one below it is the expected outcome, and says nothing about tightness.

The run directory (``outputs/canary_audit/<date>/<time>``) holds ``canary_audit.json``,
``metrics.json`` and ``privacy.json``. Its model was trained on canaries: it is never sampled,
evaluated or released, and ordinary runs (``python -m dpgen``) never see a canary.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor
from torch.utils.data import Dataset

from dpgen.config import check_run_start, refuse_missing_resume
from dpgen.data import build_dataset, build_public_dataset, has_public_data
from dpgen.errors import BudgetError, ConfigError
from dpgen.eval.empirical_epsilon import median_split_clopper_pearson, one_run_audit
from dpgen.io import write_json
from dpgen.stages import CANARY_JSON, CANARY_RUN_KEY, training_stages

log = logging.getLogger("dpgen")


class WithCanaries(Dataset):
    """The training split followed by the inserted canaries (same item contract and ``info``)."""

    def __init__(self, base: Dataset, images: Tensor, labels: Tensor) -> None:
        self.base, self.images, self.labels = base, images, labels
        self.info = base.info

    def __len__(self) -> int:
        return len(self.base) + len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        n = len(self.base)
        return self.base[i] if i < n else (self.images[i - n], int(self.labels[i - n]))


def build_canaries(cfg: DictConfig, count: int, kind: str, seed: int) -> tuple[Tensor, Tensor]:
    """``count`` canary images (in the data's size and channels) and their labels.

    Rendered from fonts, so no real image is spent on them: ``letters`` are out of distribution
    for digits and get random labels; ``mislabeled`` are digit glyphs with a wrong label.
    """
    if not has_public_data(cfg.public):
        raise ConfigError("public", cfg.public.name, "the canaries are rendered glyphs", "use public=glyphs")
    num_classes = cfg.data.num_classes
    glyphs_cfg = OmegaConf.to_container(cfg.public, resolve=True)
    glyphs_cfg["charset"] = "letters" if kind == "letters" else "digits"
    per_class = -(-count // (52 if kind == "letters" else 10)) + 1
    glyphs_cfg["samples_per_class"] = max(per_class, 2)
    glyphs_cfg["seed"] = glyphs_cfg["seed"] + 1  # never the very images the public set holds
    glyphs = build_public_dataset(glyphs_cfg)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(glyphs.labels), generator=g)[:count]
    images = glyphs.images[idx]
    if kind == "letters":
        labels = torch.randint(0, num_classes, (count,), generator=g)
    else:  # a wrong digit: shift the true one by 1..num_classes-1
        labels = (glyphs.labels[idx] + torch.randint(1, num_classes, (count,), generator=g)) % num_classes
    return images, labels


def canary_audit_result(scores: Tensor, included: Tensor, delta: float, claimed: float | None,
                        guesses: list[int], confidence: float) -> dict[str, Any]:
    """The bounds from canary scores (higher = more likely inserted) and who was inserted."""
    from dpgen.eval.audit import roc_summary

    s, inc = scores.numpy().astype(float), included.numpy().astype(bool)
    one_run = one_run_audit(s, inc, delta, guesses, confidence)
    roc = roc_summary(s[inc], s[~inc])
    bound = one_run["epsilon_lower_bound"]
    return {
        "epsilon_lower_bound": bound,
        "epsilon_claimed": claimed,
        "exceeds_claim": bool(claimed is not None and bound > claimed),
        "epsilon_lower_bound_clopper_pearson": median_split_clopper_pearson(s, inc, delta, confidence),
        "confidence": confidence,
        "delta": delta,
        "canary_auc": roc["auc"],
        "one_run": one_run,
        "method": "Steinke, Nasr & Jagielski (2023) one-run audit; Clopper-Pearson bound of the median "
                  "split for comparison (treats the canaries as independent trials)",
    }


def run_canary_audit(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    from dpgen.eval.audit import LossScoreSettings, loss_scores
    from dpgen.pipeline import run_pipeline
    from dpgen.stages.training import load_final_module

    with open_dict(cfg):  # from the start: resumes and the other tools tell this run from an ordinary one
        cfg[CANARY_RUN_KEY] = True
    c = cfg.audit.canary
    images, labels = build_canaries(cfg, c.count, c.kind, cfg.seed)
    # Which canaries go in: fixed by the seed, so the audit is reproducible; independent of
    # the training randomness (DP noise and Poisson sampling use fresh OS entropy).
    included = torch.rand(c.count, generator=torch.Generator().manual_seed(cfg.seed + 1)) < 0.5
    train = WithCanaries(build_dataset(cfg.data, "train"), images[included], labels[included])
    log.info("canary audit: %d %s canaries, %d inserted into the %d training images", c.count, c.kind,
             int(included.sum()), len(train.base))
    ctx = run_pipeline(cfg, run_dir, stages=training_stages(cfg), train_set=train)
    module = load_final_module(ctx)
    scores = loss_scores(module, images, labels, LossScoreSettings.from_config(cfg.audit.loss_score), cfg.seed)
    delta = ctx.ledger.delta if ctx.ledger is not None else cfg.privacy.delta
    claimed = ctx.ledger.epsilon_spent() if ctx.ledger is not None else None
    result = canary_audit_result(scores, included, delta, claimed, list(c.guesses), c.confidence)
    result.update({"canaries": c.count, "kind": c.kind, "inserted": int(included.sum()),
                   "training_examples": len(train), "method_name": cfg.method.name})
    write_json(run_dir / CANARY_JSON, {**result, "scores": scores.tolist(), "included": included.tolist()})
    write_json(run_dir / "metrics.json", {"method": cfg.method.name, "epsilon": claimed, "delta": delta,
                                          "canary_audit": result, "total_wall_s": sum(ctx.wall_s.values())})
    verdict = "EXCEEDS the claim" if result["exceeds_claim"] else "consistent with the claim"
    log.info("canary audit: empirical epsilon lower bound %.3f at %.0f %% confidence (Clopper-Pearson %.3f), "
             "claimed epsilon %s: %s", result["epsilon_lower_bound"], 100 * c.confidence,
             result["epsilon_lower_bound_clopper_pearson"], "none" if claimed is None else f"{claimed:.3f}", verdict)
    return result


def main(cfg: DictConfig) -> None:
    try:
        check_run_start(cfg)
        from lightning.pytorch import seed_everything  # after the checks: a refusal takes seconds

        seed_everything(cfg.seed, workers=True, verbose=False)
        run_canary_audit(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, BudgetError) as err:
        log.error("%s", err)
        sys.exit(f"dpgen.audit: {err}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="canary_audit")
def _hydra_main(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    refuse_missing_resume(sys.argv[1:], "dpgen.audit")
    _hydra_main()

