"""DPDM-style diffusion under DP-SGD (Dockhorn et al.; Ghalebikesabi et al. 2023).

What differs from the non-private module is configuration, not arithmetic: augmentation
multiplicity K (``method.multiplicity``) and a timestep distribution suited to DP training
(``method.timesteps``). Clipping, noise and accounting are the shared strategy's job.
"""

from dpgen.methods.base import DiffusionModule


class DPDMModule(DiffusionModule):
    """Diffusion trained only through :class:`dpgen.privacy.strategy.DPSGDStrategy`."""
