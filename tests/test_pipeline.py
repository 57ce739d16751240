"""End to end through the stage runner: run-directory files, resume, privacy.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_config, tiny_overrides
from omegaconf import OmegaConf

from dpgen.errors import ConfigError
from dpgen.pipeline import _check_resume_config, run_pipeline
from dpgen.privacy.accounting import compute_epsilon
from dpgen.privacy.events import MechanismEvent
from dpgen.stages.training import build_module

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
    assert set(privacy) >= DESIGN_PRIVACY_KEYS and privacy["events"] == [] and privacy["epsilon_spent"] is None
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


def test_resume_after_crash_spends_what_an_uninterrupted_run_spends(tiny_cfg, tmp_path, monkeypatch):
    """Checkpoint at step 4, crash after step 5: the resumed run spends the plan's 6 steps, as an
    uninterrupted one does; step 5 drew its noise, so it stays spent and is not run again."""
    cfg = tiny_cfg("method.train.steps=6", "privacy.eps=5")
    clean = tmp_path / "clean"
    run_pipeline(cfg, clean)

    _, crashed = _crashed_run(tiny_cfg, tmp_path, monkeypatch, 5, "method.train.steps=6")
    assert (crashed / "checkpoints" / "last.ckpt").exists()
    assert not (crashed / "model.pt").exists()

    ctx = run_pipeline(cfg, crashed)
    assert ctx.ledger.steps_spent("dp_train") == 6
    a = json.loads((clean / "privacy.json").read_text())
    b = json.loads((crashed / "privacy.json").read_text())
    assert a["events"] == b["events"]
    assert a["epsilon_spent"] == pytest.approx(b["epsilon_spent"])
    ckpt = torch.load(crashed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 5  # 4 restored + the plan's sixth


def _crash_at(monkeypatch, step):
    from dpgen.privacy import callback

    original = callback.PrivacyAccountantCallback.on_train_batch_end

    def crashing(self, trainer, *args):
        original(self, trainer, *args)
        if trainer.global_step == step:
            raise _Crash("simulated crash")

    monkeypatch.setattr(callback.PrivacyAccountantCallback, "on_train_batch_end", crashing)
    return lambda: monkeypatch.setattr(callback.PrivacyAccountantCallback, "on_train_batch_end", original)


def _crashed_run(tiny_cfg, tmp_path, monkeypatch, step, *overrides):
    """A run that crashed right after DP step ``step``; the crash is then switched off."""
    cfg = tiny_cfg("privacy.eps=5", *overrides)
    run_dir = tmp_path / "run"
    restore = _crash_at(monkeypatch, step)
    with pytest.raises(_Crash):
        run_pipeline(cfg, run_dir)
    restore()
    return cfg, run_dir


def _spent(run_dir):
    return sum(e["steps"] for e in json.loads((run_dir / "privacy.json").read_text())["events"])


def test_resume_keeps_steps_that_privacy_json_recorded_after_the_last_checkpoint(tiny_cfg, tmp_path,
                                                                                  monkeypatch, caplog):
    """Checkpoint at step 4, privacy.json at step 5, crash: step 5's spend stays spent (the
    checkpoint's older ledger must not replace it), the weights resume from step 4 and get one
    more step, the plan's sixth, so privacy.json ends at exactly 6 steps, as executed."""
    cfg, run_dir = _crashed_run(tiny_cfg, tmp_path, monkeypatch, 5, "method.train.steps=6",
                                "privacy.log_every_n_steps=5", "trainer.checkpoint_every_n_steps=2")
    assert _spent(run_dir) == 5
    with caplog.at_level("WARNING"):
        ctx = run_pipeline(cfg, run_dir)
    assert "1 steps ran after the last checkpoint" in caplog.text
    assert ctx.ledger.steps_spent("dp_train") == 6 == _spent(run_dir)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 5  # 4 restored + 1: the lost step is not re-run on top of the plan


