"""Fidelity metrics through torch-fidelity, on small image sets whose ordering is known:
a set against itself, against a fresh draw of the same distribution, against shifted images."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

from dpgen.data import build_dataset
from dpgen.eval import glyphnet as glyphnet_module
from dpgen.eval.fidelity import INCEPTION, Fidelity, FidelityImages, resolve_extractor
from dpgen.eval.glyphnet import NAME as GLYPHNET
from dpgen.eval.threads import cpu_threads

SETTINGS = {"batch_size": 256, "kid_subsets": 20, "kid_subset_size": 100, "prc_neighborhood": 3}
ALL = ["fid", "kid", "isc", "prc"]


def _fid_cfg(cache: str, **extra) -> dict:
    glyphs = {"name": "glyphs", "charset": "digits", "samples_per_class": 30, "seed": 0, "image_size": 16,
              "channels": 1, "cache_dir": cache}
    train = {"width": 8, "feature_dim": 32, "epochs": 6, "batch_size": 32, "lr": 2e-3}
    return {"glyphs": glyphs, "glyphnet": train, "weights_path": None, **SETTINGS, **extra}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """As the evaluate stage runs these models (eval.num_threads=1)."""
    with cpu_threads(1):
        yield


@pytest.fixture(scope="module")
def glyph_extractor(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return resolve_extractor(_fid_cfg(str(cache)), cache / "eval")


@pytest.fixture(scope="module")
def digits():
    """Real digits as uint8 [N, 3, 16, 16]: A and B disjoint draws, C = B shifted 3 pixels right."""
    data = build_dataset({"name": "mnist5k", "root": None, "image_size": 16, "channels": 1,
                          "num_classes": 10, "split_seed": 0, "test_size": 1000}, "train")
    picked = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:400]  # the split is class-sorted
    u8 = ((data.images[picked] + 1) * 127.5).round().to(torch.uint8)
    a, b = u8[:200], u8[200:]
    return {"A": a, "B": b, "C": torch.roll(b, shifts=3, dims=-1)}


def _session(extractor, sets: dict) -> Fidelity:
    fid = Fidelity(extractor, SETTINGS)
    for name, images in sets.items():
        fid.add(name, FidelityImages(images))
    return fid


def test_identical_sets_are_a_perfect_match(glyph_extractor, digits):
    with _session(glyph_extractor, digits) as fid:
        same = fid.compare("A", "A", ALL)
        shifted = fid.compare("A", "C", ALL)
    assert set(same) == {"fid", "kid_mean", "kid_std", "inception_score_mean", "inception_score_std",
                         "precision", "recall", "f_score"}
    assert same["fid"] < 1e-3 * shifted["fid"]
    assert abs(same["kid_mean"]) < 0.05 * shifted["kid_mean"]
    assert same["precision"] == same["recall"] == 1.0


def test_shifted_images_are_further_than_a_fresh_draw(glyph_extractor, digits):
    with _session(glyph_extractor, digits) as fid:
        fresh = fid.compare("A", "B", ["fid", "kid", "prc"])
        shifted = fid.compare("A", "C", ["fid", "kid", "prc"])
    assert 0 < fresh["fid"] < shifted["fid"]
    assert fresh["kid_mean"] < shifted["kid_mean"]
    assert fresh["precision"] > shifted["precision"]
    assert fresh["recall"] > shifted["recall"]


def test_inception_score_ranks_varied_digits_above_one_repeated_image(glyph_extractor, digits):
    constant = digits["A"][:1].expand(200, -1, -1, -1).contiguous()
    with _session(glyph_extractor, {"A": digits["A"], "constant": constant}) as fid:
        varied = fid.compare("A", "constant", ["isc"])["inception_score_mean"]
        repeated = fid.compare("constant", "A", ["isc"])["inception_score_mean"]
    assert repeated == pytest.approx(1.0, abs=1e-4)  # one prediction for all: no diversity
    assert varied > repeated + 0.2  # digits of ten classes, seen by a net that knows glyphs only


def test_glyphnet_is_trained_once_and_named_by_its_weights(glyph_extractor, tmp_path, monkeypatch):
    assert glyph_extractor.name == GLYPHNET and glyph_extractor.weights_path.exists()
    assert "public glyphs" in glyph_extractor.description
    saved = torch.load(glyph_extractor.weights_path, weights_only=True)
    assert saved["info"]["glyph_val_accuracy"] > 0.5

    def no_training(*args, **kwargs):
        raise AssertionError("retrained despite the cached weights")

    monkeypatch.setattr(glyphnet_module, "train_glyphnet", no_training)
    cache = glyph_extractor.weights_path.parent.parent
    again = resolve_extractor(_fid_cfg(str(cache)), cache / "eval")
    assert again == glyph_extractor
    other = _fid_cfg(str(cache))
    other["glyphnet"]["epochs"] = 1  # another config is another extractor
    with pytest.raises(AssertionError, match="retrained"):
        resolve_extractor(other, cache / "eval")


def test_glyphnet_is_seeded_by_its_own_config_not_the_runs(tmp_path, monkeypatch):
    """Every run with one eval config must score under one extractor, whatever its seed."""
    seeds = []
    monkeypatch.setattr(glyphnet_module, "train_glyphnet",
                        lambda glyphs, train: seeds.append(train.get("seed")) or {"info": {"glyph_val_accuracy": 0}})
    cfg = _fid_cfg(str(tmp_path))
    default = glyphnet_module.glyphnet_weights(cfg["glyphs"], cfg["glyphnet"], tmp_path)
    assert glyphnet_module.glyphnet_weights(cfg["glyphs"], {**cfg["glyphnet"], "seed": 0}, tmp_path) == default
    assert glyphnet_module.glyphnet_weights(cfg["glyphs"], {**cfg["glyphnet"], "seed": 1}, tmp_path) != default
    assert seeds == [None, 1]  # trained twice: once per extractor seed, seed 0 being the default


def _random_inception_weights(path) -> None:
    """An Inception-v3 of torch-fidelity's architecture, randomly initialised (nothing downloaded)."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    with mock.patch.object(tf_inception, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict"):
        model = tf_inception.FeatureExtractorInceptionV3(INCEPTION, ["2048"], feature_extractor_weights_path=None)
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):  # default init fades to ~1e-8 over 90 layers
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)


@pytest.mark.slow  # Inception-v3 at 299x299 on CPU: seconds per image
def test_inception_from_a_local_weights_file(tmp_path, digits, monkeypatch):
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    weights = tmp_path / "inception.pth"
    _random_inception_weights(weights)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url",
                        mock.Mock(side_effect=AssertionError("tried to download Inception weights")))
    extractor = resolve_extractor({"weights_path": str(weights)}, tmp_path / "unused")
    assert extractor.name == INCEPTION and extractor.weights_path == weights
    sets = {"A": digits["A"][:4], "C": digits["C"][:4]}  # precision/recall's 3 neighbours need 4
    with _session(extractor, sets) as fid:
        same = fid.compare("A", "A", ALL)
        shifted = fid.compare("A", "C", ["fid", "prc"])
    assert same["fid"] < 1e-3 * shifted["fid"]
    assert same["precision"] == same["recall"] == 1.0
    assert np.isfinite(same["inception_score_mean"]) and np.isfinite(same["kid_mean"])
