"""Local-root loaders, each on a tiny fixture in the dataset's real on-disk format."""

import pytest
import torch
from data_fixtures import (
    check_contract,
    make_celeba_root,
    make_cifar_root,
    make_image_folder,
    make_mnist_root,
)

from dpgen.data import build_dataset, describe_data, validate_data_config
from dpgen.errors import ConfigError


def _cfg(name: str, root, **over) -> dict:
    base = {
        "name": name,
        "root": str(root),
        "image_size": 16,
        "channels": 1,
        "num_classes": None,
        "split_seed": 0,
    }
    return {**base, **over}


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family(tmp_path, name, folder):
    make_mnist_root(tmp_path, folder, n_train=30, n_test=10)
    cfg = _cfg(name, tmp_path, num_classes=10)
    validate_data_config(cfg)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (30, 10)
    check_contract(train, 1, 16)
    assert torch.equal(train.labels, torch.arange(30) % 10)
    rgb = build_dataset({**cfg, "channels": 3, "image_size": 28}, "test")
    check_contract(rgb, 3, 28)
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 2])
    if name == "fashion_mnist":
        assert train.info.class_names[0] == "T-shirt/top"


def test_mnist_pixels_are_read_exactly(tmp_path):
    make_mnist_root(tmp_path, n_train=10, n_test=10)
    raw = (tmp_path / "MNIST/raw/t10k-images-idx3-ubyte").read_bytes()[16:]
    expected = torch.tensor(list(raw[: 28 * 28]), dtype=torch.float32).view(28, 28) / 127.5 - 1
    ds = build_dataset(_cfg("mnist", tmp_path, image_size=28), "test")
    assert torch.allclose(ds[0][0][0], expected)


def test_cifar10(tmp_path):
    make_cifar_root(tmp_path, per_batch=6)
    cfg = _cfg("cifar10", tmp_path, channels=3, num_classes=10)
    validate_data_config(cfg)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (30, 6)
    check_contract(train, 3, 16)
    assert train.info.class_names[:2] == ("airplane", "automobile")
    assert test.labels.tolist() == [(5 + j) % 10 for j in range(6)]
    full = build_dataset({**cfg, "image_size": 32}, "test")
    import pickle

    with open(tmp_path / "cifar-10-batches-py/test_batch", "rb") as f:
        raw = pickle.load(f)["data"][0]
    expected = torch.from_numpy(raw.reshape(3, 32, 32)).float() / 127.5 - 1
    assert torch.allclose(full[0][0], expected)  # channel-major layout, no resampling at 32
    gray = build_dataset({**cfg, "channels": 1}, "test")
    check_contract(gray, 1, 16)


def test_cifar10_refuses_code_in_pickles(tmp_path):
    make_cifar_root(tmp_path)
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "cifar-10-batches-py/test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(ConfigError, match="UnpicklingError: refusing to load builtins.print") as err:
        build_dataset(_cfg("cifar10", tmp_path, channels=3), "test")
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)


def test_celeba(tmp_path):
    male = make_celeba_root(tmp_path, n=8)  # partitions cycle 0, 0, 1, 2
    cfg = _cfg("celeba", tmp_path, channels=3, num_classes=2, label_attr="Male", crop_size=140)
    validate_data_config(cfg)
    assert describe_data(cfg).class_names == ("not_Male", "Male")
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert len(train) == 4 and len(test) == 2
    check_contract(train, 3, 16)
    check_contract(test, 3, 16)
    train_ids = [0, 1, 4, 5]
    assert train.labels.tolist() == [int(male[i] == 1) for i in train_ids]
    assert [p.name for p in test.paths] == ["000004.jpg", "000008.jpg"]
    # The root may also be the celeba folder itself.
    inner = build_dataset({**cfg, "root": str(tmp_path / "celeba"), "label_attr": "Young"}, "train")
    assert inner.labels.tolist() == [0, 0, 0, 0]


def test_image_folder(tmp_path):
    make_image_folder(tmp_path, classes=("normal", "tumor"), per_class=3)
    cfg = _cfg("imagefolder", tmp_path, channels=3)
    validate_data_config(cfg)
    assert describe_data(cfg).num_classes == 2
    train = build_dataset(cfg, "train")
    assert len(train) == 6 and train.info.class_names == ("normal", "tumor")
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    check_contract(train, 3, 16)
    check_contract(build_dataset({**cfg, "channels": 1}, "test"), 1, 16)


