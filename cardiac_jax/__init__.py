"""cardiac_jax: interpretable representation learning of cardiac MRI in JAX/Flax.

The library holds pure functions and Flax modules only: no absl flags and no file-path
conventions (those live in `experiments/`), and it never imports `data_pipelines`.
"""

__version__ = "0.1.0"
