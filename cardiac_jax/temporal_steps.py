"""Transitional: moved to `cardiac_jax.families.temporal_classifier` (removed once every import follows)."""
from cardiac_jax.families.temporal_classifier import *  # noqa
from cardiac_jax.metrics.classification import roc_auc  # noqa
