"""DP-SGD across 2 CPU processes (gloo): replicas stay identical, noise is drawn once, and
every rank keeps the same ledger with the global sampling rate."""

from __future__ import annotations

import json

import pytest
import torch
from dp_helpers import TinyDPModule
from lightning.pytorch import Callback, Trainer
from torch.utils.data import TensorDataset

from dpgen.privacy.ledger import PlannedStage, PrivacyLedger
from dpgen.privacy.poisson import PoissonDataModule
from dpgen.privacy.strategy import DDPDPSGDStrategy, DPSGDConfig

N, Q = 40, 0.2


class DumpParams(Callback):
    def __init__(self, out):
        self.out = out

    def on_train_start(self, trainer, pl_module):
        self.before = [p.detach().clone() for p in pl_module.parameters()]
        self.drawn = []
        self.uniforms = torch.rand(4).tolist()  # what per_example_loss would draw its timesteps from

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.drawn.append(batch[0][:, 0, 0, 0].round().long().tolist())  # the examples' indices (_run_ddp)

    def on_train_end(self, trainer, pl_module):
        after = [p.detach().clone() for p in pl_module.parameters()]
        ledger = trainer.strategy.ledger
        torch.save({"before": self.before, "after": after, "ledger": ledger.to_json() if ledger else None,
                    "drawn": self.drawn, "uniforms": self.uniforms}, f"{self.out}/rank{trainer.global_rank}.pt")


class ZeroGradModule(TinyDPModule):
    def per_example_loss(self, batch):
        return 0.0 * super().per_example_loss(batch)


def _ledger(steps):
    ledger = PrivacyLedger(epsilon_target=8.0, delta=1e-5, dataset_size=N)
    ledger.plan([PlannedStage("dp_train", "poisson_subsampled_gaussian", sample_rate=Q, count=steps)])
    return ledger


def _run_ddp(module, steps, out, clip=1.0):
    ledger = _ledger(steps)
    cfg = DPSGDConfig(noise_multiplier=ledger.planned_noise_multiplier("dp_train"), max_grad_norm=clip,
                      sample_rate=Q, dataset_size=N, max_physical_batch=8)
    strategy = DDPDPSGDStrategy(cfg, ledger=ledger, start_method="spawn", process_group_backend="gloo")
    trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False, callbacks=[DumpParams(out)])
    g = torch.Generator().manual_seed(0)
    images = torch.randn(N, 1, 6, 6, generator=g)
    images[:, 0, 0, 0] = torch.arange(N)  # each example says which it is
    data = TensorDataset(images, torch.randint(0, 3, (N,), generator=g))
    trainer.fit(module, datamodule=PoissonDataModule(data, Q, steps))
    return cfg, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
def test_ddp_replicas_identical_and_one_global_ledger(tmp_path):
    _, (r0, r1) = _run_ddp(TinyDPModule(2, lr=0.1), 3, tmp_path)
    # Each rank samples only its own shard: were both to sample the whole set, an example could
    # join one step twice (sensitivity 2C, rate 1-(1-q)^2) and no ledger would see it.
    assert len(r0["drawn"]) == len(r1["drawn"]) == 3
    for rank, r in enumerate((r0, r1)):
        assert all(i % 2 == rank for batch in r["drawn"] for i in batch), r["drawn"]
    assert sum(map(len, r0["drawn"] + r1["drawn"])) > 0
    for a, b in zip(r0["after"], r1["after"]):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(r0["after"], r0["before"]))
    assert r0["ledger"]["events"] == r1["ledger"]["events"]
    # Each example's timesteps and noise come from secret, per-rank entropy: a spawned process
    # starts from torch's fixed default seed, from which both ranks would draw alike and publicly.
    default = torch.Generator().manual_seed(torch.Generator().initial_seed())
    assert r0["uniforms"] != r1["uniforms"] and torch.rand(4, generator=default).tolist() not in \
        (r0["uniforms"], r1["uniforms"])
    single = _ledger(3)
    single.record("dp_train", "poisson_subsampled_gaussian", single.planned_noise_multiplier("dp_train"), Q, 3)
    assert r0["ledger"]["events"] == json.loads(json.dumps(single.to_json()))["events"]


@pytest.mark.slow
def test_ddp_noise_is_drawn_once_per_step(tmp_path):
    cfg, (r0, _) = _run_ddp(ZeroGradModule(1, lr=1.0), 1, tmp_path, clip=2.0)
    update = torch.cat([(a - b).flatten() for a, b in zip(r0["after"], r0["before"])])
    expected = cfg.noise_multiplier * cfg.max_grad_norm / cfg.expected_batch_size
    # Noise on both ranks would give sqrt(2) x expected; none at all would give 0.
    assert update.std().item() == pytest.approx(expected, rel=0.15)
