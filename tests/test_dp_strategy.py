"""The DP-SGD strategy against independent references (explicit per-example loops)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import on_cuda
from dp_helpers import TinyDPModule, make_batch, one_dp_step, reference_update
from omegaconf import OmegaConf

from dpgen.errors import ConfigError
from dpgen.privacy.config import CLIPPING_MODES
from dpgen.privacy.ledger import PlannedStage, PrivacyLedger
from dpgen.privacy.per_example import PerExampleGradients, UnsupportedLayerError
from dpgen.privacy.strategy import DPSGDConfig, clipped_gradient_sum


def _config(n: int = 40, q: float = 0.2, clip: float = 0.5, physical: int = 64, sigma: float = 1.0,
            clipping: str = "materialize"):
    return DPSGDConfig(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=q, dataset_size=n,
                       max_physical_batch=physical, clipping=clipping)


ALL_MODES = pytest.mark.parametrize("clipping", CLIPPING_MODES)


def _assert_close(update, reference, lr=1.0):
    for u, r in zip(update, reference):
        torch.testing.assert_close(u, -lr * r, rtol=1e-4, atol=1e-6)


def _per_example_norms(k: int, batch) -> torch.Tensor:
    module = TinyDPModule(k)
    params = list(module.parameters())
    return torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in torch.autograd.grad(
        module.copies_loss(batch[0][i:i + 1], batch[1][i:i + 1]).mean(), params)))
        for i in range(len(batch[0]))])


def _median_clip_setting(k: int, clipping: str):
    """A batch, a config and the reference update, with the clip bound at the median norm.

    Some examples are clipped and some are not: a missing clip, or a clip that also scales
    small gradients up, both change the update.
    """
    batch = make_batch(6)
    norms = _per_example_norms(k, batch)
    clip = norms.median().item()
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()
    cfg = _config(clip=clip, clipping=clipping)
    return batch, cfg, reference_update(TinyDPModule(k), batch, cfg.max_grad_norm, cfg.expected_batch_size)


@ALL_MODES
@pytest.mark.parametrize("k", [1, 4])
def test_update_equals_explicit_per_example_reference(k, clipping):
    batch, cfg, ref = _median_clip_setting(k, clipping)
    update = one_dp_step(TinyDPModule(k), batch, cfg)
    _assert_close(update, ref)


def _assert_within(update, reference, rel):
    for u, r in zip(update, reference):
        assert (u + r).norm() <= rel * r.norm(), f"off by {((u + r).norm() / r.norm()).item():.3g}"


@pytest.mark.parametrize("clipping", ["materialize", "mixed"])  # ghost is refused under autocast (below)
def test_bf16_autocast_runs_the_forward_in_bf16_and_the_clipped_sum_in_fp32(clipping, monkeypatch):
    """Under ``bf16-mixed`` the layers run in bf16, but per-example gradients, norms, the clipped
    sum and the noise added to it are fp32. The update differs from the fp32 reference by bf16
    rounding of the forward and backward (measured: under 1 %); a skipped clip is off by 30-50 %."""
    from dpgen.privacy import strategy

    sums = []

    def recording(*args, **kwargs):
        grad_sum, loss_sum = clipped_gradient_sum(*args, **kwargs)
        sums.append(grad_sum)
        return grad_sum, loss_sum

    monkeypatch.setattr(strategy, "clipped_gradient_sum", recording)
    batch, cfg, ref = _median_clip_setting(4, clipping)
    module = TinyDPModule(4)
    head_dtypes = []
    module.net.head.register_forward_hook(lambda m, i, out: head_dtypes.append(out.dtype))
    update = one_dp_step(module, batch, cfg, precision="bf16-mixed")
    assert head_dtypes == [torch.bfloat16]
    assert len(sums) == 1 and all(g.dtype == torch.float32 for g in sums[0])
    _assert_within(update, ref, rel=3e-2)


@pytest.mark.parametrize(("precision", "clipping", "key"), [
    ("16-true", "mixed", "trainer.precision"),    # fp16 parameters (16-mixed is refused by config
                                                  # validation; Lightning makes it bf16 on a CPU)
    ("bf16-true", "mixed", "trainer.precision"),  # parameters, clipped sum and noise in bf16
    ("bf16-mixed", "ghost", "privacy.clipping"),  # the sum comes from a second, bf16 backward
])
def test_a_precision_that_would_weaken_clipping_or_noise_is_refused_before_a_step(precision, clipping, key):
    ledger = PrivacyLedger(epsilon_target=10.0, delta=1e-5, dataset_size=40)
    ledger.plan([PlannedStage("dp_train", "poisson_subsampled_gaussian", sample_rate=0.2, count=5)])
    module = TinyDPModule(2)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ConfigError, match=key):
        one_dp_step(module, make_batch(4), _config(clipping=clipping), ledger=ledger, precision=precision)
    assert ledger.steps_spent("dp_train") == 0
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before))


def test_ghost_clipping_refuses_an_autocast_forward_whoever_calls_it():
    module = TinyDPModule(2)
    engine = PerExampleGradients(module)
    with pytest.raises(ConfigError, match="privacy.clipping"):
        clipped_gradient_sum(engine, module.per_example_loss, make_batch(4), 1.0, 64, "ghost",
                             forward_context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))


def _bound_module(name: str, device: str) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """A module and 8 examples: the tiny test net, or the real diffusion UNet / DP-LDM denoiser
    (whose time-embedding Linear layers keep their input and output gradient in mixed mode)."""
    if name == "tiny":
        return TinyDPModule(2).to(device), make_batch(8)
    from dpgen.bench import bench_batch, build_module

    cfg = OmegaConf.create({"image_size": 8, "channels": 1, "num_classes": 3, "batch_size": 8})
    attention = "attention_only" if name == "ldm_tiny" else "full"
    return build_module(name, attention, 2, cfg, torch.device(device)), bench_batch(name, cfg, torch.device("cpu"))


BOUND_CASES = [(m, c, False) for m in ("tiny", "unet_tiny", "ldm_tiny") for c in CLIPPING_MODES] + [
    (m, c, True) for m in ("tiny", "unet_tiny", "ldm_tiny") for c in ("materialize", "mixed")]


@pytest.mark.parametrize(("device", "model", "clipping", "autocast"), [
    *[("cpu", *case) for case in BOUND_CASES], *[on_cuda("cuda", *case) for case in BOUND_CASES]])
def test_one_examples_clipped_contribution_never_exceeds_the_bound(device, model, clipping, autocast):
    """The sensitivity the accountant assumes: every example is clipped here (C far below its
    norm), and what it adds to the sum has norm at most C, up to fp32 rounding. A sum taken by
    other kernels than the norm (a bf16 or TF32 backward), or from bf16-rounded clip factors,
    overshoots by 1e-4 to 1e-2."""
    module, (x, y) = _bound_module(model, device)
    engine = PerExampleGradients(module)
    clip = 1e-4
    context = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    for i in range(8):
        one = [x[i:i + 1].to(device), y[i:i + 1].to(device)]
        grad_sum, _ = clipped_gradient_sum(engine, module.per_example_loss, one, clip, 64, clipping,
                                           forward_context=context)
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grad_sum)).item()
        assert clip * 0.999 < norm <= clip * (1 + 1e-5)


def test_the_clipping_modes_agree_on_the_diffusion_unet_with_copies():
    """On the real module at K=2 and B=8 (the bound test above has one example, where no layout
    can be wrong), every mode clips each example's K copies together: ghost mode reweights the
    loss rows by clip factors, so a loss whose rows are not example-major would pass other
    examples' factors to an example's copies (6.8 % off, found by a mutation review)."""
    module, batch = _bound_module("unet_tiny", "cpu")
    engine = PerExampleGradients(module)
    sums = {}
    for mode in CLIPPING_MODES:
        torch.manual_seed(0)  # the same timesteps and diffusion noise for every mode
        sums[mode], _ = clipped_gradient_sum(engine, module.per_example_loss, batch, 1e-3, 64, mode)
    reference = torch.cat([g.flatten() for g in sums["materialize"]])
    for mode in ("ghost", "mixed"):
        diff = torch.cat([g.flatten() for g in sums[mode]]) - reference
        assert diff.norm() <= 1e-4 * reference.norm(), (mode, (diff.norm() / reference.norm()).item())


@pytest.mark.parametrize(("clipping", "precision"), [
    on_cuda(c, p) for c in CLIPPING_MODES for p in ("32-true", "bf16-mixed") if (c, p) != ("ghost", "bf16-mixed")])
def test_update_on_cuda_equals_the_cpu_reference(clipping, precision):
    batch, cfg, ref = _median_clip_setting(4, clipping)
    update = one_dp_step(TinyDPModule(4), batch, cfg, device="cuda", precision=precision)
    # fp32 on CUDA runs convolutions in TF32 by default (10-bit mantissa), bf16 has 7 bits.
    _assert_within(update, ref, rel=1e-2 if precision == "32-true" else 3e-2)


@ALL_MODES
def test_k_copies_are_averaged_before_clipping(clipping):
    """Clipping each copy separately and averaging gives a different (wrong) update."""
    cfg = _config(clipping=clipping)
    batch = make_batch(4)
    module = TinyDPModule(4)
    params = list(module.parameters())
    wrong = [torch.zeros_like(p) for p in params]
    for i in range(4):
        for c in range(4):
            loss = module.copies_loss(batch[0][i:i + 1], batch[1][i:i + 1])[0, c]
            grads = torch.autograd.grad(loss, params)
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            for w, g in zip(wrong, grads):
                w += min(1.0, cfg.max_grad_norm / norm.item()) * g / 4
    update = one_dp_step(TinyDPModule(4), batch, cfg)
    diff = max((u + w / cfg.expected_batch_size).abs().max().item() for u, w in zip(update, wrong))
    assert diff > 1e-3


@ALL_MODES
def test_chunking_does_not_change_the_update(clipping):
    batch = make_batch(7)
    whole = one_dp_step(TinyDPModule(2), batch, _config(physical=64, clipping=clipping))
    chunked = one_dp_step(TinyDPModule(2), batch, _config(physical=3, clipping=clipping))
    _assert_close(chunked, [-u for u in whole])


def test_empty_batch_steps_with_zero_gradient_and_is_counted():
    ledger = PrivacyLedger(epsilon_target=10.0, delta=1e-5, dataset_size=40)
    ledger.plan([PlannedStage("dp_train", "poisson_subsampled_gaussian", sample_rate=0.2, count=5)])
    sigma = ledger.planned_noise_multiplier("dp_train")
    cfg = _config(sigma=sigma)
    empty = [torch.empty(0, 1, 6, 6), torch.empty(0, dtype=torch.long)]
    update = one_dp_step(TinyDPModule(2), empty, cfg, ledger=ledger)
    assert all(u.abs().max() == 0 for u in update)
    assert ledger.steps_spent("dp_train") == 1


def test_noise_std_is_sigma_clip_over_expected_batch():
    cfg = _config(n=50, q=0.16, clip=2.0, sigma=1.5)  # expected batch 8
    empty = [torch.empty(0, 1, 6, 6), torch.empty(0, dtype=torch.long)]
    update = one_dp_step(TinyDPModule(1), empty, cfg, noise=True)
    flat = torch.cat([u.flatten() for u in update])
    expected = cfg.noise_multiplier * cfg.max_grad_norm / cfg.expected_batch_size
    # ~370 parameters: relative standard error of the sample std is about 1/sqrt(2n) < 4 %.
    assert flat.numel() > 300
    assert flat.std().item() == pytest.approx(expected, rel=0.15)
    assert abs(flat.mean().item()) < 4 * expected / math.sqrt(flat.numel())


def test_noise_is_not_reproducible_from_the_run_seed():
    cfg = _config()
    empty = [torch.empty(0, 1, 6, 6), torch.empty(0, dtype=torch.long)]
    torch.manual_seed(0)
    a = one_dp_step(TinyDPModule(1), empty, cfg, noise=True)
    torch.manual_seed(0)
    b = one_dp_step(TinyDPModule(1), empty, cfg, noise=True)
    assert not torch.equal(a[0], b[0])


class _RecordsItsDraws(TinyDPModule):
    """Draws per-row randomness from torch's global generator, as the diffusion methods do
    (timesteps, diffusion noise, label dropout)."""

    def per_example_loss(self, batch):
        self.draws = torch.rand(len(batch[0]))
        return super().per_example_loss(batch) * (1 + 0 * self.draws[:, None])


def test_per_example_draws_are_not_reproducible_from_the_run_seed():
    """From the public seed, one example more or less would shift every later row's draws and
    move the clipped sum by more than C; secret draws can be coupled across neighbours."""
    batch = make_batch(6)
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        module = _RecordsItsDraws(1)
        one_dp_step(module, batch, _config())
        draws.append(module.draws)
    torch.manual_seed(0)
    from_seed = torch.rand(6)
    assert not torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], from_seed) and not torch.equal(draws[1], from_seed)


@ALL_MODES
def test_frozen_parameters_get_no_per_example_work(clipping):
    module = TinyDPModule(1)
    module.net.conv.requires_grad_(False)
    engine = PerExampleGradients(module)
    assert all(p.requires_grad for p in engine.params)
    assert module.net.conv not in engine._samplers
    update = one_dp_step(module, make_batch(4), _config(clipping=clipping))
    assert update[0].abs().max() == 0 and update[1].abs().max() == 0  # conv weight, bias untouched


def test_unsupported_trainable_layer_is_refused():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.ones(3))

    with pytest.raises(UnsupportedLayerError):
        PerExampleGradients(Odd())


def test_a_conv_padding_other_than_zeros_is_refused():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(UnsupportedLayerError, match="padding_mode='reflect'"):
        PerExampleGradients(net)


class _WeightAlsoUsedOutsideItsModule(torch.nn.Module):
    """``lin.weight`` also enters through ``F.linear``, where no hook of ``lin`` sees it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(6, 6)

    def per_example_loss(self, batch):
        h = torch.tanh(self.lin(batch[0]))
        return torch.nn.functional.linear(h, self.lin.weight).pow(2).sum(1, keepdim=True)


@ALL_MODES
def test_a_gradient_the_hooks_cannot_see_never_passes_clipping(clipping):
    """Every mode sums only what the hooks saw, by the formulas that gave the norms. Ghost mode
    used to take its sum from autograd, which also saw the outside use: 1.6-2.1 C per example."""
    module = _WeightAlsoUsedOutsideItsModule()
    engine = PerExampleGradients(module)
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    clip = 1e-3
    for i in range(6):
        grad_sum, _ = clipped_gradient_sum(engine, module.per_example_loss, [x[i:i + 1]], clip, 8, clipping)
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grad_sum)).item()
        assert norm <= clip * (1 + 1e-5)
