"""Diffusion math shared by every backend: schedules, samplers and classifier-free guidance (NumPy)."""
