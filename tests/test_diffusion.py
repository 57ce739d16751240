"""Timestep distributions for DP training and the [B, K] per-example loss of the methods."""

from __future__ import annotations

import pytest
import torch
from test_per_example import TINY

from dpgen.diffusion.sampling import make_train_scheduler
from dpgen.diffusion.timesteps import build_timestep_sampler
from dpgen.methods.base import DiffusionModule
from dpgen.models.unet import build_unet

DIFFUSION = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
ALPHAS = make_train_scheduler(DIFFUSION).alphas_cumprod


def test_uniform_timesteps():
    s = build_timestep_sampler({"kind": "uniform"}, ALPHAS)
    t = s.sample(20000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() < 1000
    assert abs(t.float().mean().item() - 499.5) < 10


def test_mixture_puts_its_weights_on_its_intervals():
    s = build_timestep_sampler({"kind": "mixture", "intervals": [[0, 100, 0.7], [100, 1000, 0.3]]}, ALPHAS)
    t = s.sample(20000, generator=torch.Generator().manual_seed(0))
    assert (t < 100).float().mean().item() == pytest.approx(0.7, abs=0.02)


def test_lognormal_follows_dpdm_noise_levels():
    p_mean, p_std = -1.2, 1.2
    s = build_timestep_sampler({"kind": "lognormal", "p_mean": p_mean, "p_std": p_std}, ALPHAS)
    assert s.probabilities().sum().item() == pytest.approx(1.0, abs=1e-5)
    t = s.sample(50000, generator=torch.Generator().manual_seed(0))
    log_sigma = 0.5 * torch.log((1 - ALPHAS[t]) / ALPHAS[t])
    # the grid clips the tails (sigma_min, sigma_max of the schedule); the bulk must match
    assert log_sigma.median().item() == pytest.approx(p_mean, abs=0.1)


def test_bad_interval_is_refused():
    with pytest.raises(ValueError, match="interval"):
        build_timestep_sampler({"kind": "mixture", "intervals": [[0, 2000, 1.0]]}, ALPHAS)


def _module(k: int, label_dropout: float) -> DiffusionModule:
    torch.manual_seed(0)
    return DiffusionModule(build_unet(TINY, 8, 1, 3), num_classes=3, diffusion=DIFFUSION,
                           timesteps={"kind": "uniform"}, lr=1e-3, multiplicity=k,
                           label_dropout=label_dropout)


def test_per_example_loss_shape_and_label_dropout_once_per_example():
    module = _module(k=4, label_dropout=0.5)
    seen = {}
    original = module.unet.forward

    def spy(x, t, class_labels=None):
        seen["labels"] = class_labels.clone()
        seen["t"] = t.clone()
        return original(x, t, class_labels=class_labels)

    module.unet.forward = spy
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 3, (64,))
    loss = module.per_example_loss([x, y])
    assert loss.shape == (64, 4)
    labels = seen["labels"].view(4, 64).T  # copy-major rows: row c*B + i is copy c of example i
    assert (labels == labels[:, :1]).all(), "the K copies of an example must share its label"
    dropped = labels[:, 0] == module.null_label
    assert 10 < dropped.sum() < 54  # about half, decided per example
    assert (labels[~dropped, 0] == y[~dropped]).all()
    # the copies get their own timesteps (noise multiplicity), not one shared draw
    assert (seen["t"].view(4, 64).T.float().std(1) > 0).float().mean() > 0.9


class _ExactGaussianDenoiser(torch.nn.Module):
    """The exact noise prediction for data N(mean, std^2) per pixel: E[eps | x_t] in closed form."""

    def __init__(self, alphas_cumprod: torch.Tensor, mean: float, std: float) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # sample_images reads the device from it
        self.alphas_cumprod, self.mean, self.var = alphas_cumprod, mean, std**2

    def forward(self, x, t, class_labels=None):
        a = self.alphas_cumprod[int(t)].double()
        eps = (x - a.sqrt() * self.mean) * (1 - a).sqrt() / (a * self.var + 1 - a)
        return type("Out", (), {"sample": eps.to(x.dtype)})()


def test_dpm_solver_reaches_the_data_distribution_in_ten_steps_where_ddim_does_not():
    """With the exact denoiser, the probability-flow ODE maps N(0, 1) onto the data N(0.3, 0.2^2);
    what is left is the solver's error. DPM-Solver++ with log-SNR steps is there in 10 steps;
    first-order DDIM with its spacing in t is still far short of the data's spread."""
    from dpgen.diffusion.sampling import make_sample_scheduler, sample_images

    cfg = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    labels = torch.zeros(4096, dtype=torch.long)

    def moments(solver, steps):
        scheduler = make_sample_scheduler(cfg, solver)
        denoiser = _ExactGaussianDenoiser(scheduler.alphas_cumprod, mean=0.3, std=0.2)
        x = sample_images(denoiser, scheduler, labels, steps, 1.0, 0, (1, 1, 1),
                          generator=torch.Generator().manual_seed(0), batch_size=4096, progress=False)
        return x.mean().item(), x.std().item()

    mean, std = moments("dpm++", 10)
    assert abs(mean - 0.3) < 0.01 and abs(std - 0.2) < 0.01
    _, ddim_std = moments("ddim", 10)
    assert abs(ddim_std - 0.2) > 0.05


def test_every_accepted_beta_schedule_trains_and_samples_with_every_solver():
    """``diffusion.beta_schedule`` is checked against a list, without importing diffusers: each
    listed schedule must build the training scheduler and both samplers, and a schedule that
    only the training scheduler has must be off the list."""
    from dpgen.diffusion.config import BETA_SCHEDULES, SOLVERS
    from dpgen.diffusion.sampling import make_sample_scheduler

    for schedule in BETA_SCHEDULES:
        cfg = {"num_train_timesteps": 1000, "beta_schedule": schedule}
        make_train_scheduler(cfg)
        for solver in SOLVERS:
            make_sample_scheduler(cfg, solver)
    make_train_scheduler({"num_train_timesteps": 1000, "beta_schedule": "sigmoid"})
    with pytest.raises(NotImplementedError):
        make_sample_scheduler({"num_train_timesteps": 1000, "beta_schedule": "sigmoid"}, "ddim")
    assert "sigmoid" not in BETA_SCHEDULES


def test_dpm_solver_clips_its_data_predictions_like_ddim():
    from dpgen.diffusion.sampling import make_sample_scheduler

    scheduler = make_sample_scheduler({"num_train_timesteps": 1000, "beta_schedule": "linear",
                                       "clip_sample_range": 2.5}, "dpm++")
    wild = torch.tensor([-40.0, -2.0, 0.5, 3.0, 90.0])
    torch.testing.assert_close(scheduler._threshold_sample(wild), torch.tensor([-2.5, -2.0, 0.5, 2.5, 2.5]))
    with pytest.raises(ValueError, match="sample.solver='euler'"):
        make_sample_scheduler({"num_train_timesteps": 1000, "beta_schedule": "linear"}, "euler")
