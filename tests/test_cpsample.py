"""CPSample: the protection classifier, the guided correction, and what a CPSample run states."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config, tiny_dpldm_overrides
from omegaconf import OmegaConf

from dpgen.config import validate_config
from dpgen.diffusion.sampling import make_train_scheduler
from dpgen.errors import ConfigError
from dpgen.pipeline import run_pipeline
from dpgen.privacy.guarantee import CPSAMPLE_NO_GUARANTEE
from dpgen.release import ReleaseSpec, make_release
from dpgen.sampling.__main__ import main as resample
from dpgen.sampling.__main__ import resampling_config
from dpgen.sampling.guidance import ProtectionGuidance
from dpgen.sampling.protection import ProtectionSettings, random_labels, train_protection_classifier
from dpgen.stages import registry as stages
from dpgen.stages import run_stages

ALPHAS = make_train_scheduler({"num_train_timesteps": 1000, "beta_schedule": "linear"}).alphas_cumprod


def test_classifier_memorises_random_labels_and_is_unsure_elsewhere():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1
    fresh = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1
    settings = ProtectionSettings(width=16, max_steps=1500, batch_size=64, lr=3e-3, target_accuracy=0.98,
                                  check_every=100, check_timesteps=50)
    classifier, info = train_protection_classifier(train, ALPHAS, settings, seed=0)
    assert info["overfitted"] and info["train_accuracy_low_noise"] >= 0.98 and info["steps"] <= 1500
    labels = random_labels(64, 0)
    t = torch.full((64,), 10)
    with torch.no_grad():
        p_train = torch.sigmoid(classifier(train, t))
        p_fresh = torch.sigmoid(classifier(fresh, t))
    assert ((p_train > 0.5).float() == labels).float().mean() >= 0.95
    confidence = lambda p: torch.maximum(p, 1 - p).mean()  # noqa: E731
    assert confidence(p_train) > confidence(p_fresh) + 0.05


class _Linear(torch.nn.Module):
    """logit = w·x: a classifier whose guidance direction is known in closed form."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) * self.w.flatten()).sum(1)


def test_the_classifier_takes_the_samplers_cpu_timestep_on_another_device():
    """scheduler.timesteps are CPU scalars; on a GPU the classifier is not. (The meta device stands
    in for CUDA: mixing it with a CPU tensor fails as CUDA does.)"""
    from dpgen.models.protection import ProtectionClassifier

    classifier = ProtectionClassifier(channels=1, width=8).to("meta")
    assert classifier(torch.zeros(3, 1, 8, 8, device="meta"), torch.tensor(17)).shape == (3,)


def test_guidance_pushes_away_from_the_predicted_label_only_when_confident():
    w = torch.ones(1, 2, 2)
    guidance = ProtectionGuidance(_Linear(w), ALPHAS, threshold=0.9, scale=2.0)
    x = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 0.1), torch.full((1, 2, 2), -1.0)])
    eps = torch.zeros_like(x)
    t = torch.tensor(500)
    out = guidance(x, t, eps)
    # logits 4, 0.4, -4: only the first and the last are confident (sigmoid(4) = 0.982)
    assert torch.equal(out[1], eps[1])
    sigma = (1 - ALPHAS[500]).sqrt()
    # d/dx log sigmoid(-|w·x|) = -sign(w·x) sigmoid(|w·x|) w: it does not vanish when confident
    expected = 2.0 * sigma * torch.sigmoid(torch.tensor(4.0)) * w
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out[2], -expected)
    # the predicted clean image x0 = (x - sigma eps) / sqrt(alpha) moves towards the other label
    x0 = lambda e: (x - sigma * e) / ALPHAS[500].sqrt()  # noqa: E731
    logit_x0 = lambda e: (x0(e).flatten(1) * w.flatten()).sum(1)  # noqa: E731
    assert logit_x0(out)[0] < logit_x0(eps)[0] and logit_x0(out)[2] > logit_x0(eps)[2]
    assert guidance.guided == 2 and guidance.total == 3 and guidance.guided_fraction == pytest.approx(2 / 3)


def test_cpsample_inserts_its_stage_and_refuses_latent_models(tiny_cfg, tmp_path):
    assert run_stages(tiny_cfg("sampling=cpsample")) == ["pretrain_public", "dp_train",
                                                         "train_protection_classifier", "sample", "evaluate"]
    assert "train_protection_classifier" not in run_stages(tiny_cfg())
    with pytest.raises(ConfigError, match=r"^sampling='cpsample'.*latents.*Fix:"):
        validate_config(compose_config([*tiny_dpldm_overrides(tmp_path), "sampling=cpsample"]))


@pytest.mark.parametrize("override,key", [
    ("sampling.threshold=0.3", "sampling.threshold"),
    ("sampling.classifier.width=12", "sampling.classifier.width"),
    ("sampling.classifier.max_steps=0", "sampling.classifier.max_steps"),
])
def test_bad_sampling_config_is_refused(tiny_cfg, override, key):
    with pytest.raises(ConfigError) as err:
        validate_config(tiny_cfg("sampling=cpsample", override))
    assert str(err.value).startswith(key) and "Fix:" in str(err.value)


