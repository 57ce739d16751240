"""DP-SGD as a Lightning strategy, for one process and for DDP.

One Lightning "batch" is one *logical* DP-SGD step: the Poisson-sampled batch of this rank.
``training_step`` splits it into physical chunks, asks the method for its per-example loss
``[B, K]``, takes per-example gradients of the mean over K, clips each example to norm C and
sums. Noise N(0, σ²C²) is then added once for the whole step (by rank 0 only), the sum is
all-reduced across ranks and divided by the *expected* batch size q·N. ``backward`` only hands
that gradient to the optimizer; Lightning then steps as usual, and callbacks (EMA, accountant)
see exactly one optimizer step per logical step.

Methods contain no DP arithmetic: they implement ``per_example_loss(batch) -> Tensor[B, K]``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.strategies.ddp import _sync_module_states
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch import Tensor

from dpgen.privacy.config import CLIPPING_MODES, check_dp_precision
from dpgen.privacy.events import POISSON_GAUSSIAN
from dpgen.privacy.journal import append_spend
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.privacy.mechanisms import fresh_generator
from dpgen.privacy.per_example import PerExampleGradients, exact_fp32

_CAPTURE_MODE = {"materialize": "materialize", "ghost": "norms", "mixed": "mixed"}


@dataclass(frozen=True)
class DPSGDConfig:
    """Everything the DP step needs, fixed by the privacy plan before training starts."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    dataset_size: int  # global N of the sensitive training split
    max_physical_batch: int = 256
    stage: str = "dp_train"
    clipping: str = "mixed"  # how per-example gradients are clipped; see clipped_gradient_sum
    log_train_loss: bool = False  # log each sensitive batch's loss, un-noised (outside the guarantee)

    def __post_init__(self) -> None:
        if self.max_grad_norm <= 0:
            raise ValueError(f"privacy.clip={self.max_grad_norm}: must be > 0")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample rate q={self.sample_rate}: must be in (0, 1]")
        if self.noise_multiplier < 0:
            raise ValueError(f"noise multiplier {self.noise_multiplier}: must be >= 0")
        if self.clipping not in CLIPPING_MODES:
            raise ValueError(f"privacy.clipping={self.clipping!r}: must be one of {CLIPPING_MODES}")
        if self.max_physical_batch < 1:
            raise ValueError(f"privacy.max_physical_batch={self.max_physical_batch}: must be >= 1")

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.dataset_size


def _batch_len(batch: Any) -> int:
    return len(batch[0]) if isinstance(batch, list | tuple) else len(batch)


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, list | tuple):
        return type(batch)(t[start:stop] for t in batch)
    return batch[start:stop]


def clip_factors(sq_norms: Tensor, max_grad_norm: float) -> Tensor:
    """min(1, C/||g_i||) per example; the tiny constant only guards 0/0 for a zero gradient."""
    return (max_grad_norm / (sq_norms.sqrt() + 1e-12)).clamp(max=1.0)


