"""The ``eval`` and ``audit`` groups are checked before any work, with messages that name the full
key and a fix that works when pasted."""

from __future__ import annotations

import pytest
from conftest import compose_config, tiny_overrides
from omegaconf import OmegaConf

from dpgen.config import validate_config
from dpgen.errors import ConfigError
from dpgen.eval.config import validate_audit_config, validate_eval_config


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
    message = _refused(cfg.eval, key, value, lambda e: validate_eval_config(e, cfg.sample.num_samples))
    assert message.startswith(f"eval.{key}=") and fix in message


def test_loss_score_timesteps_must_lie_below_the_runs_diffusion_steps(cfg, tmp_path):
    """Checked with the audit group itself, so ``python -m dpgen.evaluate`` (which validates the
    audit group alone) refuses them too instead of failing with an IndexError after the audit's work."""
    validate_audit_config(cfg.audit, 1000)
    message = _refused(cfg.audit, "loss_score.timesteps", [10, 5000], lambda a: validate_audit_config(a, 1000))
    assert message.startswith("audit.loss_score.timesteps=[10, 5000]: must lie below "
                              "diffusion.num_train_timesteps=1000. Fix:")
    with pytest.raises(ConfigError, match=r"^audit\.loss_score\.timesteps=.*num_train_timesteps=400"):
        validate_config(compose_config([*tiny_overrides(tmp_path), "diffusion.num_train_timesteps=400"]))
