"""Association tests of latent phenotypes with traits, and sparse trait directions in latent
space (the analyses of the UK Biobank DiffAE latent-phenotype study, Ometto et al. 2024).
The regressions and the false-discovery control are statsmodels', the sparse models
scikit-learn's; this module adds the checks and the NaN-with-a-note reporting around them.

Per-latent tests (one latent x, one trait y, n subjects, covariates C (n, c)):
- `ols_association` (continuous trait): y = b0 + b x + C g + e by least squares with the
  design X = [1, x, C] (k = 2 + c columns) (statsmodels OLS);
    sigma^2 = RSS / (n - k),  se(b) = sqrt(sigma^2 [(X'X)^-1]_xx),  t = b / se(b),
    p = 2 P(T_{n-k} > |t|)  (Student t, two-sided).
  Without covariates this is the P-value of the Pearson correlation (scipy.stats.linregress).
  `cov_type="HC3"` (or HC0..HC2) replaces sigma^2 (X'X)^-1 by a heteroscedasticity-consistent
  sandwich, keeping the t reference distribution.
- `logistic_association` (binary trait y in {0, 1}): logit P(y = 1) = b0 + b x + C g, maximum
  likelihood by IRLS (Newton-Raphson for this canonical link; statsmodels GLM, Binomial)
  from the intercept-only optimum; converged when |D_old - D| < tol (|D| + 0.1) with the
  deviance D = -2 sum [y log pi + (1 - y) log(1 - pi)] (R's glm rule). Wald test:
  se(b) = sqrt([(X' W X)^-1]_xx), W = diag(pi (1 - pi)), z = b / se(b), p = 2 P(N(0, 1) > |z|)
  (`cov_type="HC0"`: the sandwich instead).
  Separation (some linear combination of the columns splits the classes, so the likelihood
  has no maximum and b runs to infinity) shows as fitted logits beyond +-`SEPARATION_LOGIT`
  or as no convergence within `max_iter` iterations: the test is then reported with
  converged = False and se, z and p NaN (a Wald P-value at a diverging b is meaningless); its
  beta is the last iterate's, a point on a diverging path (only its sign means something).
- A latent that is constant or collinear with the covariates (rank-deficient design), too
  few subjects (n <= k) or a perfect fit give NaN statistics with a note, never an exception
  (statsmodels would fit a rank-deficient design through a pseudo-inverse and report numbers).

Multiple testing: `benjamini_hochberg` adjusts P-values over all tests (statsmodels
multipletests, fdr_bh; NaN P-values are not tests: they keep q = NaN and do not count in m),
  q_(i) = min_{j >= i} min(1, m p_(j) / j)   (p sorted ascending, i = 1..m),
so q is monotone in p and q >= p; test i is a discovery at level alpha when q_i < alpha.
`bh_threshold` is the P-value line of those discoveries (for Manhattan plots).

Trait directions for manipulation (`trait_direction`): on latents standardised per dimension
(`standardise`: z_std = (z - mean) / std with the mean and standard deviation of a reference
set), a sparse linear model of the trait,
- kind "linear": Lasso, alpha chosen by 5-fold cross-validation (sklearn LassoCV, shuffled
  folds); CV score = out-of-fold R^2 of the Lasso at the chosen alpha on the same folds;
- kind "logistic": L1-penalised logistic regression, C chosen by stratified 5-fold
  cross-validation on ROC AUC (sklearn LogisticRegressionCV, liblinear) over 12 values from
  C_0 = 1 / max_j |z_j' (y - ybar)| (below which the model is empty) to 1000 C_0; CV score =
  mean fold AUC at the chosen C;
and the direction beta = w / ||w|| of its coefficient vector w. A manipulation moves
z_std' = z_std + m sqrt(D) beta: a step of m standard deviations of the latent cloud's
typical radius sqrt(D). When the cross-validated model is empty (w = 0: the trait is not
predictable from the latents at this sample size), the sparsest non-empty model on the
regularisation path is used instead and `TraitDirection.empty_fallback` says so.

The coefficient vector w is a filter: the combination of latents that best predicts the trait.
When the latents are correlated it need not be the direction in which the codes of subjects
with a larger trait lie (Haufe et al., NeuroImage 2014, "On the interpretation of weight vectors
of linear models"): w may cancel shared variation, and moving along it leaves the cloud of
codes the decoder was trained on. `activation_pattern` gives that direction instead: with
s = z_std w the model's score (prediction or logit) over the reference subjects,
  a = cov(z_std, s) / sd(s) = Sigma w / sqrt(w' Sigma w),   Sigma = cov(z_std),
so z_std + m a moves the score by exactly m standard deviations (w' a = sd(s)) along a shift of
Mahalanobis length |m| (a' Sigma^-1 a = 1 when Sigma is invertible): the expected change of the
codes when the score changes by m of its standard deviations, under a Gaussian model.

The rank-based inverse normal transform, optional before association of heavy-tailed latents
(as in the GWAS of the latents), is `cardiac_jax.phenotypes.inverse_normal_transform`.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

# |logit| beyond which a fitted probability is numerically 0 or 1 (1 - sigmoid(30) ~ 1e-13):
# a sign of (quasi-)complete separation.
SEPARATION_LOGIT = 30.0
DEFAULT_FOLDS = 5
LOGISTIC_NUM_CS = 12
KINDS = ("linear", "logistic")
OLS_COV_TYPES = ("nonrobust", "HC0", "HC1", "HC2", "HC3")
LOGISTIC_COV_TYPES = ("nonrobust", "HC0")


@dataclasses.dataclass(frozen=True)
class AssociationTest:
  """One latent-trait test: coefficient `beta` of the latent with its standard error, test
  statistic `stat` (t for OLS, Wald z for logistic), two-sided `p`, the number of subjects `n`,
  and whether the fit converged (always True for OLS); `note` says why statistics are NaN."""
  beta: float
  se: float
  stat: float
  p: float
  n: int
  converged: bool = True
  iterations: int = 0
  note: str = ""


def _as_vector(values, name: str) -> np.ndarray:
  array = np.asarray(values, dtype=np.float64)
  if array.ndim != 1:
    raise ValueError(f"{name} must be a vector (n,), got shape {array.shape}")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} has {int(np.sum(~np.isfinite(array)))} non-finite values; drop "
                     "those subjects before testing")
  return array


def _design(y, x, covariates) -> tuple[np.ndarray, np.ndarray]:
  """(y (n,), X = [1, x, C] (n, 2 + c)) checked for shapes and finiteness."""
  y = _as_vector(y, "y")
  x = _as_vector(x, "x")
  if len(x) != len(y):
    raise ValueError(f"x has {len(x)} values and y {len(y)}: one of each per subject")
  columns = [np.ones_like(y), x]
  if covariates is not None:
    c = np.asarray(covariates, dtype=np.float64)
    c = c[:, None] if c.ndim == 1 else c
    if c.ndim != 2 or c.shape[0] != len(y):
      raise ValueError(f"covariates must be (n, c) with n = {len(y)}, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
      raise ValueError("covariates have non-finite values; drop those subjects before testing")
    columns.extend(c.T)
  return y, np.stack(columns, axis=1)


def _full_rank(design: np.ndarray) -> bool:
  # Columns scaled to unit norm so that the rank test does not depend on their units.
  norms = np.linalg.norm(design, axis=0)
  if np.any(norms == 0):
    return False
  return np.linalg.matrix_rank(design / norms) == design.shape[1]


def _nan_test(n: int, note: str, beta: float = np.nan, converged: bool = True,
              iterations: int = 0) -> AssociationTest:
  return AssociationTest(beta=float(beta), se=np.nan, stat=np.nan, p=np.nan, n=n,
                         converged=converged, iterations=iterations, note=note)


def ols_association(y, x, covariates=None, cov_type: str = "nonrobust") -> AssociationTest:
  """t-test of the coefficient of `x` in the least-squares fit y ~ 1 + x + covariates
  (statsmodels OLS).

  Args:
    y: (n,) trait values.
    x: (n,) latent values.
    covariates: optional (n, c) or (n,) covariates (intercept added here).
    cov_type: covariance of the coefficients: "nonrobust" (sigma^2 (X'X)^-1, the classical
      test) or a heteroscedasticity-consistent sandwich "HC0".."HC3" (HC3, MacKinnon & White
      1985, for small n); the t distribution with n - k degrees of freedom either way.

  Returns:
    AssociationTest (module docstring); NaN statistics when n <= k, the design is rank
    deficient (x constant or collinear with the covariates) or the fit is perfect.
  """
  import statsmodels.api as sm  # pylint: disable=g-import-not-at-top
  if cov_type not in OLS_COV_TYPES:
    raise ValueError(f"cov_type must be one of {OLS_COV_TYPES}, got {cov_type!r}")
  y, design = _design(y, x, covariates)
  n, k = design.shape
  if n <= k:
    return _nan_test(n, f"{n} subjects for {k} coefficients: no residual degrees of freedom")
  if not _full_rank(design):
    return _nan_test(n, "rank-deficient design: the latent is constant or collinear with the "
                     "covariates")
  fit = sm.OLS(y, design).fit(cov_type=cov_type, use_t=True)
  beta = float(fit.params[1])
  # Residuals at rounding level (|e_i| ~ eps |y_i|): the standard error would be rounding noise.
  if fit.ssr <= (n * np.finfo(np.float64).eps) ** 2 * float(y @ y):
    return _nan_test(n, "perfect fit: zero residual variance", beta)
  se = float(fit.bse[1])
  if not (np.isfinite(se) and se > 0.0):
    return _nan_test(n, f"{cov_type} standard error undefined (a subject with leverage 1)", beta)
  return AssociationTest(beta=beta, se=se, stat=float(fit.tvalues[1]), p=float(fit.pvalues[1]),
                         n=n)


def logistic_association(y, x, covariates=None, max_iter: int = 50, tol: float = 1e-10,
                         cov_type: str = "nonrobust") -> AssociationTest:
  """Wald test of the coefficient of `x` in the logistic regression y ~ 1 + x + covariates
  (statsmodels GLM, Binomial family, IRLS).

  Args:
    y: (n,) binary trait in {0, 1}.
    x: (n,) latent values.
    covariates: optional (n, c) or (n,) covariates (intercept added here).
    max_iter: IRLS iterations before the fit is reported as not converged.
    tol: relative deviance change of convergence.
    cov_type: "nonrobust" (inverse Fisher information) or "HC0" (the sandwich; statsmodels'
      GLM gives HC1..HC3 the HC0 value, so they are not offered).

  Returns:
    AssociationTest; converged = False with NaN se, stat and p (and the last beta) when the
    classes are separated or IRLS did not converge; NaN statistics when y has one class only
    or the design is rank deficient. The covariance comes from one more IRLS step started at
    the optimum: statsmodels' own is at the last step's starting weights, which moved se by
    up to 2e-4 relative on the frozen test cases.
  """
  import statsmodels.api as sm  # pylint: disable=g-import-not-at-top
  from statsmodels.tools import sm_exceptions  # pylint: disable=g-import-not-at-top
  if cov_type not in LOGISTIC_COV_TYPES:
    raise ValueError(f"cov_type must be one of {LOGISTIC_COV_TYPES}, got {cov_type!r}")
  y, design = _design(y, x, covariates)
  n, k = design.shape
  if not np.all((y == 0) | (y == 1)):
    raise ValueError(f"a logistic trait must be 0/1, got values {np.unique(y)[:8]}")
  cases = int(y.sum())
  if cases in (0, n):
    return _nan_test(n, f"only one class ({cases} cases of {n}): nothing to test")
  if n <= k or not _full_rank(design):
    return _nan_test(n, "rank-deficient design: the latent is constant or collinear with the "
                     "covariates")
  # Start at the intercept-only maximum (the log odds of the case fraction), and stop on R's
  # glm rule |D_old - D| < tol (|D| + 0.1), i.e. atol = 0.1 tol and rtol = tol.
  start = np.zeros(k)
  start[0] = np.log(cases / (n - cases))
  model = sm.GLM(y, design, family=sm.families.Binomial())
  with warnings.catch_warnings(), np.errstate(over="ignore"):
    # Separation (diverging logits, exp overflowing in the link) is detected below from the
    # fitted logits and reported in the note.
    warnings.simplefilter("ignore", sm_exceptions.PerfectSeparationWarning)
    warnings.simplefilter("ignore", sm_exceptions.ConvergenceWarning)
    fit = model.fit(start_params=start, maxiter=max_iter, tol=tol, atol=0.1 * tol, rtol=tol,
                    cov_type=cov_type)
  iterations = int(fit.fit_history["iteration"])
  beta = float(fit.params[1])
  eta = design @ fit.params
  if np.max(np.abs(eta)) > SEPARATION_LOGIT:
    return _nan_test(n, f"separation: fitted logits reach {np.max(np.abs(eta)):.0f} (fitted "
                     "probabilities numerically 0 or 1); the maximum-likelihood estimate does "
                     "not exist", beta, converged=False, iterations=iterations)
  if not fit.converged:
    return _nan_test(n, f"Newton did not converge in {max_iter} iterations", beta,
                     converged=False, iterations=iterations)
  # statsmodels (like R's glm) takes the covariance from the last IRLS step, whose weights
  # pi (1 - pi) are those of the step's start, not of the optimum; at tol = 1e-10 that moved se
  # by up to 2e-4 relative. One more step from the optimum puts them at the optimum.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sm_exceptions.ConvergenceWarning)
    fit = model.fit(start_params=fit.params, maxiter=1, cov_type=cov_type)
  beta = float(fit.params[1])
  se = float(fit.bse[1])
  if not (np.isfinite(se) and se > 0.0):
    return _nan_test(n, "singular information matrix at the optimum", beta, converged=False,
                     iterations=iterations)
  return AssociationTest(beta=beta, se=se, stat=float(fit.tvalues[1]), p=float(fit.pvalues[1]),
                         n=n, converged=True, iterations=iterations)


def benjamini_hochberg(p) -> np.ndarray:
  """Benjamini-Hochberg adjusted P-values (q-values) of any shape (statsmodels multipletests,
  fdr_bh); NaN stays NaN and is not counted among the m tests (module docstring). The NaN
  are masked out here because multipletests turns every q into NaN when one P-value is."""
  from statsmodels.stats import multitest  # pylint: disable=g-import-not-at-top
  p = np.asarray(p, dtype=np.float64)
  flat = p.ravel()
  q = np.full(flat.shape, np.nan)
  tested = np.flatnonzero(np.isfinite(flat))
  if tested.size == 0:
    return q.reshape(p.shape)
  values = flat[tested]
  if np.any((values < 0) | (values > 1)):
    raise ValueError(f"P-values must be in [0, 1], got range [{values.min()}, {values.max()}]")
  q[tested] = multitest.multipletests(values, method="fdr_bh")[1]
  return q.reshape(p.shape)


def bh_threshold(p, alpha: float = 0.05) -> float:
  """The P-value line of the BH discoveries at level alpha: the largest P-value with
  q < alpha, or alpha / m (what the smallest P-value would need) when there is none."""
  p = np.asarray(p, dtype=np.float64).ravel()
  p = p[np.isfinite(p)]
  if p.size == 0:
    return float(alpha)
  q = benjamini_hochberg(p)
  significant = p[q < alpha]
  return float(significant.max()) if significant.size else float(alpha / p.size)


@dataclasses.dataclass(frozen=True)
class Standardisation:
  """Per-dimension mean and standard deviation of a reference set of latents (D,)."""
  mean: np.ndarray
  std: np.ndarray

  def apply(self, z) -> np.ndarray:
    """(N, D) latents -> (N, D) standardised latents (z - mean) / std."""
    return (np.asarray(z, np.float64) - self.mean) / self.std

  def invert(self, z_std) -> np.ndarray:
    """(N, D) standardised latents -> latents mean + std z_std."""
    return self.mean + self.std * np.asarray(z_std, np.float64)


def standardise(z, reference=None) -> tuple[np.ndarray, Standardisation]:
  """(z_std, Standardisation): z (N, D) standardised with the per-dimension mean and standard
  deviation (ddof 0) of `reference` (M, D) (default: z itself). A dimension that is constant
  in the reference keeps std 1 (it only loses its mean) instead of dividing by zero."""
  z = np.asarray(z, np.float64)
  reference = z if reference is None else np.asarray(reference, np.float64)
  if z.ndim != 2 or reference.ndim != 2 or z.shape[1] != reference.shape[1]:
    raise ValueError(f"latents must be (N, D) like the reference; got {z.shape} and "
                     f"{reference.shape}")
  if len(reference) < 2:
    raise ValueError(f"a standardisation needs at least 2 reference subjects, got "
                     f"{len(reference)}")
  mean = reference.mean(axis=0)
  std = reference.std(axis=0)
  std = np.where(std > 0, std, 1.0)
  transform = Standardisation(mean=mean, std=std)
  return transform.apply(z), transform


@dataclasses.dataclass(frozen=True)
class TraitDirection:
  """A unit direction `beta` (D,) in standardised latent space that increases a trait.

  `regularisation` is the selected Lasso alpha (linear) or inverse strength C (logistic);
  `num_nonzero` counts the non-zero coefficients; `cv_score` is the cross-validated R^2
  (linear) or ROC AUC (logistic) named by `cv_metric`, of the model used; `empty_fallback` is
  True when the cross-validated model was empty and the sparsest non-empty model on the path
  (whose alpha or C, and CV score, are then reported) was used instead.
  """
  kind: str
  beta: np.ndarray
  coefficients: np.ndarray
  intercept: float
  regularisation: float
  regularisation_name: str
  num_nonzero: int
  cv_score: float
  cv_metric: str
  num_folds: int
  empty_fallback: bool = False

  def to_dict(self) -> dict:
    return {"kind": self.kind, "beta": [float(b) for b in self.beta],
            "coefficients": [float(c) for c in self.coefficients],
            "intercept": float(self.intercept),
            self.regularisation_name: float(self.regularisation),
            "num_nonzero": int(self.num_nonzero), "cv_score": float(self.cv_score),
            "cv_metric": self.cv_metric, "num_folds": int(self.num_folds),
            "empty_fallback": bool(self.empty_fallback)}


def _unit(w: np.ndarray) -> np.ndarray:
  return w / np.linalg.norm(w)


def _lasso_direction(z: np.ndarray, y: np.ndarray, folds: int, seed: int) -> TraitDirection:
  from sklearn import linear_model, model_selection  # pylint: disable=g-import-not-at-top
  n = len(y)
  folds = min(folds, n)
  if folds < 2:
    raise ValueError(f"a cross-validated Lasso needs at least 2 subjects, got {n}")
  if np.ptp(y) == 0:
    raise ValueError("the trait is constant over the subjects: no direction to fit")
  splitter = model_selection.KFold(folds, shuffle=True, random_state=seed)
  model = linear_model.LassoCV(cv=splitter, max_iter=100000, random_state=seed).fit(z, y)
  coef, intercept, alpha = model.coef_.copy(), float(model.intercept_), float(model.alpha_)
  fallback = not np.any(coef)
  if fallback:
    # The path's alphas descend; the first with a non-zero coefficient gives the sparsest
    # non-empty model (LassoCV centres the data for its intercept, and so does this).
    zc, yc = z - z.mean(axis=0), y - y.mean()
    alphas, paths, _ = linear_model.lasso_path(zc, yc, alphas=model.alphas_, max_iter=100000)
    nonzero = np.flatnonzero(np.any(paths != 0, axis=0))
    if nonzero.size == 0:
      raise ValueError("every Lasso on the path is empty: no latent relates to the trait")
    alpha = float(alphas[nonzero[0]])
    coef = paths[:, nonzero[0]]
    intercept = float(y.mean() - z.mean(axis=0) @ coef)
  predicted = model_selection.cross_val_predict(
      linear_model.Lasso(alpha=alpha, max_iter=100000), z, y, cv=splitter)
  r2 = 1.0 - float(np.sum((y - predicted) ** 2) / np.sum((y - y.mean()) ** 2))
  return TraitDirection(kind="linear", beta=_unit(coef), coefficients=coef, intercept=intercept,
                        regularisation=alpha, regularisation_name="alpha",
                        num_nonzero=int(np.count_nonzero(coef)), cv_score=r2, cv_metric="r2",
                        num_folds=folds, empty_fallback=fallback)


def _logistic_direction(z: np.ndarray, y: np.ndarray, folds: int, seed: int) -> TraitDirection:
  from sklearn import linear_model, model_selection  # pylint: disable=g-import-not-at-top
  if not np.all((y == 0) | (y == 1)):
    raise ValueError(f"a logistic trait must be 0/1, got values {np.unique(y)[:8]}")
  minority = int(min(y.sum(), len(y) - y.sum()))
  folds = min(folds, minority)
  if folds < 2:
    raise ValueError(f"the binary trait has {minority} subject(s) in its smaller class; a "
                     "stratified cross-validation needs at least 2")
  splitter = model_selection.StratifiedKFold(folds, shuffle=True, random_state=seed)
  # C grid relative to the largest C of the empty model, C_0 = 1 / max_j |z_j' (y - ybar)|
  # (the L1 optimality condition at w = 0), over three decades, like the Lasso path.
  c_empty = 1.0 / max(float(np.max(np.abs(z.T @ (y - y.mean())))), 1e-12)
  grid = c_empty * np.logspace(0.0, 3.0, LOGISTIC_NUM_CS)
  fixed = dict(l1_ratio=1.0, solver="liblinear", max_iter=1000, random_state=seed)
  with warnings.catch_warnings():
    # liblinear stops at max_iter on (nearly) separable folds, and folds whose held-out part is
    # tiny may be perfectly classified: neither is an error for choosing C.
    warnings.simplefilter("ignore", category=UserWarning)
    model = linear_model.LogisticRegressionCV(
        Cs=grid, l1_ratios=(1.0,), solver="liblinear", scoring="roc_auc", cv=splitter,
        max_iter=1000, random_state=seed, use_legacy_attributes=False).fit(z, y)
  coef, intercept = model.coef_[0].copy(), float(model.intercept_[0])
  c_value = float(model.C_)
  fallback = not np.any(coef)
  if fallback:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", category=UserWarning)
      for c in sorted(model.Cs_):
        refit = linear_model.LogisticRegression(C=float(c), **fixed).fit(z, y)
        if np.any(refit.coef_):
          coef, intercept, c_value = refit.coef_[0].copy(), float(refit.intercept_[0]), float(c)
          break
      else:
        raise ValueError("every L1-logistic model on the C grid is empty: no latent relates to "
                         "the trait")
  scores = np.asarray(model.scores_)[:, 0, :]  # (folds, Cs), C on the grid.
  auc = float(np.nanmean(scores[:, int(np.argmin(np.abs(model.Cs_ - c_value)))]))
  return TraitDirection(kind="logistic", beta=_unit(coef), coefficients=coef,
                        intercept=intercept, regularisation=c_value, regularisation_name="C",
                        num_nonzero=int(np.count_nonzero(coef)), cv_score=auc,
                        cv_metric="roc_auc", num_folds=folds, empty_fallback=fallback)


def trait_direction(z_std, y, kind: str = "linear", folds: int = DEFAULT_FOLDS,
                    seed: int = 0) -> TraitDirection:
  """The unit direction in standardised latent space of a sparse model of a trait.

  Args:
    z_std: (N, D) standardised latents (`standardise`).
    y: (N,) trait: continuous for kind "linear", 0/1 for kind "logistic".
    kind: "linear" (LassoCV) or "logistic" (L1 LogisticRegressionCV).
    folds: cross-validation folds (at most N, or the smaller class size for logistic).
    seed: seed of the fold shuffling.

  Returns:
    TraitDirection (module docstring).
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  z = np.asarray(z_std, np.float64)
  y = _as_vector(y, "y")
  if z.ndim != 2 or len(z) != len(y):
    raise ValueError(f"z_std must be (N, D) with N = {len(y)} trait values, got shape {z.shape}")
  if not np.all(np.isfinite(z)):
    raise ValueError("z_std has non-finite values")
  if kind == "linear":
    return _lasso_direction(z, y, folds, seed)
  return _logistic_direction(z, y, folds, seed)


def activation_pattern(z_std, coefficients) -> np.ndarray:
  """(D,) activation pattern a = cov(z_std, s) / sd(s) of the linear score s = z_std w over the
  (N, D) reference latents (module docstring)."""
  z = np.asarray(z_std, np.float64)
  w = _as_vector(coefficients, "coefficients")
  if z.ndim != 2 or z.shape[1] != len(w):
    raise ValueError(f"z_std must be (N, D) with D = {len(w)} coefficients, got {z.shape}")
  if len(z) < 2:
    raise ValueError(f"an activation pattern needs at least 2 subjects, got {len(z)}")
  score = z @ w
  spread = float(np.std(score, ddof=1))
  if not spread > 0.0:
    raise ValueError("the score z_std w is constant over the subjects: no activation pattern")
  centred = z - z.mean(axis=0)
  return centred.T @ (score - score.mean()) / ((len(z) - 1) * spread)
