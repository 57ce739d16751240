"""The canary audit can fail: through the real DP-SGD strategy and ledger, noise disabled gives an
empirical ε far above the claim, noise enabled stays below it. And the `python -m dpgen.audit`
wiring: canaries enter only the audit's own run."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from omegaconf import OmegaConf
from torch import nn

from dpgen.audit import (
    CANARY_JSON,
    WithCanaries,
    build_canaries,
    canary_audit_result,
    run_canary_audit,
)
from dpgen.data import build_public_dataset
from dpgen.errors import ConfigError
from dpgen.evaluate import evaluation_config
from dpgen.pipeline import RunContext
from dpgen.privacy.ledger import PlannedStage, PrivacyLedger
from dpgen.privacy.poisson import PoissonDataModule
from dpgen.privacy.strategy import POISSON_GAUSSIAN, DPSGDConfig, DPSGDStrategy
from dpgen.release.source import ReleaseError, open_run

DIM, BACKGROUND, CANARIES, STEPS = 10_000, 100, 256, 20


class MeanModel(LightningModule):
    """θ ∈ R^d fitted to ||x − θ||² / 2 under clipping: the textbook model of memorisation (θ moves
    towards every training point), trained here by the project's own DP-SGD strategy."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Linear(1, DIM, bias=False)  # θ = theta(1): a layer the engine can hook
        nn.init.zeros_(self.theta.weight)

    def per_example_loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        x = batch[0]
        return 0.5 * (x - self.theta(torch.ones(len(x), 1))).pow(2).sum(1, keepdim=True)

    def training_step(self, batch, batch_idx):
        raise AssertionError("under DP the strategy runs the step")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Gradients are clipped to norm 1 and points lie at distance ~sqrt(d): this step size
        # halves the distance to the mean each step.
        return torch.optim.SGD(self.parameters(), lr=0.5 * DIM ** 0.5)


def _sphere(n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, DIM, generator=g)
    return x / x.norm(dim=1, keepdim=True) * DIM ** 0.5  # equal norms: the loss alone scores them


