"""Training CPSample's protection classifier until it has memorised random labels.

Each training image gets a fixed random bit. No property of the image predicts it, so the only
way to be right is to memorise the image: the trained classifier is confident near training
images and unsure elsewhere. It is trained on noisy images x_t at uniform timesteps (the noise
of the diffusion's own training schedule), because guidance queries it along the trajectory.
"Overfitted" is checked, not assumed: training stops once the accuracy on the training images,
at low noise, reaches ``target_accuracy`` (or after ``max_steps``, with the accuracy reached).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dpgen.models.protection import ProtectionClassifier

log = logging.getLogger("dpgen")


@dataclass(frozen=True)
class ProtectionSettings:
    width: int = 32
    max_steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    target_accuracy: float = 0.99
    check_every: int = 100
    check_timesteps: int = 100  # accuracy is measured on x_t with t drawn below this

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ProtectionSettings:
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__})


def random_labels(n: int, seed: int) -> Tensor:
    """The fixed random bits the classifier memorises (float 0/1, one per training image)."""
    return torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).float()


def _noisy(images: Tensor, t: Tensor, alphas_cumprod: Tensor, generator: torch.Generator) -> Tensor:
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noise = torch.randn(images.shape, generator=generator)
    return a.sqrt() * images + (1 - a).sqrt() * noise


@torch.no_grad()
def low_noise_accuracy(classifier: nn.Module, images: Tensor, labels: Tensor, alphas_cumprod: Tensor,
                       check_timesteps: int, seed: int) -> float:
    """Accuracy on the training images at timesteps below ``check_timesteps`` (fixed draws)."""
    g = torch.Generator().manual_seed(seed)
    was_training = classifier.training
    classifier.eval()
    correct = 0
    for idx in torch.arange(len(images)).split(512):
        t = torch.randint(0, check_timesteps, (len(idx),), generator=g)
        logits = classifier(_noisy(images[idx], t, alphas_cumprod, g), t)
        correct += int(((logits > 0).float() == labels[idx]).sum())
    classifier.train(was_training)
    return correct / len(images)


def train_protection_classifier(images: Tensor, alphas_cumprod: Tensor, settings: ProtectionSettings,
                                seed: int) -> tuple[ProtectionClassifier, dict[str, Any]]:
    """Train on ``images`` (float [N, C, H, W] in [-1, 1]) with :func:`random_labels`.

    Returns the classifier (eval mode) and what the run records about its training.
    """
    start = time.time()
    labels = random_labels(len(images), seed)
    torch.manual_seed(seed)
    classifier = ProtectionClassifier(images.shape[1], settings.width)
    opt = torch.optim.Adam(classifier.parameters(), lr=settings.lr)
    g = torch.Generator().manual_seed(seed + 1)
    num_timesteps = len(alphas_cumprod)
    accuracy, step = 0.0, 0
    while step < settings.max_steps:
        idx = torch.randint(0, len(images), (settings.batch_size,), generator=g)
        t = torch.randint(0, num_timesteps, (len(idx),), generator=g)
        logits = classifier(_noisy(images[idx], t, alphas_cumprod, g), t)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % settings.check_every == 0 or step == settings.max_steps:
            accuracy = low_noise_accuracy(classifier, images, labels, alphas_cumprod, settings.check_timesteps, seed)
            log.info("train_protection_classifier: step %d, loss %.4f, accuracy on the random labels "
                     "(t < %d) %.3f", step, loss.item(), settings.check_timesteps, accuracy)
            if accuracy >= settings.target_accuracy:
                break
    overfitted = accuracy >= settings.target_accuracy
    if not overfitted:
        log.warning("train_protection_classifier: reached only %.3f of target accuracy %.3f after %d steps; "
                    "protection is weaker. Raise sampling.classifier.max_steps or width",
                    accuracy, settings.target_accuracy, step)
    classifier.eval()
    info = {"steps": step, "train_accuracy_low_noise": accuracy, "overfitted": overfitted,
            "num_images": len(images), "train_wall_s": time.time() - start}
    return classifier, info
