"""Model builders around diffusers and the small classifiers used by evaluation."""
