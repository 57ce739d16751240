"""Validation of the data/public config groups and the shipped YAML files."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dpgen.data import (
    build_dataset,
    build_public_dataset,
    describe_data,
    has_public_data,
    validate_data_config,
    validate_public_config,
)
from dpgen.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
MNIST5K = {
    "name": "mnist5k",
    "root": None,
    "image_size": 16,
    "channels": 1,
    "num_classes": 10,
    "split_seed": 0,
    "test_size": 1000,
}
GLYPHS = {
    "name": "glyphs",
    "charset": "digits",
    "samples_per_class": 2,
    "seed": 0,
    "image_size": 16,
    "channels": 1,
    "cache_dir": None,
}


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "Fix: " in msg
    return msg


def test_unknown_name():
    with pytest.raises(ConfigError) as err:
        validate_data_config({**MNIST5K, "name": "mnist6k"})
    assert _one_line(err).startswith(
        "data.name='mnist6k': must be one of mnist5k, mnist, fashion_mnist"
    )


@pytest.mark.parametrize("size", [0, -3, "16", 16.0, True, None])
def test_bad_image_size(size):
    with pytest.raises(ConfigError) as err:
        validate_data_config({**MNIST5K, "image_size": size})
    assert _one_line(err).startswith(f"data.image_size={size!r}: must be")


@pytest.mark.parametrize("channels", [0, 2, 4, "3"])
def test_bad_channels(channels):
    with pytest.raises(ConfigError, match=r"^data\.channels=.*must be one of 1, 3"):
        validate_data_config({**MNIST5K, "channels": channels})


def test_mnist5k_ignores_root_and_checks_its_keys():
    validate_data_config({**MNIST5K, "root": "/does/not/exist"})
    with pytest.raises(ConfigError, match=r"^data\.test_size=4995: leaves fewer than 10"):
        validate_data_config({**MNIST5K, "test_size": 4995})
    with pytest.raises(ConfigError, match=r"^data\.num_classes=5: but mnist5k has 10 classes"):
        validate_data_config({**MNIST5K, "num_classes": 5})


def test_bad_split_name():
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset(MNIST5K, "val")


def test_unresolvable_interpolation_names_the_key():
    root = OmegaConf.create({"public": {**GLYPHS, "cache_dir": "${paths.cache_dir}/public"}})
    with pytest.raises(ConfigError) as err:
        validate_public_config(root.public)
    assert _one_line(err).startswith(
        "public.cache_dir='${paths.cache_dir}/public': cannot be resolved"
    )


def test_mandatory_value():
    cfg = OmegaConf.create({**MNIST5K, "root": "???"})
    with pytest.raises(ConfigError, match=r"^data\.root='\?\?\?': is mandatory"):
        validate_data_config(cfg)


@pytest.mark.parametrize("path", sorted((CONF / "data").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_data_yaml(path):
    cfg = OmegaConf.load(path)
    assert cfg.name == path.stem
    assert {"name", "root", "image_size", "channels", "num_classes", "split_seed"} <= set(cfg)
    assert cfg.root is None  # literal null default: never points at a guessed location
    if cfg.name == "mnist5k":
        assert cfg.image_size == 16
        assert describe_data(cfg).num_classes == 10
    else:  # local-root datasets ask for a root, with a fix
        with pytest.raises(ConfigError, match=r"^data\.root=None: .* Fix: set data\.root"):
            validate_data_config(cfg)


def test_public_validation_errors():
    validate_public_config(GLYPHS)
    bad = [
        ({"name": "emnist"}, r"^public\.name='emnist': must be one of glyphs, none"),
        ({"charset": "kanji"}, r"^public\.charset='kanji': must be one of digits, letters, alnum"),
        ({"samples_per_class": 0}, r"^public\.samples_per_class=0: must be >= 1"),
        ({"channels": 2}, r"^public\.channels=2"),
        ({"augment": {"rotate": 5}}, r"^public\.augment\.rotate=5: is not a known distortion"),
        ({"augment": {"blur": -1}}, r"^public\.augment\.blur=-1: must be a number"),
        ({"augment": {"stroke_width": [0.2, 0.1]}}, r"^public\.augment\.stroke_width="),
    ]
    for override, pattern in bad:
        with pytest.raises(ConfigError, match=pattern):
            validate_public_config({**GLYPHS, **override})


def test_public_none():
    cfg = OmegaConf.load(CONF / "public" / "none.yaml")
    validate_public_config(cfg)
    assert not has_public_data(cfg) and has_public_data(GLYPHS)
    with pytest.raises(ConfigError, match=r"^public\.name='none': this stage needs public data"):
        build_public_dataset(cfg)
