"""Evaluate a trained run: `python -m experiments.evaluate --workdir=DIR [--split=test]`.

VAE-family runs: reconstructions, interpretability metrics and traversals (below). diffae3d
runs: each subject's cine is encoded to z_sem, inverted to x_T with --inversion_steps DDIM
steps and decoded with --decode_steps (default: the run's config.eval); DIR/eval/metrics.json
holds SSIM (3D, on the (T, S, S) volume), NRMSE and PSNR on [0, 1]-scaled cines, the eps losses
at the config's fixed timesteps with the subject's own and with another subject's z_sem, the
across-subject SD of z_sem and the step counts; DIR/eval/reconstructions_<step>.png shows two
subjects' input, reconstruction and a decoding of random noise with their z_sem.

Resumable: batches finished before an interruption are kept in DIR/eval/partial_<split>_step<N>
and not recomputed by a rerun; the folder is removed once metrics.json is written.

Writes DIR/eval/metrics.json with
- reconstruction: MSE, PSNR, SSIM (overall and per channel) of the decoded codes of --codes (by
  default the same seeded draw z ~ q(z|x), decoded as the reference evaluations' forward pass
  does), and reconstruction_mean_codes: those of the posterior-mean reconstruction with the
  reconstruction loss and KL (with --codes=mean the two swap), on the held-out split;
- interpretability: the metrics of `cardiac_jax.metrics.interpretability` (interpretability
  score, MIG, SAP, SCC, modularity, binned MIG, DCI) against the config's attributes, on the
  codes of --codes: by default one seeded draw z ~ q(z|x) per subject (--code_seed), the
  codes the AR-VAE and AR-SIVAE reference evaluations score; the block's "codes" and
  "protocol" say which;
- regularized: Spearman rho of each regularised latent dimension with its attribute, same codes;
- interpretability_mean_codes, regularized_mean_codes (or ..._sampled_codes with
  --codes=mean): the same metrics for the other kind of code;
and draws DIR/eval/reconstructions.png, traversals.png (each regularised dimension, or for an
unregularised model the dimension with the highest mutual information per attribute, decoded
across its range with the other dimensions at a real subject's posterior mean) and
attribute_scatter.png (the scored codes).
"""

from __future__ import annotations

import os
import shutil
import sys

from absl import app, flags

def define_flags() -> None:
  """The command-line flags; defined only when run as a program (so that importing the module
  next to other commands defines nothing)."""
  flags.DEFINE_string("workdir", None, "Run directory written by experiments.train.")
  flags.DEFINE_enum("split", "test", ["train", "val", "test"], "Split to evaluate.")
  flags.DEFINE_string("step", None, "Checkpoint: a step, best (the best validation "
                      "checkpoint) or latest (default).")
  flags.DEFINE_string("output_dir", None, "Where metrics.json and the figures go (default: "
                      "DIR/eval); e.g. DIR/eval_best for --step=best beside the final step's.")
  flags.DEFINE_integer("traversal_steps", 9, "Columns of the traversal grid.")
  flags.DEFINE_float("traversal_range", 2.5,
                     "Traversal half-width in standard deviations of the test codes.")
  flags.DEFINE_enum("codes", "sampled", ["sampled", "mean"],
                    "Codes the interpretability metrics score: one draw z ~ q(z|x) per subject "
                    "(the reference protocol) or the posterior means; the other kind is "
                    "reported beside them.")
  flags.DEFINE_integer("code_seed", 0, "Seed of the draws of --codes=sampled.")
  flags.DEFINE_integer("inversion_steps", None,
                       "diffae3d: DDIM inversion steps (default: config.eval).")
  flags.DEFINE_integer("decode_steps", None,
                       "diffae3d: DDIM decoding steps (default: config.eval).")
  flags.DEFINE_enum("ddim_grid", None, ["stride", "even"],
                    "diffae3d: DDIM step grid (default: config.eval.ddim_grid; runs without "
                    "the field: even).")


