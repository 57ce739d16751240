"""PrivImage (Li et al., USENIX Security 2024): pretrain on the public classes a DP semantic
query finds closest to the sensitive data, then fine-tune the whole model with DP-SGD.

The generator is DPDM's (whole-model DP-SGD, multiplicity K, biased timesteps); what differs
is where its pretraining comes from, which is the job of the stages in
:mod:`dpgen.stages.semantic`. This module only refuses configurations that cannot work
(the selection's own settings: :mod:`dpgen.methods.selection`).
"""

from __future__ import annotations

from omegaconf import DictConfig

from dpgen.errors import ConfigError
from dpgen.methods.dpdm import DPDMModule


class PrivImageModule(DPDMModule):
    """Diffusion trained only through :class:`dpgen.privacy.strategy.DPSGDStrategy`, initialised
    from the pretraining on the selected public classes."""

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        if cfg.method.pretrain != "selection":
            raise ConfigError("method.pretrain", cfg.method.pretrain, "privimage pretrains on the public selection",
                              "set method.pretrain=selection (or use method=dpdm)")
