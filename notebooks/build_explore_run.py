"""Writes explore_run.ipynb: a notebook that explores a trained VAE-family run (ar_sivae,
ar_vae, attri_vae, vae, ...) through the library's own helpers (restore, evaluation pass,
traversals, interpretability metrics). Edit the cells here and run
`python notebooks/build_explore_run.py`; the committed notebook has no outputs.
"""

from __future__ import annotations

import os

import nbformat

NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "explore_run.ipynb")

# (kind, tag, source): the tags name the cells whose outputs the test checks.
CELLS = [
    ("markdown", "", """\
# Explore a trained run

Reconstructions of held-out subjects, latent traversals of the regularised dimensions, each
attribute against its dimension, the interpretability table, and an edit of one subject's
attribute dimension, decoded. Works for any VAE-family workdir (`ar_sivae`, `ar_vae`,
`attri_vae`, `vae`, ...) written by `python -m experiments.train`.

Set `WORKDIR` below (or the environment variable `CARDIAC_JAX_RUN`), then run all cells."""),
    ("code", "settings", """\
import os

# The run to explore; a relative path is read from the repository root.
WORKDIR = os.environ.get("CARDIAC_JAX_RUN", "workdirs/ar_sivae")
SPLIT = os.environ.get("CARDIAC_JAX_SPLIT", "test")  # The subjects to encode.
STEP = None            # A checkpoint step, "best", or None for the latest.
TRAVERSAL_SIGMAS = 2.0  # Traversals and the edit span +-this many SDs of a dimension."""),
    ("code", "restore", """\
%matplotlib inline
import pathlib

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from cardiac_jax import io, training
from cardiac_jax.families import vae_evaluation
from cardiac_jax.metrics import interpretability
from experiments import common

# Relative paths are the repository's (the notebook itself lives in notebooks/).
if pathlib.Path.cwd().name == "notebooks" and not os.path.isabs(WORKDIR):
  os.chdir("..")
config, family, state, mesh = common.restore_run(WORKDIR, STEP)
if not hasattr(family, "decode"):
  raise ValueError(f"{WORKDIR} is a {config.name} run; this notebook needs a VAE-family run")
names = list(config.data.attributes)
dims = [int(d) for d in config.loss.get("regularized_dims", ())]
print(f"{config.name} at step {int(state.step)}: {config.model.latent_dim} latent dimensions; "
      f"regularised: {dict(zip(names, dims)) or 'none'}")"""),
    ("code", "encode", """\
# One pass of the evaluation step over the split: posterior (mu, logvar), the posterior-mean
# reconstruction, the inputs and the attributes of every subject.
_, outputs = training.evaluate(
    family, state, common.split_batches(config, family, SPLIT)(None), mesh,
    keep=("mu", "logvar", "reconstruction", "image", "attributes", "subject"))
mu, logvar, attributes = outputs["mu"], outputs["logvar"], outputs["attributes"]
subjects = [s.decode() if isinstance(s, bytes) else str(s) for s in outputs["subject"]]
# One grey scale for every image: the range of the inputs.
low, high = float(outputs["image"].min()), float(outputs["image"].max())
print(f"{len(subjects)} {SPLIT} subjects encoded; codes {mu.shape}")"""),
    ("markdown", "", "## Reconstructions (posterior means decoded), first channel"),
    ("code", "reconstructions", """\
shown_subjects = min(6, len(subjects))
fig, axes = plt.subplots(2, shown_subjects, figsize=(2 * shown_subjects, 4.2), squeeze=False)
for i in range(shown_subjects):
  for row, (images, label) in enumerate(((outputs["image"], "input"),
                                         (outputs["reconstruction"], "reconstruction"))):
    axes[row, i].imshow(images[i, ..., 0], cmap="gray", vmin=low, vmax=high)
    axes[row, i].set_xticks([]), axes[row, i].set_yticks([])
    axes[0, i].set_title(subjects[i], fontsize=8)
    axes[row, 0].set_ylabel(label)
plt.tight_layout()
plt.show()"""),
    ("markdown", "", """\
## Interpretability

Per attribute: the regularised dimension and its Spearman rho, the dimension of highest mutual
information d* with its interpretability score (R^2 of the attribute on z_d*), MIG and SAP
(`cardiac_jax.metrics.interpretability`, on the posterior means)."""),
    ("code", "interpretability", """\
metrics = interpretability.posterior_code_metrics(mu, logvar, attributes, names, dims,
                                                  codes="mean")
scores = metrics["interpretability"]
regularised = metrics.get("regularized", {})
rows = []
for name in names:
  best = scores["interpretability"][name]
  rho = regularised.get(name)
  rows.append([name, rho["dim"] if rho else "", f"{rho['spearman_rho']:.3f}" if rho else "",
               best["dim"], f"{best['score']:.3f}", f"{scores['mig'][name]:.3f}",
               f"{scores['sap'][name]:.3f}"])
display(Markdown(io.markdown_table(
    ["attribute", "regularised dim", "Spearman rho", "d* (max MI)", "interpretability",
     "MIG", "SAP"], rows, align="lrrrrrr")))"""),
    ("markdown", "", """\
## Latent traversals

Each shown dimension (the regularised ones, or d* per attribute for an unregularised model)
swept over +-`TRAVERSAL_SIGMAS` of its SD across the split, at the subject whose code is
closest to the median code."""),
    ("code", "traversals", """\
shown = dims or [scores["interpretability"][n]["dim"] for n in names]
anchor = int(np.argmin(np.abs(mu - np.median(mu, axis=0)).sum(axis=1)))
sigmas = np.linspace(-TRAVERSAL_SIGMAS, TRAVERSAL_SIGMAS, 7)
centre, spread = mu[:, shown].mean(axis=0), mu[:, shown].std(axis=0) + 1e-6
values = [c + sigmas * s for c, s in zip(centre, spread)]
grid = vae_evaluation.traversal_images(family, state, mu[anchor], shown, values)
fig, axes = plt.subplots(len(shown), len(sigmas), figsize=(1.6 * len(sigmas), 1.7 * len(shown)),
                         squeeze=False)
for r, (d, name) in enumerate(zip(shown, names)):
  for c, sigma in enumerate(sigmas):
    axes[r, c].imshow(grid[r, c, ..., 0], cmap="gray", vmin=low, vmax=high)
    axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
    axes[0, c].set_title(f"{sigma:+.1f} sd", fontsize=8)
  axes[r, 0].set_ylabel(f"z{d} ({name})", fontsize=8)
fig.suptitle(f"traversals at {subjects[anchor]}")
plt.tight_layout()
plt.show()"""),
    ("markdown", "", "## Each attribute against its dimension"),
    ("code", "scatter", """\
fig, axes = plt.subplots(1, len(shown), figsize=(3.4 * len(shown), 3.2), squeeze=False)
for a, (d, name) in enumerate(zip(shown, names)):
  ax = axes[0, a]
  ax.scatter(mu[:, d], attributes[:, a], s=12)
  rho = regularised[name]["spearman_rho"] if name in regularised else float("nan")
  ax.set_xlabel(f"z{d} (posterior mean)")
  ax.set_ylabel(name)
  ax.set_title(f"rho {rho:.2f}" if np.isfinite(rho) else name, fontsize=9)
plt.tight_layout()
plt.show()"""),
    ("markdown", "", """\
## Edit one subject's attribute dimension

Moves `SUBJECT`'s code along the dimension of `ATTRIBUTE` by `SHIFT_SIGMAS` SDs of that
dimension over the split and decodes it; the last panel is the edited minus the unedited
decoding."""),
    ("code", "edit", """\
SUBJECT = subjects[0]
ATTRIBUTE = names[0]
SHIFT_SIGMAS = TRAVERSAL_SIGMAS

i, a = subjects.index(SUBJECT), names.index(ATTRIBUTE)
d = shown[a]
edited = mu[i].copy()
edited[d] += SHIFT_SIGMAS * mu[:, d].std()
decoded = np.asarray(family.decode(state, np.stack([mu[i], edited])))
panels = [(outputs["image"][i, ..., 0], "input"), (decoded[0, ..., 0], "decoded z"),
          (decoded[1, ..., 0], f"z{d} {SHIFT_SIGMAS:+.1f} sd"),
          (decoded[1, ..., 0] - decoded[0, ..., 0], "difference")]
fig, axes = plt.subplots(1, 4, figsize=(9, 2.6))
for ax, (image, title) in zip(axes, panels):
  difference = title == "difference"
  limit = max(float(np.abs(image).max()), 1e-6)
  ax.imshow(image, cmap="RdBu_r" if difference else "gray",
            vmin=-limit if difference else low, vmax=limit if difference else high)
  ax.set_title(title, fontsize=9)
  ax.set_xticks([]), ax.set_yticks([])
fig.suptitle(f"{SUBJECT}: {ATTRIBUTE} {attributes[i, a]:.1f}, dimension z{d} edited")
plt.tight_layout()
plt.show()"""),
]


def build() -> nbformat.NotebookNode:
  """The notebook, with no outputs."""
  notebook = nbformat.v4.new_notebook()
  notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}
  notebook.metadata["language_info"] = {"name": "python"}
  for index, (kind, tag, source) in enumerate(CELLS):
    make = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
    # Fixed cell ids keep the written file the same from one build to the next.
    cell = make(source, id=tag or f"text-{index}")
    if tag:
      cell.metadata["tags"] = [tag]
    notebook.cells.append(cell)
  nbformat.validate(notebook)
  return notebook


if __name__ == "__main__":
  nbformat.write(build(), NOTEBOOK)
  print(f"wrote {NOTEBOOK}")