def test_image_folder_test_split_missing_a_class_keeps_labels(tmp_path):
    make_image_folder(tmp_path, classes=("a", "b", "c"), per_class=2)
    for f in (tmp_path / "test" / "a").iterdir():
        f.unlink()
    (tmp_path / "test" / "a").rmdir()
    test = build_dataset(_cfg("imagefolder", tmp_path, channels=3), "test")
    assert test.labels.tolist() == [1, 1, 2, 2] and test.info.num_classes == 3


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mnist", "MNIST not found (expected {root}/MNIST/raw/train-images-idx3-ubyte"),
        ("fashion_mnist", "Fashion-MNIST not found (expected {root}/FashionMNIST/raw/"),
        (
            "cifar10",
            "CIFAR-10 not found (expected {root}/cifar-10-batches-py/data_batch_1..5, test_batch",
        ),
        ("celeba", "CelebA not found (expected {root}/celeba/img_align_celeba"),
        ("imagefolder", "no class folders found (expected {root}/train/<class>/*.png)"),
    ],
)
def test_empty_root_says_what_to_put_where(tmp_path, name, expected):
    with pytest.raises(ConfigError) as err:
        validate_data_config(_cfg(name, tmp_path, channels=3))
    msg = str(err.value)
    assert msg.startswith(f"data.root='{tmp_path}': ") and expected.format(root=tmp_path) in msg
    assert "Fix: " in msg and "\n" not in msg


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "celeba", "imagefolder"])
def test_missing_root(tmp_path, name):
    with pytest.raises(
        ConfigError, match=r"^data\.root=None: .*never downloaded\. Fix: set data\.root"
    ):
        validate_data_config({**_cfg(name, "x"), "root": None})
    with pytest.raises(ConfigError, match=r"is not an existing directory"):
        validate_data_config(_cfg(name, tmp_path / "nope"))


def test_cifar_partial_copy_names_missing_file(tmp_path):
    make_cifar_root(tmp_path)
    (tmp_path / "cifar-10-batches-py/data_batch_3").unlink()
    with pytest.raises(ConfigError, match="missing data_batch_3"):
        validate_data_config(_cfg("cifar10", tmp_path))


def test_celeba_unknown_attribute(tmp_path):
    make_celeba_root(tmp_path, n=4)
    with pytest.raises(ConfigError, match=r"^data\.label_attr='male': is not a CelebA attribute"):
        validate_data_config(_cfg("celeba", tmp_path, label_attr="male"))


def test_wrong_num_classes(tmp_path):
    make_image_folder(tmp_path, classes=("a", "b", "c"), per_class=1)
    with pytest.raises(ConfigError, match=r"^data\.num_classes=2: but imagefolder has 3 classes"):
        validate_data_config(_cfg("imagefolder", tmp_path, num_classes=2))


def test_image_folder_test_classes_must_exist_in_train(tmp_path):
    make_image_folder(tmp_path, classes=("a",), per_class=1)
    (tmp_path / "test" / "zebra").mkdir()
    with pytest.raises(ConfigError, match="test has classes absent from train: zebra"):
        validate_data_config(_cfg("imagefolder", tmp_path))


def test_an_image_folder_run_infers_its_class_count_before_building_models(tmp_path):
    """conf/data/imagefolder.yaml leaves num_classes null; the UNet is built from it."""
    from conftest import compose_config, tiny_overrides

    from dpgen.config import validate_config

    make_image_folder(tmp_path / "folder", classes=("a", "b", "c"), per_class=2)
    cfg = compose_config([*tiny_overrides(tmp_path), "data=imagefolder", f"data.root={tmp_path / 'folder'}",
                          "data.image_size=8", "method.train.batch_size=2"])
    assert cfg.data.num_classes is None
    validate_config(cfg)
    assert cfg.data.num_classes == 3


def test_damaged_dataset_files_are_named_as_such(tmp_path):
    """The layout check passes (the files are there); a truncated download is a one-line ConfigError,
    not torchvision's bare AssertionError. A non-image file in an image folder names itself."""
    make_mnist_root(tmp_path)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=r"^data\.root=.*the mnist train files there could not be read.*"
                                          r"Fix: download and extract the dataset again"):
        build_dataset(_cfg("mnist", tmp_path), "train")
    folder = tmp_path / "folder"
    make_image_folder(folder, classes=("a", "b"), per_class=1)
    (folder / "train" / "a" / "notes.png").write_text("not an image")
    dataset = build_dataset(_cfg("imagefolder", folder, channels=3), "train")
    bad = next(i for i, p in enumerate(dataset.paths) if p.name == "notes.png")
    with pytest.raises(OSError, match=r"notes\.png: not a readable image .*Fix: remove or replace the file"):
        dataset[bad]


def test_gzipped_mnist_files_are_recognised_and_the_fix_is_to_unpack_them(tmp_path):
    import gzip

    make_mnist_root(tmp_path)
    for f in (tmp_path / "MNIST" / "raw").iterdir():
        f.with_name(f.name + ".gz").write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()
    with pytest.raises(ConfigError, match=r"Fix: gunzip .*\.gz and the other \.gz files$"):
        validate_data_config(_cfg("mnist", tmp_path))


def test_an_empty_class_folder_is_named_before_work(tmp_path):
    make_image_folder(tmp_path, classes=("a", "b"), per_class=1)
    (tmp_path / "train" / "c").mkdir()
    with pytest.raises(ConfigError, match=r"train/c holds no images. Fix: add images to .*/train/c, or remove"):
        validate_data_config(_cfg("imagefolder", tmp_path, channels=3))
