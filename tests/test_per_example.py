"""Per-example gradients on the real diffusers UNet (conv, attention, GroupNorm, embeddings)
against an explicit loop over examples, with K copies folded in."""

from __future__ import annotations

import pytest
import torch
from conftest import on_cuda

from dpgen.models.unet import build_unet
from dpgen.privacy.per_example import PerExampleGradients, UnsupportedLayerError, exact_fp32

TINY = {"name": "t", "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 4,
        "attention_head_dim": 8}


@pytest.mark.parametrize("k", [1, 3])
def test_unet_per_example_gradients_match_explicit_loop(k):
    torch.manual_seed(0)
    unet = build_unet(TINY, image_size=8, channels=1, num_classes=3)
    # Every formula: 3x3 and 1x1 (skip-connection) convolutions, Linear, GroupNorm, embeddings.
    kernels = {m.kernel_size for m in unet.modules() if isinstance(m, torch.nn.Conv2d)}
    assert {(1, 1), (3, 3)} <= kernels
    b = 4
    x = torch.randn(b * k, 1, 8, 8)
    t = torch.randint(0, 1000, (b * k,))
    y = torch.randint(0, 4, (b,)).repeat(k)  # copy-major rows: row c*b + i is copy c of example i
    target = torch.randn_like(x)

    def row_losses(sl):
        return (unet(x[sl], t[sl], class_labels=y[sl]).sample - target[sl]).pow(2).flatten(1).mean(1)

    rows_of = [torch.arange(k) * b + i for i in range(b)]

    engine = PerExampleGradients(unet)
    params = engine.params
    with engine.capture(b):
        engine.backward(row_losses(slice(None)).view(k, b).mean(0).sum())
        per_example = [p.grad_sample.clone() for p in params]
    engine.remove()
    for i in range(b):
        ref = torch.autograd.grad(row_losses(rows_of[i]).mean(), params)
        got = torch.cat([g[i].flatten() for g in per_example])
        want = torch.cat([r.flatten() for r in ref])
        assert (got - want).norm() <= 1e-4 * want.norm()


@pytest.fixture
def exact_cuda_matmuls():
    """The comparisons below test formulas, not TF32 rounding (on by default for CUDA convolutions)."""
    with exact_fp32():
        yield


@pytest.mark.parametrize("device", ["cpu", on_cuda("cuda")])
@pytest.mark.parametrize("mode", ["norms", "mixed"])
@pytest.mark.parametrize("k", [1, 3])
def test_unet_norms_and_weighted_sums_match_explicit_loop_in_every_mode(k, mode, device, exact_cuda_matmuls):
    """Ghost clipping (norms, then the reweighted backward) and book-keeping give the same norms
    and clipped sums as the explicit loop."""
    torch.manual_seed(0)
    unet = build_unet(TINY, image_size=8, channels=1, num_classes=3).to(device)
    b = 6
    x, t = torch.randn(b * k, 1, 8, 8, device=device), torch.randint(0, 1000, (b * k,), device=device)
    y = torch.randint(0, 4, (b,), device=device).repeat(k)
    target = torch.randn_like(x)

    def row_losses(sl):
        return (unet(x[sl], t[sl], class_labels=y[sl]).sample - target[sl]).pow(2).flatten(1).mean(1)

    engine = PerExampleGradients(unet)
    params = engine.params
    factors = torch.rand(b, device=device)
    with engine.capture(b, mode=mode):
        losses = row_losses(slice(None)).view(k, b).mean(0)
        engine.backward(losses.sum(), retain_graph=mode == "norms")
        sq_norms = engine.squared_norms()
        if mode == "mixed":
            weighted = engine.weighted_sum(factors)
            # Both kinds of layer occur in this UNet: 8x8 layers keep gradients, 4x4 ones activations.
            assert engine._kept and any(p.grad_sample is not None for p in params)
        else:  # ghost clipping: the reweighted backward, summed by the same hooks
            weighted = engine.reweighted_sum((factors * losses).sum())
    engine.remove()
    refs = [torch.autograd.grad(row_losses(torch.arange(k, device=device) * b + i).mean(), params)
            for i in range(b)]
    want_sq = torch.stack([sum(r.pow(2).sum() for r in ref) for ref in refs])
    torch.testing.assert_close(sq_norms, want_sq, rtol=1e-4, atol=1e-8)
    for j, got in enumerate(weighted):
        want = sum(factors[i] * refs[i][j] for i in range(b))
        assert (got - want).norm() <= 1e-4 * want.norm() + 1e-7


