"""Image reconstruction metrics: MSE, PSNR and SSIM, per image and per channel.

All functions are pure `jax.numpy`, batched and jittable (every shape and the filter settings
are static). Images are (B, H, W, C) with C the channels of one example (ED and ES frames in
the UK Biobank AR-SIVAE setting, one ED frame for ACDC); volumes for `ssim3d` are
(B, T, H, W, C) cine sequences. Every per-example function returns an array of shape (B, C):
one value per image and per channel, so that the ED and ES channels are reported separately.

SSIM follows Wang, Bovik, Sheikh & Simoncelli (2004), "Image quality assessment: from error
visibility to structural similarity", eq. 13, with a Gaussian window (11 taps, sigma 1.5),
K1 = 0.01, K2 = 0.03 and population (not sample) statistics inside the window. The local
statistics are computed only where the window fits inside the image ('valid' filtering) and the
SSIM map is averaged over those positions. This is the same number as
`skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1.0)` computed channel by channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def _check_pair(x: jnp.ndarray, y: jnp.ndarray, ndim: int, layout: str) -> None:
  """Raises ValueError unless x and y are two arrays of the same `ndim`-D shape."""
  if x.ndim != ndim or y.ndim != ndim:
    raise ValueError(f"expected two {layout} arrays, got shapes {tuple(x.shape)} and "
                     f"{tuple(y.shape)}")
  if x.shape != y.shape:
    raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)} "
                     f"(both must be {layout})")


def _as_float(x: jnp.ndarray) -> jnp.ndarray:
  # bfloat16 / uint8 inputs are promoted so that E[x^2] - E[x]^2 inside SSIM does not cancel
  # to noise; float64 inputs (with x64 enabled) stay float64.
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def mse(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """Mean squared error per image and channel.

  Args:
    x, y: (B, H, W, C) images.

  Returns:
    (B, C): mean over H and W of (x - y)^2.
  """
  _check_pair(x, y, 4, "(B, H, W, C)")
  diff = _as_float(x) - _as_float(y)
  return jnp.mean(diff * diff, axis=(1, 2))


def psnr(x: jnp.ndarray, y: jnp.ndarray, data_range: float = 1.0) -> jnp.ndarray:
  """Peak signal-to-noise ratio in dB per image and channel.

  Args:
    x, y: (B, H, W, C) images.
    data_range: difference between the largest and smallest possible intensity (1 for images
      min-max normalised to [0, 1]).

  Returns:
    (B, C): 10 * log10(data_range^2 / mse). Identical images give +inf.
  """
  return 10.0 * jnp.log10(data_range ** 2 / mse(x, y))


def _gaussian_taps(size: int, sigma: float) -> np.ndarray:
  """Normalised 1-D Gaussian window of `size` taps centred on the middle tap."""
  if size < 1:
    raise ValueError(f"filter_size must be >= 1, got {size}")
  if sigma <= 0:
    raise ValueError(f"filter_sigma must be > 0, got {sigma}")
  offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  taps = np.exp(-0.5 * (offsets / sigma) ** 2)
  return taps / taps.sum()


def _valid_filter_1d(x: jnp.ndarray, taps: np.ndarray, axis: int) -> jnp.ndarray:
  """Correlates `x` with `taps` along `axis`, keeping only positions where the window fits.

  Written as a weighted sum of shifted slices rather than a convolution: the window is small
  (11 taps), the result is exact float32 arithmetic on every backend (GPU convolutions may run
  in TF32 by default), and the same code serves 2D and 3D windows.
  """
  size = len(taps)
  out_len = x.shape[axis] - size + 1
  out = None
  for k, weight in enumerate(taps):
    index = [slice(None)] * x.ndim
    index[axis] = slice(k, k + out_len)
    term = float(weight) * x[tuple(index)]
    out = term if out is None else out + term
  return out


def _ssim_over_axes(x: jnp.ndarray, y: jnp.ndarray, spatial_axes: Sequence[int],
                    filter_sizes: Sequence[int], filter_sigmas: Sequence[float],
                    data_range: float, k1: float, k2: float) -> jnp.ndarray:
  """Mean SSIM map over `spatial_axes` with a separable Gaussian window (Wang et al. eq. 13)."""
  for axis, size in zip(spatial_axes, filter_sizes):
    if x.shape[axis] < size:
      raise ValueError(f"SSIM window of {size} taps does not fit in axis {axis} of length "
                       f"{x.shape[axis]} (image shape {tuple(x.shape)}); use a smaller "
                       f"filter_size")
  x = _as_float(x)
  y = _as_float(y)
  # The five local moments are filtered together: one stacked array, one pass per axis.
  stacked = jnp.stack([x, y, x * x, y * y, x * y])
  for axis, size, sigma in zip(spatial_axes, filter_sizes, filter_sigmas):
    stacked = _valid_filter_1d(stacked, _gaussian_taps(size, sigma), axis + 1)
  mu_x, mu_y, e_xx, e_yy, e_xy = stacked
  var_x = e_xx - mu_x * mu_x
  var_y = e_yy - mu_y * mu_y
  cov_xy = e_xy - mu_x * mu_y
  c1 = (k1 * data_range) ** 2
  c2 = (k2 * data_range) ** 2
  ssim_map = ((2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2) /
              ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)))
  return jnp.mean(ssim_map, axis=tuple(spatial_axes))


def ssim(x: jnp.ndarray, y: jnp.ndarray, data_range: float = 1.0, filter_size: int = 11,
         filter_sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jnp.ndarray:
  """Structural similarity per image and channel (Wang et al. 2004).

  Args:
    x, y: (B, H, W, C) images; H and W must be >= filter_size.
    data_range: intensity range L in the constants C1 = (k1 L)^2, C2 = (k2 L)^2.
    filter_size: taps of the Gaussian window along each spatial axis.
    filter_sigma: standard deviation of the Gaussian window in pixels.
    k1, k2: stabilising constants of the SSIM formula.

  Returns:
    (B, C): the SSIM map of each channel (computed over H x W with 'valid' filtering, i.e. on
    (H - filter_size + 1) x (W - filter_size + 1) positions) averaged over those positions.
    Channels are never mixed.
  """
  _check_pair(x, y, 4, "(B, H, W, C)")
  return _ssim_over_axes(x, y, (1, 2), (filter_size,) * 2, (filter_sigma,) * 2,
                         data_range, k1, k2)


def _per_axis(value, name: str, kind: type) -> tuple:
  if isinstance(value, (tuple, list)):
    if len(value) != 3:
      raise ValueError(f"{name} must be a number or a (T, H, W) triple, got {value!r}")
    return tuple(kind(v) for v in value)
  return (kind(value),) * 3


def ssim3d(x: jnp.ndarray, y: jnp.ndarray, data_range: float = 1.0,
           filter_size: int | Sequence[int] = 11,
           filter_sigma: float | Sequence[float] = 1.5, k1: float = 0.01,
           k2: float = 0.03) -> jnp.ndarray:
  """Structural similarity of (2D+time or 3D) volumes per example and channel.

  The SSIM formula of `ssim` with a separable 3D Gaussian window over (T, H, W) and 'valid'
  filtering along all three axes.

  Args:
    x, y: (B, T, H, W, C) volumes; each of T, H, W must be >= its window size.
    data_range, k1, k2: as in `ssim`.
    filter_size: taps of the window, one int for all axes or a (T, H, W) triple (a cine of 25
      frames fits an 11-frame window; shorter sequences need a smaller temporal window).
    filter_sigma: standard deviation(s) of the window, one float or a (T, H, W) triple.

  Returns:
    (B, C): the mean of the SSIM map over the valid (T, H, W) positions.
  """
  _check_pair(x, y, 5, "(B, T, H, W, C)")
  sizes = _per_axis(filter_size, "filter_size", int)
  sigmas = _per_axis(filter_sigma, "filter_sigma", float)
  return _ssim_over_axes(x, y, (1, 2, 3), sizes, sigmas, data_range, k1, k2)


def reconstruction_metrics(x: jnp.ndarray, y: jnp.ndarray,
                           data_range: float = 1.0) -> dict[str, jnp.ndarray]:
  """MSE, PSNR and SSIM of a batch, overall and per channel.

  Args:
    x: (B, H, W, C) reference images.
    y: (B, H, W, C) reconstructions.
    data_range: intensity range for PSNR and SSIM.

  Returns:
    Scalars keyed `mse`, `psnr`, `ssim` (mean over the B x C per-image-per-channel values) and
    `mse_ch{c}`, `psnr_ch{c}`, `ssim_ch{c}` (mean over the batch for channel c). PSNR is the
    mean of per-image PSNRs in dB (not the PSNR of the mean MSE), as image papers report it.
  """
  per_image = {
      "mse": mse(x, y),
      "psnr": psnr(x, y, data_range),
      "ssim": ssim(x, y, data_range),
  }
  out: dict[str, jnp.ndarray] = {}
  for name, values in per_image.items():
    out[name] = jnp.mean(values)
    for channel in range(values.shape[1]):
      out[f"{name}_ch{channel}"] = jnp.mean(values[:, channel])
  return out
