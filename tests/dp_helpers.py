"""Tiny modules and references shared by the DP-SGD tests."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader

from dpgen.privacy.strategy import DPSGDConfig, DPSGDStrategy


class TinyNet(nn.Module):
    """Every layer type the strategy folds or delegates: Conv2d, GroupNorm, Embedding, Linear."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.embed = nn.Embedding(num_classes, 4)
        self.head = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.conv(x)) + self.embed(y)[:, :, None, None])
        return self.head(h.flatten(1))


class TinyDPModule(LightningModule):
    """Deterministic per-example loss with K distinct copies (copy k shifts the input by k)."""

    def __init__(self, multiplicity: int = 1, lr: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyNet()
        self.k = multiplicity
        self.lr = lr

    def copies_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, k = len(x), self.k
        # Copy-major rows (row c*B + i is copy c of example i), as the strategy expects.
        xs = x.repeat(k, 1, 1, 1) + 0.3 * torch.arange(k, device=x.device).repeat_interleave(b)[:, None, None, None]
        out = self.net(xs, y.repeat(k))
        return out.pow(2).sum(1).mul(3.0).view(k, b).T  # large enough that clipping bites

    def per_example_loss(self, batch):
        return self.copies_loss(batch[0], batch[1])

    def training_step(self, batch, batch_idx):
        raise AssertionError("under DP the strategy runs the step; the module's own must not run")

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def make_batch(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)]


def reference_update(module: TinyDPModule, batch, clip: float, expected_batch: float) -> list[torch.Tensor]:
    """Explicit per-example loop: grad of the mean over K, clip, sum, divide by q*N."""
    params = [p for p in module.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    x, y = batch
    for i in range(len(x)):
        loss = module.copies_loss(x[i : i + 1], y[i : i + 1]).mean()
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        scale = min(1.0, clip / norm.item())
        for t, g in zip(total, grads):
            t += scale * g
    return [t / expected_batch for t in total]


def one_dp_step(module: TinyDPModule, batch, config: DPSGDConfig, noise: bool = False,
                ledger=None, generator: torch.Generator | None = None, device: str = "cpu",
                precision: str = "32-true") -> list[torch.Tensor]:
    """Runs a single logical step through a real Trainer on ``device``; returns the parameter
    change, on the CPU (where the references are computed)."""
    before = [p.detach().clone() for p in module.parameters()]
    strategy = DPSGDStrategy(config, ledger=ledger, device="cuda:0" if device == "cuda" else "cpu")
    strategy._noise_enabled = noise
    strategy.noise_generator = generator
    # The accelerator is named, not "auto": on a machine with a GPU the CPU tests stay on the CPU.
    trainer = Trainer(max_steps=1, strategy=strategy, accelerator="gpu" if device == "cuda" else "cpu",
                      precision=precision, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader([batch], batch_size=None))
    return [p.detach().cpu() - b for p, b in zip(module.parameters(), before)]


def record_calls(monkeypatch, module, name: str) -> list[tuple[tuple, dict]]:
    """Replace ``module.name`` (a function) by a wrapper that records each call's arguments."""
    original, calls = getattr(module, name), []

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return calls


def record_instances(monkeypatch, module, name: str) -> list:
    """Replace the class ``module.name`` by a subclass that records every instance built."""
    original, instances = getattr(module, name), []

    class Recorded(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            instances.append(self)

    monkeypatch.setattr(module, name, Recorded)
    return instances
