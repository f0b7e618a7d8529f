"""Transitional: the families moved to `cardiac_jax.families` (removed once every import follows)."""
from cardiac_jax.families import FAMILIES, make_family, parameter_counts, parameter_summary  # noqa
from cardiac_jax.families.vae import *  # noqa
