"""A run's formal guarantee follows from the stages it runs, not from a config flag: every stage
that reads the sensitive images without DP voids it, in privacy.json, the release and W&B."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from dpgen.config import validate_config
from dpgen.errors import ConfigError
from dpgen.loggers.run import _run_name
from dpgen.pipeline import RunContext
from dpgen.privacy.guarantee import (
    CPSAMPLE_NO_GUARANTEE,
    NO_GUARANTEE,
    guarantee_notes,
    has_formal_guarantee,
    training_is_private,
)
from dpgen.stages.planning import plan_privacy


def test_shipped_methods_and_sampling_get_the_guarantee_their_stages_give(tiny_cfg, tmp_path):
    assert has_formal_guarantee(tiny_cfg()) and _run_name(tiny_cfg("privacy.eps=4")) == "dpdm-eps4"
    nonprivate = tiny_cfg("method=nonprivate")
    assert not training_is_private(nonprivate) and guarantee_notes(nonprivate) == [NO_GUARANTEE]
    assert _run_name(nonprivate) == "nonprivate"
    cpsample = tiny_cfg("sampling=cpsample", "privacy.eps=4")
    assert training_is_private(cpsample) and guarantee_notes(cpsample) == [CPSAMPLE_NO_GUARANTEE]
    assert _run_name(cpsample) == "dpdm-eps4-cpsample-no-formal-dp"
    named = tiny_cfg("sampling=cpsample", "logger=wandb", "logger.run_name=mine")
    assert _run_name(named) == "mine-cpsample-no-formal-dp"  # a user's name keeps the warning
    assert _run_name(tiny_cfg("method=nonprivate", "logger=wandb", "logger.run_name=ours-eps1")) == "ours-eps1-nonprivate"
    for method in ("dpldm", "privimage", "feta"):
        cfg = compose_config([f"paths.cache_dir={tmp_path}", f"paths.data_root={tmp_path}", f"method={method}"])
        assert has_formal_guarantee(cfg), method


def test_a_non_private_stage_voids_the_guarantee_whatever_the_method(tiny_cfg, tmp_path):
    """A DP method told to run plain ``train`` plans nothing and must not call itself private."""
    cfg = tiny_cfg("method.stages=[train,sample,evaluate]", "method.pretrain=none")
    validate_config(cfg)
    assert not has_formal_guarantee(cfg)
    assert plan_privacy(RunContext(cfg=cfg, run_dir=tmp_path)) is None
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    assert privacy["formal_guarantee"] is False and privacy["note"] == NO_GUARANTEE
    assert privacy["epsilon_spent"] is None and privacy["events"] == []  # DESIGN's keys, no ε to state


def test_cpsample_by_name_voids_the_guarantee_without_its_stage(tiny_cfg, tmp_path):
    """Its guidance would read a protection classifier an earlier attempt trained."""
    cfg = tiny_cfg("sampling.stages=[]")
    cfg.sampling = OmegaConf.merge(tiny_cfg("sampling=cpsample").sampling, {"stages": []})
    assert guarantee_notes(cfg) == [CPSAMPLE_NO_GUARANTEE]
    ledger = plan_privacy(RunContext(cfg=cfg, run_dir=tmp_path))
    assert ledger is not None and not ledger.formal_guarantee
    assert json.loads((tmp_path / "privacy.json").read_text())["formal_guarantee"] is False


def test_dp_and_non_private_training_cannot_be_mixed(tiny_cfg):
    with pytest.raises(ConfigError, match="mixes DP stages") as err:
        validate_config(tiny_cfg("method.stages=[dp_train,train,sample,evaluate]"))
    assert "method=nonprivate" in str(err.value)


def test_the_flag_is_gone_so_a_config_cannot_claim_a_guarantee(tiny_cfg):
    with pytest.raises(Exception, match="formal_guarantee"):
        tiny_cfg("method=nonprivate", "method.formal_guarantee=true")


def test_every_stage_is_classified_as_dp_non_private_or_public():
    """The guarantee is a denylist of non-private stages: a new stage must be placed on purpose."""
    from dpgen.privacy.guarantee import NON_PRIVATE_STAGES
    from dpgen.stages import STAGE_NAMES
    from dpgen.stages.planning import STAGE_PLANS
    from dpgen.stages.registry import STAGES

    public_or_evaluation = {"pretrain_public", "pretrain_autoencoder", "pretrain_ldm", "train_query_classifier",
                            "pretrain_selected", "warmup", "sample", "evaluate"}
    groups = [set(STAGE_PLANS), set(NON_PRIVATE_STAGES), public_or_evaluation]
    assert set().union(*groups) == set(STAGES)
    assert sum(len(g) for g in groups) == len(STAGES)  # each in exactly one group
    assert sorted(STAGE_NAMES) == sorted(STAGES)  # the names a config is validated against, and no more
