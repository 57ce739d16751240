"""Where curves and results go: ``logger=csv`` or ``logger=wandb``.

Every training stage writes CSV files under ``<run>/logs/<stage>/`` (ε spent, learning rate, and
the training loss of non-private stages; of DP stages only with ``privacy.log_train_loss=true``).
With ``logger=wandb`` the whole dpgen run is also one W&B run, opened by the pipeline before the
first stage: each stage's Lightning ``WandbLogger`` attaches to it with the stage as key prefix,
and the final metrics become its summary. ``logger.mode=offline`` writes
under ``<run>/wandb/`` and needs no account; ``wandb sync`` uploads it later. A resumed run logs
to the W&B run it started (its id and group are kept in ``<run>/wandb-run.json``); W&B cannot
resume an offline run, so offline each attempt writes its own ``offline-run-*`` directory under
the same run id.

A DP stage's training loss, where logged, is computed on sensitive batches without noise, and
so are the summary's metrics against the training split: like the CSV logs, a W&B run is not
part of the released output, and its notes and ``outside_dp_guarantee`` summary say so.
"""

from __future__ import annotations

from typing import Any

from dpgen.checks import require_choice, require_int, to_plain
from dpgen.errors import ConfigError

LOGGERS = ("csv", "wandb")
WANDB_MODES = ("online", "offline", "disabled")
WANDB_CONSOLES = ("off", "auto", "wrap", "redirect")


def validate_logger_config(cfg: Any) -> None:
    lg = to_plain(cfg, "logger")
    if require_choice(lg, "logger", "name", LOGGERS) == "wandb":
        require_choice(lg, "logger", "mode", WANDB_MODES)
        require_choice(lg, "logger", "console", WANDB_CONSOLES)
        tags = lg.get("tags")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):  # W&B refuses others at init
            raise ConfigError("logger.tags", tags, "must be a list of words", "e.g. logger.tags=[mnist,dpdm]")
    require_int(lg, "logger", "sample_every_n_steps", minimum=0)
    require_int(lg, "logger", "grid_per_class", minimum=1)
    require_int(lg, "logger", "grid_steps", minimum=1)
