"""The accountant callback: ε on the dashboard, privacy.json on disk, the ledger in checkpoints.

The strategy records each logical step in the ledger just before its noise is drawn (the
ledger refuses a step beyond the plan). This callback reports what was spent, stops training
when the planned steps are used up, and carries the ledger through checkpoints so a resumed
run continues from the spent budget instead of restarting at zero.

What a crash may not lose is the spend of any step that drew noise. The strategy appends each
step's charge to the spend journal before drawing its noise (dpgen/privacy/journal.py);
privacy.json is written (before the other callbacks run) at every step where one of them
releases something derived from the weights (sample grids), and a checkpoint carries its own
copy of the ledger. On resume the ledger keeps whichever record spent most, and training stops
when the plan's steps are spent, even if the restored weights are behind the spend: a step that
ran after the last checkpoint is lost to the model, never run a second time uncharged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from dpgen.privacy.ledger import PrivacyLedger

log = logging.getLogger(__name__)


class PrivacyAccountantCallback(Callback):
    def __init__(self, ledger: PrivacyLedger, stage: str, privacy_json: str | Path | None,
                 log_every_n_steps: int = 10, output_every_n_steps: int = 0) -> None:
        """``output_every_n_steps``: the cadence of another callback's released outputs (sample
        grids; 0 = none), at which privacy.json is written too."""
        self.ledger = ledger
        self.stage = stage
        self.privacy_json = Path(privacy_json) if privacy_json else None
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.output_every_n_steps = output_every_n_steps
        self._logged_at: int | None = None

    @property
    def state_key(self) -> str:
        return f"PrivacyAccountant[{self.stage}]"

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The ledger, not the step counter, says how many steps are left: after a crash that lost
        # steps, the restored weights are behind the spend (see load_state_dict).
        trainer.fit_loop.epoch_loop.max_steps = trainer.global_step + self.ledger.remaining_steps(self.stage)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        steps = self.ledger.steps_spent(self.stage)
        if steps % self.log_every_n_steps == 0 or self.ledger.remaining_steps(self.stage) == 0:
            self._log(trainer, steps)
            self._write(trainer)
        elif self.output_every_n_steps and trainer.global_step % self.output_every_n_steps == 0:
            self._write(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, self.ledger.steps_spent(self.stage))
        self._write(trainer)

    def _log(self, trainer: Trainer, steps: int) -> None:
        """ε after ``steps`` DP steps, at x = ``steps``, straight to the stage's loggers: through
        ``LightningModule.log`` it would reach them only every ``trainer.log_every_n_steps``, one
        step off, and miss the last step. The claimed ε is the governing accountant's; RDP's bound
        (usually looser) is logged beside it for comparison with papers that report RDP's."""
        if not trainer.is_global_zero or steps == self._logged_at:
            return
        self._logged_at = steps
        metrics = {"privacy/epsilon": self.ledger.epsilon_spent(),
                   "privacy/epsilon_rdp": self.ledger.epsilon_spent("rdp"),
                   "privacy/steps": float(steps)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=steps)

    def _write(self, trainer: Trainer) -> None:
        if self.privacy_json is not None and trainer.is_global_zero:
            self.ledger.write(self.privacy_json)

    def state_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        checkpointed = state_dict["ledger"]
        lost = self.ledger.steps_spent(self.stage) - PrivacyLedger.from_json(checkpointed).steps_spent(self.stage)
        self.ledger.load_state_dict(checkpointed)  # keeps privacy.json's record where it spent more
        if lost > 0:
            log.warning("%s: %d steps ran after the last checkpoint and were lost with the crash; their "
                        "budget stays spent, so the model gets %d fewer steps than planned "
                        "(trainer.checkpoint_every_n_steps sets how many a crash can lose)",
                        self.stage, lost, lost)
