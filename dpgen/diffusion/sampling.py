"""Sampling a trained class-conditional UNet with a diffusers scheduler (DDIM or DPM-Solver++)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import Tensor
from tqdm.auto import tqdm

from dpgen.diffusion.config import SOLVERS

# (x_t, t, eps) -> eps: a per-step change of the noise prediction, applied after any CFG.
EpsCorrection = Callable[[Tensor, Tensor, Tensor], Tensor]


def make_train_scheduler(cfg: dict) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg["num_train_timesteps"], beta_schedule=cfg["beta_schedule"])


class ClippedDPMSolver(DPMSolverMultistepScheduler):
    """DPM-Solver++ whose x0 predictions are clipped to ``[-r, r]``, as DDIM's ``clip_sample`` does.

    diffusers' ``thresholding`` option is Imagen's dynamic thresholding, which also rescales
    by a quantile; only its hook is reused here, with a plain clip.
    """

    def _threshold_sample(self, sample: Tensor) -> Tensor:
        r = self.config.sample_max_value
        return sample.clamp(-r, r)


def make_sample_scheduler(cfg: dict, solver: str = "ddim") -> DDIMScheduler | ClippedDPMSolver:
    """The sampler's scheduler: ``ddim`` (deterministic DDIM), or ``dpm++`` (DPM-Solver++ 2M,
    Lu et al. 2022), which integrates the same probability-flow ODE at second order, with steps
    uniform in log-SNR, and so needs fewer network evaluations for the same samples.

    x0 predictions are clipped to ``[-clip_sample_range, clip_sample_range]``: by default
    [-1, 1], where pixels live; latent models pass the range of their latents."""
    common = {"num_train_timesteps": cfg["num_train_timesteps"], "beta_schedule": cfg["beta_schedule"]}
    clip = cfg.get("clip_sample_range", 1.0)
    if solver == "ddim":
        return DDIMScheduler(**common, clip_sample=True, clip_sample_range=clip)
    if solver == "dpm++":
        # Steps uniform in log-SNR (the DPM-Solver paper's spacing): with DDIM's spacing in t, the
        # last step alone spans most of the fine detail and few steps undershoot it.
        return ClippedDPMSolver(**common, algorithm_type="dpmsolver++", solver_order=2, use_lu_lambdas=True,
                                thresholding=True, sample_max_value=clip)
    raise ValueError(f"sample.solver={solver!r}: use one of {SOLVERS}")


@torch.no_grad()
def sample_images(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler | ClippedDPMSolver,
    labels: torch.Tensor,
    num_inference_steps: int,
    guidance_scale: float,
    null_label: int,
    image_shape: tuple[int, int, int],
    generator: torch.Generator | None = None,
    batch_size: int = 250,
    progress: bool = True,
    eps_correction: EpsCorrection | None = None,
) -> torch.Tensor:
    """One sample per label, in the scheduler's clipping range ([-1, 1] for pixels).
    Classifier-free guidance when ``guidance_scale != 1``:
    eps = eps_uncond + w · (eps_cond − eps_uncond), with ``null_label`` as the unconditional class.
    ``eps_correction(x_t, t, eps) -> eps``, when given, adjusts every step's noise prediction
    (e.g. CPSample's protection, :mod:`dpgen.sampling.guidance`)."""
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    out = []
    chunks = list(labels.split(batch_size))
    bar = tqdm(total=len(chunks) * num_inference_steps, desc="sampling", disable=not progress)
    for y in chunks:
        y = y.to(device)
        x = torch.randn((len(y), *image_shape), generator=generator).to(device)
        scheduler.set_timesteps(num_inference_steps)
        guided = guidance_scale != 1.0
        for t in scheduler.timesteps:
            if guided:
                inp = torch.cat([x, x])
                cls = torch.cat([y, torch.full_like(y, null_label)])
                eps_c, eps_u = unet(inp, t, class_labels=cls).sample.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            else:
                eps = unet(x, t, class_labels=y).sample
            if eps_correction is not None:
                eps = eps_correction(x, t, eps)
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
            bar.update(1)
        r = scheduler.config.get("clip_sample_range", scheduler.config.get("sample_max_value"))
        out.append(x.clamp(-r, r).cpu())
    bar.close()
    unet.train(was_training)
    return torch.cat(out) if out else torch.empty((0, *image_shape))
