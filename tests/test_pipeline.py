"""End to end through the stage runner: run-directory files, resume, privacy.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dpgen.pipeline import run_pipeline
from dpgen.privacy.ledger import MechanismEvent, compute_epsilon

DESIGN_METRICS_KEYS = {"method", "epsilon", "delta", "num_samples", "downstream_accuracy",
                       "trainable_parameters", "total_parameters", "train_wall_s", "total_wall_s",
                       "fid", "fid_feature_extractor", "kid_mean", "precision", "recall"}
DESIGN_PRIVACY_KEYS = {"delta", "epsilon_target", "epsilon_spent", "accountant", "epsilon_by_accountant",
                       "dataset_size", "neighbouring", "events"}


def _check_run_dir(run_dir, num_samples=20, num_classes=10):
    for name in ("samples.png", "samples.npz", "metrics.json", "privacy.json", "model.pt", "stages.json"):
        assert (run_dir / name).exists(), name
    with np.load(run_dir / "samples.npz") as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (num_samples, 8, 8, 1)
        assert z["labels"].dtype == np.int64
        assert np.bincount(z["labels"], minlength=num_classes).tolist() == [num_samples // num_classes] * 10
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= DESIGN_METRICS_KEYS
    assert set(metrics["downstream_accuracy"]) == {"cnn", "resnet", "mlp", "mean"}
    assert 0.0 <= metrics["downstream_accuracy"]["mean"] <= 1.0
    assert metrics["fid_feature_extractor"] == "glyphnet-v1"
    assert not list(run_dir.rglob("*.tmp")), "a temporary file was left behind"
    return metrics


def test_nonprivate_end_to_end(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run_pipeline(tiny_cfg("method=nonprivate"), run_dir)
    metrics = _check_run_dir(run_dir)
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["formal_guarantee"] is False and metrics["formal_guarantee"] is False
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


def test_dpdm_end_to_end_privacy_json(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    ctx = run_pipeline(tiny_cfg("privacy.eps=5"), run_dir)
    metrics = _check_run_dir(run_dir)
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert set(privacy) >= DESIGN_PRIVACY_KEYS
    assert privacy["dataset_size"] == 4000 and privacy["neighbouring"] == "add_remove"
    (event,) = privacy["events"]
    assert event["stage"] == "dp_train" and event["steps"] == 4
    assert event["sample_rate"] == pytest.approx(64 / 4000)
    assert privacy["epsilon_spent"] <= 5.0
    # independent recomputation from the file's own events
    events = [MechanismEvent.from_json(e) for e in privacy["events"]]
    assert compute_epsilon(events, privacy["delta"], "pld") == pytest.approx(privacy["epsilon_spent"], abs=0.01)
    assert metrics["epsilon"] == privacy["epsilon_spent"]
    assert ctx.ledger.steps_spent("dp_train") == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dpdm_end_to_end_on_one_gpu_in_bf16(tiny_cfg, tmp_path):
    """``trainer=gpu`` (the experiment configs' trainer: bf16 autocast) through every stage."""
    run_dir = tmp_path / "run"
    ctx = run_pipeline(tiny_cfg("privacy.eps=5", "trainer=gpu"), run_dir)
    _check_run_dir(run_dir)
    assert ctx.ledger.steps_spent("dp_train") == 4
    assert json.loads((run_dir / "privacy.json").read_text())["epsilon_spent"] <= 5.0


class _Crash(RuntimeError):
    pass


def test_resume_after_crash_matches_uninterrupted(tiny_cfg, tmp_path, monkeypatch):
    from dpgen.privacy import callback

    cfg = tiny_cfg("method.train.steps=6", "privacy.eps=5")
    clean = tmp_path / "clean"
    run_pipeline(cfg, clean)

    crashed = tmp_path / "crashed"
    original = callback.PrivacyAccountantCallback.on_train_batch_end

    def crash_at_step_5(self, trainer, *args):
        original(self, trainer, *args)
        if trainer.global_step == 5:
            raise _Crash("simulated crash")

    monkeypatch.setattr(callback.PrivacyAccountantCallback, "on_train_batch_end", crash_at_step_5)
    with pytest.raises(_Crash):
        run_pipeline(cfg, crashed)
    assert (crashed / "checkpoints" / "last.ckpt").exists()
    assert not (crashed / "model.pt").exists()
    monkeypatch.setattr(callback.PrivacyAccountantCallback, "on_train_batch_end", original)

    ctx = run_pipeline(cfg, crashed)
    assert ctx.ledger.steps_spent("dp_train") == 6
    a = json.loads((clean / "privacy.json").read_text())
    b = json.loads((crashed / "privacy.json").read_text())
    assert a["events"] == b["events"]
    assert a["epsilon_spent"] == pytest.approx(b["epsilon_spent"])
    ckpt = torch.load(crashed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6


def test_resume_refuses_a_different_config(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run_pipeline(tiny_cfg("method=nonprivate"), run_dir)
    with pytest.raises(ValueError, match="different configuration"):
        run_pipeline(tiny_cfg("method=nonprivate", "seed=3"), run_dir)
