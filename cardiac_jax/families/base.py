"""The contract between a model family and the code that trains and analyses it.

`ModelFamily` is what `cardiac_jax.training` relies on: a family is built as
`Family(config, axis_name=None)` (`axis_name`: the replica axis under the pmap backend, over
which its steps average gradients and metrics so the update equals the jit one) and offers
pure steps, its evaluation outputs and its figures. `FamilyBase` gives the defaults most
families share and the optional analysis hooks (`evaluate_run`, `generator`, `encode`,
`invert`, `concepts`, `first_linear_kernel`, `first_block_features`): a family implements the ones it can, and a
command asks `supports(family, hook)` instead of testing the family's name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional, Protocol, runtime_checkable

import jax

from cardiac_jax.train_state import TrainState

Metrics = dict[str, jax.Array]
Step = Callable[[TrainState, dict, jax.Array], tuple[TrainState, Metrics]]


@runtime_checkable
class ModelFamily(Protocol):
  """What the training loop needs of a family.

  - `train_step(state, batch, key) -> (state, metrics)`: pure; scalar metrics including
    "loss", "finite" and "skipped_nonfinite";
  - `warmup_train_step` (or None) and `uses_warmup(step)`: a first training stage;
  - `eval_step(state, batch) -> {key: (B, ...) array}`: pure; `eval_metric_keys` are averaged
    over the real examples of a split and logged as val/<key>, `eval_keep_keys` are kept whole
    for `finalize_eval(outputs)`, which adds metrics of the whole split (e.g. AUC);
  - `save_figures(state, examples, figures_dir, step, key)`;
  - `batch_fields`: for cine data, the array fields its batches need (the pipeline copies and
    augments only those); None for slice data.
  """

  skip_nonfinite: bool
  eval_metric_keys: tuple[str, ...]
  eval_keep_keys: tuple[str, ...]
  batch_fields: Optional[tuple[str, ...]]
  train_step: Step
  warmup_train_step: Optional[Step]

  def init_state(self, key: jax.Array) -> TrainState: ...

  def uses_warmup(self, step: int) -> bool: ...

  def eval_step(self, state: TrainState, batch: dict) -> dict[str, jax.Array]: ...

  def finalize_eval(self, outputs: dict[str, Any]) -> dict[str, float]: ...

  def save_figures(self, state: TrainState, examples: dict[str, Any], figures_dir: str,
                   step: int, key: jax.Array) -> None: ...


class FamilyCapabilityError(ValueError):
  """A command asked a family for an analysis hook it does not implement."""


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """Settings of `python -m experiments.evaluate`; each family reads the ones it uses.

  codes / code_seed: which codes a VAE's metrics score ("sampled": one seeded draw
  z ~ q(z|x) per subject, the reference protocol; "mean": the posterior means).
  traversal_steps / traversal_range: the VAE traversal grid (columns; half-width in SDs).
  inversion_steps / decode_steps / ddim_grid: a DiffAE's DDIM settings (None: the run's
  config.eval)."""
  codes: str = "sampled"
  code_seed: int = 0
  traversal_steps: int = 9
  traversal_range: float = 2.5
  inversion_steps: Optional[int] = None
  decode_steps: Optional[int] = None
  ddim_grid: Optional[str] = None


# (batch_size or None for the config's eval batch) -> iterator over one split's batches.
SplitBatches = Callable[[Optional[int]], Iterator[dict]]


class FamilyBase:
  """Defaults of `ModelFamily` and the optional analysis hooks, which raise
  `FamilyCapabilityError` unless a family implements them."""

  eval_keep_keys: tuple[str, ...] = ()
  batch_fields: Optional[tuple[str, ...]] = None
  warmup_train_step: Optional[Step] = None
  warmup_steps = 0               # Steps of the first stage, when warmup_train_step is set.
  config: Any                    # The run's config; every family keeps it.

  @property
  def name(self) -> str:
    """The family's name in `families.FAMILIES` (config.model.family)."""
    return str(self.config.model.family)

  def uses_warmup(self, step: int) -> bool:
    return self.warmup_train_step is not None and step < self.warmup_steps

  def finalize_eval(self, outputs: dict[str, Any]) -> dict[str, float]:
    del outputs
    return {}

  def _unsupported(self, hook: str):
    from cardiac_jax import families  # pylint: disable=g-import-not-at-top
    raise FamilyCapabilityError(
        f"model.family {self.name!r} has no {hook}; families with one: "
        f"{', '.join(families.supporting(hook)) or 'none'}")

  # ----------------------------------------------------------------- analysis hooks
  def evaluate_run(self, state: TrainState, mesh, split_batches: SplitBatches, out_dir: str,
                   options: EvalOptions, header: dict) -> dict:
    """The metrics of `python -m experiments.evaluate` on the split header["split"], written
    to out_dir/metrics.json after `header` (workdir, config, split, step, step_selection) with
    the figures beside it; resumable per batch from a partial folder in out_dir."""
    del state, mesh, split_batches, out_dir, options, header
    self._unsupported("evaluate_run")

  def evaluation_summary(self, result: dict) -> str:
    """One line of `evaluate_run`'s result for the terminal."""
    del result
    self._unsupported("evaluate_run")

  def generator(self, state: TrainState) -> Callable[[jax.Array], jax.Array]:
    """Pure (B, latent_dim) z ~ N(0, I) -> (B, H, W, C) images in [0, 1], parameters closed
    over (inference mode): what latent-direction discovery explores."""
    del state
    self._unsupported("generator")

  def encode(self, state: TrainState, images: jax.Array):
    """Images -> (mu, logvar) of the approximate posterior."""
    del state, images
    self._unsupported("encode")

  def invert(self, state: TrainState, x0: jax.Array, code: jax.Array, num_steps: int,
             ema: bool = True) -> jax.Array:
    """The deterministic noise x_T that decodes to x0 under `code` (DDIM inversion): what
    editing a subject's latent code and decoding again starts from."""
    del state, x0, code, num_steps, ema
    self._unsupported("invert")

  def concepts(self, state: TrainState, codes: jax.Array) -> jax.Array:
    """(B, latent_dim) codes -> (B, C) activations of the classifier's concept layer (TCAV)."""
    del state, codes
    self._unsupported("concepts")

  def first_linear_kernel(self, state: TrainState) -> jax.Array:
    """(latent_dim, F) kernel of the generator's first linear map (SeFa)."""
    del state
    self._unsupported("first_linear_kernel")

  def first_block_features(self, state: TrainState, z: jax.Array) -> jax.Array:
    """z (B, latent_dim) -> (B, F) activations of the generator's first block (GANSpace)."""
    del state, z
    self._unsupported("first_block_features")


def supports(family_or_class, hook: str) -> bool:
  """Whether a family (or its class) implements the analysis hook `hook` of `FamilyBase`."""
  cls = family_or_class if isinstance(family_or_class, type) else type(family_or_class)
  return getattr(cls, hook, None) is not getattr(FamilyBase, hook)
