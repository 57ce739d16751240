"""The ``eval`` and ``audit`` groups are checked before any work, with messages that name the full
key and a fix that works when pasted."""

from __future__ import annotations

import pytest
from conftest import compose_config, tiny_overrides
from omegaconf import OmegaConf

from dpgen.config import validate_config
from dpgen.errors import ConfigError
from dpgen.eval.config import validate_audit_config, validate_eval_config, validate_utility_sizes
from dpgen.pipeline import run_pipeline


@pytest.fixture
def cfg(tmp_path):
    return compose_config(tiny_overrides(tmp_path))


def _refused(node, key, value, check) -> str:
    bad = node.copy()
    OmegaConf.update(bad, key, value)
    with pytest.raises(ConfigError) as err:
        check(bad)
    return str(err.value)


@pytest.mark.parametrize(("key", "value", "fix"), [
    ("fid.metrics", ["fid", "foo"], "Fix: e.g. eval.fid.metrics=[fid,kid,isc,prc]"),
    ("downstream.classifiers", ["cnnn"], "Fix: e.g. eval.downstream.classifiers=[cnn,resnet,mlp]"),
])
def test_a_list_of_names_suggests_its_full_key(cfg, key, value, fix):
    message = _refused(cfg.eval, key, value, lambda e: validate_eval_config(e, cfg.sample.num_samples, cfg.data.num_classes))
    assert message.startswith(f"eval.{key}=") and fix in message


def test_loss_score_timesteps_must_lie_below_the_runs_diffusion_steps(cfg, tmp_path):
    """Checked with the audit group itself, so ``python -m dpgen.evaluate`` (which validates the
    audit group alone) refuses them too instead of failing with an IndexError after the audit's work."""
    validate_audit_config(cfg.audit, 1000)
    message = _refused(cfg.audit, "loss_score.timesteps", [10, 5000], lambda a: validate_audit_config(a, 1000))
    assert message.startswith("audit.loss_score.timesteps=[10, 5000]: must lie below "
                              "diffusion.num_train_timesteps=1000. Fix:")
    with pytest.raises(ConfigError, match=r"^audit\.loss_score\.timesteps=.*num_train_timesteps=400"):
        # (The timestep law's intervals must then lie below 400 too, or they are refused first.)
        validate_config(compose_config([*tiny_overrides(tmp_path), "diffusion.num_train_timesteps=400",
                                        "method.timesteps.kind=uniform"]))


@pytest.mark.parametrize(("key", "value"), [
    ("downstream.lr", -1), ("downstream.lr", 0), ("fid.glyphnet.lr", -5), ("fid.heldout", "maybe"),
    ("fid.glyphnet.seed", None), ("fid.glyphnet.seed", -1)])
def test_learning_rates_and_the_heldout_switch_are_checked(cfg, key, value):
    message = _refused(cfg.eval, key, value, lambda e: validate_eval_config(e, cfg.sample.num_samples, cfg.data.num_classes))
    assert message.startswith(f"eval.{key}={value!r}: ") and "Fix:" in message


def _study(cfg, **utility):
    e = cfg.eval.copy()
    OmegaConf.update(e, "utility_study", True)
    for key, value in utility.items():
        OmegaConf.update(e, f"utility.{key}", value)
    validate_eval_config(e, cfg.sample.num_samples, cfg.data.num_classes)  # N is not known here: every multiple > 0 passes
    return e


def test_utility_sizes_leave_one_training_image_per_class_beside_the_validation_split(cfg):
    """N = 4000, 10 classes, eval=fast's val_fraction 0.2: 12 images keep 10 for training
    (11 keep 9); 0.0001 x N gives none at all."""
    validate_utility_sizes(_study(cfg, size_multiples=[0.003, 1], selection_multiple=0.0029), 4000, 10)
    for key, value in (("size_multiples", [0.0001]), ("size_multiples", [1, 0.0027]), ("selection_multiple", 0.0001)):
        with pytest.raises(ConfigError) as err:
            validate_utility_sizes(_study(cfg, **{key: value}), 4000, 10)
        message = str(err.value)
        assert message.startswith(f"eval.utility.{key}=") and "at least 12" in message
        assert message.endswith("Fix: use multiples of at least 0.003")
    validate_utility_sizes(cfg.eval, 4000, 10)  # the study is off: nothing to check


def test_a_run_whose_utility_study_gets_too_few_images_is_refused_before_its_first_stage(tmp_path):
    cfg = compose_config([*tiny_overrides(tmp_path), "eval.utility_study=true", "eval.utility.size_multiples=[0.0001]"])
    validate_config(cfg)
    with pytest.raises(ConfigError, match=r"^eval\.utility\.size_multiples=\[0\.0001\]: .* gives 0 synthetic images"):
        run_pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "stages.json").exists() and not (tmp_path / "run" / "privacy.json").exists()
