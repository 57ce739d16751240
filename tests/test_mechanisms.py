"""Gaussian mechanism: the noise scale, and noise that no seed can reproduce."""

from __future__ import annotations

import pytest
import torch

from dpgen.privacy.mechanisms import fresh_generator, gaussian_mechanism, gaussian_noise_like


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("sensitivity", "sigma"), [(1.0, 1.0), (0.5, 3.0), (2.0, 0.7)])
def test_noise_std_is_multiplier_times_sensitivity(sensitivity, sigma):
    value = torch.full((200_000,), 7.0)
    out = gaussian_mechanism(value, sensitivity, sigma, generator=seeded())
    noise = out - value
    expected = sigma * sensitivity
    # 200k draws: the sample std is within ~0.3 % of the truth, the mean within ~0.01 std.
    assert noise.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(noise.mean().item()) < 0.02 * expected


def test_noise_like_keeps_shape_device_and_float_dtype():
    t = torch.zeros(3, 4, dtype=torch.float64)
    n = gaussian_noise_like(t, 2.0, seeded())
    assert n.shape == t.shape and n.dtype == torch.float64 and n.device == t.device
    assert gaussian_noise_like(t, 0.0, seeded()).abs().sum() == 0


def test_integer_and_half_inputs_get_float32_noise():
    counts = torch.tensor([3, 0, 5])
    out = gaussian_mechanism(counts, 1.0, 2.0, generator=seeded())
    assert out.dtype == torch.float32
    assert not torch.equal(out, counts.float())
    half = gaussian_mechanism(torch.zeros(4, dtype=torch.bfloat16), 1.0, 2.0, generator=seeded())
    assert half.dtype == torch.float32


def test_fresh_generators_ignore_the_global_seed():
    value = torch.zeros(1000)
    torch.manual_seed(0)
    a = gaussian_mechanism(value, 1.0, 1.0)
    torch.manual_seed(0)
    b = gaussian_mechanism(value, 1.0, 1.0)
    assert not torch.allclose(a, b)

    torch.manual_seed(0)
    g1 = fresh_generator()
    torch.manual_seed(0)
    g2 = fresh_generator()
    assert g1.initial_seed() != g2.initial_seed()
    x1 = gaussian_noise_like(value, 1.0, g1)
    x2 = gaussian_noise_like(value, 1.0, g2)
    assert not torch.allclose(x1, x2)


def test_explicit_generator_is_reproducible():
    value = torch.zeros(10)
    a = gaussian_mechanism(value, 1.0, 1.0, generator=seeded(3))
    b = gaussian_mechanism(value, 1.0, 1.0, generator=seeded(3))
    assert torch.equal(a, b)


def test_rejects_invalid_parameters():
    value = torch.zeros(3)
    with pytest.raises(ValueError, match="l2_sensitivity"):
        gaussian_mechanism(value, 0.0, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        gaussian_mechanism(value, 1.0, 0.0)
    with pytest.raises(ValueError, match="std"):
        gaussian_noise_like(value, float("nan"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_noise_from_either_generator():
    value = torch.zeros(100_000, device="cuda")
    out = gaussian_mechanism(value, 1.0, 2.0)  # fresh CUDA generator
    assert out.device.type == "cuda"
    assert out.std().item() == pytest.approx(2.0, rel=0.03)
    cpu_gen = gaussian_mechanism(value, 1.0, 2.0, generator=seeded())
    assert cpu_gen.device.type == "cuda"
    assert fresh_generator("cuda").device.type == "cuda"
