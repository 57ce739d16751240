"""How a trained generator is sampled (``sampling=default|cpsample``).

``cpsample`` (Kazdan et al. 2024): a protection classifier memorises random binary labels of the
training images, and guided sampling pushes trajectories away from where it is confident.
It reads the sensitive images without DP: a run that uses it carries no formal guarantee.
"""
