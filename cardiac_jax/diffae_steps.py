"""Transitional: moved to `cardiac_jax.families.diffae3d` (removed once every import follows)."""
from cardiac_jax.families.diffae3d import *  # noqa
