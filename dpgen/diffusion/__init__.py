"""Noise schedules, timestep samplers and samplers around diffusers' schedulers."""
