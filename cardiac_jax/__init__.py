"""cardiac_jax: interpretable representation learning of cardiac MRI in JAX/Flax.

The library holds pure functions and Flax modules only: no absl flags and no file-path
conventions (those live in `experiments/`), and it never imports `data_pipelines`. Importing it
changes nothing in the process; the XLA:CPU setting the commands use is applied by them
(`cardiac_jax.runtime.configure_xla_cpu`).
"""

__version__ = "0.1.0"
