"""dpgen: differentially private synthetic image generation."""

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _gpus_per_node(accelerator: str, devices: int) -> int:
    """SLURM's --gpus-per-node for a job of ``trainer.devices`` tasks: one GPU each, none on the CPU."""
    return 0 if accelerator == "cpu" else devices


# Registered on import of the package, i.e. in every process that composes or launches a config
# (the submitting one resolves hydra.launcher) and in every job.
if not OmegaConf.has_resolver("dpgen.gpus_per_node"):
    OmegaConf.register_new_resolver("dpgen.gpus_per_node", _gpus_per_node)