def clipped_gradient_sum(engine: PerExampleGradients, per_example_loss: Callable[[Any], Tensor], batch: Any,
                         max_grad_norm: float, max_physical_batch: int, clipping: str = "mixed",
                         forward_context: Callable[[], AbstractContextManager] = nullcontext,
                         ) -> tuple[list[Tensor], Tensor]:
    """Sum over the batch of per-example gradients clipped to ``max_grad_norm`` (no noise yet).

    ``forward_context`` wraps the forward pass only (bf16 autocast under mixed precision). The
    backward, the per-example gradients, their norms and the clipped sum run outside it, in the
    parameters' dtype: under autocast the hooks' contractions would run in bf16, and the sum that
    the noise is added to would be bf16 too.

    Flat clipping: one norm over all trainable parameters of an example. The batch is
    processed in physical chunks of ``max_physical_batch`` examples; chunking changes memory
    only. ``clipping`` chooses how, with the same result:

    - ``materialize``: one backward that leaves every example's gradient (``B*P`` values),
      then a weighted sum. Memory grows with B times the trainable parameters.
    - ``ghost``: a first backward keeps only per-example norms (one layer's gradients at a
      time), a second backward of the loss reweighted by the clip factors gives the clipped
      sum, each layer's share by the formula that gave its norm. About one extra backward
      pass, no ``B*P`` memory.
    - ``mixed``: one backward; each layer keeps either its per-example gradients or its
      input and output gradient (``PerExampleGradients`` says which), and the clipped sum of
      the latter is one ordinary weight gradient with reweighted output gradients (book-keeping).

    Returns the clipped sum (one tensor per trainable parameter) and the sum of per-example
    losses (for display).
    """
    if clipping not in CLIPPING_MODES:
        raise ValueError(f"privacy.clipping={clipping!r}: must be one of {CLIPPING_MODES}")
    params = engine.params
    grad_sum: list[Tensor] | None = None
    loss_sum = torch.zeros((), device=params[0].device if params else None)
    n_local = _batch_len(batch)
    for start in range(0, n_local, max_physical_batch):
        chunk = _slice(batch, start, start + max_physical_batch)
        n = _batch_len(chunk)
        with engine.capture(n, mode=_CAPTURE_MODE[clipping]):
            with forward_context():
                losses = per_example_loss(chunk)
                if clipping == "ghost" and torch.is_autocast_enabled(losses.device.type):
                    check_dp_precision("bf16-mixed", clipping)  # refuses, with the reason
            if losses.dim() != 2 or losses.shape[0] != n:
                raise ValueError(f"per_example_loss must return [B, K]; got {tuple(losses.shape)}")
            # Mean over the K copies *before* clipping: the engine sums each example's copies.
            per_example = losses.float().mean(1)
            if clipping == "ghost":
                # The norms come from the first backward, the sum from the second: both passes
                # must compute the same backpropagated gradients, at full precision.
                with exact_fp32():
                    engine.backward(per_example.sum(), retain_graph=True)
                    factors = clip_factors(engine.squared_norms(), max_grad_norm)
                    clipped = engine.reweighted_sum((factors.detach() * per_example).sum())
            else:
                engine.backward(per_example.sum())
                clipped = engine.weighted_sum(clip_factors(engine.squared_norms(), max_grad_norm))
            if grad_sum is None:
                grad_sum = clipped
            else:
                for acc, g in zip(grad_sum, clipped):
                    acc.add_(g)
        loss_sum += losses.detach().float().mean(1).sum()
    if grad_sum is None:  # an empty local batch (Poisson sampling) still takes part in the step
        grad_sum = [torch.zeros_like(p) for p in params]
    return grad_sum, loss_sum


def add_gaussian_noise(grad_sum: list[Tensor], std: float, generator: torch.Generator) -> None:
    """Adds N(0, std²) independently to every coordinate of the clipped sum, in place."""
    # One parameter tensor at a time: a single draw for all of them would briefly hold noise the
    # size of the whole trainable set, for little gain (0.8 vs 1.0 ms, timed on 111 tensors sized like DP-LDM's set).
    for g in grad_sum:
        g.add_(torch.randn(g.shape, generator=generator, device=g.device, dtype=g.dtype), alpha=std)


