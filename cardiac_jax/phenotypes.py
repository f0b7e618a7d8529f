"""Latent phenotypes: per-subject codes as traits (pure numpy / scipy / scikit-learn).

The semantic codes z_sem of a DiffAE run (`experiments.infer_latents`, one D-vector per subject)
are used like imaging phenotypes: transformed for association studies, matched across training
seeds, and probed for the clinical measurements they carry.

Rank-based inverse-normal transform (`inverse_normal_transform`), per column over the n
non-missing values x_1..x_n with ranks r_i (ties get the average of their ranks):
  INT(x_i) = Phi^-1((r_i - c) / (n - 2c + 1)),  c = 3/8 (Blom),
so the transformed column is the expected normal order statistics of n draws; a missing (NaN)
value stays NaN and is not counted in n.

Matching latents across seeds (`match_latents`, the reproducibility analysis of the UK Biobank
DiffAE latent-phenotype study, Ometto et al. 2024): for two code matrices A (N, D_a) and
B (N, D_b) of the same N subjects,
  r_ij   = Pearson correlation of column i of A and column j of B across the subjects,
  cos_ij = a_i . b_j / (|a_i| |b_j|) (uncentred),
and for every latent i of A its best match in B: max_j |r_ij| with its argmax j, and
max_j |cos_ij| with its argmax (the sign is free: a flipped latent is the same latent). A
constant column (zero norm) correlates 0 with everything. Subjects with a missing value in
either matrix are left out. Latent i of A is reproduced in B when its best |r| (or |cos|) is
above the threshold, 0.5 in the reference (`reproducibility_counts`); the best match is not
one-to-one, so several latents of A may share a partner (counted by `*_distinct_partners`).

Linear probe (`linear_probe`): how much of a trait a code carries linearly. Standardise the
codes with the training subjects' mean and standard deviation, fit ridge regression
y = w . z + b with the penalty chosen by efficient leave-one-out cross-validation over a log
grid of alphas (scikit-learn RidgeCV) on the training subjects, then on the test subjects
  R^2 = 1 - sum (y - y_hat)^2 / sum (y - mean(y))^2   (can be negative),
  r   = Pearson(y, y_hat).
Subjects whose target is missing (NaN) are dropped and counted; so are subjects with a
non-finite code.

Files (other code depends on both formats):
- latents CSV (`write_latents_csv`, `read_latents_csv`): header `subject,split,z0,...,z{D-1}`,
  one row per subject, values with 9 significant digits (exact for float32 codes), missing
  values as NA; split is train / val / test or empty when unknown.
- PLINK / REGENIE phenotype file (`write_plink_phenotypes`, `read_plink_phenotypes`): one
  whitespace-separated header `FID IID z0 ... z{D-1}`, then one line per subject with
  FID = IID = subject id, missing values as NA (plink --pheno, regenie --phenoFile).
`read_latents` reads either, telling them apart by the first header field.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence
from typing import Optional

import numpy as np
from scipy import stats

from cardiac_jax import io

BLOM_OFFSET = 3.0 / 8.0
LATENT_PREFIX = "z"
CSV_ID_COLUMNS = ("subject", "split")
PLINK_ID_COLUMNS = ("FID", "IID")
MISSING = "NA"
_MISSING_TOKENS = frozenset({"", "na", "nan", "-nan", "null", "none"})
# Ridge penalties searched by the probe: 1e-3 .. 1e5, two per decade.
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-3, 5, 17))
DEFAULT_THRESHOLD = 0.5


class LatentsFileError(ValueError):
  """A latents table (CSV or PLINK file, or the codes written into one) that cannot be used:
  the message names the file and the problem, and a command prints it as one line."""


# ----------------------------------------------------------------------------- transforms

def inverse_normal_transform(values, offset: float = BLOM_OFFSET) -> np.ndarray:
  """Rank-based inverse-normal transform of (N,) or (N, D) values, per column (module
  docstring): Phi^-1((rank - offset) / (n - 2 offset + 1)) with average ranks for ties over
  the n non-NaN values of the column; NaN stays NaN (+-inf are ranked like other values).
  Returns float64 of the input's shape."""
  array = np.asarray(values, dtype=np.float64)
  if array.ndim not in (1, 2):
    raise ValueError(f"expected (N,) or (N, D) values, got shape {array.shape}")
  if not 0.0 <= offset < 0.5:
    raise ValueError(f"the rank offset must be in [0, 0.5), got {offset}")
  columns = array[:, None] if array.ndim == 1 else array
  out = np.full(columns.shape, np.nan)
  for j in range(columns.shape[1]):
    present = ~np.isnan(columns[:, j])
    n = int(present.sum())
    if n == 0:
      continue
    ranks = stats.rankdata(columns[present, j], method="average")
    out[present, j] = stats.norm.ppf((ranks - offset) / (n - 2.0 * offset + 1.0))
  return out[:, 0] if array.ndim == 1 else out


