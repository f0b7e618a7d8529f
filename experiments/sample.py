"""Synthetic cines from a trained 3D diffusion autoencoder and its latent DDIM.

  python -m experiments.sample --workdir=DIR --num=N [--seed=0] [--output_dir=DIR/samples]
      [--decode_steps=K] [--latent_steps=M]

Sampling as in Diffusion Autoencoders (Preechakul et al. 2022, Sec. 3.3) for a `diffae3d` run:

1. Codes. The run's checkpoint (default: latest) is restored and every subject of its training
   split is encoded with the EMA semantic encoder, z_n = Enc_EMA(x_0,n) (deterministic,
   batches of train.eval_batch_size, no augmentation).
2. Latent DDIM (`cardiac_jax.latent_diffusion`, network `cardiac_jax.models.latent_ddim`):
   fitted to the per-dimension z-normalised codes u_n = (z_n - m) / s with the run's `latent`
   config section (the current default section for runs older than it) into DIR/latent_ddim;
   a finished checkpoint there is reused, an unfinished one resumed. Its training key is
   fold_in(key(config.seed), LATENT_KEY_SALT), so it does not depend on --seed.
3. Samples. From key(--seed): u_i = DDIM decoding (--latent_steps, default
   latent.sample_steps, no clipping) of u_T ~ N(0, I_D), z_i = m + s u_i; then the cine
   x_0,i = DDIM decoding (--decode_steps, default latent.image_decode_steps) of x_T,i ~ N(0, I)
   under z_i with the EMA UNet (`DiffAEFamily.decode`), mapped to [0, 1] by (x + 1) / 2 and
   clipped. Sample i's x_T comes from fold_in(key, i): the same whatever --num is.
4. Quality check, in normalised units (the z-scores u): the distance of every sampled u_i to
   its nearest training code, against the leave-one-out nearest-neighbour distance of the
   training codes among themselves. A median ratio far below 1 means the latent DDIM
   reproduces training codes (memorised); far above 1, that its samples lie away from the
   codes (under-trained, or too few codes); beyond FAR_RATIO (2) or below NEAR_RATIO (0.25)
   samples.json and the log carry a warning. Also the mean |mean| and mean std over dimensions
   of the sampled u (0 and 1 for the training codes).

Writes to --output_dir (default DIR/samples):
- sample_XXX.gif: all T frames of sample XXX on [0, 1] (T frames per second, at most 25,
  upscaled to about 128 px);
- sample_XXX.nii.gz: float32 (S, S, 1, T) on [0, 1], the layout of the 4-chamber NIfTI files
  the cine pipeline reads (data[x, y, 0, t] = frame t at row x, column y of the model input);
  affine diag(d, d, 1, 1) with the in-plane spacing of the model input
  d = data.prepare.spacing_mm * data.prepare.image_size / data.image_size mm, through-plane 1
  and the frame duration unknown, 1 (xyzt units mm, unknown);
- overview.png: one row per sample (the first 32), columns up to 8 evenly spaced frames;
- samples.npz: z_sem (N, D) and the normalised codes u (N, D) of the samples;
- samples.json: the settings, the latent DDIM (directory, steps, final loss, config), the
  quality check and per sample its files and nearest training subject.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

from absl import app, flags

from cardiac_jax import io
from cardiac_jax import runtime
from experiments import common

LATENT_KEY_SALT = 0x1A7E47
OVERVIEW_ROWS = 32
OVERVIEW_FRAMES = 8
# Median nearest-training-code distance of the samples over that of the training codes among
# themselves beyond which samples.json carries a warning.
FAR_RATIO, NEAR_RATIO = 2.0, 0.25


def define_flags() -> None:
  """The command-line flags; defined only when run as a program, so that importing this module
  (tests, other entry points) never collides with another entry point's flags."""
  common.define_workdir_flag("diffae3d run directory.")
  flags.DEFINE_integer("num", 8, "Number of synthetic cines.", lower_bound=1)
  common.define_seed_flag("Seed of the sampled codes and of x_T.")
  common.define_output_dir_flag("Output folder (default: WORKDIR/samples).")
  flags.DEFINE_integer("decode_steps", None, "DDIM steps of the cine decoding (default: the "
                       "run's latent.image_decode_steps).", lower_bound=1)
  flags.DEFINE_integer("latent_steps", None, "DDIM steps of the z_sem sampling (default: the "
                       "run's latent.sample_steps).", lower_bound=1)
  common.define_step_flag()
  flags.DEFINE_integer("batch_size", None, "Cines encoded / decoded per call (default: the "
                       "run's train.eval_batch_size).", lower_bound=1)
  flags.DEFINE_string("latent_dir", None, "Latent DDIM folder (default: WORKDIR/latent_ddim).")
  # Flags defined by experiments.common are this command's: --help lists them.
  flags.adopt_module_key_flags(common)


