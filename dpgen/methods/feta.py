"""DP-FETA (Li et al. 2025): diffusion learnt from easy to hard.

The module is dpdm's: the same objective trains the non-private warm-up on DP central images
and then the DP-SGD stage. What DP-FETA adds are stages (``dpgen/stages/central.py``) and a
mechanism (``dpgen/privacy/class_means.py``); their settings are checked in
``dpgen/methods/config.py``.
"""

from __future__ import annotations

from dpgen.methods.dpdm import DPDMModule


class FETAModule(DPDMModule):
    """dpdm's diffusion module, warmed up on central images before DP-SGD."""
