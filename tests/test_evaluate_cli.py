"""``python -m dpgen.evaluate``: a finished run evaluated again with today's evaluation config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_config, tiny_overrides
from omegaconf import OmegaConf

from dpgen.evaluate import evaluation_config, main
from dpgen.io import save_torch, write_json
from dpgen.stages.sample import to_uint8_hwc
from dpgen.stages.training import build_module


@pytest.fixture
def old_run(tmp_path):
    """A finished run whose saved config predates today's eval group (as the README's default run)."""
    cfg = compose_config(tiny_overrides(tmp_path) + ["method=nonprivate"])
    run = tmp_path / "run"
    run.mkdir()
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["eval"] = {"classifier": "cnn", "epochs": 8, "batch_size": 64, "lr": 0.001, "val_fraction": 0.1}
    OmegaConf.save(OmegaConf.create(saved), run / "run_config.yaml")
    save_torch(run / "model.pt", build_module(cfg).generator_state_dict())
    np.savez(run / "samples.npz", images=to_uint8_hwc(torch.rand(20, 1, 8, 8) * 2 - 1),
             labels=(np.arange(20) % 10).astype(np.int64))
    write_json(run / "stages.json", {"completed": list(cfg.method.stages), "wall_s": {"train": 3.0}})
    return run


def test_reevaluates_a_run_with_todays_evaluation(old_run):
    main([str(old_run), "eval.fid.metrics=[]", "eval.reference=false", "eval.downstream.classifiers=[mlp]",
          "eval.downstream.epochs=1"])
    metrics = json.loads((old_run / "metrics.json").read_text())
    assert set(metrics["downstream_accuracy"]) == {"mlp", "mean"} and metrics["train_wall_s"] == 3.0
    used = OmegaConf.load(old_run / "evaluate_config.yaml")
    assert set(used) == {"eval", "audit"} and used.audit.mia.max_examples > 0
    assert used.eval.downstream.classifiers == ["mlp"] and used.eval.utility_study is False
    assert used.eval.cache_dir == f"{OmegaConf.load(old_run / 'run_config.yaml').paths.cache_dir}/eval"


def test_refuses_a_run_directory_another_process_is_running_in(old_run):
    """A resumed run's own evaluate writes metrics.json too."""
    from filelock import FileLock

    from dpgen.pipeline import RUN_LOCK

    with FileLock(old_run / RUN_LOCK), pytest.raises(SystemExit, match="another dpgen process is running in it"):
        main([str(old_run), "eval.fid.metrics=[]", "eval.reference=false", "eval.downstream.classifiers=[mlp]"])
    assert not (old_run / "metrics.json").exists()


def test_settings_that_differ_from_the_runs_own_unasked_are_named(tmp_path, caplog):
    """A run made with eval=fast is scored with today's default unless told: say which settings
    changed, since comparing with the run's first numbers is often the point."""
    run = tmp_path / "run"
    run.mkdir()
    OmegaConf.save(compose_config(tiny_overrides(tmp_path)), run / "run_config.yaml", resolve=True)  # eval=fast
    with caplog.at_level("WARNING", logger="dpgen"):
        evaluation_config(run, ["eval.downstream.epochs=3"])
    warned = [r.getMessage() for r in caplog.records if "differs from the run's own" in r.getMessage()]
    assert len(warned) == 1 and "eval.fid.kid_subsets: 10 -> 100" in warned[0]
    assert "eval.downstream.epochs" not in warned[0] and "audit." not in warned[0]  # asked for; unchanged
    caplog.clear()
    with caplog.at_level("WARNING", logger="dpgen"):
        evaluation_config(run, ["eval=fast"])
    assert "differs from the run's own" not in caplog.text


def test_a_run_older_than_the_audit_group_gets_todays_audit_settings(old_run):
    cfg = evaluation_config(old_run, ["eval.audit=true", "audit.mia.max_examples=50"])
    assert cfg.eval.audit is True and cfg.audit.mia.max_examples == 50 and cfg.audit.replication.pairs == 32


