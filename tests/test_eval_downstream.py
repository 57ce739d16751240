"""Downstream classifiers: each family learns, early stopping keeps the best synthetic-validation
epoch, and the test set is read in a single pass."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from dpgen.data import TensorImageDataset, build_dataset
from dpgen.eval.downstream import TrainSettings, final_accuracy, train_classifier, train_classifiers
from dpgen.eval.threads import cpu_threads
from dpgen.models.classifiers import CLASSIFIERS


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """As the evaluate stage runs these models (eval.num_threads=1)."""
    with cpu_threads(1):
        yield


@pytest.fixture(scope="module")
def digits():
    data = build_dataset({"name": "mnist5k", "root": None, "image_size": 8, "channels": 1,
                          "num_classes": 10, "split_seed": 0, "test_size": 1000}, "train")
    picked = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))  # the split is class-sorted
    train, test = picked[:400], picked[400:700]
    return data.images[train], data.labels[train], TensorImageDataset(data.images[test], data.labels[test], data.info)


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_each_family_learns_true_labels_and_not_shuffled_ones(digits, name):
    images, labels, test = digits
    settings = TrainSettings(epochs=4, batch_size=32, lr=3e-3, val_fraction=0.2)
    true = train_classifier(images, labels, 10, name, settings, progress=False)
    shuffled = train_classifier(images, labels[torch.randperm(len(labels))], 10, name, settings, progress=False)
    acc_true = final_accuracy([true], test)[name]
    acc_shuffled = final_accuracy([shuffled], test)[name]
    assert acc_true > 0.5 and acc_shuffled < 0.3, (acc_true, acc_shuffled)
    assert 0.0 <= true.val_accuracy <= 1.0 and 0 <= true.best_epoch < true.epochs_run <= 4


def test_early_stopping_keeps_the_best_validation_epoch(digits):
    images, labels, _ = digits
    # lr=0: validation accuracy never improves after the first epoch.
    frozen = train_classifier(images, labels, 10, "mlp", TrainSettings(epochs=10, lr=0.0, patience=2), progress=False)
    assert frozen.best_epoch == 0 and frozen.epochs_run == 3
    learning = train_classifier(images, labels, 10, "mlp", TrainSettings(epochs=4, lr=2e-3, patience=2), progress=False)
    assert learning.best_epoch > 0 and learning.val_accuracy > frozen.val_accuracy


class _CountingDataset(Dataset):
    def __init__(self, inner: Dataset) -> None:
        self.inner = inner
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        self.reads.append(i)
        return self.inner[i]


def test_the_test_set_is_read_once_for_all_classifiers(digits):
    images, labels, test = digits
    trained = train_classifiers(images, labels, 10, ["cnn", "mlp"], TrainSettings(epochs=1), progress=False)
    counting = _CountingDataset(test)
    acc = final_accuracy(trained, counting)
    assert sorted(counting.reads) == list(range(len(test)))
    assert acc["mean"] == pytest.approx((acc["cnn"] + acc["mlp"]) / 2)


def test_thread_settings_are_restored():
    from threadpoolctl import threadpool_info

    def blas() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info()]

    torch_before, blas_before = torch.get_num_threads(), blas()
    with pytest.raises(RuntimeError), cpu_threads(1):
        assert torch.get_num_threads() == 1 and set(blas()) <= {1}
        raise RuntimeError
    assert torch.get_num_threads() == torch_before and blas() == blas_before


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_classifier_trained_on_the_gpu_learns_and_comes_back_on_the_cpu(digits, name, augment):
    """The evaluate stage trains on the run's GPU (``sampling_device``); the held-out split and the
    utility study read the classifiers on the CPU."""
    images, labels, test = digits
    settings = TrainSettings(epochs=4, batch_size=32, lr=3e-3, val_fraction=0.2, augment=augment, device="cuda")
    trained = train_classifier(images, labels, 10, name, settings, progress=False)
    assert all(p.device.type == "cpu" for p in trained.model.parameters())
    assert final_accuracy([trained], test)[name] > 0.5