def test_no_dp_step_is_re_run_uncharged_after_a_crash(tiny_cfg, tmp_path, monkeypatch, caplog):
    """Checkpoint at step 3, privacy.json only at the start, crash after step 5: steps 4 and 5 drew
    their noise, so a resume may not draw them again. Every noise draw, across both attempts,
    is one charged step (the spend journal has each step before its noise)."""
    from dpgen.privacy import strategy
    from dpgen.privacy.journal import JOURNAL, read_spend

    draws = []
    original = strategy.add_gaussian_noise

    def noise(*args, **kwargs):
        draws.append(1)
        journaled = read_spend(tmp_path / "run" / JOURNAL)  # on disk before this draw
        assert journaled is not None and sum(e["steps"] for e in journaled["events"]) == len(draws)
        return original(*args, **kwargs)

    monkeypatch.setattr(strategy, "add_gaussian_noise", noise)
    cfg, run_dir = _crashed_run(tiny_cfg, tmp_path, monkeypatch, 5, "method.train.steps=7",
                                "privacy.log_every_n_steps=10", "trainer.checkpoint_every_n_steps=3")
    assert len(draws) == 5 and _spent(run_dir) == 0  # privacy.json is behind; the journal is not
    with caplog.at_level("WARNING"):
        ctx = run_pipeline(cfg, run_dir)
    assert "2 steps ran after the last checkpoint" in caplog.text
    assert len(draws) == 7 == ctx.ledger.steps_spent("dp_train") == _spent(run_dir)


def test_resume_without_a_checkpoint_restarts_the_weights_with_what_the_plan_has_left(tiny_cfg, tmp_path,
                                                                                       monkeypatch, caplog):
    cfg, run_dir = _crashed_run(tiny_cfg, tmp_path, monkeypatch, 4, "method.train.steps=6",
                                "privacy.log_every_n_steps=2", "trainer.checkpoint_every_n_steps=100")
    assert _spent(run_dir) == 4 and not (run_dir / "checkpoints" / "last.ckpt").exists()
    with caplog.at_level("WARNING"):
        ctx = run_pipeline(cfg, run_dir)
    assert "4 of 6 steps were spent by an interrupted attempt that left no checkpoint" in caplog.text
    assert ctx.ledger.steps_spent("dp_train") == 6 == _spent(run_dir)


@pytest.mark.parametrize("steps", [4, 5])
def test_a_crash_after_the_last_step_resumes_to_the_average_of_every_step(tiny_cfg, tmp_path, monkeypatch, steps):
    """A checkpoint every two steps, a crash before model.pt is written: the last step is
    checkpointed all the same (5 steps: it used to stop at step 4, and model.pt was rebuilt from
    it), and the resumed stage, with nothing left to train, writes the EMA of every step (4 steps:
    it wrote the trained weights of the checkpoint without their average). The interrupted
    attempt's CSV log is kept."""
    from dpgen.stages import training

    cfg = tiny_cfg("privacy.eps=5", f"method.train.steps={steps}", "trainer.checkpoint_every_n_steps=2")
    run_dir = tmp_path / "run"
    save_final = training._save_final
    monkeypatch.setattr(training, "_save_final", lambda ctx, module: (_ for _ in ()).throw(_Crash("before model.pt")))
    with pytest.raises(_Crash):
        run_pipeline(cfg, run_dir)
    monkeypatch.setattr(training, "_save_final", save_final)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == steps and sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    first_log = (run_dir / "logs" / "dp_train" / "metrics.csv").read_text()

    ctx = run_pipeline(cfg, run_dir)
    assert ctx.ledger.steps_spent("dp_train") == steps == _spent(run_dir)
    final = torch.load(run_dir / "model.pt", map_location="cpu")
    average, trained = build_module(cfg), build_module(cfg)
    average.load_state_dict(ckpt["state_dict"])
    trained.load_state_dict(ckpt["current_model_state"])
    assert all(torch.equal(v, final[k]) for k, v in average.generator_state_dict().items())
    if steps == 4:  # saved at the step, before WeightAveraging's copy: the trained weights are not the average
        assert any(not torch.equal(v, final[k]) for k, v in trained.generator_state_dict().items())
    assert (run_dir / "logs" / "dp_train" / "metrics-attempt1.csv").read_text() == first_log


def test_a_second_process_in_a_running_run_directory_is_refused(tiny_cfg, tmp_path):
    """Both would spend what the ledger has left and overwrite each other's privacy.json."""
    from filelock import FileLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # The lock held as a running dpgen holds it.
    with FileLock(run_dir / ".dpgen-run.lock"), pytest.raises(ConfigError, match="another dpgen process is running"):
        run_pipeline(tiny_cfg("privacy.eps=5"), run_dir)
    assert not (run_dir / "run_config.yaml").exists()


def test_resume_refuses_when_a_lost_attempt_spent_every_step(tiny_cfg, tmp_path, monkeypatch):
    cfg, run_dir = _crashed_run(tiny_cfg, tmp_path, monkeypatch, 4, "method.train.steps=4",
                                "privacy.log_every_n_steps=2", "trainer.checkpoint_every_n_steps=100")
    with pytest.raises(RuntimeError, match="every planned step was spent"):
        run_pipeline(cfg, run_dir)
    assert _spent(run_dir) == 4 and not (run_dir / "model.pt").exists()


