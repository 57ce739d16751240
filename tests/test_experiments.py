"""The paper-setting experiments (conf/experiment/, documented in experiments/README.md):
every one composes and validates against a dataset root in its real on-disk format, and one
per method runs a few DP steps on such a fixture, at the experiment's image shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF, compose_config
from data_fixtures import make_celeba_root, make_cifar_root, make_image_folder, make_mnist_root

from dpgen.config import validate_config
from dpgen.pipeline import run_pipeline

EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix(""))
                     for p in (CONF / "experiment").rglob("*.yaml"))
DATASETS = ("mnist", "fashion_mnist", "cifar10", "celeba32", "celeba64", "camelyon17")
METHODS = ("dpdm", "dpldm", "privimage", "feta")
# The stages that spend privacy, per method, in the order the ledger records them.
SPENDING_STAGES = {"dpdm": ["dp_train"], "dpldm": ["dp_finetune"], "privimage": ["dp_semantic_query", "dp_train"],
                   "feta": ["dp_central_images", "dp_train"]}
# Each method's stages cut to the training and sampling, with a tiny version of every stage.
TINY = {
    "dpdm": ["model=unet_tiny", "method.stages=[dp_train,sample]"],
    "dpldm": ["model=ldm_tiny", "public.samples_per_class=2", "method.stages=[pretrain_autoencoder,pretrain_ldm,"
              "dp_finetune,sample]", "method.pretrain_autoencoder.steps=2", "method.pretrain_ldm.steps=2",
              "method.pretrain_autoencoder.batch_size=16", "method.pretrain_ldm.batch_size=16"],
    "privimage": ["model=unet_tiny", "public.samples_per_class=2", "method.query_classifier.epochs=1",
                  "method.stages=[train_query_classifier,dp_semantic_query,pretrain_selected,dp_train,sample]",
                  "method.pretrain_public.steps=2", "method.pretrain_public.batch_size=16"],
    "feta": ["model=unet_tiny", "method.central.rounds=2", "method.warmup.batch_size=16",
             "method.warmup.curriculum=[{steps:2,blur:1.0}]", "method.stages=[dp_central_images,warmup,dp_train,sample]"],
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("roots")
    make_mnist_root(base / "mnist")
    make_mnist_root(base / "fashion_mnist", folder="FashionMNIST")
    make_cifar_root(base / "cifar10")
    make_celeba_root(base / "celeba", n=12)
    make_image_folder(base / "camelyon17", classes=("0", "1"), per_class=4)
    return {"mnist": base / "mnist", "fashion_mnist": base / "fashion_mnist", "cifar10": base / "cifar10",
            "celeba32": base / "celeba", "celeba64": base / "celeba", "camelyon17": base / "camelyon17"}


def test_every_dataset_has_every_method_at_both_budgets():
    expected = sorted(f"{d}/{m}_eps{e}" for d in DATASETS for m in METHODS for e in (1, 10))
    assert expected == EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name, roots, tmp_path):
    cfg = compose_config([f"+experiment={name}", f"data.root={roots[name.split('/')[0]]}",
                          f"paths.cache_dir={tmp_path}"])
    validate_config(cfg)
    method, eps = name.split("/")[1].split("_eps")
    assert cfg.method.name == method and cfg.privacy.eps == float(eps)
    assert cfg.trainer.accelerator == "gpu"  # paper scale; README says how long on what


@pytest.mark.parametrize("name,shape", [("mnist/dpdm_eps10", (28, 28, 1)), ("cifar10/dpldm_eps1", (32, 32, 3)),
                                        ("cifar10/privimage_eps10", (32, 32, 3)),
                                        ("fashion_mnist/feta_eps1", (28, 28, 1))])
def test_experiment_runs_a_few_steps_on_a_fixture(name, shape, roots, tmp_path):
    """The experiment's data, method and privacy settings at the fixture's size, with a tiny
    model and budget (the papers' models and steps need a GPU for hours)."""
    method = name.split("/")[1].split("_eps")[0]
    tiny = ["trainer=cpu", "method.train.steps=2", "method.train.batch_size=16", "method.multiplicity=2",
            "privacy.max_physical_batch=16", "sample.num_samples=20", "sample.steps=2", *TINY[method]]
    cfg = compose_config([f"+experiment={name}", f"data.root={roots[name.split('/')[0]]}",
                          f"paths.cache_dir={tmp_path / 'cache'}", f"paths.data_root={tmp_path}", *tiny])
    validate_config(cfg)
    run_pipeline(cfg, tmp_path / "run")
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert [e["stage"] for e in privacy["events"]] == SPENDING_STAGES[method]
    event = privacy["events"][-1]  # the DP-SGD stage
    assert event["steps"] == 2 and event["sample_rate"] == pytest.approx(16 / 30)
    assert privacy["delta"] == cfg.privacy.delta and privacy["epsilon_spent"] <= cfg.privacy.eps
    with np.load(tmp_path / "run" / "samples.npz") as z:
        assert z["images"].shape == (20, *shape)
