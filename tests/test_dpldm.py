"""DP-LDM: which parameters fine-tune, per-example gradients of exactly those, frozen weights
bit-identical after DP fine-tuning, the class embedder across label spaces, cached pretraining."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from conftest import compose_config, tiny_dpldm_overrides

from dpgen.config import validate_config
from dpgen.errors import ConfigError
from dpgen.methods.dpldm import DPLDMModule, attention_blocks, trainable_parameter_names
from dpgen.pipeline import run_pipeline
from dpgen.privacy.per_example import PerExampleGradients
from dpgen.stages.latent import autoencoder_cache_path, ldm_cache_path


@pytest.fixture
def dpldm_cfg(tmp_path):
    def make(*extra: str):
        return compose_config(tiny_dpldm_overrides(tmp_path) + list(extra))

    return make


def _denoiser(cfg, num_classes=10):
    return DPLDMModule.from_config(cfg, num_classes=num_classes, pretraining=True).unet


def test_method_picks_its_latent_model_by_default(tmp_path):
    cfg = compose_config([f"paths.cache_dir={tmp_path}", f"paths.data_root={tmp_path}", "method=dpldm"])
    assert cfg.model.name == "ldm_small" and cfg.method.trainable == "attention"
    validate_config(cfg)


def test_default_attention_set_is_at_most_a_fifth_of_the_unet(tmp_path):
    cfg = compose_config([f"paths.cache_dir={tmp_path}", f"paths.data_root={tmp_path}", "method=dpldm"])
    denoiser = _denoiser(cfg)
    names = trainable_parameter_names(denoiser, "attention")
    sizes = dict((n, p.numel()) for n, p in denoiser.named_parameters())
    unet_total = sum(p.numel() for p in denoiser.unet.parameters())
    fraction = sum(sizes[n] for n in names) / unet_total
    assert 0.05 < fraction <= 0.20
    # What trains: the transformers' norms, projections, self-attention, the cross-attention's
    # value and output; the embedder.
    for part in (".norm.", ".proj_in.", ".proj_out.", ".norm1.", ".attn1.to_q.", ".attn1.to_out.0.",
                 ".attn2.to_v.", ".attn2.to_out.0."):
        assert any(part in n for n in names), part
    assert "class_embedder.weight" in names
    # What does not: feed-forward, resnets, time embedding, in/out convolutions, and what only the
    # one-token cross-attention's scores depend on.
    for part in (".ff.", ".norm3.", "resnets", "time_embedding", "conv_in", "conv_out",
                 ".norm2.", ".attn2.to_q.", ".attn2.to_k."):
        assert not any(part in n for n in names), part


def test_frozen_cross_attention_scores_get_no_gradient(tmp_path):
    """Why norm2, attn2.to_q and attn2.to_k stay frozen: with one context token they get no
    gradient (float rounding only), while every parameter of the attention set gets one."""
    cfg = compose_config([f"paths.cache_dir={tmp_path}", f"paths.data_root={tmp_path}", "method=dpldm"])
    torch.manual_seed(0)
    denoiser = _denoiser(cfg)
    for p in denoiser.parameters():  # diffusers zero-initialises some output projections
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(8, 2, 8, 8)
    out = denoiser(x, torch.randint(0, 1000, (8,)), class_labels=torch.randint(0, 11, (8,))).sample
    out.square().sum().backward()
    largest = {n: float(p.grad.abs().max()) for n, p in denoiser.named_parameters()}
    attention = trainable_parameter_names(denoiser, "attention")
    transformer = trainable_parameter_names(denoiser, "transformer")
    dead = [n for n in largest if re.search(r"transformer_blocks\.\d+\.(norm2|attn2\.to_q|attn2\.to_k)\.", n)]
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in denoiser.modules())
    assert blocks > 0 and len(dead) == 4 * blocks  # norm2 (weight, bias), to_q, to_k in each
    assert max(largest[n] for n in dead) < 1e-6
    assert min(largest[n] for n in attention) > 1e-3
    assert not set(dead) & transformer


def test_parameter_sets(dpldm_cfg):
    denoiser = _denoiser(dpldm_cfg())
    everything = {n for n, _ in denoiser.named_parameters()}
    attention = trainable_parameter_names(denoiser, "attention")
    only = trainable_parameter_names(denoiser, "attention_only")
    transformer = trainable_parameter_names(denoiser, "transformer")
    assert only == attention - {"class_embedder.weight"}
    assert attention < transformer < everything
    assert {n for n in transformer - attention} == {n for n in transformer if ".ff." in n or ".norm3." in n}
    assert trainable_parameter_names(denoiser, "all") == everything
    assert sorted(attention_blocks(denoiser)) == ["down_blocks.0", "down_blocks.1", "mid_block",
                                                  "up_blocks.0", "up_blocks.1"]
    chosen = trainable_parameter_names(denoiser, "attention", ["mid_block", "up_blocks.1"])
    assert chosen - {"class_embedder.weight"} == {
        n for n in attention if n.startswith(("unet.mid_block.", "unet.up_blocks.1."))}
    with pytest.raises(ValueError, match="hold no attention"):
        trainable_parameter_names(denoiser, "attention", ["conv_in"])


def test_module_freezes_everything_outside_the_set(dpldm_cfg):
    module = DPLDMModule.from_config(dpldm_cfg("method.blocks=[up_blocks.0]"))
    names = trainable_parameter_names(module.unet, "attention", ["up_blocks.0"])
    assert {n for n, p in module.unet.named_parameters() if p.requires_grad} == names
    assert not any(p.requires_grad for p in module.autoencoder.parameters())


@pytest.mark.parametrize("k", [1, 2])
def test_per_example_gradients_of_the_attention_set_match_explicit_loop(dpldm_cfg, k):
    torch.manual_seed(0)
    module = DPLDMModule.from_config(dpldm_cfg(f"method.multiplicity={k}"))
    denoiser = module.unet
    b = 3
    x = torch.randn(b * k, 2, 4, 4)
    t = torch.randint(0, 1000, (b * k,))
    y = torch.randint(0, 11, (b,)).repeat(k)  # copy-major rows: row c*b + i is copy c of example i
    target = torch.randn_like(x)

    def row_losses(sl):
        return (denoiser(x[sl], t[sl], class_labels=y[sl]).sample - target[sl]).pow(2).flatten(1).mean(1)

    engine = PerExampleGradients(denoiser)
    hooked = {type(m).__name__ for m in engine._samplers}
    # Every layer type the default set trains has a formula (proj_in/out are 1x1 convolutions).
    assert hooked == {"Linear", "Conv2d", "LayerNorm", "GroupNorm", "Embedding"}
    assert all(all(p.requires_grad for p in m.parameters(recurse=False)) for m in engine._samplers)
    params = engine.params
    with engine.capture(b):
        engine.backward(row_losses(slice(None)).view(k, b).mean(0).sum())
        per_example = [p.grad_sample.clone() for p in params]
        assert all(getattr(p, "grad_sample", None) is None for p in denoiser.parameters() if not p.requires_grad)
    factors = torch.rand(b)
    with engine.capture(b, mode="mixed"):  # book-keeping on the cross-attention model
        engine.backward(row_losses(slice(None)).view(k, b).mean(0).sum())
        sq_norms, weighted = engine.squared_norms(), engine.weighted_sum(factors)
    engine.remove()
    refs = [torch.autograd.grad(row_losses(torch.arange(k) * b + i).mean(), params) for i in range(b)]
    for i, ref in enumerate(refs):
        got = torch.cat([g[i].flatten() for g in per_example])
        want = torch.cat([r.flatten() for r in ref])
        assert (got - want).norm() <= 1e-4 * want.norm()
        torch.testing.assert_close(sq_norms[i], want.pow(2).sum(), rtol=1e-4, atol=1e-10)
    got = torch.cat([g.flatten() for g in weighted])
    want = torch.cat([sum(f * r for f, r in zip(factors, rs)).flatten() for rs in zip(*refs)])
    assert (got - want).norm() <= 1e-4 * want.norm()


def test_class_embedder_is_fresh_where_label_spaces_differ(dpldm_cfg):
    cfg = dpldm_cfg()
    public_names = ["A", "3", "B"]
    public = _denoiser(cfg, num_classes=3).state_dict()
    module = DPLDMModule.from_config(cfg)
    before = module.unet.class_embedder.weight.detach().clone()
    shared = module.init_from_public(public, public_names, [str(d) for d in range(10)])
    assert shared == ["3"]
    weight, public_emb = module.unet.class_embedder.weight, public["class_embedder.weight"]
    assert weight.shape[0] == 11
    assert torch.equal(weight[3], public_emb[1]) and torch.equal(weight[10], public_emb[3])  # null row
    others = [c for c in range(10) if c != 3]
    assert torch.equal(weight[others], before[others])
    unet_before = {n: p for n, p in public.items() if not n.startswith("class_embedder")}
    assert all(torch.equal(p, unet_before[f"unet.{n}"]) for n, p in module.unet.unet.state_dict().items())


def test_sampling_clips_predictions_to_the_public_latent_range(dpldm_cfg, monkeypatch):
    torch.manual_seed(0)
    module = DPLDMModule.from_config(dpldm_cfg())
    module.set_autoencoder(module.autoencoder.state_dict(), latent_scale=1.0, latent_range=0.5)
    monkeypatch.setattr(module, "decode", lambda latents, batch_size: latents)
    latents = module.sample(torch.arange(10), num_inference_steps=3, guidance_scale=1.0, progress=False)
    assert latents.shape == (10, 2, 4, 4)
    # An untrained denoiser's predictions leave the box; the sampler keeps them in it.
    assert latents.abs().max() <= 0.5 and latents.abs().max() > 0.45


@pytest.mark.parametrize("override,key", [
    ("model=unet_tiny", "model"),
    ("method.trainable=convs", "method.trainable"),
    ("method.blocks=[conv_in]", "method.blocks"),
    ("method.blocks=[]", "method.blocks"),
    ("method.trainable=all method.blocks=[mid_block]", "method.blocks"),
])
def test_bad_dpldm_config_is_refused(dpldm_cfg, override, key):
    with pytest.raises(ConfigError) as err:
        validate_config(dpldm_cfg(*override.split()))
    assert str(err.value).startswith(key) and "Fix:" in str(err.value)


def test_dpldm_needs_public_data(tmp_path):
    overrides = [o for o in tiny_dpldm_overrides(tmp_path) if not o.startswith("public.")]
    with pytest.raises(ConfigError, match="^public="):
        validate_config(compose_config([*overrides, "public=none"]))


def test_pixel_method_refuses_a_latent_model(tmp_path):
    from conftest import tiny_overrides

    with pytest.raises(ConfigError, match="^model="):
        validate_config(compose_config(tiny_overrides(tmp_path) + ["model=ldm_tiny"]))


def test_cache_keys_follow_what_changes_the_weights(dpldm_cfg):
    base = dpldm_cfg()
    ae, ldm = autoencoder_cache_path(base), ldm_cache_path(base)
    # The DP stage and the budget do not touch public pretraining.
    same = dpldm_cfg("privacy.eps=1", "method.train.steps=9", "method.trainable=all")
    assert (autoencoder_cache_path(same), ldm_cache_path(same)) == (ae, ldm)
    for override in ("seed=1", "method.pretrain_autoencoder.steps=4", "model.autoencoder.latent_channels=3",
                     "public.samples_per_class=9"):
        changed = dpldm_cfg(override)
        assert autoencoder_cache_path(changed) != ae and ldm_cache_path(changed) != ldm, override
    for override in ("method.pretrain_ldm.steps=4", "model.unet.cross_attention_dim=16", "method.label_dropout=0.2"):
        changed = dpldm_cfg(override)
        assert autoencoder_cache_path(changed) == ae and ldm_cache_path(changed) != ldm, override


def test_dp_finetune_end_to_end(dpldm_cfg, tmp_path, caplog, monkeypatch):
    """After DP fine-tuning every weight outside the trainable set is bit-identical to public
    pretraining, per-example work touched only trainable layers, and a second run reuses the
    cached pretraining."""
    models, processed = [], set()
    original_init, original_accumulate = PerExampleGradients.__init__, PerExampleGradients._accumulate

    def init_spy(self, model):
        models.append(model)
        original_init(self, model)

    def accumulate_spy(self, key, module, *args):
        processed.add(module)
        return original_accumulate(self, key, module, *args)

    monkeypatch.setattr(PerExampleGradients, "__init__", init_spy)
    monkeypatch.setattr(PerExampleGradients, "_accumulate", accumulate_spy)
    cfg = dpldm_cfg("privacy.eps=5")
    run_dir = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="dpgen")
    run_pipeline(cfg, run_dir)

    ae_cache = torch.load(autoencoder_cache_path(cfg), map_location="cpu")
    pretrained = torch.load(ldm_cache_path(cfg), map_location="cpu")["state_dict"]
    final = torch.load(run_dir / "model.pt", map_location="cpu")
    module = DPLDMModule.from_config(cfg)
    trainable = {n for n, p in module.unet.named_parameters() if p.requires_grad}
    frozen = [n for n, _ in module.unet.named_parameters() if n not in trainable]
    assert frozen and all(torch.equal(final[f"unet.{n}"], pretrained[n]) for n in frozen)
    assert all(torch.equal(final[f"autoencoder.{n}"], p) for n, p in ae_cache["state_dict"].items())
    assert final["latent_scale"].item() == pytest.approx(ae_cache["latent_scale"])
    assert final["latent_range"].item() == pytest.approx(ae_cache["latent_range"])
    changed = [n for n in trainable if not torch.equal(final[f"unet.{n}"], pretrained[n])]
    assert len(changed) == len(trainable)  # DP noise moves every trainable weight

    # Per-example work: exactly the modules that own trainable weights, and only trainable ones.
    (trained,) = models
    owners = {m for m in trained.modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    assert processed == owners
    assert all(p.requires_grad for m in processed for p in m.parameters(recurse=False))
    assert {n for n, p in trained.unet.named_parameters() if p.requires_grad} == trainable

    privacy = json.loads((run_dir / "privacy.json").read_text())
    (event,) = privacy["events"]
    assert event["stage"] == "dp_finetune" and event["steps"] == 4 and privacy["epsilon_spent"] <= 5
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["trainable_parameters"] == sum(p.numel() for p in module.unet.parameters() if p.requires_grad)
    assert metrics["total_parameters"] == sum(p.numel() for p in module.unet.parameters())
    assert metrics["train_wall_s"] > 0
    with np.load(run_dir / "samples.npz") as z:
        assert z["images"].shape == (20, 8, 8, 1) and z["images"].std() > 0
    assert re.search("pretrain_autoencoder: .*; cached", caplog.text) and "pretrain_ldm: cached" in caplog.text
    assert "(%.1f %%)" % (100 * metrics["trainable_parameters"] / metrics["total_parameters"]) in caplog.text

    caplog.clear()
    mtimes = [p.stat().st_mtime_ns for p in (autoencoder_cache_path(cfg), ldm_cache_path(cfg))]
    run_pipeline(cfg, tmp_path / "second")
    assert "reusing cached public autoencoder" in caplog.text
    assert "reusing cached public latent diffusion model" in caplog.text
    assert [p.stat().st_mtime_ns for p in (autoencoder_cache_path(cfg), ldm_cache_path(cfg))] == mtimes
