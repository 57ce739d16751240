"""One LightningModule per method: only what differs between papers."""

from dpgen.methods.base import DiffusionModule
from dpgen.methods.dpdm import DPDMModule
from dpgen.methods.nonprivate import NonPrivateDiffusion

METHODS = {"nonprivate": NonPrivateDiffusion, "dpdm": DPDMModule}

__all__ = ["METHODS", "DiffusionModule", "DPDMModule", "NonPrivateDiffusion"]
