"""Every line of differential-privacy logic lives in this package and nowhere else."""
