"""Evaluation of a VAE-family run on one split (`python -m experiments.evaluate`).

metrics.json holds
- reconstruction: MSE, PSNR, SSIM (overall and per channel) of the decoded codes of
  options.codes (by default one seeded draw z ~ q(z|x) per subject, decoded as the reference
  evaluations' forward pass does), and reconstruction_<other>_codes: those of the other kind
  (the posterior-mean block carries the reconstruction loss and KL too);
- interpretability: the metrics of `cardiac_jax.metrics.interpretability` against the config's
  attributes on the codes of options.codes, with "codes" and "protocol" naming them;
- regularized: Spearman rho of each regularised latent dimension with its attribute;
- interpretability_<other>_codes, regularized_<other>_codes: the same for the other codes;
with reconstructions.png, traversals.png (each regularised dimension, or for an unregularised
model the dimension with the highest mutual information per attribute, decoded across its range
at a real subject's posterior mean) and attribute_scatter.png (the scored codes).
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from cardiac_jax import io, training, viz
from cardiac_jax.metrics import interpretability
from cardiac_jax.metrics import reconstruction as recon_metrics


def traversal_images(family, state, base_code, dims, values_per_dim) -> np.ndarray:
  """(len(dims), S, H, W, C) decodings of `base_code` with dims[r] set to values_per_dim[r]."""
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


def evaluate(family, state, mesh, split_batches, out_dir: str, options, header: dict) -> dict:
  """metrics.json (module docstring) and the figures in out_dir; returns the metrics.
  Finished batches of an interrupted evaluation are read back from out_dir, not recomputed."""
  config, split, codes = family.config, header["split"], options.codes
  if codes not in interpretability.CODE_PROTOCOLS:
    raise ValueError(f"--codes must be one of {interpretability.CODE_PROTOCOLS}, got {codes!r}")
  cache_dir = os.path.join(out_dir, f"partial_{split}_step{int(state.step)}")
  reconstruction, outputs = training.evaluate(
      family, state, split_batches(None), mesh, cache_dir=cache_dir,
      keep=("mu", "logvar", "reconstruction", "image", "attributes", "group", "subject"))
  names = list(config.data.attributes)
  latents, attributes = outputs["mu"], outputs["attributes"]
  result = {**header, "num_subjects": int(len(latents)),
            **reconstruction_blocks(family, state, outputs, reconstruction, codes,
                                    options.code_seed, int(config.train.eval_batch_size))}
  dims = [int(d) for d in config.loss.get("regularized_dims", ())]
  if names and len(latents) > 4:
    result.update(interpretability.posterior_code_metrics(
        latents, outputs["logvar"], attributes, names, dims, codes=codes,
        seed=options.code_seed))
    scored, _ = interpretability.posterior_codes(latents, outputs["logvar"], codes,
                                                 options.code_seed)

  viz.save_reconstruction_figure(os.path.join(out_dir, "reconstructions.png"),
                                 outputs["image"][:8], outputs["reconstruction"][:8],
                                 channel_names=[c.upper() for c in config.data.channels],
                                 title=f"{config.name}: {split} inputs and posterior-mean "
                                       f"reconstructions")
  if names and "interpretability" in result:
    shown = dims or [result["interpretability"]["interpretability"][n]["dim"] for n in names]
    # The subject whose code is closest to the median code anchors the traversal.
    anchor = int(np.argmin(np.abs(latents - np.median(latents, axis=0)).sum(axis=1)))
    mean, std = latents[:, shown].mean(axis=0), latents[:, shown].std(axis=0) + 1e-6
    half, steps = options.traversal_range, options.traversal_steps
    values = [np.linspace(m - half * s, m + half * s, steps) for m, s in zip(mean, std)]
    images = traversal_images(family, state, latents[anchor], shown, values)
    labels = [f"z{d} ({n})" for d, n in zip(shown, names)]
    viz.save_traversal_grid(os.path.join(out_dir, "traversals.png"), images[..., 0], labels,
                            np.linspace(-half, half, steps),
                            title=f"{config.name}: traversals (sigma units) of "
                                  f"{outputs['subject'][anchor]}")
    viz.save_attribute_scatter_grid(
        os.path.join(out_dir, "attribute_scatter.png"), scored[:, shown], attributes,
        xlabels=[f"z{d} ({codes})" for d in shown], ylabels=names,
        title=f"{config.name}: attributes vs latent dimensions ({split})")
  io.write_json(os.path.join(out_dir, "metrics.json"), result)
  shutil.rmtree(cache_dir, ignore_errors=True)
  return result


def summary(result: dict) -> str:
  """One line of an evaluation's metrics for the terminal."""
  rec = result["reconstruction"]
  line = (f"{result['config']} step {result['step']} on {result['num_subjects']} "
          f"{result['split']} subjects ({rec['codes']} codes decoded): SSIM {rec['ssim']:.4f}"
          f"  PSNR {rec['psnr']:.2f} dB  MSE {rec['mse']:.5f}")
  if "regularized" in result:
    line += (f"  mean |rho| of regularised dims {result['regularized']['mean_abs_rho']:.3f} "
             f"({result['regularized']['codes']} codes)")
  return line
