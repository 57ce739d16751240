"""``python -m dpgen.bench`` (``make bench``): what privacy costs per training step.

For each model and trainable set, and each multiplicity K, one process times a non-private
step and a DP-SGD step on the *same* B·K images (the method's real per-example loss, the
strategy's real clipped sum, noise and optimizer step), interleaved so that machine noise
hits both alike, and measures the peak memory of each. It prints the ratios and writes
them to ``bench.output`` (``outputs/bench.json``) as a list of rows.

Models are names under ``conf/model/``. A pixel UNet (``unet_*``) trains on B·K images; a
latent model (``ldm_*``) is DP-LDM's denoiser on the latents of its autoencoder (what
``dp_finetune`` trains on), where ``full`` is ``method.trainable=all`` and ``attention_only``
is DP-LDM's default set (``conf/method/dpldm.yaml``). For a pixel UNet, ``attention_only``
freezes everything but its attention blocks.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the profiler's allocation
events of one step (peak of the running sum), plus what was allocated before the step
(parameters, optimizer state, the batch), so both numbers are totals.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from diffusers.models.attention_processor import Attention
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from dpgen.bench_checks import check_bench_config, check_output, load_model_config
from dpgen.io import write_json
from dpgen.methods.base import DiffusionModule
from dpgen.methods.dpldm import DPLDMModule
from dpgen.models.config import is_latent_model, latent_shape
from dpgen.models.ldm import build_autoencoder, build_latent_denoiser
from dpgen.models.unet import build_unet
from dpgen.overrides import CONF_DIR
from dpgen.privacy.events import POISSON_GAUSSIAN
from dpgen.privacy.journal import JOURNAL
from dpgen.privacy.ledger import PlannedStage, PrivacyLedger
from dpgen.privacy.mechanisms import fresh_generator
from dpgen.privacy.per_example import PerExampleGradients
from dpgen.privacy.strategy import DPSGDConfig, assert_dp_compatible, dp_gradient

log = logging.getLogger("dpgen.bench")


def dpldm_trainable(trainable: str) -> str:
    """DP-LDM's parameter set for a bench set: ``all``, or the method's default (attention)."""
    return "all" if trainable == "full" else OmegaConf.load(CONF_DIR / "method" / "dpldm.yaml").method.trainable


def restrict_to_attention(module: torch.nn.Module) -> None:
    """Freeze everything but the attention blocks (their norms and projections)."""
    module.requires_grad_(False)
    blocks = [m for m in module.modules() if isinstance(m, Attention)]
    if not blocks:
        raise SystemExit("dpgen.bench: attention_only needs a model with attention blocks")
    for block in blocks:
        block.requires_grad_(True)


def build_module(model_name: str, trainable: str, k: int, cfg: DictConfig, device: torch.device) -> DiffusionModule:
    torch.manual_seed(0)
    model_cfg = load_model_config(model_name)
    diffusion = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    if is_latent_model(model_cfg):
        return DPLDMModule(
            denoiser=build_latent_denoiser(model_cfg, cfg.image_size, cfg.num_classes),
            autoencoder=build_autoencoder(model_cfg, cfg.channels, cfg.image_size),
            num_classes=cfg.num_classes, diffusion=diffusion, timesteps={"kind": "uniform"}, lr=1e-4,
            multiplicity=k, label_dropout=0.1, trainable=dpldm_trainable(trainable)).to(device)
    unet = build_unet(model_cfg, cfg.image_size, cfg.channels, cfg.num_classes)
    module = DiffusionModule(unet, cfg.num_classes, diffusion, {"kind": "uniform"}, lr=1e-4, multiplicity=k,
                             label_dropout=0.1)
    if trainable == "attention_only":
        restrict_to_attention(module)
    return module.to(device)


def bench_batch(model_name: str, cfg: DictConfig, device: torch.device) -> list[Tensor]:
    """B fixed examples as the model trains on them: images in [-1, 1], or unit-scale latents."""
    model_cfg = load_model_config(model_name)
    g = torch.Generator().manual_seed(0)
    if is_latent_model(model_cfg):  # its size checked by check_bench_config
        examples = torch.randn(cfg.batch_size, *latent_shape(model_cfg, cfg.image_size), generator=g)
    else:
        examples = torch.rand(cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=g)
    return [examples.to(device), labels.to(device)]


def _tensor_bytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _persistent_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: list[Tensor]) -> int:
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
    return _tensor_bytes(list(module.parameters()) + state + batch)


def peak_memory_bytes(step: Callable[[], None], module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      batch: list[Tensor], device: torch.device) -> int:
    """Peak bytes allocated while ``step`` runs, counting what already existed."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile

    before = _persistent_bytes(module, optimizer, batch)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # The public event list nets allocations inside each op; the raw events keep every
    # allocation and free in order, which is what a peak needs.
    running = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU:
            running += event.nbytes()
            peak = max(peak, running)
    return before + peak