def traversal_images(family, state, base_code, dims, values_per_dim):
  """(len(dims), S, H, W, C) decodings of `base_code` with dims[r] set to values_per_dim[r]."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  codes = []
  for d, values in zip(dims, values_per_dim):
    block = np.repeat(base_code[None], len(values), axis=0)
    block[:, d] = values
    codes.append(block)
  decoded = jax.jit(family.decode)(state, jnp.asarray(np.concatenate(codes)))
  return np.asarray(decoded).reshape(len(dims), len(values_per_dim[0]), *decoded.shape[1:])


def reconstruction_blocks(family, state, outputs: dict, mean_code_metrics: dict, codes: str,
                          code_seed: int, batch_size: int) -> dict:
  """The reconstruction blocks of metrics.json: MSE, PSNR and SSIM of the decoded codes of
  `codes` under "reconstruction" and of the other kind under "reconstruction_<other>_codes".

  The reference evaluations decode the z they sample from q(z|x) (the model's forward pass);
  the posterior-mean decoding is the eval step's (`mean_code_metrics`, with the loss terms).
  Sampled codes are the same seeded draw the interpretability metrics score."""
  import jax
  import numpy as np
  from cardiac_jax.metrics import interpretability
  from cardiac_jax.metrics import reconstruction as recon_metrics
  sampled, sentence = interpretability.posterior_codes(outputs["mu"], outputs["logvar"],
                                                       "sampled", code_seed)
  decode = jax.jit(family.decode)
  decoded = np.concatenate([np.asarray(decode(state, sampled[i:i + batch_size]))
                            for i in range(0, len(sampled), batch_size)])
  blocks = {
      "sampled": {"codes": "sampled", "protocol": f"decoded {sentence}", "seed": int(code_seed),
                  **{k: float(v) for k, v in recon_metrics.reconstruction_metrics(
                      outputs["image"], decoded).items()}},
      "mean": {"codes": "mean", "protocol": "decoded posterior means z = mu",
               **mean_code_metrics}}
  other = "mean" if codes == "sampled" else "sampled"
  return {"reconstruction": blocks[codes], f"reconstruction_{other}_codes": blocks[other]}


def evaluate_run(workdir: str, split: str = "test", step: int | None = None,
                 traversal_steps: int = 9, traversal_range: float = 2.5,
                 codes: str = "sampled", code_seed: int = 0,
                 output_dir: str | None = None) -> dict:
  """Computes and writes `output_dir`/metrics.json (default DIR/eval) and the figures; returns
  the metrics.

  `codes` ("sampled" or "mean") picks the codes of the "interpretability" and "regularized"
  blocks, `code_seed` the draws of the sampled ones (module docstring)."""
  import numpy as np
  from cardiac_jax import training, viz
  from cardiac_jax.metrics import interpretability
  from data_pipelines import pipeline
  from experiments import common

  if codes not in interpretability.CODE_PROTOCOLS:
    raise ValueError(f"--codes must be one of {interpretability.CODE_PROTOCOLS}, got {codes!r}")
  config, family, state, mesh = common.restore_run(workdir, step)
  source = common.split_source(config, split)
  batches = pipeline.eval_batches(source, config.data, batch_size=config.train.eval_batch_size)
  out_dir = output_dir or os.path.join(workdir, "eval")
  # Finished batches of an interrupted evaluation are read back, not recomputed.
  cache_dir = os.path.join(out_dir, f"partial_{split}_step{int(state.step)}")
  reconstruction, outputs = training.evaluate(
      family, state, batches, mesh, cache_dir=cache_dir,
      keep=("mu", "logvar", "reconstruction", "image", "attributes", "group", "subject"))
  names = list(config.data.attributes)
  latents, attributes = outputs["mu"], outputs["attributes"]
  result = {"workdir": os.path.abspath(workdir), "config": config.name, "split": split,
            "step": int(state.step), "step_selection": common.step_selection(step),
            "num_subjects": int(len(latents)),
            **reconstruction_blocks(family, state, outputs, reconstruction, codes, code_seed,
                                    int(config.train.eval_batch_size))}
  dims = [int(d) for d in config.loss.get("regularized_dims", ())]
  if names and len(latents) > 4:
    result.update(interpretability.posterior_code_metrics(
        latents, outputs["logvar"], attributes, names, dims, codes=codes, seed=code_seed))
    scored, _ = interpretability.posterior_codes(latents, outputs["logvar"], codes, code_seed)

  channel_names = [c.upper() for c in config.data.channels]
  viz.save_reconstruction_figure(os.path.join(out_dir, "reconstructions.png"),
                                 outputs["image"][:8], outputs["reconstruction"][:8],
                                 channel_names=channel_names,
                                 title=f"{config.name}: {split} inputs and posterior-mean "
                                       f"reconstructions")
  if names and "interpretability" in result:
    shown = dims or [result["interpretability"]["interpretability"][n]["dim"] for n in names]
    # The subject whose code is closest to the median code anchors the traversal.
    anchor = int(np.argmin(np.abs(latents - np.median(latents, axis=0)).sum(axis=1)))
    mean, std = latents[:, shown].mean(axis=0), latents[:, shown].std(axis=0) + 1e-6
    values = [np.linspace(m - traversal_range * s, m + traversal_range * s, traversal_steps)
              for m, s in zip(mean, std)]
    images = traversal_images(family, state, latents[anchor], shown, values)
    labels = [f"z{d} ({n})" for d, n in zip(shown, names)]
    viz.save_traversal_grid(os.path.join(out_dir, "traversals.png"), images[..., 0], labels,
                            np.linspace(-traversal_range, traversal_range, traversal_steps),
                            title=f"{config.name}: traversals (sigma units) of "
                                  f"{outputs['subject'][anchor]}")
    viz.save_attribute_scatter_grid(
        os.path.join(out_dir, "attribute_scatter.png"), scored[:, shown], attributes,
        xlabels=[f"z{d} ({codes})" for d in shown], ylabels=names,
        title=f"{config.name}: attributes vs latent dimensions ({split})")
  common.write_json(os.path.join(out_dir, "metrics.json"), result)
  shutil.rmtree(cache_dir, ignore_errors=True)
  return result


def evaluate_diffae_run(workdir: str, split: str = "test", step: int | None = None,
                       inversion_steps: int | None = None,
                       decode_steps: int | None = None, ddim_grid: str | None = None,
                       output_dir: str | None = None) -> dict:
  """Reconstruction metrics of a diffae3d run (module docstring); writes and returns
  DIR/eval/metrics.json. Resumable per batch like `evaluate_run`."""
  import jax
  from cardiac_jax import diffusion, training
  from data_pipelines import cine, prepare
  from experiments import common

  config, family, state, mesh = common.restore_run(workdir, step)
  for name, value in (("inversion_steps", inversion_steps), ("decode_steps", decode_steps)):
    if value is not None and not 1 <= int(value) <= family.num_timesteps:
      raise ValueError(f"--{name} must be in [1, {family.num_timesteps}], got {value}")
  family.inversion_steps = int(inversion_steps or family.inversion_steps)
  family.decode_steps = int(decode_steps or family.decode_steps)
  family.ddim_grid = ddim_grid or family.ddim_grid
  family.check_ddim_steps(family.inversion_steps, family.decode_steps, family.ddim_grid)
  source = prepare.load_split(cine.prepared_cine_dir(config, create=False), split)
  batches = cine.eval_batches(source, config.data, batch_size=config.train.eval_batch_size,
                              fields=family.batch_fields)
  out_dir = output_dir or os.path.join(workdir, "eval")
  ddim = f"ddim{family.inversion_steps}x{family.decode_steps}_{family.ddim_grid}"
  cache_dir = os.path.join(out_dir, f"partial_{split}_step{int(state.step)}_{ddim}")
  metrics, outputs = training.evaluate(family, state, batches, mesh, cache_dir=cache_dir,
                                       keep=("subject",))
  eps = {k: v for k, v in metrics.items() if k.startswith("eps_loss")}
  result = {"workdir": os.path.abspath(workdir), "config": config.name, "split": split,
            "step": int(state.step), "step_selection": common.step_selection(step),
            "num_subjects": int(len(outputs["subject"])),
            "inversion_steps": family.inversion_steps, "decode_steps": family.decode_steps,
            "ddim_grid": family.ddim_grid,
            "ddim_timesteps": {
                "inversion": diffusion.ddim_timesteps(family.num_timesteps,
                                                      family.inversion_steps,
                                                      family.ddim_grid).tolist(),
                "decoding": diffusion.ddim_timesteps(family.num_timesteps, family.decode_steps,
                                                     family.ddim_grid).tolist()},
            "ema": family.eval_use_ema,
            "reconstruction": {k: metrics[k] for k in ("ssim", "nrmse", "psnr")},
            "eps_loss": eps, "z_sem_std": metrics.get("z_sem_std")}
  first = next(iter(cine.eval_batches(source, config.data, batch_size=2,
                                      fields=family.batch_fields)))
  family.save_figures(state, {family.field: first[family.field]}, out_dir, int(state.step),
                      jax.random.key(config.seed))
  common.write_json(os.path.join(out_dir, "metrics.json"), result)
  shutil.rmtree(cache_dir, ignore_errors=True)
  return result


def main(argv):
  from experiments import common
  FLAGS = flags.FLAGS
  common.start_command(argv, workdir=FLAGS.workdir)
  if common.load_run_config(FLAGS.workdir).model.family == "diffae3d":
    result = evaluate_diffae_run(FLAGS.workdir, FLAGS.split, FLAGS.step,
                                 FLAGS.inversion_steps, FLAGS.decode_steps, FLAGS.ddim_grid,
                                 FLAGS.output_dir)
    rec = result["reconstruction"]
    line = (f"{result['config']} step {result['step']} on {result['num_subjects']} "
            f"{result['split']} subjects ({result['inversion_steps']} inversion + "
            f"{result['decode_steps']} decoding steps, {result['ddim_grid']} grid): "
            f"SSIM {rec['ssim']:.4f}  PSNR {rec['psnr']:.2f} dB  NRMSE {rec['nrmse']:.4f}")
  else:
    result = evaluate_run(FLAGS.workdir, FLAGS.split, FLAGS.step, FLAGS.traversal_steps,
                          FLAGS.traversal_range, codes=FLAGS.codes, code_seed=FLAGS.code_seed,
                          output_dir=FLAGS.output_dir)
    rec = result["reconstruction"]
    line = (f"{result['config']} step {result['step']} on {result['num_subjects']} "
            f"{result['split']} subjects ({rec['codes']} codes decoded): SSIM {rec['ssim']:.4f}"
            f"  PSNR {rec['psnr']:.2f} dB  MSE {rec['mse']:.5f}")
    if "regularized" in result:
      line += (f"  mean |rho| of regularised dims {result['regularized']['mean_abs_rho']:.3f} "
               f"({result['regularized']['codes']} codes)")
  print(line)
  output_dir = FLAGS.output_dir or os.path.join(FLAGS.workdir, "eval")
  print(f"Wrote {os.path.join(output_dir, 'metrics.json')}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(main)
