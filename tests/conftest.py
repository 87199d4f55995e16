"""Shared test settings: one torch thread and a fast, deadline-free hypothesis profile."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

settings.register_profile(
    "sparseforge",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("sparseforge")
# A deeper, randomised search on demand: pytest --hypothesis-profile=thorough
settings.register_profile("thorough", deadline=None, max_examples=500, suppress_health_check=list(HealthCheck))