class _SharedNet(torch.nn.Module):
    """A Linear called twice per forward (shared weights), beside a LayerNorm and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = torch.nn.Linear(5, 5)
        self.norm = torch.nn.LayerNorm(5)
        self.head = torch.nn.Linear(5, 1)

    def forward(self, x):
        h = self.shared(torch.tanh(self.shared(x)))
        return self.head(self.norm(h)).squeeze(-1).pow(2).mean(-1)  # x: [rows, tokens, 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["materialize", "norms", "mixed"])
@pytest.mark.parametrize("k", [1, 2])
def test_shared_weights_and_fp64_match_explicit_loop_in_every_mode(k, mode, dtype):
    """A module called twice is normed from the sum of its calls' gradients (the norm of a sum is
    not the sum of norms); an fp64 model keeps working. Norms and weighted sums against the loop."""
    torch.manual_seed(0)
    net = _SharedNet().to(dtype)
    b = 4
    x = torch.randn(k * b, 3, 5, dtype=dtype)
    engine = PerExampleGradients(net)
    params = engine.params
    factors = torch.rand(b, dtype=dtype)
    with engine.capture(b, mode=mode):
        losses = net(x).view(k, b).mean(0)
        engine.backward(losses.sum(), retain_graph=mode == "norms")
        assert engine._calls[net.shared] == 2
        sq_norms = engine.squared_norms()
        if mode == "norms":
            weighted = engine.reweighted_sum((factors * losses).sum())
        else:
            weighted = engine.weighted_sum(factors)
    engine.remove()
    refs = [torch.autograd.grad(net(x[torch.arange(k) * b + i]).mean(), params) for i in range(b)]
    want_sq = torch.stack([sum(r.pow(2).sum() for r in ref) for ref in refs])
    torch.testing.assert_close(sq_norms, want_sq.float(), rtol=1e-5, atol=1e-9)
    for j, got in enumerate(weighted):
        torch.testing.assert_close(got, sum(factors[i] * refs[i][j] for i in range(b)), rtol=1e-5, atol=1e-7)


def test_a_removed_engine_refuses_to_capture_instead_of_recording_nothing():
    net = _SharedNet()
    engine = PerExampleGradients(net)
    engine.remove()
    with pytest.raises(RuntimeError, match="attach"), engine.capture(2):
        pass
    engine.attach()
    with engine.capture(2):
        engine.backward(net(torch.randn(2, 3, 5)).sum())
        assert engine.squared_norms().gt(0).all()
    engine.remove()


class _InPlaceNet(torch.nn.Module):
    """A layer whose output is modified in place downstream, and an embedding root."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(3, 4)
        self.embed = torch.nn.Embedding(2, 4)
        self.second = torch.nn.Linear(4, 1)

    def forward(self, x, y):
        h = self.first(x)
        h.mul_(2.0).add_(self.embed(y))  # in place on a hooked output
        return self.second(torch.tanh(h)).squeeze(1)


def test_engine_matches_loop_without_batch_weight_gradients_even_with_in_place_ops():
    torch.manual_seed(0)
    net = _InPlaceNet()
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    engine = PerExampleGradients(net)
    with engine.capture(5):
        engine.backward(net(x, y).pow(2).sum())
        per_example = {p: p.grad_sample.clone() for p in engine.params}
        assert all(p.grad is None for p in engine.params), "the batch gradient must never be computed"
    for i in range(5):
        ref = torch.autograd.grad(net(x[i : i + 1], y[i : i + 1]).pow(2).sum(), engine.params)
        for p, r in zip(engine.params, ref):
            torch.testing.assert_close(per_example[p][i], r, rtol=1e-5, atol=1e-6)


def test_engine_refuses_a_trainable_weight_tied_across_two_modules():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    b.weight = a.weight
    with pytest.raises(UnsupportedLayerError, match="shared by Linear and Linear"):
        PerExampleGradients(torch.nn.Sequential(a, b))
    a.weight.requires_grad_(False)  # frozen tied weights need no per-example norm
    PerExampleGradients(torch.nn.Sequential(a, b)).remove()