def test_cpsample_on_a_finished_run_states_no_formal_guarantee(tiny_cfg, tmp_path, caplog, monkeypatch):
    """A finished DP run sampled again with CPSample (``python -m dpgen.sampling``): the same
    generator, ε of its DP training still tracked, but privacy.json, metrics.json, protection.json,
    the log and a release's data card say the outputs carry no formal guarantee; the audit runs."""
    source = tmp_path / "run"
    plain = tiny_cfg("eval.downstream.classifiers=[]", "eval.fid.metrics=[]", "eval.reference=false")
    run_pipeline(plain, source)
    refused = tmp_path / "refused"
    with pytest.raises(SystemExit, match=r"^dpgen\.sampling: eval\.utility\.size_multiples=\[0\.0001\]: "):
        resample([str(source), "--out", str(refused), "eval.utility_study=true", "eval.utility.size_multiples=[0.0001]"])
    assert not refused.exists()
    out = tmp_path / "cpsample"
    args = [str(source), "--out", str(out), "sampling.classifier.max_steps=3", "sampling.classifier.width=8",
            "eval=fast", "eval.audit=true", "audit.mia.max_examples=20", "audit.loss_score.noise_draws=1",
            "eval.downstream.classifiers=[cnn]", "eval.fid.metrics=[fid]"]
    sample_stage = stages.STAGES["sample"]
    monkeypatch.setitem(stages.STAGES, "sample", lambda ctx: (_ for _ in ()).throw(RuntimeError("sampler failed")))
    with pytest.raises(RuntimeError, match="sampler failed"):
        resample(args)
    monkeypatch.setitem(stages.STAGES, "sample", sample_stage)
    with caplog.at_level("WARNING", logger="dpgen"):
        resample(args)  # the failed attempt's directory is resumed, not refused as existing
    cfg = OmegaConf.load(out / "run_config.yaml")
    assert cfg.sampling.name == "cpsample" and cfg.method == plain.method
    assert (out / "model.pt").read_bytes() == (source / "model.pt").read_bytes()
    privacy = json.loads((out / "privacy.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert privacy["formal_guarantee"] is False and privacy["note"] == CPSAMPLE_NO_GUARANTEE
    assert privacy["events"][0]["steps"] == 4  # the DP training is still accounted
    assert json.loads((source / "privacy.json").read_text())["formal_guarantee"] is True  # source untouched
    assert metrics["formal_guarantee"] is False and metrics["privacy_note"] == CPSAMPLE_NO_GUARANTEE
    assert metrics["epsilon"] == privacy["epsilon_spent"] and "generator training only" in metrics["epsilon_scope"]
    assert CPSAMPLE_NO_GUARANTEE in caplog.text
    assert metrics["cpsample"]["classifier"]["steps"] == 3 and 0 <= metrics["cpsample"]["guided_fraction"] <= 1
    assert 0 <= metrics["replication_rate"] <= 1 and 0 <= metrics["mia_auc"] <= 1
    assert metrics["mia_members"] == metrics["mia_non_members"] == 20
    assert (out / "replication_pairs.png").stat().st_size > 0
    assert json.loads((out / "stages.json").read_text())["completed"] == run_stages(cfg)
    assert json.loads((out / "protection.json").read_text())["note"] == CPSAMPLE_NO_GUARANTEE
    # a release samples through the same protection, and its data card states the missing guarantee
    release = make_release(out, tmp_path / "release", ReleaseSpec(6, "npz", shard_size=6), progress=False)
    card = json.loads((release / "datacard.json").read_text())
    assert card["formal_guarantee"] is False and card["statement"].startswith("NO FORMAL PRIVACY GUARANTEE")
    assert card["note"] == CPSAMPLE_NO_GUARANTEE and card["sampler"]["name"] == "dpm++ + cpsample"
    assert card["epsilon_scope"] == metrics["epsilon_scope"]


def test_resampling_refuses_changes_to_the_generator(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"^privacy.eps='1': only sampling"):
        resampling_config(tmp_path, ["privacy.eps=1"])


def test_resampling_names_an_override_hydra_cannot_apply(tmp_path):
    """A typo ends ``python -m dpgen.sampling`` with one line (a ConfigError), not Hydra's traceback."""
    with pytest.raises(ConfigError, match=r"^sampling\.scalee='3': no such key in the config .*Fix: "):
        resampling_config(tmp_path, ["sampling=cpsample", "sampling.threshold=0.95", "sampling.scalee=3"])


def test_resampling_changes_the_runs_own_sample_settings_and_nothing_else(tiny_cfg, tmp_path):
    """``sample.*`` overrides change the solver and steps of the run's own settings (a user compares
    samplers on one trained generator); the rest of ``sample`` stays what the run had."""
    run_cfg = tiny_cfg("sample.solver=ddim", "sample.steps=25", "sample.num_samples=30")
    OmegaConf.save(run_cfg, tmp_path / "run_config.yaml")
    cfg = resampling_config(tmp_path, ["sampling=default", "sample.solver=dpm++", "sample.steps=8"])
    assert (cfg.sample.solver, cfg.sample.steps, cfg.sample.num_samples) == ("dpm++", 8, 30)
    assert cfg.sampling.name == "default" and cfg.privacy == run_cfg.privacy
    validate_config(cfg)
    with pytest.raises(ConfigError, match="sample.solver='euler': unknown solver"):
        validate_config(resampling_config(tmp_path, ["sample.solver=euler"]))
    with pytest.raises(ConfigError, match="sample settings can be changed, not deleted"):
        resampling_config(tmp_path, ["~sample.steps"])
    for typo in ("sample.stepz=4", "+sample.stepz=4"):  # both were added to the config and never read
        with pytest.raises(ConfigError, match=r"^sample\.stepz='4': no sample setting has this key.*"
                                              r"did you mean sample\.steps="):
            resampling_config(tmp_path, [typo])
    del run_cfg.sample.solver  # a run from before the key: sampled with DDIM, and can be given a solver
    OmegaConf.save(run_cfg, tmp_path / "run_config.yaml")
    for solver in ("sample.solver=dpm++", "+sample.solver=dpm++"):
        assert resampling_config(tmp_path, ["sampling=default", solver]).sample.solver == "dpm++"
