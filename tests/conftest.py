"""Shared fixtures: composing the real Hydra config with tiny, fast overrides."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.insert(0, str(Path(__file__).parent))  # tests/dp_helpers.py

torch.set_num_threads(min(2, os.cpu_count() or 1))

# CUDA-only tests: marked `gpu`, skipped cleanly where no CUDA device is visible (CI).
NEEDS_CUDA = (pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


def on_cuda(*values: object) -> object:
    """A parametrize case that runs only with CUDA."""
    return pytest.param(*values, marks=NEEDS_CUDA)


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def tiny_overrides(tmp: Path) -> list[str]:
    """A run that exercises every stage in seconds: tiny UNet at 8x8, a few steps."""
    return [
        f"paths.cache_dir={tmp / 'cache'}",
        f"paths.data_root={tmp / 'data'}",
        "model=unet_tiny",
        "data.image_size=8",
        "public.samples_per_class=8",
        "method.multiplicity=2",
        "method.train.steps=4",
        "method.train.batch_size=64",
        "method.pretrain_public.steps=3",
        "method.pretrain_public.batch_size=16",
        "privacy.max_physical_batch=32",
        "trainer.checkpoint_every_n_steps=2",
        "sample.num_samples=20",
        "sample.steps=2",
        "eval=fast",
    ]


def tiny_dpldm_overrides(tmp: Path) -> list[str]:
    """The tiny run for ``method=dpldm``: a latent model, public pretraining of a few steps."""
    base = [o for o in tiny_overrides(tmp) if not o.startswith(("model=", "method.pretrain_public."))]
    return [*base, "method=dpldm", "model=ldm_tiny",
            "method.pretrain_autoencoder.steps=3", "method.pretrain_autoencoder.batch_size=16",
            "method.pretrain_ldm.steps=3", "method.pretrain_ldm.batch_size=16"]


def finished_run(root: Path, *overrides: str, private: bool = True) -> Path:
    """``root/run``: a finished tiny run written in the real run-directory formats (its config,
    untrained final weights, every stage done and, ``private``, a DP ledger), in a second or so."""
    from dpgen.io import save_torch, write_json
    from dpgen.privacy.ledger import PlannedStage, PrivacyLedger
    from dpgen.stages.training import build_module

    cfg = compose_config(tiny_overrides(root / "work") + list(overrides))
    run = root / "run"
    run.mkdir(parents=True)
    OmegaConf.save(cfg, run / "run_config.yaml", resolve=True)
    save_torch(run / "model.pt", build_module(cfg).generator_state_dict())
    write_json(run / "stages.json", {"completed": list(cfg.method.stages), "wall_s": {}})
    if private:
        ledger = PrivacyLedger(epsilon_target=5.0, delta=1e-5, dataset_size=4000)
        ledger.plan([PlannedStage("dp_train", "poisson_subsampled_gaussian", sample_rate=64 / 4000, count=4,
                                  noise_multiplier=1.0)])
        ledger.record("dp_train", "poisson_subsampled_gaussian", 1.0, 64 / 4000, count=4)
        ledger.write(run / "privacy.json")
    return run


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*extra: str) -> DictConfig:
        return compose_config(tiny_overrides(tmp_path) + list(extra))

    return make