def dp_gradient(engine: PerExampleGradients, per_example_loss: Callable[[Any], Tensor], batch: Any,
                config: DPSGDConfig, noise_generator: torch.Generator | None, *,
                ledger: PrivacyLedger | None = None,
                spend_journal: Path | None = None,
                forward_context: Callable[[], AbstractContextManager] = nullcontext,
                noise: bool = True) -> tuple[list[Tensor], Tensor]:
    """One DP-SGD step's gradient, and the summed loss of the local batch; what a run's strategy
    and ``make bench`` both take, so the benchmark times the step that trains.

    The clipped per-example sum is charged to ``ledger`` (and appended to ``spend_journal``, which
    only rank 0 passes) before its noise is drawn: a crash between the two then costs budget
    instead of giving a free draw. Under DDP the noise is drawn once, by rank 0, and added to the
    sum of every rank's clipped sum. The result is normalised by the *expected* batch size q·N,
    not the realised one, whose size would reveal whether an example was sampled.
    ``noise_generator`` is rank 0's (other ranks draw nothing and may pass None); ``noise=False``
    is for tests that need the un-noised update, and no config reaches it.
    """
    grad_sum, loss_sum = clipped_gradient_sum(engine, per_example_loss, batch, config.max_grad_norm,
                                              config.max_physical_batch, config.clipping, forward_context)
    if ledger is not None:
        ledger.record(config.stage, POISSON_GAUSSIAN, config.noise_multiplier, config.sample_rate, 1)
        if spend_journal is not None:
            append_spend(spend_journal, ledger)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    if rank == 0 and noise and config.noise_multiplier > 0:
        if noise_generator is None:
            raise ValueError("rank 0 draws the step's noise: it needs a noise generator")
        add_gaussian_noise(grad_sum, config.noise_multiplier * config.max_grad_norm, noise_generator)
    if distributed:
        # One noise draw for the step: rank 0's noise plus every rank's clipped sum.
        flat = torch.cat([g.flatten() for g in grad_sum])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grad_sum:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    return [g / config.expected_batch_size for g in grad_sum], loss_sum


def assert_dp_compatible(module: torch.nn.Module) -> None:
    """Refuse modules that per-example clipping cannot make private, before any training.

    Opacus's validator flags e.g. BatchNorm, whose batch statistics mix examples so that one
    example's gradient depends on the others in its batch. It only looks at trainable modules;
    a frozen or affine-free BatchNorm mixes examples all the same, and its running statistics
    of the sensitive batches would be saved un-noised, so every module is checked for those.
    """
    from opacus.validators import ModuleValidator

    for name, m in module.named_modules():
        tracks = isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) and m.track_running_stats
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or tracks:
            raise ValueError(f"model is not DP-compatible: {name} ({type(m).__name__}) mixes examples or keeps "
                             "running statistics of the sensitive batches, trainable or not. "
                             "Fix: use GroupNorm or LayerNorm")

    errors = ModuleValidator.validate(module, strict=False)
    if errors:
        first = str(errors[0]).split(". ")[0]
        raise ValueError(f"model is not DP-compatible: {first}. Fix: use GroupNorm or LayerNorm")


class _DPSGDMixin:
    """The DP-SGD logical step; mixed into a single-device or a DDP strategy."""

    def _init_dp(self, config: DPSGDConfig, ledger: PrivacyLedger | None, spend_journal: str | Path | None) -> None:
        self.dp_config = config
        self.ledger = ledger
        # Rank 0 appends each step's charge here before the step's noise (dpgen/privacy/journal.py).
        self.spend_journal = Path(spend_journal) if spend_journal is not None else None
        self._engine: PerExampleGradients | None = None
        self._dp_grads: list[Tensor] | None = None
        # Fresh OS entropy, never the run seed: reproducible noise would void the guarantee.
        # Tests may replace it; ``_noise_enabled`` is a test-only switch, never set from config.
        self.noise_generator: torch.Generator | None = None
        self._noise_enabled = True

    # -- set-up ---------------------------------------------------------------------------
    @staticmethod
    def _reseed_example_randomness() -> None:
        """Seed torch's global generators (CPU and CUDA) from OS entropy, on every rank.

        ``per_example_loss`` draws each example's timesteps, diffusion noise and label dropout
        from them row by row, so which draws an example gets depends on which others are in
        its Poisson batch. The sensitivity C of the clipped sum holds only if those draws are
        secret: then the other examples' draws can be coupled across neighbouring datasets.
        From the run seed, which is public, removing one example shifts every later row's
        draws and moves the sum by far more than C. (Ranks also stop repeating each other's.)
        """
        torch.manual_seed(secrets.randbits(63))

    def _check_trainer(self, trainer: Any) -> None:
        if trainer.gradient_clip_val:
            raise ValueError("trainer.gradient_clip_val must be unset under DP: clipping is per example")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError("trainer.accumulate_grad_batches must be 1 under DP: use privacy.max_physical_batch")
        check_dp_precision(getattr(trainer, "precision", "32"), self.dp_config.clipping)

    def _attach_engine(self) -> None:
        module = self.lightning_module
        if self._engine is None:
            assert_dp_compatible(module)
            # Created after callbacks' setup, so copies of the module (EMA) carry no hooks.
            self._engine = PerExampleGradients(module)

    # -- the logical step -----------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int = 0, *args: Any, **kwargs: Any) -> Tensor:
        module = self.lightning_module
        assert self._engine is not None, "DP strategy used before setup"
        cfg = self.dp_config
        if self.noise_generator is None and self.is_global_zero:  # the one rank that draws noise
            self.noise_generator = fresh_generator(self.root_device)
        self._dp_grads, loss_sum = dp_gradient(
            self._engine, module.per_example_loss, batch, cfg, self.noise_generator, ledger=self.ledger,
            spend_journal=self.spend_journal if self.is_global_zero else None,
            forward_context=self.precision_plugin.train_step_context, noise=self._noise_enabled)
        # The mean loss of a sensitive batch has no noise: it never feeds a decision, and it is
        # logged (to the progress bar, CSV, W&B) only where the config asks for it.
        n_local = _batch_len(batch)
        mean_loss = loss_sum / max(n_local, 1)
        if cfg.log_train_loss:
            module.log("train/loss", mean_loss, prog_bar=True, batch_size=max(n_local, 1))
        return mean_loss.detach().requires_grad_()

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        # Lightning zeroes gradients between training_step and backward; install ours now.
        assert self._dp_grads is not None
        for p, g in zip(self._engine.params, self._dp_grads):
            p.grad = g.to(p.dtype)
        self._dp_grads = None
        return closure_loss


