"""public=glyphs: fonts shipped with matplotlib, rendered and framed like MNIST."""

import dataclasses
from pathlib import Path

import pytest
import torch
from data_fixtures import check_contract
from omegaconf import OmegaConf

from dpgen.data import build_public_dataset, validate_public_config
from dpgen.data.glyphs import public as glyph_public
from dpgen.data.glyphs.augment import Augment
from dpgen.data.glyphs.config import CHARSETS
from dpgen.data.glyphs.fonts import drawable_chars, font_dir, usable_fonts
from dpgen.data.glyphs.render import render_glyph_set

PER_CLASS = 24


def _cfg(tmp: Path, **over) -> dict:
    cfg = {
        "name": "glyphs",
        "charset": "digits",
        "samples_per_class": PER_CLASS,
        "seed": 0,
        "image_size": 16,
        "channels": 1,
        "cache_dir": str(tmp),
    }
    return {**cfg, **over}


@pytest.fixture(scope="module")
def digits28():
    return render_glyph_set("digits", PER_CLASS, 0, Augment())


def _centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    """[N, 1, S, S] intensities >= 0 -> [N, 2] (x, y) in pixel-index coordinates."""
    s = images.shape[-1]
    idx = torch.arange(s, dtype=torch.float32)
    w = images[:, 0]
    mass = w.sum(dim=(1, 2))
    return torch.stack([(w.sum(1) * idx).sum(1) / mass, (w.sum(2) * idx).sum(1) / mass], 1)


def test_font_filter_drops_fake_glyphs():
    fonts = {p.name: chars for p, chars in usable_fonts(CHARSETS["alnum"]).items()}
    # TeX math fonts map digits/letters to symbols; LastResort draws placeholder boxes.
    assert "cmex10.ttf" not in fonts and "LastResortHE-Regular.ttf" not in fonts
    assert fonts["cmsy10.ttf"] == CHARSETS["alnum"][10:36]  # only its (calligraphic) capitals
    assert fonts["DejaVuSans.ttf"] == CHARSETS["alnum"]
    assert drawable_chars(font_dir() / "cmmi10.ttf", "0123") == ""  # old-style figures
    assert len(usable_fonts(CHARSETS["digits"])) >= 15


def test_digits_labels_and_balance(digits28):
    assert digits28.class_names == tuple("0123456789")
    assert torch.bincount(digits28.labels).tolist() == [PER_CLASS] * 10
    assert digits28.images.dtype == torch.uint8 and digits28.images.shape[1:] == (1, 28, 28)
    assert len(digits28.fonts) >= 15


def test_no_blank_renders(digits28):
    x = digits28.images.float() / 255
    assert bool((x.amax(dim=(1, 2, 3)) == 1.0).all())  # strokes saturate, as in MNIST
    bright = (x > 0.5).sum(dim=(1, 2, 3))
    assert int(bright.min()) >= 8


def test_mnist_framing():
    """Bounding box within 20×20 and centre of mass at the centre, as MNIST was made."""
    gs = render_glyph_set("digits", 8, 1, Augment(translate=0.0))
    x = gs.images.float() / 255
    com = _centre_of_mass(x)
    assert torch.allclose(com, torch.full_like(com, 13.5), atol=0.35)
    ink = x[:, 0] > 0.1
    rows, cols = ink.any(2), ink.any(1)
    height, width = rows.sum(1), cols.sum(1)
    longer = torch.maximum(height, width)
    assert int(longer.max()) <= 22 and float(longer.float().mean()) >= 18


def test_translation_is_small_and_centred_on_average(digits28):
    com = _centre_of_mass(digits28.images.float())
    assert float((com - 13.5).abs().max()) <= 1.6
    assert torch.allclose(com.mean(0), torch.tensor([13.5, 13.5]), atol=0.2)


def test_public_dataset_contract_and_determinism(tmp_path):
    ds = build_public_dataset(_cfg(tmp_path))
    check_contract(ds, 1, 16)
    assert ds.info.name == "glyphs" and ds.info.num_classes == 10
    assert [int(lab) for lab in ds.labels[::PER_CLASS]] == list(range(10))  # label = the digit
    com = _centre_of_mass((ds.images + 1) / 2)
    assert torch.allclose(com.mean(0), torch.tensor([7.5, 7.5]), atol=0.2)
    fresh = build_public_dataset(_cfg(tmp_path / "other"))
    assert torch.equal(fresh.images, ds.images) and torch.equal(fresh.labels, ds.labels)
    reseeded = build_public_dataset(_cfg(tmp_path / "other", seed=1))
    assert not torch.equal(reseeded.images, ds.images)


def test_cache_hit_skips_rendering(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    first = build_public_dataset(cfg)
    path = glyph_public.glyph_cache_path(cfg)
    assert path is not None and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left

    def no_render(*args, **kwargs):
        raise AssertionError("rendered despite a cached copy")

    monkeypatch.setattr(glyph_public, "render_glyph_set", no_render)
    again = build_public_dataset({**cfg, "image_size": 28, "channels": 3})  # same pixels
    check_contract(again, 3, 28)
    assert torch.equal(build_public_dataset(cfg).images, first.images)
    # Anything that changes the pixels changes the key.
    assert glyph_public.glyph_cache_path({**cfg, "seed": 5}) != path
    assert glyph_public.glyph_cache_path({**cfg, "augment": {"rotation": 3.0}}) != path
    assert glyph_public.glyph_cache_path({**cfg, "image_size": 28}) == path


def test_corrupt_cache_is_regenerated(tmp_path):
    cfg = _cfg(tmp_path, samples_per_class=2)
    path = glyph_public.glyph_cache_path(cfg)
    path.write_bytes(b"not a torch file")
    ds = build_public_dataset(cfg)
    assert len(ds) == 20 and path.stat().st_size > 1000


def test_no_cache_dir_renders_without_writing(tmp_path):
    ds = build_public_dataset(_cfg(tmp_path, cache_dir=None, samples_per_class=2))
    assert len(ds) == 20 and not any(tmp_path.iterdir())


def test_alnum_classes_and_subset(tmp_path):
    ds = build_public_dataset(_cfg(tmp_path, charset="alnum", samples_per_class=2))
    assert ds.info.num_classes == 62 and ds.info.class_names[:11] == tuple("0123456789A")
    assert len(ds) == 124
    sub = ds.subset_classes(list("0123456789"))
    assert sub.info.class_names == tuple("0123456789") and len(sub) == 20
    assert torch.equal(sub.labels, ds.labels[:20])


def test_shipped_yaml_matches_code_defaults(tmp_path):
    root = OmegaConf.create(
        {
            "data": OmegaConf.load("conf/data/mnist5k.yaml"),
            "paths": {"cache_dir": str(tmp_path)},
            "public": OmegaConf.load("conf/public/glyphs.yaml"),
        }
    )
    validate_public_config(root.public)
    assert (
        Augment(**{**root.public.augment, "stroke_width": tuple(root.public.augment.stroke_width)})
        == Augment()
    )
    assert set(root.public.augment) == {f.name for f in dataclasses.fields(Augment)}
    path = glyph_public.glyph_cache_path(OmegaConf.to_container(root.public, resolve=True))
    assert path.parent == tmp_path / "public"
