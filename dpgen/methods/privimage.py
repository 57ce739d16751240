"""PrivImage (Li et al., USENIX Security 2024): pretrain on the public classes a DP semantic
query finds closest to the sensitive data, then fine-tune the whole model with DP-SGD.

The generator is DPDM's (whole-model DP-SGD, multiplicity K, biased timesteps); what differs
is where its pretraining comes from, which is the job of the stages in
:mod:`dpgen.stages.semantic`. Its settings are checked in :mod:`dpgen.methods.config` and
:mod:`dpgen.methods.selection`.
"""

from __future__ import annotations

from dpgen.methods.dpdm import DPDMModule


class PrivImageModule(DPDMModule):
    """Diffusion trained only through :class:`dpgen.privacy.strategy.DPSGDStrategy`, initialised
    from the pretraining on the selected public classes."""
