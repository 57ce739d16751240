"""One LightningModule per method: only what differs between papers."""

from dpgen.methods.base import DiffusionModule
from dpgen.methods.dpdm import DPDMModule
from dpgen.methods.dpldm import DPLDMModule
from dpgen.methods.feta import FETAModule
from dpgen.methods.nonprivate import NonPrivateDiffusion
from dpgen.methods.privimage import PrivImageModule

METHODS = {"nonprivate": NonPrivateDiffusion, "dpdm": DPDMModule, "dpldm": DPLDMModule,
           "privimage": PrivImageModule, "feta": FETAModule,
           "feta_privimage": FETAModule}  # a composition of stages: DP-FETA's module

__all__ = ["METHODS", "DiffusionModule", "DPDMModule", "DPLDMModule", "FETAModule", "NonPrivateDiffusion",
           "PrivImageModule"]
