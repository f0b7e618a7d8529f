"""Metrics of a binary classifier over a whole split."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as sk_metrics


def roc_auc(scores, labels) -> float:
  """Area under the ROC curve of `scores` for boolean `labels` (ties count 1/2; scikit-learn's
  `roc_auc_score`); NaN when one class is missing, ValueError when the lengths differ."""
  scores = np.asarray(scores, np.float64).ravel()
  labels = np.asarray(labels).ravel().astype(bool)
  if scores.shape != labels.shape:
    raise ValueError(f"{scores.shape[0]} scores for {labels.shape[0]} labels")
  if labels.all() or not labels.any():
    return float("nan")
  return float(sk_metrics.roc_auc_score(labels, scores))