def test_engine_skips_frozen_layers_and_stops_backward_at_the_first_trainable_one():
    torch.manual_seed(0)
    net = _InPlaceNet()
    net.first.requires_grad_(False)
    net.embed.requires_grad_(False)
    engine = PerExampleGradients(net)
    assert set(engine.params) == set(net.second.parameters())
    with engine.capture(5):
        engine.backward(net(torch.randn(5, 3), torch.randint(0, 2, (5,))).sum())
        assert net.second.weight.grad_sample.shape == (5, 1, 4)
        assert all(getattr(p, "grad_sample", None) is None for p in (*net.first.parameters(), net.embed.weight))


def test_engine_refuses_a_trainable_layer_whose_output_gets_no_gradient():
    net = _InPlaceNet()
    unused = torch.nn.Linear(3, 3)
    net.unused = unused
    original = net.forward
    net.forward = lambda x, y: (unused(x), original(x, y))[1]
    engine = PerExampleGradients(net)
    with engine.capture(2), pytest.raises(ValueError, match="received no gradient"):
        engine.backward(net(torch.randn(2, 3), torch.randint(0, 2, (2,))).sum())


def _bytes_held_after(forward):
    """Net CPU bytes allocated by ``forward()`` and still held (its graph kept alive)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = forward()
    held = sum(e.nbytes() for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    del out
    return held


def test_hooks_hold_no_activation_that_autograd_does_not_already_hold():
    """Multiplicity must cost activations only: the engine keeps each layer's input for its
    backward, and that must be the very tensor autograd saves. Attention feeds its Linear
    layers a transposed (strided) input, of which the matmul saves a contiguous copy; the
    engine once held both, so privacy's memory overhead grew with K (53 MB at K=16 vs 12 MB
    at K=1 on the default UNet)."""
    torch.manual_seed(0)
    unet = build_unet(TINY, image_size=8, channels=1, num_classes=3)
    b, k = 8, 4
    x, t, y = torch.randn(b * k, 1, 8, 8), torch.randint(0, 1000, (b * k,)), torch.randint(0, 3, (b * k,))

    def forward():
        return unet(x, t, class_labels=y).sample.pow(2).mean()

    forward()  # warm-up: first-call allocations stay out of the comparison
    plain = _bytes_held_after(forward)
    engine = PerExampleGradients(unet)
    with engine.capture(b, mode="mixed"):
        hooked = _bytes_held_after(forward)
    engine.remove()
    assert hooked - plain < 0.01 * plain, (hooked, plain)


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "size", "via_pixels"), [
    (3, 1, 1, 1, (6, 5), True),    # the common 3x3 convolution: Gram of the padded pixels
    (3, 1, 2, 2, (7, 6), True),    # dilated
    ((3, 1), 1, (1, 0), 1, (5, 4), True),  # non-square kernel and padding
    (3, 2, 1, 1, (8, 8), False),   # strided (a downsampler): the unfolded patches are cheaper
])
@pytest.mark.parametrize("k", [1, 3])
def test_ghost_norm_of_a_convolution_equals_the_norm_of_its_formed_gradients(
        kernel, stride, padding, dilation, size, via_pixels, k):
    """The patch Gram matrix built from pixel inner products (no im2col) or from unfolded
    patches gives each example's squared gradient norm, its K copies folded in."""
    from dpgen.privacy.per_example import _conv2d, _ghost_sq_norms, _gram_via_pixels

    torch.manual_seed(0)
    b = 5
    layer = torch.nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation)
    acts = torch.randn(k * b, 4, *size, dtype=torch.float64)
    layer = layer.double()
    backprops = torch.randn_like(layer(acts))
    assert _gram_via_pixels(layer, acts, b) is via_pixels
    formed = _conv2d(layer, acts, backprops, b)
    want = sum(g.flatten(1).pow(2).sum(1) for g in formed.values())
    torch.testing.assert_close(_ghost_sq_norms(layer, acts, backprops, b), want.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("layer, shape", [
    (torch.nn.GroupNorm(2, 4), (4, 3, 3)),
    (torch.nn.GroupNorm(4, 4, affine=True), (4, 5)),
    (torch.nn.LayerNorm(6), (5, 6)),              # tokens, as in the transformer blocks
    (torch.nn.LayerNorm((3, 6), bias=False), (2, 3, 6)),  # Opacus's formula fails on this one
])
@pytest.mark.parametrize("k", [1, 3])
def test_folded_norm_layers_match_per_row_autograd_summed_over_copies(layer, shape, k):
    """Our GroupNorm and LayerNorm formulas (which replace Opacus's, for speed) against autograd,
    one row at a time, each example's K copies summed."""
    from dpgen.privacy.per_example import _sampler_for

    torch.manual_seed(0)
    layer = layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    b = 4
    acts = torch.randn(k * b, *shape, dtype=torch.float64)
    backprops = torch.randn_like(layer(acts))
    params = list(layer.parameters())
    rows = [torch.autograd.grad((layer(acts[r : r + 1]) * backprops[r : r + 1]).sum(), params)
            for r in range(k * b)]
    got = _sampler_for(layer)(layer, acts, backprops, b)
    assert list(got) == params
    for i, p in enumerate(params):
        want = torch.stack([g[i] for g in rows]).reshape(k, b, *p.shape).sum(0)
        torch.testing.assert_close(got[p], want)


def test_mixed_capture_keeps_gradients_where_their_norm_forms_them_anyway():
    """Book-keeping keeps a layer's input only where the ghost norm spares forming its
    per-example gradients; where they are formed for the norm anyway, it keeps them, so the
    clipped sum is a weighted sum, not a second weight gradient."""
    from dpgen.privacy.per_example import KEEP_GRADIENTS_UP_TO, _ghost_pays

    torch.manual_seed(0)
    unet = build_unet(TINY, image_size=8, channels=1, num_classes=3)
    b, k = 6, 1
    x, t, y = torch.randn(b * k, 1, 8, 8), torch.randint(0, 1000, (b * k,)), torch.randint(0, 3, (b * k,))
    engine = PerExampleGradients(unet)
    sizes = {}
    probes = [m.register_forward_hook(lambda m, i, o: sizes.__setitem__(m, i[0].numel() + o.numel()))
              for m in engine._samplers]
    with engine.capture(b, mode="mixed"):
        engine.backward(unet(x, t, class_labels=y).sample.pow(2).flatten(1).mean(1).sum())
        kept = {module: (acts, backprops) for module, acts, backprops in engine._kept}
        assert kept and len(kept) < len(engine._samplers)
        for module in engine._samplers:
            per_example = b * sum(p.numel() for p in module.parameters())
            if module in kept:
                acts, backprops = kept[module]
                ghost = _ghost_pays(module, acts, backprops, b)
                assert ghost or per_example > KEEP_GRADIENTS_UP_TO * (acts.numel() + backprops.numel()), module
            else:  # the small ones keep their formed gradients
                assert all(p.grad_sample is not None for p in module.parameters()), module
                assert per_example <= KEEP_GRADIENTS_UP_TO * sizes[module], module
    for probe in probes:
        probe.remove()
    engine.remove()


def test_per_example_contractions_run_without_tf32_and_leave_the_setting_as_it_was():
    """TF32 (cuDNN's default for fp32 convolutions) would make a layer's norm and its share of the
    clipped sum disagree; the flags are only read on CUDA, so on the CPU the test checks that they
    are off while the engine computes and restored afterwards."""
    torch.manual_seed(0)
    unet = build_unet(TINY, image_size=8, channels=1, num_classes=3)
    engine = PerExampleGradients(unet)
    seen = []

    def recording(sampler):
        def run(*args):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return sampler(*args)
        return run

    engine._samplers = {m: recording(s) for m, s in engine._samplers.items()}
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        x = torch.randn(4, 1, 8, 8)
        with engine.capture(4, mode="mixed"):
            engine.backward(unet(x, torch.randint(0, 1000, (4,)), class_labels=torch.arange(4) % 3).sample.pow(2).sum())
            assert engine._kept  # weighted_sum below runs samplers too
            engine.weighted_sum(torch.ones(4))
        flags_after = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    engine.remove()
    assert seen and not any(a or b for a, b in seen)
    assert flags_after == (True, True)