class StepPair:
    """A non-private and a DP-SGD step of one module on one fixed batch.

    The DP step is a run's (:func:`dpgen.privacy.strategy.dp_gradient`): charged to a planned
    ledger and appended, fsynced, to a spend journal (in a temporary directory) before its noise."""

    # A stand-in sensitive set: q·N is then the batch, so the update is normalised as in a run.
    DATASET_SIZE = 60_000

    def __init__(self, module: DiffusionModule, batch: list[Tensor], precision: str, clipping: str,
                 max_physical_batch: int | None = None) -> None:
        self.module, self.batch = module, batch
        rows = len(batch[0])
        # max_physical_batch None: the whole batch in one chunk (make bench compares like with like on B*K images).
        self.config = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=rows / self.DATASET_SIZE,
                                  dataset_size=self.DATASET_SIZE, max_physical_batch=max_physical_batch or rows,
                                  clipping=clipping)
        self.ledger = PrivacyLedger(1e6, 1e-6, self.DATASET_SIZE)
        # Planned far beyond the steps a bench takes, so that recording one is the covered check a run makes.
        self.ledger.plan([PlannedStage(self.config.stage, POISSON_GAUSSIAN, self.config.sample_rate, count=10_000,
                                       noise_multiplier=self.config.noise_multiplier)])
        self._journal_dir = tempfile.TemporaryDirectory(prefix="dpgen-bench-")  # removed with the pair
        self.journal = Path(self._journal_dir.name) / JOURNAL
        self.optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-4)
        self.generator = fresh_generator(batch[0].device)
        self.autocast = precision == "bf16"
        assert_dp_compatible(module)
        # Built once, as the strategy does for a run; its hooks are attached only for the DP step,
        # as a non-private run has none.
        self.engine = PerExampleGradients(module)
        self.engine.remove()

    def _context(self) -> Any:
        return torch.autocast(self.batch[0].device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def nonprivate(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self._context():
            loss = self.module.per_example_loss(self.batch).float().mean()
        loss.backward()
        self.optimizer.step()

    def private(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.engine.attach()
        try:
            grads, _ = dp_gradient(self.engine, self.module.per_example_loss, self.batch, self.config, self.generator,
                                   ledger=self.ledger, spend_journal=self.journal, forward_context=self._context)
        finally:
            self.engine.remove()
        for p, g in zip(self.engine.params, grads):
            p.grad = g
        self.optimizer.step()


def time_step(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(pair: StepPair, warmup: int, repeats: int, device: torch.device) -> dict:
    times: dict[str, list[float]] = {"nonprivate": [], "private": []}
    for i in range(warmup + repeats):
        # Alternate which goes first, so drift (thermal, other load) hits both alike.
        order = ("nonprivate", "private") if i % 2 == 0 else ("private", "nonprivate")
        for name in order:
            elapsed = time_step(getattr(pair, name), device)
            if i >= warmup:
                times[name].append(elapsed)
    mem = {name: peak_memory_bytes(getattr(pair, name), pair.module, pair.optimizer, pair.batch, device)
           for name in ("nonprivate", "private")}
    np_s, dp_s = statistics.median(times["nonprivate"]), statistics.median(times["private"])
    # The ratio is taken per repeat, between the two steps run back to back, then its median:
    # this host's speed drifts by tens of percent over seconds, and a pair shares its moment.
    ratios = [dp / base for dp, base in zip(times["private"], times["nonprivate"])]
    mb = 2**20
    return {
        "dp_step_s": dp_s, "dp_step_min_s": min(times["private"]), "dp_step_max_s": max(times["private"]),
        "nonprivate_step_s": np_s, "nonprivate_step_min_s": min(times["nonprivate"]),
        "nonprivate_step_max_s": max(times["nonprivate"]),
        "time_ratio": statistics.median(ratios), "time_ratio_min": min(ratios), "time_ratio_max": max(ratios),
        "dp_peak_mb": mem["private"] / mb, "nonprivate_peak_mb": mem["nonprivate"] / mb,
        "memory_ratio": mem["private"] / mem["nonprivate"],
        "privacy_memory_overhead_mb": (mem["private"] - mem["nonprivate"]) / mb,
    }


# Near the memory limit cuDNN and cuBLAS fail with errors of their own rather than torch's.
_OUT_OF_MEMORY = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED",
                  "Unable to find a valid cuDNN algorithm", "can't allocate memory")


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and any(s in str(err) for s in _OUT_OF_MEMORY))


def run_bench(cfg: DictConfig, on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Measure every configuration; ``on_row(rows so far)`` after each, so that a run stopped
    part-way (a time limit on a lent GPU) keeps what it measured."""
    check_bench_config(cfg)
    device = torch.device(cfg.device)
    batches = {name: bench_batch(name, cfg, device) for name in cfg.models}
    rows = []
    for model_name, batch in batches.items():
        for trainable in cfg.trainable:
            for clipping, k in itertools.product(cfg.clipping, cfg.multiplicities):
                module = build_module(model_name, trainable, k, cfg, device)
                total = sum(p.numel() for p in module.parameters())
                n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
                pair = StepPair(module, batch, str(cfg.precision), clipping)
                row = {"config": f"{model_name}/{trainable}/{clipping}", "K": k, "B": cfg.batch_size,
                       "image_size": cfg.image_size, "channels": cfg.channels, "device": str(device),
                       "precision": str(cfg.precision), "threads": torch.get_num_threads(),
                       "total_parameters": total, "trainable_parameters": n_train}
                if device.type == "cuda":
                    # Both steps run under these; the per-example contractions never use TF32 (exact_fp32).
                    row.update(tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                               tf32_cudnn=torch.backends.cudnn.allow_tf32)
                try:
                    row.update(measure(pair, cfg.warmup, cfg.repeats, device))
                except RuntimeError as err:
                    if not is_out_of_memory(err):
                        raise
                    # A row of its own, as in the reference table: the other sizes still get measured.
                    row["out_of_memory"] = True
                    log.info("%s K=%d: out of memory", row["config"], k)
                else:
                    log.info("%s K=%d: time x%.2f (DP %.3fs, non-private %.3fs), memory x%.2f (%.0f / %.0f MB)",
                             row["config"], k, row["time_ratio"], row["dp_step_s"], row["nonprivate_step_s"],
                             row["memory_ratio"], row["dp_peak_mb"], row["nonprivate_peak_mb"])
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
                del module, pair
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("| config | params (trainable) | B, K | non-private s | DP s [min–max] | time × [min–max] "
            "| non-private MB | DP MB | memory × | DP overhead MB |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        size = (f"| {r['config']} | {r['total_parameters'] / 1e6:.2f}M ({r['trainable_parameters'] / 1e6:.2f}M) "
                f"| {r['B']}, {r['K']} ")
        if r.get("out_of_memory"):
            lines.append(size + "| out of memory |" + " |" * 6)
            continue
        lines.append(
            size + f"| {r['nonprivate_step_s']:.3f} "
            f"| {r['dp_step_s']:.3f} [{r['dp_step_min_s']:.3f}–{r['dp_step_max_s']:.3f}] "
            f"| {r['time_ratio']:.2f} [{r['time_ratio_min']:.2f}–{r['time_ratio_max']:.2f}] "
            f"| {r['nonprivate_peak_mb']:.0f} | {r['dp_peak_mb']:.0f} | {r['memory_ratio']:.2f} "
            f"| {r['privacy_memory_overhead_mb']:.0f} |")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    bench = cfg.bench
    check_bench_config(bench)  # run_bench checks again; here before the threads are set and the output's folder made
    output = Path(str(bench.output))
    check_output(output)
    if bench.get("threads") is not None:
        torch.set_num_threads(bench.threads)
    rows = run_bench(bench, on_row=lambda rows: write_json(output, rows))
    print(format_table(rows))
    print(f"written to {bench.output}")


if __name__ == "__main__":
    main()
