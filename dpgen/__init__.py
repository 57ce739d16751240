"""dpgen: differentially private synthetic image generation."""

__version__ = "0.1.0"