@pytest.mark.parametrize(("overrides", "expected"), [
    (["privacy.eps=1"], "only the evaluation"),
    (["eval.downstream.epochs=0"], "eval.downstream.epochs"),
    (["eval.audit=true", "audit.loss_score.timesteps=[5000]"], "below diffusion.num_train_timesteps=1000"),
    (["eval.utility_study=true", "eval.utility.size_multiples=[0.0001]"], "gives 0 synthetic images"),
    # overrides Hydra cannot apply: one line naming the override, not Hydra's traceback
    (["eval.reference=false", "eval.fid.metricss=[fid]"], "eval.fid.metricss='[fid]': no such key"),
    (["eval=nosuch"], "eval='nosuch': no such option of config group eval. Fix: use one of default, fast"),
    (["eval.fid.metrics=[fid"], "eval.fid.metrics='[fid': is not a valid override"),
    (["+eval.fid.metricss=[fid]"], "no dpgen config defines this key"),  # Hydra would add it, unread
    # paths.* were merged whatever their key: a typo was accepted and never read
    (["paths.cache_dri=/elsewhere"], "paths.cache_dri='/elsewhere': no path setting of this run has this key, "
                                     "so the evaluation would ignore it. Fix: did you mean paths.cache_dir=...?"),
    (["+paths.foo=1"], "paths.foo='1': no path setting of this run has this key"),
])
def test_refuses_changes_beyond_the_evaluation(old_run, overrides, expected):
    with pytest.raises(SystemExit) as exc:
        main([str(old_run), *overrides])
    assert str(exc.value.code).startswith("dpgen.evaluate: ") and expected in str(exc.value.code)
    assert "\n" not in str(exc.value.code)
    assert not (old_run / "metrics.json").exists()


# An evaluation quick enough to reach the files that the checks exist for, had they not refused it.
QUICK = ["eval.fid.metrics=[]", "eval.reference=false", "eval.downstream.classifiers=[mlp]", "eval.downstream.epochs=1"]


@pytest.mark.parametrize(("broken", "overrides", "expected"), [
    ({"run_config.yaml": "seed: 0\nmethod: [unclosed\n"}, [], "run_config.yaml: unreadable (expected"),
    ({"run_config.yaml": ""}, [], "run_config.yaml: empty"),
    ({"stages.json": "{"}, [], "stages.json: unreadable"),
    # read after the downstream classifiers trained
    ({"privacy.json": '{"epsilon_spent": 1.0,\n'}, [], "privacy.json: unreadable"),
    # read by the audit after downstream training and FID
    ({"model.pt": None}, ["eval.audit=true"], "model.pt: missing. Fix: restore it from a copy of the run, or leave "
                                              "eval.audit and eval.utility_study off"),
    ({"samples.npz": None}, [], "samples.npz: missing. Fix: sample the run again"),
    ({"samples.npz": b"PK\x03\x04"}, [], "samples.npz: unreadable (File is not a zip file)"),
    ({"protection.json": "["}, [], "protection.json: unreadable"),
])
def test_refuses_a_run_whose_files_the_evaluation_cannot_read(old_run, broken, overrides, expected):
    for name, content in broken.items():
        if content is None:
            (old_run / name).unlink()
        elif isinstance(content, bytes):
            (old_run / name).write_bytes(content)
        else:
            (old_run / name).write_text(content)
    with pytest.raises(SystemExit) as exc:
        main([str(old_run), *QUICK, *overrides])
    message = str(exc.value.code)
    assert message.startswith(f"dpgen.evaluate: {old_run}/") and expected in message and "\n" not in message
    assert not (old_run / "metrics.json").exists()


def test_a_private_run_is_evaluated_only_with_its_ledger(old_run, tmp_path):
    """Without privacy.json a DP run's metrics.json would state no ε and no guarantee, as if it had none."""
    cfg = OmegaConf.load(old_run / "run_config.yaml")
    cfg.method = compose_config(tiny_overrides(tmp_path)).method  # DP-SGD (dpdm)
    OmegaConf.save(cfg, old_run / "run_config.yaml")
    with pytest.raises(SystemExit, match=r"^dpgen\.evaluate: .*: no privacy\.json, so the guarantee of method dpdm "
                                         r"cannot be stated\. Fix: restore privacy\.json"):
        main([str(old_run), *QUICK])
    write_json(old_run / "privacy.json", {"epsilon_spent": "1.0", "epsilon_target": 5.0, "delta": 1e-5})
    with pytest.raises(SystemExit, match="epsilon_spent='1.0' is not a finite number"):
        main([str(old_run), *QUICK])
    assert not (old_run / "metrics.json").exists()