_log = runtime.phase_logger('sample')


def check_diffae_run(workdir: str):
  """The run's config; ValueError unless `workdir` holds a run of a diffusion autoencoder (a
  family with `invert`)."""
  from cardiac_jax import families
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{workdir} is not a training run directory (no config.json); "
                     f"experiments.sample needs a {' or '.join(families.supporting('invert'))} "
                     "run")
  config = common.load_run_config(workdir)
  families.require(config.get("model", {}).get("family"), "invert",
                   "experiments.sample (a semantic encoder, a DDIM decoder and their codes)",
                   path)
  return config


def latent_config_of(config, log: Callable[[str], None] = _log):
  """The run's `latent` section, or the current default one for runs trained without it."""
  if "latent" in config:
    return config.latent
  from experiments.configs import diffae3d
  log("the run's config has no latent section: using the default diffae3d one")
  return diffae3d.get_config().latent


def input_spacing_mm(config) -> float:
  """In-plane spacing of the model input: the stored crops' spacing times their downsizing."""
  data = config.data
  return float(data.prepare.spacing_mm) * float(data.prepare.image_size) / float(data.image_size)


def decode_codes(family, state, z_sem, key, num_steps: int, batch_size: int):
  """(N, T, S, S, 1) cines in [-1, 1]: DDIM decoding of x_T,i ~ N(0, I) (key fold_in(key, i))
  under z_sem (N, D), in batches of `batch_size` (the last one padded)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from cardiac_jax.models import diffae3d as model_lib
  num = len(z_sem)
  shape = (family.num_frames, family.image_size, family.image_size, 1)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num))
  x_T = jax.vmap(lambda k: model_lib.flat_normal(k, shape))(keys)
  decode = jax.jit(functools.partial(family.decode, num_steps=int(num_steps)))
  out = []
  for start in range(0, num, batch_size):
    rows = min(batch_size, num - start)
    pad = batch_size - rows
    x = jnp.pad(x_T[start:start + rows], ((0, pad),) + ((0, 0),) * 4)
    z = jnp.pad(jnp.asarray(z_sem[start:start + rows], jnp.float32), ((0, pad), (0, 0)))
    out.append(np.asarray(decode(state, x, z))[:rows])
  return np.concatenate(out)


def write_nifti(path: str, frames, spacing_mm: float) -> str:
  """(T, S, S) frames -> float32 NIfTI (S, S, 1, T), affine diag(d, d, 1, 1) (module
  docstring)."""
  import nibabel as nib
  import numpy as np
  frames = np.asarray(frames, np.float32)
  if frames.ndim != 3:
    raise ValueError(f"{path}: frames must be (T, S, S), got shape {frames.shape}")
  data = np.ascontiguousarray(frames.transpose(1, 2, 0)[:, :, None, :])
  affine = np.diag([spacing_mm, spacing_mm, 1.0, 1.0])
  image = nib.Nifti1Image(data, affine)
  image.header.set_data_dtype(np.float32)
  image.header.set_zooms((spacing_mm, spacing_mm, 1.0, 1.0))
  image.header.set_xyzt_units("mm", "unknown")
  image.set_qform(affine, code=2)
  image.set_sform(affine, code=2)
  nib.save(image, path + ".tmp.nii.gz")
  os.replace(path + ".tmp.nii.gz", path)
  return path


def quality_check(u_samples, u_train) -> tuple[dict[str, float], Any, Any]:
  """(summary, per-sample nearest distance, index of the nearest training code), in
  normalised units (module docstring)."""
  import numpy as np
  from cardiac_jax import latent_diffusion
  distance, index = latent_diffusion.nearest_distances(u_samples, u_train)
  summary = {"sample_nearest_median": float(np.median(distance)),
             "sample_nearest_mean": float(np.mean(distance)),
             "sample_nearest_min": float(np.min(distance)),
             "sample_mean_abs_mean": float(np.mean(np.abs(np.mean(u_samples, axis=0)))),
             "sample_mean_std": (float(np.mean(np.std(u_samples, axis=0)))
                                 if len(u_samples) > 1 else None)}
  summary["warning"] = None
  if len(u_train) > 1:
    train, _ = latent_diffusion.nearest_distances(u_train, u_train, exclude_self=True)
    ratio = float(np.median(distance) / max(np.median(train), 1e-12))
    summary.update(train_nearest_median=float(np.median(train)),
                   train_nearest_mean=float(np.mean(train)), nearest_ratio_median=ratio)
    if ratio > FAR_RATIO:
      summary["warning"] = (f"the sampled codes lie {ratio:.1f} times farther from the training "
                            "codes than those from each other: the latent DDIM is probably "
                            "under-trained (raise latent.num_steps)")
    elif ratio < NEAR_RATIO:
      summary["warning"] = (f"the sampled codes lie {ratio:.2f} times as far from the training "
                            "codes as those from each other: the latent DDIM may reproduce "
                            "training codes (memorisation)")
  return summary, distance, index


def run(workdir: str, num: int, seed: int = 0, output: str | None = None,
        decode_steps: int | None = None, latent_steps: int | None = None,
        step: int | None = None, batch_size: int | None = None, latent_dir: str | None = None,
        log: Callable[[str], None] = _log) -> dict[str, Any]:
  """Encodes, fits or restores the latent DDIM, samples, decodes and writes every output
  (module docstring). Returns the content of samples.json."""
  import jax
  import numpy as np
  from cardiac_jax import diffusion, latent_diffusion, viz
  from data_pipelines.errors import InvalidArgumentError
  if num < 1:
    raise InvalidArgumentError(f"--num must be >= 1, got {num}")
  check_diffae_run(workdir)
  config, family, state, _ = common.restore_run(workdir, step)
  settings = latent_diffusion.LatentSettings.from_config(latent_config_of(config, log))
  decode_steps = int(decode_steps or settings.image_decode_steps)
  latent_steps = int(latent_steps or settings.sample_steps)
  for name, value in (("decode_steps", decode_steps), ("latent_steps", latent_steps)):
    if not 1 <= value <= settings.num_timesteps:
      raise InvalidArgumentError(f"--{name} must be in [1, {settings.num_timesteps}], got "
                                 f"{value}")
  for name, value, grid in (("decode_steps", decode_steps, family.ddim_grid),
                            ("latent_steps", latent_steps, settings.ddim_grid)):
    try:
      diffusion.ddim_timesteps(settings.num_timesteps, value, grid)
    except ValueError as e:
      raise InvalidArgumentError(f"--{name}={value} on the {grid!r} DDIM grid: {e}") from None
  batch_size = int(batch_size or config.train.eval_batch_size)
  output = output or os.path.join(workdir, "samples")
  latent_dir = latent_dir or os.path.join(workdir, "latent_ddim")
  os.makedirs(output, exist_ok=True)

  log(f"encoding the training split with the EMA encoder (step {int(state.step)})")
  from experiments import infer_latents  # pylint: disable=g-import-not-at-top
  subjects, _, z_train = infer_latents.compute_latents(workdir, splits=["train"],
                                                       batch_size=batch_size,
                                                       step=int(state.step))
  if not subjects:
    raise ValueError(f"the train split of {workdir}'s dataset is empty: no codes to fit the "
                     "latent DDIM to")
  latent_key = jax.random.fold_in(jax.random.key(int(config.seed)), LATENT_KEY_SALT)
  latent = latent_diffusion.train_latent_ddim(z_train, settings, latent_key, latent_dir, log=log)

  key_z, key_x = jax.random.split(jax.random.key(int(seed)))
  u_samples = latent.sample(key_z, num, latent_steps, normalized=True)
  z_samples = latent_diffusion.denormalize(u_samples, latent.stats)
  log(f"decoding {num} cines ({decode_steps} DDIM steps)")
  cines = decode_codes(family, state, z_samples, key_x, decode_steps, batch_size)
  unit = np.clip((cines[..., 0].astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)  # (N, T, S, S)

  spacing = input_spacing_mm(config)
  num_frames, size = unit.shape[1], unit.shape[-1]
  width = max(3, len(str(num - 1)))
  u_train = latent_diffusion.normalize(z_train, latent.stats)
  summary, distance, index = quality_check(u_samples, u_train)
  records = []
  for i in range(num):
    name = f"sample_{i:0{width}d}"
    viz.save_cine_gif(os.path.join(output, f"{name}.gif"), unit[i],
                      fps=float(min(num_frames, 25)), scale=max(1, round(128 / size)))
    write_nifti(os.path.join(output, f"{name}.nii.gz"), unit[i], spacing)
    records.append({"index": i, "gif": f"{name}.gif", "nifti": f"{name}.nii.gz",
                    "nearest_train_distance": float(distance[i]),
                    "nearest_train_subject": subjects[int(index[i])]})
  frames = np.unique(np.linspace(0, num_frames - 1, min(OVERVIEW_FRAMES, num_frames)).astype(int))
  shown = min(num, OVERVIEW_ROWS)
  viz.save_image_grid(os.path.join(output, "overview.png"),
                      [[unit[i, t] for t in frames] for i in range(shown)],
                      row_titles=[f"sample {i}" for i in range(shown)],
                      col_titles=[f"t={t}" for t in frames], vmin=0.0, vmax=1.0,
                      title=f"{os.path.basename(os.path.abspath(workdir))}: {num} samples")
  np.savez(os.path.join(output, "samples.npz.tmp.npz"), z_sem=z_samples, u=u_samples)
  os.replace(os.path.join(output, "samples.npz.tmp.npz"), os.path.join(output, "samples.npz"))
  result = {
      "workdir": os.path.abspath(workdir), "checkpoint_step": int(state.step),
      "step_selection": common.step_selection(step), "num": num,
      "seed": seed, "decode_steps": decode_steps, "latent_steps": latent_steps,
      "ddim_grid": {"cine": family.ddim_grid, "latent": settings.ddim_grid},
      "num_frames": num_frames, "image_size": size, "spacing_mm": spacing,
      "z_sem_dim": int(z_train.shape[1]), "value_range": [0.0, 1.0],
      "latent_ddim": {"directory": os.path.abspath(latent_dir), "step": latent.step,
                      "trained_steps_this_run": latent.trained_steps,
                      "final_loss": latent.final_loss, "settings": settings.to_dict()},
      "training_codes": {"split": "train", "num_subjects": len(subjects)},
      "quality": {"units": "normalised z_sem (per-dimension z-scores of the training codes)",
                  **summary},
      "overview": {"file": "overview.png", "rows": shown, "frames": frames.tolist()},
      "codes": "samples.npz", "samples": records}
  io.write_json(os.path.join(output, "samples.json"), result)
  if summary["warning"]:
    log(f"WARNING: {summary['warning']}")
  log(f"wrote {num} samples to {output}; nearest-training-code distance median "
      f"{summary['sample_nearest_median']:.3f}"
      + (f" (training codes among themselves {summary['train_nearest_median']:.3f})"
         if "train_nearest_median" in summary else ""))
  return result


def main(argv):
  f = flags.FLAGS
  common.start_command(argv, workdir=f.workdir)
  from cardiac_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir_lib.check_output_dir(f.output_dir)
  workdir_lib.check_output_dir(f.latent_dir, "latent_dir")
  try:
    check_diffae_run(f.workdir)
  except ValueError as e:
    raise app.UsageError(str(e))
  run(f.workdir, f.num, seed=f.seed, output=f.output_dir, decode_steps=f.decode_steps,
      latent_steps=f.latent_steps, step=f.step, batch_size=f.batch_size,
      latent_dir=f.latent_dir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
