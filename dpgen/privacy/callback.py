"""The accountant callback: ε on the dashboard, privacy.json on disk, the ledger in checkpoints.

The strategy records each logical step in the ledger at the moment its noise is added (the
ledger refuses a step beyond the plan). This callback reports what was spent, stops training
when the planned steps are used up, and carries the ledger through checkpoints so a resumed
run continues from the spent budget instead of restarting at zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from dpgen.privacy.ledger import PrivacyLedger, compute_epsilon


class PrivacyAccountantCallback(Callback):
    def __init__(self, ledger: PrivacyLedger, stage: str, privacy_json: str | Path | None,
                 log_every_n_steps: int = 10) -> None:
        self.ledger = ledger
        self.stage = stage
        self.privacy_json = Path(privacy_json) if privacy_json else None
        self.log_every_n_steps = max(1, log_every_n_steps)

    @property
    def state_key(self) -> str:
        return f"PrivacyAccountant[{self.stage}]"

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        steps = self.ledger.steps_spent(self.stage)
        # RDP is cheap enough for every step and upper-bounds nothing we claim; the governing
        # accountant (PLD by default) is logged at intervals and at the end.
        pl_module.log("privacy/epsilon_rdp", compute_epsilon(self.ledger.events, self.ledger.delta, "rdp"))
        pl_module.log("privacy/steps", float(steps))
        if steps % self.log_every_n_steps == 0 or self.ledger.remaining_steps(self.stage) == 0:
            pl_module.log("privacy/epsilon", self.ledger.epsilon_spent())
            self._write(trainer)
        if self.ledger.remaining_steps(self.stage) <= 0:
            trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)

    def _write(self, trainer: Trainer) -> None:
        if self.privacy_json is not None and trainer.is_global_zero:
            self.ledger.write(self.privacy_json)

    def state_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ledger.load_state_dict(state_dict["ledger"])
