"""Each method's LightningModule, by the name ``method.name`` gives (:data:`dpgen.methods.METHOD_NAMES`)."""

from dpgen.methods.base import DiffusionModule
from dpgen.methods.dpdm import DPDMModule
from dpgen.methods.dpldm import DPLDMModule
from dpgen.methods.feta import FETAModule
from dpgen.methods.nonprivate import NonPrivateDiffusion
from dpgen.methods.privimage import PrivImageModule

METHODS: dict[str, type[DiffusionModule]] = {
    "nonprivate": NonPrivateDiffusion, "dpdm": DPDMModule, "dpldm": DPLDMModule, "privimage": PrivImageModule,
    "feta": FETAModule, "feta_privimage": FETAModule,  # a composition of stages: DP-FETA's module
}
