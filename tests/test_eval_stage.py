"""The evaluate stage on samples whose quality is known: real digits with their true labels
(a perfect generator) and with shuffled labels (a useless one)."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import compose_config, tiny_overrides

import dpgen.pipeline
from dpgen.data import TensorImageDataset
from dpgen.eval.fidelity import Fidelity
from dpgen.io import write_json
from dpgen.pipeline import RunContext
from dpgen.stages.evaluate import evaluate
from dpgen.stages.sample import to_uint8_hwc

# The module, not the function that dpgen.stages re-exports under the same name.
evaluate_stage = importlib.import_module("dpgen.stages.evaluate")
N_SAMPLES, N_REAL_TRAIN = 300, 300


def _context(cfg, run_dir, shuffle_labels: bool = False) -> RunContext:
    """A run whose samples.npz holds real training digits; its training split is made small so
    that the real-data references train in seconds."""
    ctx = RunContext(cfg=cfg, run_dir=run_dir)
    train = ctx.train_set
    g = torch.Generator().manual_seed(0)
    picked = torch.randperm(len(train), generator=g)  # the split is class-sorted
    samples, real = picked[:N_SAMPLES], picked[N_SAMPLES:N_SAMPLES + N_REAL_TRAIN]
    labels = train.labels[samples]
    if shuffle_labels:
        labels = labels[torch.randperm(N_SAMPLES, generator=g)]
    run_dir.mkdir(parents=True, exist_ok=True)
    np.savez(run_dir / "samples.npz", images=to_uint8_hwc(train.images[samples]), labels=labels.numpy())
    ctx.train_set = TensorImageDataset(train.images[real], train.labels[real], train.info)
    return ctx


class _Events:
    """Records, in order, the classifier trainings, the openings of the held-out split and the
    fidelity comparisons."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.log: list[tuple] = []
        train, build, compare = evaluate_stage.train_classifiers, dpgen.pipeline.build_dataset, Fidelity.compare

        def spy_train(images, *args, **kwargs):
            self.log.append(("train", len(images)))
            return train(images, *args, **kwargs)

        def spy_build(cfg, split):
            if split == "test":
                self.log.append(("open", split))
            return build(cfg, split)

        def spy_compare(fid, generated, real, metrics):
            self.log.append(("compare", generated, real))
            return compare(fid, generated, real, metrics)

        mp.setattr(evaluate_stage, "train_classifiers", spy_train)
        mp.setattr(dpgen.pipeline, "build_dataset", spy_build)
        mp.setattr(Fidelity, "compare", spy_compare)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Two runs sharing a cache: a perfect generator first, then a useless one."""
    tmp = tmp_path_factory.mktemp("eval")
    # Two classifier families keep it quick; every family is tested in test_eval_downstream.
    cfg = compose_config(tiny_overrides(tmp) + ["method=nonprivate", "eval.reference=true",
                                                "eval.downstream.classifiers=[cnn,mlp]", "eval.downstream.epochs=6",
                                                "eval.downstream.batch_size=32", "eval.downstream.lr=0.003"])
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        events = _Events(mp)
        for name, shuffle in (("perfect", False), ("useless", True)):
            events.log = []
            evaluate(_context(cfg, tmp / name, shuffle_labels=shuffle))
            runs[name] = (json.loads((tmp / name / "metrics.json").read_text()), events.log)
    return runs


def test_heldout_split_is_opened_once_after_every_model_choice(evaluated):
    _, log = evaluated["perfect"]
    trainings_and_opening = [e for e in log if e[0] != "compare"]
    # The synthetic classifiers are trained, and their epochs chosen, before the held-out split
    # exists; what trains afterwards is the real-data reference (on N_REAL_TRAIN images).
    assert trainings_and_opening == [("train", N_SAMPLES), ("open", "test"), ("train", N_REAL_TRAIN)]
    # Second run: the reference comes from the cache; the split still opens once, after training.
    _, log = evaluated["useless"]
    assert [e for e in log if e[0] != "compare"] == [("train", N_SAMPLES), ("open", "test")]


def test_fidelity_names_its_extractor_and_the_reference_is_computed_once(evaluated):
    perfect, log = evaluated["perfect"]
    assert perfect["fid_feature_extractor"] == "glyphnet-v1"
    assert perfect["feature_extractor"]["weights_sha256"]
    assert "public glyphs" in perfect["feature_extractor"]["description"]
    for key in ("fid", "kid_mean", "kid_std", "inception_score_mean", "precision", "recall",
                "fid_heldout", "kid_mean_heldout", "precision_heldout", "recall_heldout"):
        assert isinstance(perfect[key], float), key
    reference = perfect["fidelity_reference"]
    assert reference["feature_extractor"] == "glyphnet-v1" and reference["fid"] >= 0
    assert [e for e in log if e[0] == "compare"] == [
        ("compare", "samples", "train"), ("compare", "samples", "heldout"), ("compare", "heldout_n", "train"),
        ("compare", "samples_n", "train")]
    # The reference and its generator counterpart score as many images each (FID depends on it):
    # here the 300 samples and 300 of the 1000 held-out images.
    assert perfect["fidelity_set_sizes"] == {"samples": N_SAMPLES, "train": N_REAL_TRAIN, "heldout": 1000,
                                             "reference": N_SAMPLES}
    assert reference["compares"].startswith(f"{N_SAMPLES} real held-out images")
    # n is every sample here, so the counterpart is the headline FID (in another order).
    assert perfect["fid_at_reference_size"] == pytest.approx(perfect["fid"], rel=1e-4)
    useless, log = evaluated["useless"]
    assert ("compare", "heldout_n", "train") not in log
    assert useless["fidelity_reference"] == reference
    # Fidelity ignores labels: the useless run (same images, shuffled labels) scores the same;
    # and the held-out comparison is its own, not a copy of the training one.
    for key in ("fid", "kid_mean", "precision", "recall", "fid_heldout", "precision_heldout"):
        assert useless[key] == pytest.approx(perfect[key]), key
    assert perfect["fid"] != perfect["fid_heldout"]


def test_downstream_ranks_a_perfect_generator_above_a_useless_one(evaluated):
    perfect, useless = evaluated["perfect"][0], evaluated["useless"][0]
    acc = perfect["downstream_accuracy"]
    assert set(acc) == {"cnn", "mlp", "mean"}
    assert acc["mean"] == pytest.approx((acc["cnn"] + acc["mlp"]) / 2)
    assert set(perfect["downstream_val_accuracy"]) == {"cnn", "mlp"}
    assert acc["mean"] > 0.5 and useless["downstream_accuracy"]["mean"] < 0.3, (acc, useless["downstream_accuracy"])
    assert perfect["downstream_accuracy_real"]["mean"] > 0.5
    assert perfect["downstream_accuracy_real"] == useless["downstream_accuracy_real"]  # cached ceiling
    assert "not part of the released output" in perfect["reference_note"]
    assert perfect["num_samples"] == N_SAMPLES


def test_num_samples_and_metric_selection(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg("method=nonprivate", "eval.num_samples=100", "eval.fid.metrics=[fid]",
                   "eval.fid.heldout=false", "eval.downstream.classifiers=[mlp]")
    events = _Events(monkeypatch)
    added = {}
    add = Fidelity.add

    def spy_add(fid, name, images):
        added[name] = len(images)
        add(fid, name, images)

    monkeypatch.setattr(Fidelity, "add", spy_add)
    evaluate(_context(cfg, tmp_path / "run"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # Of the 300 samples in samples.npz, the classifiers and the fidelity metrics see 100.
    assert metrics["num_samples"] == 100 and ("train", 100) in events.log and added["samples"] == 100
    assert set(metrics["downstream_accuracy"]) == {"mlp", "mean"}
    assert "fid" in metrics and not {"kid_mean", "precision", "inception_score_mean", "fid_heldout"} & set(metrics)


def test_real_data_references_key_on_the_content_of_the_splits(tiny_cfg, tmp_path, monkeypatch):
    """Another sensitive set under the same config (same root re-exported, a copied config)
    must not read this one's cached numbers: the key holds both splits' fingerprints."""
    keys = []
    monkeypatch.setattr(evaluate_stage, "cached_reference", lambda _dir, _kind, key, _compute: keys.append(key) or {})
    cfg = tiny_cfg("method=nonprivate")
    ctx = _context(cfg, tmp_path / "a")
    held_out = ctx.held_out_test_set()
    evaluate_stage._real_classifiers(ctx, held_out)
    train = ctx.train_set
    images = train.images.clone()
    images[0, 0, 0, 0] += 0.5  # one pixel of one image
    ctx.train_set = TensorImageDataset(images, train.labels, train.info)
    evaluate_stage._real_classifiers(ctx, held_out)
    ctx.train_set = train
    evaluate_stage._real_classifiers(ctx, held_out)
    assert keys[0]["content"] != keys[1]["content"] and keys[0] == keys[2]
    assert keys[0]["data"] == keys[1]["data"]
    # CUDA trains the same seed to other weights, and so may another GPU model or torch: their own entries.
    assert keys[0]["device"] == "cpu" and keys[0]["torch"] == torch.__version__
    monkeypatch.setattr(evaluate_stage, "sampling_device", lambda trainer: "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    evaluate_stage._real_classifiers(ctx, held_out)
    assert keys[3]["device"].startswith("cuda:NVIDIA H100 80GB HBM3 (CUDA ")


@pytest.mark.parametrize(("sampling", "ledger", "formal", "scope"), [
    # a DP run older than the ledger's formal_guarantee key, re-scored: its ε is its guarantee
    ("default", {"epsilon_spent": 9.9, "delta": 1e-5}, True, None),
    ("default", {"epsilon_spent": 9.9, "delta": 1e-5, "formal_guarantee": True}, True, None),
    # CPSample: the ε stays, but covers the generator's training only
    ("cpsample", {"epsilon_spent": 9.9, "delta": 1e-5, "formal_guarantee": False}, False,
     "generator training only; the samples carry no formal guarantee (CPSample's protection classifier "
     "read the training images)"),
    ("default", {"formal_guarantee": False, "note": "non-private"}, False, None),  # no ε at all
])
def test_metrics_state_the_guarantee_as_the_report_and_release_do(tiny_cfg, tmp_path, sampling, ledger, formal, scope):
    cfg = tiny_cfg(f"sampling={sampling}", "eval.fid.metrics=[]", "eval.downstream.classifiers=[]")
    ctx = _context(cfg, tmp_path / "run")
    write_json(ctx.privacy_json, ledger)
    evaluate(ctx)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epsilon"] == ledger.get("epsilon_spent")
    assert metrics["formal_guarantee"] is formal and metrics["epsilon_scope"] == scope
    # Whatever the guarantee, the file says which of its numbers ε does not cover (found by the DP audit).
    assert "outside the guarantee" in metrics["outside_dp_guarantee"]


class _StubFidelity:
    """Fidelity's interface without feature extraction: the key is what is under test."""

    def __init__(self, extractor, fid_cfg, seed, cuda):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add(self, name, images):
        pass

    def compare(self, a, b, metrics):
        return {}


