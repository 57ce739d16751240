"""The utility study: selection on synthetic data only, its statistics, and the evaluate stage
running it on a (tiny) run's generator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_config, tiny_overrides
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import Dataset

import dpgen.eval.utility as utility
from dpgen.data import TensorImageDataset, build_dataset
from dpgen.errors import ConfigError
from dpgen.eval.config import validate_eval_config
from dpgen.eval.downstream import TrainSettings
from dpgen.eval.threads import cpu_threads
from dpgen.io import save_torch
from dpgen.pipeline import RunContext
from dpgen.stages.evaluate import UTILITY_PNG, UTILITY_SAMPLES, evaluate
from dpgen.stages.sample import to_uint8_hwc
from dpgen.stages.training import build_module

GRID = {"lr": [1e-3, 3e-3], "epochs": [1, 2], "width": [8], "augment": [False, True]}


@pytest.fixture(scope="module")
def digits():
    """Real digits standing in for synthetic ones (300) and for the held-out split (200)."""
    data = build_dataset({"name": "mnist5k", "root": None, "image_size": 8, "channels": 1,
                          "num_classes": 10, "split_seed": 0, "test_size": 1000}, "train")
    picked = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))  # the split is class-sorted
    synthetic, test = picked[:300], picked[300:500]
    return (data.images[synthetic], data.labels[synthetic],
            TensorImageDataset(data.images[test], data.labels[test], data.info))


class _Tripwire(Dataset):
    """The held-out split, sealed: any access raises until the reporting step opens it."""

    def __init__(self, inner: Dataset) -> None:
        self.inner, self.open, self.reads = inner, False, 0

    def _check(self) -> None:
        if not self.open:
            raise AssertionError("the held-out split was read before the reporting step")

    def __len__(self) -> int:
        self._check()
        return len(self.inner)

    def __getitem__(self, i):
        self._check()
        self.reads += 1
        return self.inner[i]


def test_selection_runs_on_synthetic_data_and_never_reads_the_held_out_split(digits, monkeypatch):
    images, labels, test = digits
    sealed = _Tripwire(test)
    report = utility._held_out_probabilities

    def reporting_step(models, held_out):
        assert held_out is sealed
        sealed.open = True
        return report(models, held_out)

    monkeypatch.setattr(utility, "_held_out_probabilities", reporting_step)
    with cpu_threads(1):
        study = utility.utility_study(images, labels, sealed, num_classes=10, n_train=100, multiples=[1, 3],
                                      classifiers=["cnn", "mlp"], settings=TrainSettings(epochs=2, lr=3e-3),
                                      grid_classifier="mlp", grid=GRID, selection_multiple=1, seed=0)
    assert sealed.reads == len(test), "the reporting step reads the held-out split once"
    sel = study["selection"]
    assert len(sel["grid"]) == 8
    val = [g["synthetic_val_accuracy"] for g in sel["grid"]]
    chosen = sel["grid"][val.index(max(val))]
    assert sel["selected"] == {k: chosen[k] for k in utility.GRID_KEYS}
    assert sel["selected_real_accuracy"] == chosen["real_accuracy"] <= sel["best_real_accuracy"]
    assert sel["best_real_accuracy"] == max(g["real_accuracy"] for g in sel["grid"])
    small, large = study["sizes"]
    assert (small["num_samples"], large["num_samples"]) == (100, 300)
    assert set(small["accuracy"]) == {"cnn", "mlp", "mean"} and 0 <= small["ensemble_accuracy"] <= 1
    for size in (small, large):  # the headline member is chosen on synthetic validation data only
        chosen = max(("cnn", "mlp"), key=lambda n: (size["synthetic_val_accuracy"][n], n == "cnn"))
        assert size["val_selected_member"] == chosen
        assert size["val_selected_member_accuracy"] == size["accuracy"][chosen]
        assert size["hindsight_best_member_accuracy"] == max(size["accuracy"]["cnn"], size["accuracy"]["mlp"])


def test_rank_correlations_and_the_ensemble_average_softmax():
    r = utility.rank_correlations([0.1, 0.2, 0.3, 0.4], [0.1, 0.3, 0.2, 0.4])
    assert r["spearman"] == pytest.approx(0.8) and r["kendall"] == pytest.approx(2 / 3)
    assert utility.rank_correlations([0.5, 0.5], [0.1, 0.2]) == {"spearman": None, "kendall": None}

    class _Member:
        def __init__(self, name, val):
            self.name, self.val_accuracy = name, val

    # Two members, each right on a different half; the averaged softmax is right on both halves.
    targets = torch.tensor([0, 0, 1, 1])
    a = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    b = torch.tensor([[0.4, 0.6], [0.4, 0.6], [0.1, 0.9], [0.1, 0.9]])
    run = utility._SizeRun(1, 4, [_Member("a", 0.7), _Member("b", 0.6)])
    report = utility._size_report(run, {"1/a": a, "1/b": b}, targets)
    assert report["accuracy"]["a"] == report["accuracy"]["b"] == 0.5 and report["ensemble_accuracy"] == 1.0
    assert report["val_selected_member"] == "a"


def test_utility_config_is_checked_before_any_work(tmp_path):
    cfg = compose_config(tiny_overrides(tmp_path) + ["eval.utility_study=true"])
    validate_eval_config(cfg.eval, cfg.sample.num_samples, cfg.data.num_classes)
    for key, value in (("utility.size_multiples", []), ("utility.grid.epochs", [0]),
                       ("utility.grid.augment", ["maybe"]), ("utility.grid_classifier", "vit")):
        bad = cfg.eval.copy()
        OmegaConf.update(bad, key, value)
        with pytest.raises(ConfigError, match=key[len("utility."):].replace(".", r"\.")):
            validate_eval_config(bad, cfg.sample.num_samples, cfg.data.num_classes)


def test_evaluate_runs_the_study_on_the_generator(tmp_path):
    """N = 4000 training digits; multiples of 1 % and 2 % keep it to 80 generated samples."""
    cfg = compose_config(tiny_overrides(tmp_path) + [
        "method=nonprivate", "eval.utility_study=true", "eval.fid.metrics=[]", "eval.downstream.classifiers=[mlp]",
        "eval.utility.size_multiples=[0.01,0.02]", "eval.utility.selection_multiple=0.01",
        "eval.utility.sample_shard_size=50", "eval.utility.grid_classifier=mlp",
        "eval.utility.grid.lr=[0.001,0.003]", "eval.utility.grid.epochs=[1]", "eval.utility.grid.width=[16]",
        "eval.utility.grid.augment=[false]"])
    run = tmp_path / "run"
    ctx = RunContext(cfg=cfg, run_dir=run)
    run.mkdir()
    save_torch(run / "model.pt", build_module(cfg).generator_state_dict())
    labels = torch.arange(20) % 10
    np.savez(run / "samples.npz", images=to_uint8_hwc(torch.rand(20, 1, 8, 8) * 2 - 1), labels=labels.numpy())
    evaluate(ctx)
    study = json.loads((run / "metrics.json").read_text())["utility_study"]
    assert [s["num_samples"] for s in study["sizes"]] == [40, 80] and study["training_split_size"] == 4000
    assert len(study["selection"]["grid"]) == 2 and study["selection"]["num_samples"] == 40
    assert Image.open(run / UTILITY_PNG).size[0] > 100
    shards = sorted((run / UTILITY_SAMPLES).glob("samples-*.npz"))
    assert len(shards) == 2 and sum(len(np.load(s)["labels"]) for s in shards) == 80