def _unit_columns(x: np.ndarray, centre: bool) -> np.ndarray:
  """Columns scaled to unit norm (after removing their mean when `centre`). A constant column
  (its norm after centring at rounding level of its magnitude) becomes zero, so that it
  correlates 0 with everything."""
  y = x - x.mean(axis=0, keepdims=True) if centre else x
  norms = np.linalg.norm(y, axis=0, keepdims=True)
  constant = (norms == 0) | (norms <= 1e-10 * np.linalg.norm(x, axis=0, keepdims=True))
  return np.where(constant, 0.0, y / np.where(constant, 1.0, norms))


# ----------------------------------------------------------------------------- matching

@dataclasses.dataclass(frozen=True)
class LatentMatch:
  """Best matches of every latent of A among the latents of B (module docstring).

  pearson, cosine: (D_a, D_b) signed similarity matrices; best_abs_pearson (D_a,) with
  best_pearson_index (D_a,) into B's latents; best_abs_cosine, best_cosine_index likewise;
  num_subjects: the subjects used.
  """
  pearson: np.ndarray
  cosine: np.ndarray
  best_abs_pearson: np.ndarray
  best_pearson_index: np.ndarray
  best_abs_cosine: np.ndarray
  best_cosine_index: np.ndarray
  num_subjects: int

  @property
  def dim(self) -> int:
    return int(self.pearson.shape[0])