def test_fidelity_reference_key_follows_the_splits_extractor_size_and_device(tiny_cfg, tmp_path, monkeypatch):
    """The cached fidelity reference is reused only by runs that would compute the same numbers:
    the same splits' contents, feature weights, image count n and GPU model / CUDA / torch."""
    keys = []
    sha = ["a" * 64]
    monkeypatch.setattr(evaluate_stage, "cached_reference", lambda _dir, _kind, key, _compute: keys.append(key) or {})
    monkeypatch.setattr(evaluate_stage, "Fidelity", _StubFidelity)
    monkeypatch.setattr(evaluate_stage, "resolve_extractor", lambda fid_cfg, cache_dir: SimpleNamespace(
        name="stub", weights_sha256=sha[0], to_json=lambda: {}))
    ctx = _context(tiny_cfg("method=nonprivate", "eval.reference=true"), tmp_path / "run")
    held_out = ctx.held_out_test_set()
    samples = torch.zeros(N_SAMPLES, *ctx.train_set.images.shape[1:], dtype=torch.uint8)
    evaluate_stage._fidelity(ctx, samples, held_out)                       # 0: as is
    evaluate_stage._fidelity(ctx, samples, held_out)                       # 1: the same again
    evaluate_stage._fidelity(ctx, samples[:100], held_out)                 # 2: n = 100
    train = ctx.train_set
    images = train.images.clone()
    images[0, 0, 0, 0] += 0.5
    ctx.train_set = TensorImageDataset(images, train.labels, train.info)
    evaluate_stage._fidelity(ctx, samples, held_out)                       # 3: one training pixel
    ctx.train_set = train
    sha[0] = "b" * 64
    evaluate_stage._fidelity(ctx, samples, held_out)                       # 4: other feature weights
    sha[0] = "a" * 64
    monkeypatch.setattr(evaluate_stage, "sampling_device", lambda trainer: "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    evaluate_stage._fidelity(ctx, samples, held_out)                       # 5: on a GPU
    assert keys[0] == keys[1] and keys[0]["device"] == "cpu" and keys[0]["torch"] == torch.__version__
    assert keys[2]["n"] == 100 and keys[0]["n"] == N_SAMPLES
    assert keys[3]["content"] != keys[0]["content"]
    assert keys[4]["extractor"] != keys[0]["extractor"]
    assert keys[5]["device"].startswith("cuda:NVIDIA H100 80GB HBM3 (CUDA ")
    for i, changed in ((2, "n"), (3, "content"), (4, "extractor"), (5, "device")):
        assert {k for k in keys[0] if keys[0][k] != keys[i][k]} == {changed}, i