def _audit(noise: bool, claimed_eps: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(0)
    background, canaries = _sphere(BACKGROUND, g), _sphere(CANARIES, g)
    included = torch.rand(CANARIES, generator=g) < 0.5
    data = torch.utils.data.TensorDataset(torch.cat([background, canaries[included]]))
    ledger = PrivacyLedger(claimed_eps, 1e-5, len(data))
    ledger.plan([PlannedStage("dp_train", POISSON_GAUSSIAN, sample_rate=1.0, count=STEPS)])
    sigma = ledger.planned[0].noise_multiplier
    strategy = DPSGDStrategy(DPSGDConfig(sigma, 1.0, 1.0, len(data), max_physical_batch=512), ledger=ledger)
    strategy._noise_enabled = noise  # the deliberately broken configuration: clipping, no noise
    strategy.noise_generator = torch.Generator().manual_seed(1)
    model = MeanModel()
    Trainer(max_steps=STEPS, strategy=strategy, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False).fit(model, datamodule=PoissonDataModule(data, 1.0, STEPS))
    assert ledger.steps_spent("dp_train") == STEPS
    with torch.no_grad():
        scores = -model.per_example_loss([canaries])[:, 0]
    return canary_audit_result(scores, included, ledger.delta, ledger.epsilon_spent(), [128, 256], 0.95)


def test_noise_disabled_is_caught_far_above_the_claim():
    broken = _audit(noise=False)
    assert broken["epsilon_claimed"] <= 1.0
    assert broken["canary_auc"] > 0.99
    assert broken["epsilon_lower_bound"] > 3.0 * broken["epsilon_claimed"] and broken["exceeds_claim"]
    assert broken["epsilon_lower_bound_clopper_pearson"] > 2.0


def test_real_dp_stays_below_the_claim():
    honest = _audit(noise=True)
    assert honest["epsilon_lower_bound"] <= honest["epsilon_claimed"] and not honest["exceeds_claim"]
    assert abs(honest["canary_auc"] - 0.5) < 0.15


def test_canaries_are_glyphs_with_labels_in_range(tiny_cfg):
    cfg = tiny_cfg()
    images, labels = build_canaries(cfg, 30, "letters", seed=0)
    assert images.shape == (30, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    assert labels.min() >= 0 and labels.max() < 10
    digits, wrong = build_canaries(cfg, 30, "mislabeled", seed=0)
    assert digits.shape == (30, 1, 8, 8)
    # Each mislabeled canary is a digit glyph under another digit's label: find it in the glyph
    # set build_canaries renders (30 canaries: 4 per digit, the public seed + 1) and check that
    # its label is not its digit.
    glyphs = build_public_dataset({**OmegaConf.to_container(cfg.public, resolve=True), "charset": "digits",
                                   "samples_per_class": 4, "seed": cfg.public.seed + 1})
    flat = glyphs.images.flatten(1)
    for image, label in zip(digits, wrong):
        match = (flat - image.flatten()).abs().amax(1).argmin()
        assert torch.equal(glyphs.images[match], image) and glyphs.labels[match] != label


def test_canary_run_trains_on_canaries_in_its_own_directory_only(tiny_cfg, tmp_path, monkeypatch):
    import dpgen.pipeline

    cfg = tiny_cfg("audit.canary.count=16", "audit.canary.guesses=[8,16]", "privacy.eps=5")
    trained_on = []
    original = dpgen.pipeline.run_pipeline
    monkeypatch.setattr(dpgen.pipeline, "run_pipeline",
                        lambda cfg, run_dir, **kw: trained_on.append(kw["train_set"]) or original(cfg, run_dir, **kw))
    result = run_canary_audit(cfg, tmp_path / "audit")
    run = tmp_path / "audit"
    saved = json.loads((run / CANARY_JSON).read_text())
    privacy = json.loads((run / "privacy.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    inserted = sum(saved["included"])
    assert privacy["dataset_size"] == 4000 + inserted == saved["training_examples"]
    assert metrics["canary_audit"]["epsilon_claimed"] == privacy["epsilon_spent"] <= 5.0
    assert len(saved["scores"]) == 16 and result["epsilon_lower_bound"] >= 0
    # The canaries marked included, and only those, were appended to the training split.
    images, labels = build_canaries(cfg, 16, cfg.audit.canary.kind, cfg.seed)
    included = torch.tensor(saved["included"])
    (train,) = trained_on
    assert torch.equal(train.images, images[included]) and torch.equal(train.labels, labels[included])
    # The saved scores and membership reproduce the reported bounds.
    again = canary_audit_result(torch.tensor(saved["scores"]), torch.tensor(saved["included"]), privacy["delta"],
                                privacy["epsilon_spent"], [8, 16], cfg.audit.canary.confidence)
    assert again["epsilon_lower_bound"] == result["epsilon_lower_bound"]
    assert again["canary_auc"] == result["canary_auc"]
    # a model trained on canaries is never sampled or evaluated
    assert not (run / "samples.npz").exists() and "sample" not in json.loads((run / "stages.json").read_text())["completed"]
    # ... nor finished as an ordinary run, resampled, evaluated or released
    with pytest.raises(ConfigError, match="canary audit's run"):
        original(tiny_cfg("audit.canary.count=16", "audit.canary.guesses=[8,16]",
                          "privacy.eps=5"), run)
    with pytest.raises(ReleaseError, match="canary audit's run"):
        open_run(run)
    with pytest.raises(ConfigError, match="canary audit's run"):
        evaluation_config(run, [])
    # and an ordinary run is not "resumed" as an audit, which would score canaries it never saw
    plain = tmp_path / "plain-run"
    plain.mkdir()
    OmegaConf.save(tiny_cfg("privacy.eps=5"), plain / "run_config.yaml")
    with pytest.raises(ConfigError, match="an ordinary run, not a canary audit's"):
        run_canary_audit(tiny_cfg("audit.canary.count=16", "audit.canary.guesses=[8,16]", "privacy.eps=5"), plain)
    assert not (plain / "metrics.json").exists()
    # an ordinary run's training split holds no canary
    assert len(RunContext(cfg=cfg, run_dir=tmp_path / "plain").train_set) == 4000
    assert len(WithCanaries(RunContext(cfg=cfg, run_dir=tmp_path).train_set, torch.zeros(3, 1, 8, 8),
                            torch.zeros(3, dtype=torch.long))) == 4003


def test_audits_from_before_the_config_key_are_known_and_runs_with_samples_are_not(tiny_cfg, tmp_path):
    """An interrupted audit started before ``canary_audit: true`` existed is known by Hydra's record
    (finishing it with ``python -m dpgen`` would sample a model trained on canaries); an ordinary
    run into which an old ``dpgen.audit +resume=`` wrote canary_audit.json is known by its samples."""
    from dpgen.pipeline import _check_resume_config
    from dpgen.stages import trained_on_canaries

    ordinary, audit = tiny_cfg("privacy.eps=5"), tiny_cfg("privacy.eps=5", "+canary_audit=true")
    old_audit = tmp_path / "old-audit"
    (old_audit / ".hydra").mkdir(parents=True)
    OmegaConf.save(ordinary, old_audit / "run_config.yaml")  # no key: saved before it existed
    (old_audit / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    config_name: canary_audit\n")
    assert trained_on_canaries(old_audit, ordinary)
    with pytest.raises(ConfigError, match="is a canary audit's run"):
        _check_resume_config(ordinary, old_audit, [])
    _check_resume_config(audit, old_audit, [])  # dpgen.audit +resume= of it goes on

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / CANARY_JSON).write_text("{}")
    assert trained_on_canaries(damaged, ordinary)
    (damaged / "samples.npz").write_bytes(b"")
    assert not trained_on_canaries(damaged, ordinary)