def match_latents(a, b, min_subjects: int = 3) -> LatentMatch:
  """Best |Pearson r| and best |cosine| match in `b` (N, D_b) of every latent (column) of `a`
  (N, D_a); the rows of both are the same N subjects in the same order. Subjects with a
  non-finite value in either are left out; ValueError when fewer than `min_subjects` remain
  or the shapes do not fit."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 2 or b.ndim != 2:
    raise ValueError(f"expected two (N, D) code matrices, got shapes {a.shape} and {b.shape}")
  if a.shape[0] != b.shape[0]:
    raise ValueError(f"the code matrices cover {a.shape[0]} and {b.shape[0]} subjects; match "
                     "them on the same subjects, in the same order")
  if a.shape[1] == 0 or b.shape[1] == 0:
    raise ValueError(f"a code matrix has no latents (shapes {a.shape} and {b.shape})")
  rows = np.all(np.isfinite(a), axis=1) & np.all(np.isfinite(b), axis=1)
  count = int(rows.sum())
  if count < max(min_subjects, 2):
    raise ValueError(f"only {count} of {a.shape[0]} subjects have finite codes in both "
                     f"matrices; matching needs at least {max(min_subjects, 2)}")
  a, b = a[rows], b[rows]
  pearson = _unit_columns(a, True).T @ _unit_columns(b, True)
  cosine = _unit_columns(a, False).T @ _unit_columns(b, False)
  pearson, cosine = np.clip(pearson, -1.0, 1.0), np.clip(cosine, -1.0, 1.0)
  p_index = np.argmax(np.abs(pearson), axis=1)
  c_index = np.argmax(np.abs(cosine), axis=1)
  take = np.arange(len(pearson))
  return LatentMatch(pearson=pearson, cosine=cosine,
                     best_abs_pearson=np.abs(pearson[take, p_index]),
                     best_pearson_index=p_index,
                     best_abs_cosine=np.abs(cosine[take, c_index]),
                     best_cosine_index=c_index, num_subjects=count)


def reproducibility_counts(match: LatentMatch, threshold: float = DEFAULT_THRESHOLD) -> dict:
  """How many latents of A are reproduced in B: best |r| > threshold ("pearson"), best |cos| >
  threshold ("cosine"), either ("either"), out of "dim"; the distinct partners in B of the
  reproduced latents, and the mean best |r| and |cos|."""
  if not 0.0 <= threshold < 1.0:
    raise ValueError(f"the threshold must be in [0, 1), got {threshold}")
  by_r = match.best_abs_pearson > threshold
  by_cos = match.best_abs_cosine > threshold
  return {
      "threshold": float(threshold), "dim": match.dim, "num_subjects": match.num_subjects,
      "pearson": int(by_r.sum()), "cosine": int(by_cos.sum()),
      "either": int((by_r | by_cos).sum()),
      "pearson_distinct_partners": int(len(np.unique(match.best_pearson_index[by_r]))),
      "cosine_distinct_partners": int(len(np.unique(match.best_cosine_index[by_cos]))),
      "mean_best_abs_pearson": float(match.best_abs_pearson.mean()),
      "mean_best_abs_cosine": float(match.best_abs_cosine.mean()),
  }


# ----------------------------------------------------------------------------- probe

@dataclasses.dataclass(frozen=True)
class ProbeResult:
  """Test-split performance of the ridge probe of one trait (module docstring).

  predictions: (n_test,) predictions of the test subjects that were kept (finite target and
  code), in their order.
  """
  r2: float
  pearson_r: float
  alpha: float
  n_train: int
  n_test: int
  dropped_train: int
  dropped_test: int
  predictions: np.ndarray

  def to_dict(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if k != "predictions"}


def _finite_rows(z: np.ndarray, y: np.ndarray, what: str) -> np.ndarray:
  if z.ndim != 2 or y.ndim != 1 or len(z) != len(y):
    raise ValueError(f"{what}: expected codes (N, D) and targets (N,), got {z.shape} and "
                     f"{y.shape}")
  return np.isfinite(y) & np.all(np.isfinite(z), axis=1)


def linear_probe(z_train, y_train, z_test, y_test,
                 alphas: Sequence[float] = DEFAULT_ALPHAS) -> ProbeResult:
  """Ridge probe of a trait from codes: standardise with the training statistics, RidgeCV over
  `alphas` on the training subjects, R^2 and Pearson r on the test subjects (module
  docstring). Subjects with a NaN target (or a non-finite code) are dropped and counted.
  ValueError when fewer than 3 training or 2 test subjects remain."""
  from sklearn import linear_model, metrics, preprocessing
  z_train, z_test = np.asarray(z_train, np.float64), np.asarray(z_test, np.float64)
  y_train, y_test = np.asarray(y_train, np.float64), np.asarray(y_test, np.float64)
  keep_train = _finite_rows(z_train, y_train, "training subjects")
  keep_test = _finite_rows(z_test, y_test, "test subjects")
  if z_train.shape[1] != z_test.shape[1]:
    raise ValueError(f"training codes have {z_train.shape[1]} latents, test codes "
                     f"{z_test.shape[1]}")
  n_train, n_test = int(keep_train.sum()), int(keep_test.sum())
  if n_train < 3 or n_test < 2:
    raise ValueError(f"the probe needs >= 3 training and >= 2 test subjects with a target, has "
                     f"{n_train} (of {len(y_train)}) and {n_test} (of {len(y_test)})")
  if not alphas or min(alphas) <= 0:
    raise ValueError(f"alphas must be positive penalties, got {alphas}")
  scaler = preprocessing.StandardScaler().fit(z_train[keep_train])
  model = linear_model.RidgeCV(alphas=np.asarray(alphas, np.float64))
  model.fit(scaler.transform(z_train[keep_train]), y_train[keep_train])
  predictions = model.predict(scaler.transform(z_test[keep_test]))
  truth = y_test[keep_test]
  r2 = float(metrics.r2_score(truth, predictions)) if np.ptp(truth) > 0 else float("nan")
  if np.ptp(truth) > 0 and np.ptp(predictions) > 0:
    r = float(np.corrcoef(truth, predictions)[0, 1])
  else:
    r = float("nan")  # Constant predictions (the penalty shrank every weight) or targets.
  return ProbeResult(r2=r2, pearson_r=r, alpha=float(model.alpha_), n_train=n_train,
                     n_test=n_test, dropped_train=len(y_train) - n_train,
                     dropped_test=len(y_test) - n_test, predictions=predictions)


# ----------------------------------------------------------------------------- files

@dataclasses.dataclass
class LatentsTable:
  """Codes of N subjects: subjects (N ids), splits (N, "" when unknown), z (N, D) float64;
  path: the file they were read from (None when built in memory)."""
  subjects: list[str]
  splits: list[str]
  z: np.ndarray
  path: Optional[str] = None

  @property
  def dim(self) -> int:
    return int(self.z.shape[1])

  def rows(self, subjects: Sequence[str]) -> np.ndarray:
    """(len(subjects), D) codes of `subjects` in that order; KeyError naming the missing."""
    index = {s: i for i, s in enumerate(self.subjects)}
    missing = [s for s in subjects if s not in index]
    if missing:
      raise KeyError(f"{len(missing)} subjects have no latents, e.g. {missing[:3]}")
    return self.z[[index[s] for s in subjects]]

  def split_indices(self, splits: Sequence[str]) -> np.ndarray:
    """Indices (int64) of the subjects whose split is one of `splits`, in table order."""
    wanted = set(splits)
    return np.asarray([i for i, s in enumerate(self.splits) if s in wanted], dtype=np.int64)

  def in_splits(self, splits: Sequence[str]) -> "LatentsTable":
    """The table of the subjects of `splits` only (same order and path)."""
    index = self.split_indices(splits)
    return LatentsTable(subjects=[self.subjects[i] for i in index],
                        splits=[self.splits[i] for i in index],
                        z=self.z[index].reshape(len(index), self.z.shape[1]), path=self.path)

  def require_finite(self) -> "LatentsTable":
    """The table itself; LatentsFileError naming the file and the subjects when a code is missing
    (NaN) or infinite (for analyses that cannot drop subjects)."""
    bad = [s for s, row in zip(self.subjects, self.z) if not np.all(np.isfinite(row))]
    if bad:
      raise LatentsFileError(f"{self.path or 'latents'}: non-finite latents for subjects "
                             f"{bad[:10]}")
    return self


def latent_names(dim: int) -> list[str]:
  """["z0", ..., "z{dim-1}"]."""
  return [f"{LATENT_PREFIX}{i}" for i in range(dim)]


def _check_table(subjects: Sequence[str], z: np.ndarray, splits: Optional[Sequence[str]],
                 path: str) -> np.ndarray:
  z = np.asarray(z)
  if z.ndim != 2:
    raise LatentsFileError(f"{path}: codes must be (N, D), got shape {z.shape}")
  if len(subjects) != len(z) or (splits is not None and len(splits) != len(z)):
    raise LatentsFileError(f"{path}: {len(subjects)} subjects"
                     f"{'' if splits is None else f', {len(splits)} splits'} for {len(z)} "
                     "code rows")
  empty = [i for i, s in enumerate(subjects) if not str(s)]
  if empty:
    raise LatentsFileError(f"{path}: row {empty[0]} has an empty subject id")
  seen, duplicates = set(), []
  for subject in subjects:
    if subject in seen:
      duplicates.append(subject)
    seen.add(subject)
  if duplicates:
    raise LatentsFileError(f"{path}: duplicate subject ids, e.g. {duplicates[:3]}")
  return z


def _format_value(value: float) -> str:
  return MISSING if np.isnan(value) else f"{value:.9g}"


def write_latents_csv(path: str, subjects: Sequence[str], splits: Sequence[str], z) -> None:
  """Writes the latents CSV (module docstring) atomically: a reader sees the old file or the
  complete new one, never a part."""
  z = _check_table(subjects, z, splits, path)
  with io.atomic_path(path) as temporary, open(temporary, "w", newline="",
                                               encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow([*CSV_ID_COLUMNS, *latent_names(z.shape[1])])
    for subject, split, row in zip(subjects, splits, z):
      writer.writerow([subject, split, *(_format_value(v) for v in row)])


def write_plink_phenotypes(path: str, subjects: Sequence[str], z) -> None:
  """Writes a PLINK / REGENIE phenotype file `FID IID z0 ... z{D-1}` (FID = IID = subject,
  missing as NA) atomically. LatentsFileError for a subject id with whitespace, which the format
  cannot hold."""
  z = _check_table(subjects, z, None, path)
  bad = [s for s in subjects if any(c.isspace() for c in str(s))]
  if bad:
    raise LatentsFileError(f"{path}: subject ids with whitespace cannot be PLINK FID/IID, e.g. "
                     f"{bad[:3]}")
  with io.atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as f:
    f.write(" ".join([*PLINK_ID_COLUMNS, *latent_names(z.shape[1])]) + "\n")
    for subject, row in zip(subjects, z):
      f.write(" ".join([subject, subject, *(_format_value(v) for v in row)]) + "\n")


def parse_number(text: Optional[str], where: str) -> float:
  """A table cell as a number: NaN for an absent (None) or missing cell (empty, NA, nan, null,
  none; any case), LatentsFileError naming `where` for text that is not a number."""
  if text is None or text.strip().lower() in _MISSING_TOKENS:
    return np.nan
  try:
    return float(text)
  except ValueError:
    raise LatentsFileError(f"{where} holds {text!r}, not a number (missing values are "
                     f"{MISSING})") from None


def _parse_values(fields: Sequence[str], path: str, line: int, names: Sequence[str]) -> list:
  return [parse_number(text, f"{path}, line {line}: column {name}")
          for name, text in zip(names, fields)]


def _check_latent_header(header: Sequence[str], id_columns: Sequence[str], path: str) -> int:
  """D of a header `*id_columns, z0..z{D-1}`; LatentsFileError naming the file otherwise."""
  names = list(header[len(id_columns):])
  if list(header[:len(id_columns)]) != list(id_columns) or not names or (
      names != latent_names(len(names))):
    shown = ",".join(header[:len(id_columns) + 3]) + (",..." if len(header) > 5 else "")
    raise LatentsFileError(f"{path}: the header must be {' '.join(id_columns)} then "
                     f"{LATENT_PREFIX}0 .. {LATENT_PREFIX}<D-1>, got {shown!r}")
  return len(names)


def _check_exists(path: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: write it with `python -m "
                            "experiments.infer_latents --output=...`")


def _read_rows(rows, dim: int, path: str) -> tuple[list[list[str]], np.ndarray]:
  """The two id fields of every non-empty row after the header (rows: lists of fields, the
  first on line 2) and their (N, dim) float64 values; LatentsFileError naming the file and
  line for a row of the wrong length or a bad value. Shared by the CSV and PLINK readers."""
  names = latent_names(dim)
  ids, values = [], []
  for line, fields in enumerate(rows, start=2):
    if not fields:
      continue
    if len(fields) != dim + 2:
      raise LatentsFileError(f"{path}, line {line}: {len(fields)} fields, the header has "
                             f"{dim + 2}")
    ids.append(fields[:2])
    values.append(_parse_values(fields[2:], path, line, names))
  return ids, np.asarray(values, np.float64).reshape(len(values), dim)


def read_latents_csv(path: str) -> LatentsTable:
  """The latents CSV (module docstring) as a LatentsTable; FileNotFoundError when absent,
  LatentsFileError naming the file and line for a bad header, row or value, or duplicate
  subjects."""
  _check_exists(path)
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      raise LatentsFileError(f"{path}: empty file, expected the header subject,split,z0,...")
    dim = _check_latent_header(header, CSV_ID_COLUMNS, path)
    ids, z = _read_rows(reader, dim, path)
  subjects, splits = [i[0] for i in ids], [i[1] for i in ids]
  _check_table(subjects, z, splits, path)
  return LatentsTable(subjects=subjects, splits=splits, z=z, path=path)


def read_plink_phenotypes(path: str) -> LatentsTable:
  """A phenotype file `FID IID z0 ... z{D-1}` as a LatentsTable (subjects = IID, splits
  empty); LatentsFileError naming the file and line for a bad header, row or value."""
  _check_exists(path)
  with open(path, encoding="utf-8") as f:
    header = f.readline().split()
    if not header:
      raise LatentsFileError(f"{path}: empty file, expected the header FID IID z0 ...")
    dim = _check_latent_header(header, PLINK_ID_COLUMNS, path)
    ids, z = _read_rows((text.split() for text in f), dim, path)
  subjects = [i[1] for i in ids]  # IID.
  _check_table(subjects, z, None, path)
  return LatentsTable(subjects=subjects, splits=[""] * len(subjects), z=z, path=path)


def read_latents(path: str) -> LatentsTable:
  """A latents CSV or PLINK phenotype file, told apart by the first header field."""
  _check_exists(path)
  with open(path, encoding="utf-8") as f:
    first = f.readline()
  if first.split() and first.split()[0] == PLINK_ID_COLUMNS[0]:
    return read_plink_phenotypes(path)
  return read_latents_csv(path)


def common_subjects(tables: Sequence[LatentsTable]) -> list[str]:
  """The subjects present in every table, in the order of the first."""
  if not tables:
    return []
  shared = set(tables[0].subjects)
  for table in tables[1:]:
    shared &= set(table.subjects)
  return [s for s in tables[0].subjects if s in shared]