def test_privacy_json_is_written_before_each_sample_grid(tiny_cfg, tmp_path, monkeypatch):
    """A grid released at step 3 reflects three steps: privacy.json must already say so, even
    though its own cadence (every 10 steps) has not come round."""
    _, run_dir = _crashed_run(tiny_cfg, tmp_path, monkeypatch, 3, "method.train.steps=6",
                              "privacy.log_every_n_steps=10", "logger.sample_every_n_steps=3",
                              "trainer.checkpoint_every_n_steps=100")
    assert _spent(run_dir) == 3


def test_resume_refuses_a_different_config(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run_pipeline(tiny_cfg("method=nonprivate"), run_dir)
    with pytest.raises(ValueError, match=r"different configuration \(seed: 0 -> 3\)"):
        run_pipeline(tiny_cfg("method=nonprivate", "seed=3"), run_dir)
    # Every stage finished: the sampling settings are fixed too.
    with pytest.raises(ValueError, match=r"sample.steps: 2 -> 3"):
        run_pipeline(tiny_cfg("method=nonprivate", "sample.steps=3"), run_dir)
    # So they are once DP-FETA's warm-up has previewed its model with them.
    with pytest.raises(ValueError, match=r"sample.steps: 2 -> 3"):
        _check_resume_config(tiny_cfg("method=nonprivate", "sample.steps=3"), run_dir, ["warmup"])
    _check_resume_config(tiny_cfg("method=nonprivate", "sample.steps=3"), run_dir, ["train"])
    # The canary audit never evaluates, and trains on the canaries these settings choose.
    with pytest.raises(ValueError, match=r"audit.canary.kind: 'letters' -> 'mislabeled'"):
        _check_resume_config(tiny_cfg("method=nonprivate", "audit.canary.kind=mislabeled"), run_dir, ["train"])
    _check_resume_config(tiny_cfg("method=nonprivate", "audit.canary.confidence=0.9"), run_dir, ["train"])
    # A resampling whose CPSample classifier failed (out of memory, say) can be given other settings.
    _check_resume_config(tiny_cfg("method=nonprivate", "sampling=cpsample"), run_dir, ["train"])
    with pytest.raises(ValueError, match=r"sampling.classifier.batch_size: '<unset>' -> 128"):
        _check_resume_config(tiny_cfg("method=nonprivate", "sampling=cpsample"), run_dir,
                             ["train", "train_protection_classifier"])
    # Logging shapes no output; a refusal names the privacy plan, data, method and seed first.
    _check_resume_config(tiny_cfg("method=nonprivate", "logger=wandb"), run_dir, ["train", "sample", "evaluate"])
    with pytest.raises(ValueError, match=r"\(seed: 0 -> 3; audit.canary.kind"):
        _check_resume_config(tiny_cfg("method=nonprivate", "seed=3", "audit.canary.kind=mislabeled"), run_dir,
                             ["train"])
    # A run saved with the retired formal_guarantee flags (older dpgen versions) still resumes.
    saved = OmegaConf.load(run_dir / "run_config.yaml")
    saved.method.formal_guarantee, saved.sampling.formal_guarantee = False, True
    OmegaConf.save(saved, run_dir / "run_config.yaml")
    _check_resume_config(tiny_cfg("method=nonprivate"), run_dir, ["train", "sample", "evaluate"])


def test_a_sampling_setting_that_failed_after_dp_training_can_be_corrected_on_resume(tiny_cfg, tmp_path,
                                                                                     monkeypatch):
    """The trained model and the ε it cost are kept: sample settings shape no output until
    sample runs. The privacy plan still cannot change."""
    from dpgen.stages import registry as stages

    original = stages.STAGES["sample"]

    def failing(ctx):
        raise RuntimeError("a sampler failure")

    monkeypatch.setitem(stages.STAGES, "sample", failing)
    run_dir = tmp_path / "run"
    cfg = tiny_cfg("privacy.eps=5", "method.stages=[pretrain_public,dp_train,sample]")
    with pytest.raises(RuntimeError, match="a sampler failure"):
        run_pipeline(cfg, run_dir)
    spent = _spent(run_dir)
    monkeypatch.setitem(stages.STAGES, "sample", original)
    with pytest.raises(ValueError, match=r"privacy.eps: 5 -> 4"):
        run_pipeline(tiny_cfg("privacy.eps=4", "method.stages=[pretrain_public,dp_train,sample]"), run_dir)
    run_pipeline(tiny_cfg("privacy.eps=5", "method.stages=[pretrain_public,dp_train,sample]", "sample.steps=3"),
                 run_dir)
    assert _spent(run_dir) == spent == 4 and (run_dir / "samples.npz").exists()
    assert OmegaConf.load(run_dir / "run_config.yaml").sample.steps == 3


def test_a_run_refused_by_its_privacy_plan_leaves_nothing_that_blocks_the_corrected_run(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"privacy\.delta"):
        run_pipeline(tiny_cfg("privacy.delta=0.001"), run_dir)  # delta >= 1/N
    assert not (run_dir / "run_config.yaml").exists()
    _check_resume_config(tiny_cfg("privacy.delta=1e-5"), run_dir, [])  # a fresh run, not a changed resume


def test_a_resume_removes_the_unfinished_writes_of_a_killed_attempt_only(tiny_cfg, tmp_path):
    """A kill during an atomic write leaves its temporary file (a partial checkpoint can be as
    large as the model); the next attempt removes it, but never a write this attempt's other
    ranks may have in progress (newer than its start)."""
    import os
    import time

    run_dir = tmp_path / "run"
    killed = [run_dir / "checkpoints" / ".last.ckpt.x1y2.tmp", run_dir / ".privacy.json.abc.tmp"]
    in_progress = run_dir / ".samples.npz.def.tmp"
    kept = run_dir / "notes.tmp"  # not an atomic write's name
    for path in [*killed, in_progress, kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    for path in [*killed, kept]:
        os.utime(path, (time.time() - 60, time.time() - 60))
    os.utime(in_progress, (time.time() + 60, time.time() + 60))
    cfg = tiny_cfg("privacy.delta=0.001")
    with pytest.raises(ConfigError, match=r"privacy\.delta"):  # refused by its plan, after the lock
        run_pipeline(cfg, run_dir)
    assert all(p.exists() for p in killed)  # no run_config.yaml: not (yet) a run's directory, not dpgen's to clean
    OmegaConf.save(cfg, run_dir / "run_config.yaml", resolve=True)
    with pytest.raises(ConfigError, match=r"privacy\.delta"):
        run_pipeline(cfg, run_dir)
    assert [p.exists() for p in killed] == [False, False]
    assert in_progress.exists() and kept.exists()


def test_resume_refuses_a_checkpoint_that_trained_another_parameter_set(tmp_path):
    from dpgen.stages.training import _check_checkpoint_trains_the_same_parameters

    module = build_module(compose_config(tiny_overrides(tmp_path)))
    n = len(module.trainable_parameters())
    path = tmp_path / "last.ckpt"
    torch.save({"optimizer_states": [{"param_groups": [{"params": list(range(n + 3))}]}]}, path)
    with pytest.raises(ValueError, match=f"trained {n + 3} parameter tensors, this dpgen trains {n}"):
        _check_checkpoint_trains_the_same_parameters(str(path), module, "dp_train")
    torch.save({"optimizer_states": [{"param_groups": [{"params": list(range(n))}]}]}, path)
    _check_checkpoint_trains_the_same_parameters(str(path), module, "dp_train")


def test_the_hydra_record_is_published_only_from_a_hydra_run_of_this_directory(tmp_path, monkeypatch):
    """A config composed by a tool or a test (``return_hydra_config=True``) leaves Hydra's
    singleton set without a runtime.output_dir; a run started afterwards must not fail on it
    (the whole suite did, in this order)."""
    from dpgen import pipeline

    attempt = tmp_path / ".hydra" / "2026-11-24_15-00-00"
    attempt.mkdir(parents=True)
    (attempt / "overrides.yaml").write_text("- privacy.eps=4\n")
    monkeypatch.setattr(pipeline.HydraConfig, "initialized", staticmethod(lambda: True))
    for runtime in ("???", str(tmp_path / "elsewhere"), str(tmp_path)):
        hydra = OmegaConf.create({"output_subdir": ".hydra/2026-11-24_15-00-00", "runtime": {"output_dir": runtime}})
        monkeypatch.setattr(pipeline.HydraConfig, "get", staticmethod(lambda hydra=hydra: hydra))
        pipeline._publish_hydra_record(tmp_path)
        published = tmp_path / ".hydra" / "overrides.yaml"
        assert published.exists() == (runtime == str(tmp_path))
    assert published.read_text() == "- privacy.eps=4\n"
