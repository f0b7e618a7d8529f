"""Shared fields of every experiment config and the named variants.

Every field is documented here once; experiment modules only override values. Variants:
- `smoke`: a model and cohort small enough that a full train/eval cycle takes seconds (tests).
- `paper`: the published hyperparameters (set by each experiment module, see `PAPER` there).
- no variant: the default, sized to train to a useful model on a 2-core CPU in about 30 minutes.
A variant string may also carry comma-separated `key=value` pairs for top-level sections, e.g.
`vae:smoke` or `vae:paper`; finer changes use `--config.section.key=value` overrides.
"""

from __future__ import annotations

import ml_collections

# Attributes regularised by default (AR-SIVAE ACDC version): LV EDV, myocardium ED volume, RV EDV.
DEFAULT_ATTRIBUTES = ("lv_edv_ml", "myo_ed_ml", "rv_edv_ml")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = ""                      # Experiment name (the config module's name).
  c.seed = 0                       # Root seed: parameters, data order, per-step keys.

  c.data = ml_collections.ConfigDict()
  # "synthetic": generate the synthetic cine cohort once into the cache and prepare it.
  # "acdc": prepare an ACDC-layout directory (data.source_dir) into the cache.
  # "prepared": use an already prepared dataset at data.prepared_dir as it is.
  c.data.dataset = "synthetic"
  c.data.source_dir = ""           # Raw ACDC-layout root for dataset="acdc".
  c.data.prepared_dir = ""         # Prepared dataset; "" = derived under data.cache_dir.
  c.data.cache_dir = ""            # "" = $CARDIAC_JAX_CACHE or ~/.cache/cardiac_jax.
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.num_subjects = 400
  c.data.synthetic.seed = 0
  c.data.prepare = ml_collections.ConfigDict()
  c.data.prepare.image_size = 128  # Stored crop size in pixels.
  c.data.prepare.spacing_mm = 1.3  # In-plane resampling.
  # "mid": the middle of the slices showing RV, myocardium and LV. The paper variants use the
  # reference's "acdc_basal" rule; on the synthetic cohort the basal slice's label areas predict
  # the whole-heart volumes poorly, the mid slice's well (docs/configs.md, section base).
  c.data.prepare.slice_rule = "mid"
  c.data.prepare.label_convention = "acdc"
  c.data.prepare.split_seed = 0
  # Plausibility bounds other than the defaults, as prepare's --plausibility entries
  # ("lv_ef=2:90", ...); a non-default set prepares (and caches) its own dataset.
  c.data.prepare.plausibility = ()
  c.data.image_size = 64           # Model input size (resized from the stored crop).
  c.data.channels = ("ed",)        # Stored channels used as image channels: "ed", "es".
  c.data.attributes = DEFAULT_ATTRIBUTES
  c.data.mask_background = True    # Zero intensities outside the heart labels (ACDC version).
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.max_shift_px = 5
  c.data.augment.zoom_prob = 0.1
  c.data.augment.zoom_range = (0.9, 1.1)
  c.data.augment.flip_prob = 0.0

  c.model = ml_collections.ConfigDict()
  c.model.family = "vae"           # Model family: a name in cardiac_jax.families.FAMILIES.
  c.model.channels = (32, 64, 128, 256)  # One halving per entry (stem included).
  c.model.latent_dim = 64
  c.model.output_activation = "sigmoid"
  c.model.conv_impl = "auto"       # "auto" | "xla" | "im2col" (cardiac_jax.layers).
  c.model.compute_dtype = "float32"  # "bfloat16" for mixed precision (params stay float32).
  c.model.remat = "none"           # "none" | "blocks": recompute each ResBlock in the backward.
  c.model.initializer = "lecun_normal"    # "lecun_normal" | "xavier_normal" | "he_normal".

  c.loss = ml_collections.ConfigDict()
  c.loss.objective = "vae"         # "vae" (VAE/beta-VAE/AR-VAE) | "soft_intro" (SIVAE family).
  c.loss.reconstruction = "mse"    # "mse" | "bce": per-sample sum, batch mean.
  c.loss.beta_kl = 1.0
  c.loss.beta_rec = 1.0            # Soft-IntroVAE weights (objective="soft_intro").
  c.loss.beta_neg = 256.0
  c.loss.gamma_r = 1e-8
  c.loss.scale = "chw"             # Soft-IntroVAE s: 1/(C*H*W) ("chw"), 1/(H*W) ("hw"), 1.
  c.loss.gamma = 0.0               # Attribute-regularisation weight (0 = off).
  c.loss.delta = 1.0               # AR tanh sharpness.
  c.loss.regularized_dims = ()     # Latent dim per entry of data.attributes (AR).
  c.loss.vae_warmup_steps = 0      # Soft-IntroVAE: plain VAE steps first.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 2e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 0.0
  c.optimizer.schedule = "constant"  # "constant" | "cosine"
  c.optimizer.warmup_steps = 0
  c.optimizer.decay_steps = 0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16          # Global batch size (all devices and processes).
  c.train.num_steps = 1000         # 57 epochs of the 280 training subjects of the default cohort.
  c.train.log_every = 25
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  c.train.figure_every = 250
  c.train.max_checkpoints = 3       # Latest checkpoints kept (plus the best, below).
  # Validation metric (as logged, val/<name>) whose best checkpoint is kept besides the latest
  # ones, for `--step=best` of the analyses; "" keeps none. best_mode: "min" | "max".
  c.train.best_metric = "val/reconstruction_loss"
  c.train.best_mode = "min"
  c.train.eval_batch_size = 64
  c.train.skip_nonfinite = False   # Skip (and count) non-finite updates instead of stopping.
  c.train.progress_bar = True

  c.parallel = ml_collections.ConfigDict()
  c.parallel.backend = "jit"       # "jit" (NamedSharding over a data mesh) | "pmap".
  c.parallel.num_devices = 0       # 0 = all local devices.
  return c


def apply_smoke(c: ml_collections.ConfigDict) -> None:
  """Tiny everything: a train/eval cycle in seconds, for tests and CI."""
  c.data.synthetic.num_subjects = 10
  c.data.prepare.image_size = 64
  c.data.prepare.spacing_mm = 2.6
  c.data.image_size = 32
  c.model.channels = (8, 16)
  c.model.latent_dim = 8
  c.train.update(batch_size=4, num_steps=4, log_every=1, eval_every=4, checkpoint_every=2,
                 figure_every=4, eval_batch_size=4, progress_bar=False)


def attribute_regularisation(c: ml_collections.ConfigDict, gamma: float,
                             delta: float = 1.0) -> None:
  """Attribute regularisation (Pati & Lerch 2021) of latent dims 0, 1, ... by data.attributes,
  weight gamma and tanh sharpness delta."""
  c.loss.gamma = gamma
  c.loss.delta = delta
  c.loss.regularized_dims = tuple(range(len(c.data.attributes)))


def finalize(c: ml_collections.ConfigDict, variant: str | None, paper=None,
             smoke=None) -> ml_collections.ConfigDict:
  """Applies a variant (None, "smoke", "paper") to an experiment's config; `smoke`, an
  experiment's own smoke changes, runs after `apply_smoke`."""
  if variant in (None, "", "default"):
    pass
  elif variant == "smoke":
    apply_smoke(c)
    if smoke is not None:
      smoke(c)
  elif variant == "paper":
    if paper is None:
      raise ValueError(f"config {c.name!r} has no paper variant")
    paper(c)
  else:
    raise ValueError(f"unknown variant {variant!r} for config {c.name!r} "
                     "(use smoke, paper or none)")
  return c