class DPSGDStrategy(_DPSGDMixin, SingleDeviceStrategy):
    """DP-SGD in one process."""

    def __init__(self, config: DPSGDConfig, ledger: PrivacyLedger | None = None,
                 device: str | torch.device = "cpu", spend_journal: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(device=torch.device(device), **kwargs)
        self._init_dp(config, ledger, spend_journal)

    def setup(self, trainer: Any) -> None:
        self._check_trainer(trainer)
        super().setup(trainer)
        self._attach_engine()
        self._reseed_example_randomness()


class _LedgerReturningLauncher(_MultiProcessingLauncher):
    """Spawned ranks record their steps in their own copies of the ledger; rank 0's copy is
    sent back with its weights, so the process that started them holds the one ledger that
    it writes to ``privacy.json`` and that later stages continue."""

    def get_extra_results(self, trainer: Any) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        ledger = self._strategy.ledger
        extra["ledger"] = ledger.state_dict() if ledger is not None else None
        return extra

    def update_main_process_results(self, trainer: Any, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        if extra.get("ledger") is not None:
            self._strategy.ledger.load_state_dict(extra["ledger"])


class DDPDPSGDStrategy(_DPSGDMixin, DDPStrategy):
    """DP-SGD over DDP ranks: each rank samples its shard at the global rate q.

    The model is *not* wrapped in DistributedDataParallel: DDP would all-reduce raw,
    unclipped gradients during backward. We all-reduce the clipped, noised sum once per
    logical step instead; identical updates keep the replicas identical.

    With ``start_method="spawn"`` the ledger passed in is updated from rank 0 when training
    ends; with ``"popen"`` (processes started by srun/torchrun) each process keeps its own.
    """

    def __init__(self, config: DPSGDConfig, ledger: PrivacyLedger | None = None,
                 spend_journal: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_dp(config, ledger, spend_journal)

    def setup(self, trainer: Any) -> None:
        self._check_trainer(trainer)
        super().setup(trainer)
        self._attach_engine()
        self._reseed_example_randomness()  # after the weights were synchronised from rank 0

    def configure_ddp(self) -> None:
        _sync_module_states(self.model)

    def _configure_launcher(self) -> None:
        if self._start_method == "popen":
            super()._configure_launcher()
        else:
            self._launcher = _LedgerReturningLauncher(self, start_method=self._start_method)
