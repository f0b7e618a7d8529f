"""The schema of a prepared cardiac dataset (one tfds example per subject).

Every prepared dataset (synthetic cohort, ACDC, later others) is a tensorflow-datasets dataset
with these features, so `pipeline.py` reads all of them the same way.

- `subject`:    subject id, e.g. "patient001".
- `group`:      diagnostic group index into `cardiac_jax.structures.GROUPS`.
- `image`:      (H, W, 2) float32 in [0, 1]: the selected short-axis slice at [ED, ES] after
                resampling, LV-centring, canonical rotation, cropping and normalisation.
- `label`:      (H, W, 2) uint8 canonical labels (0 bg, 1 RV, 2 MYO, 3 LV) for the same slice.
- `slice_index`: index of the selected slice in the original stack (after any flip to
                base-first order), for traceability.
- `attributes`: one float32 scalar per name in `cardiac_jax.structures.ATTRIBUTE_NAMES`
                (whole-heart measurements from all slices, not only the selected one).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from cardiac_jax import structures

CHANNELS = ("ed", "es")


def prepared_features(image_size: int) -> tfds.features.FeaturesDict:
  """The FeaturesDict of one prepared subject for square crops of `image_size` pixels."""
  return tfds.features.FeaturesDict({
      "subject": tfds.features.Text(),
      "group": tfds.features.ClassLabel(names=list(structures.GROUPS)),
      "image": tfds.features.Tensor(shape=(image_size, image_size, len(CHANNELS)),
                                    dtype=np.float32),
      "label": tfds.features.Tensor(shape=(image_size, image_size, len(CHANNELS)),
                                    dtype=np.uint8),
      "slice_index": tfds.features.Scalar(dtype=np.int32),
      "attributes": tfds.features.FeaturesDict({
          name: tfds.features.Scalar(dtype=np.float32)
          for name in structures.ATTRIBUTE_NAMES}),
  })
