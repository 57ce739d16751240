"""The non-private upper bound: the same diffusion objective, no clipping, no noise."""

from dpgen.methods.base import DiffusionModule


class NonPrivateDiffusion(DiffusionModule):
    """Trained with an ordinary Lightning strategy; carries no privacy guarantee."""
