"""The in-memory dataset type, the shared transforms and the stratified split."""

import numpy as np
import pytest
import torch
from PIL import Image

from dpgen.data import DatasetInfo, TensorImageDataset
from dpgen.data.splits import stratified_split
from dpgen.data.transforms import convert_channels, pil_to_model, uint8_to_model


def _toy(n_per_class: int = 4, classes: int = 3) -> TensorImageDataset:
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    images = (
        torch.linspace(-1, 1, len(labels))[:, None, None, None].expand(-1, 1, 4, 4).contiguous()
    )
    info = DatasetInfo("toy", classes, tuple("abc"[:classes]), 1, 4)
    return TensorImageDataset(images, labels, info)


def test_tensor_dataset_items_and_fields():
    ds = _toy()
    image, label = ds[5]
    assert image.shape == (1, 4, 4) and type(label) is int and label == 1
    assert ds.images.shape == (12, 1, 4, 4) and ds.labels.dtype == torch.long


@pytest.mark.parametrize(
    "images, labels",
    [
        (torch.zeros(2, 1, 4, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.long)),  # dtype
        (torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)),  # channels
        (torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.long)),  # count
        (torch.zeros(2, 1, 4, 4), torch.tensor([0, 3])),  # label out of range
    ],
)
def test_tensor_dataset_rejects_mismatches(images, labels):
    with pytest.raises(ValueError):
        TensorImageDataset(images, labels, DatasetInfo("toy", 3, ("a", "b", "c"), 1, 4))


def test_subset_classes_relabels_in_given_order():
    ds = _toy()
    sub = ds.subset_classes(["c", 0])
    assert sub.info.class_names == ("c", "a") and sub.info.num_classes == 2
    assert len(sub) == 8
    assert torch.equal(sub.labels, torch.tensor([1] * 4 + [0] * 4))  # a keeps order, relabelled 1
    assert torch.equal(sub.images[4:], ds.images[8:])  # the c images, now label 0
    assert all(int(label) == 0 for label in sub.labels[4:])
    with pytest.raises(ValueError):
        ds.subset_classes([0, 0])
    with pytest.raises(ValueError):
        ds.subset_classes(["z"])


def test_uint8_to_model_range_resize_and_channels():
    x = torch.tensor([0, 255], dtype=torch.uint8).repeat(2, 1, 14, 14)  # [2, 1, 28, 28]
    y = uint8_to_model(x, 16, 3)
    assert y.shape == (2, 3, 16, 16) and y.dtype == torch.float32
    assert float(y.min()) >= -1 and float(y.max()) <= 1
    assert torch.equal(
        uint8_to_model(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), 8, 1), -torch.ones(1, 1, 8, 8)
    )
    assert torch.equal(
        uint8_to_model(torch.full((1, 1, 8, 8), 255, dtype=torch.uint8), 8, 1),
        torch.ones(1, 1, 8, 8),
    )


def test_rgb_to_gray_uses_luma():
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    assert torch.allclose(convert_channels(red, 1), torch.full((1, 1, 2, 2), 0.2989), atol=1e-3)


def test_pil_to_model_crops_centre_square():
    img = np.zeros((30, 40), dtype=np.uint8)
    img[:, 5:35] = 255  # the centred 30×30 square is white; the side bands are cut off
    out = pil_to_model(Image.fromarray(img), 10, 1)
    assert out.shape == (1, 10, 10) and torch.allclose(out, torch.ones_like(out))


def test_stratified_split_quotas_and_determinism():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train, test = stratified_split(labels, 10, seed=1)
    assert len(test) == 10 and len(train) == 90
    assert np.bincount(labels[test]).tolist() == [5, 3, 2]
    assert not set(train) & set(test)
    again = stratified_split(labels, 10, seed=1)
    assert np.array_equal(test, again[1])
    assert not np.array_equal(test, stratified_split(labels, 10, seed=2)[1])


def test_content_fingerprint_follows_pixels_labels_and_files(tmp_path):
    from torch.utils.data import Subset

    from dpgen.data.dataset import FileImageDataset, content_fingerprint

    info = DatasetInfo("t", 2, ("a", "b"), 1, 4)
    images, labels = torch.zeros(3, 1, 4, 4), torch.tensor([0, 1, 0])
    base = content_fingerprint(TensorImageDataset(images, labels, info))
    assert content_fingerprint(TensorImageDataset(images.clone(), labels.clone(), info)) == base
    changed = images.clone()
    changed[2, 0, 3, 3] = 1e-3
    assert content_fingerprint(TensorImageDataset(changed, labels, info)) != base
    assert content_fingerprint(TensorImageDataset(images, torch.tensor([0, 1, 1]), info)) != base

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("L", (4, 4), i).save(paths[-1])
    files = FileImageDataset(paths, [0, 1, 0], info, transform=lambda img: torch.zeros(1, 4, 4))
    before = content_fingerprint(files)
    assert content_fingerprint(Subset(files, [0, 2])) != content_fingerprint(Subset(files, [0, 1]))
    Image.new("L", (5, 4), 9).save(paths[1])  # the same path re-exported with other content
    assert content_fingerprint(files) != before
