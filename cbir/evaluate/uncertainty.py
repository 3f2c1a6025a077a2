"""Intervals and paired comparisons over per-query records (SPEC section 11), vectorised.

Everything here is a pure function: per-query values (numpy) in, numbers and tables out.

- Interval: percentile bootstrap with the queries resampled within each class (stratified: a
  class keeps its query count, so a macro average keeps every class); the reported value is the
  point estimate of the full sample, `[low, high]` the percentiles of the resampled statistic.
- A class's resampled sum is drawn as multinomial counts over the class's distinct values
  (exactly the distribution of a resample of its queries): P@N and correctness take few distinct
  values, so 1.6M queries x 1,000 resamples cost a few multinomial draws per class, not 1.6e9
  gathers. Classes with many distinct values fall back to resampling index arrays in chunks.
- Paired comparison: the statistic on per-query differences P_A - P_B (the same resampled query
  sets for both runs), p-value by the two-sided sign-flip permutation test (exact when the
  nonzero differences are few, else `flips` random sign vectors), Holm across pairs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd

MAX_DISTINCT = 256  # above this many distinct values in a class, resample index arrays
CHUNK_ELEMENTS = 8_000_000  # bound on the temporaries of one chunk of resamples
TIED_ALPHA = 0.05


def rng_for(seed: int, *names: str) -> np.random.Generator:
    """A generator per (seed, metric): intervals do not depend on which others were computed."""
    words = [int.from_bytes(name.encode()[:32].ljust(32, b"\0"), "little") % (2**63) for name in names]
    return np.random.default_rng([int(seed), *words])


def _strata(classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class code of each value 0..C-1, query count per class)."""
    codes, _ = pd.factorize(pd.Series(np.asarray(classes)), sort=True)
    return codes, np.bincount(codes)


def class_resample_sums(
    values: np.ndarray, classes: np.ndarray, resamples: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(B, C) sum of the values of a stratified resample in each class, and the counts (C,)."""
    values = np.asarray(values, dtype=np.float64)
    codes, counts = _strata(classes)
    sums = np.zeros((resamples, len(counts)))
    order = np.argsort(codes, kind="stable")
    starts = np.r_[0, np.cumsum(counts)]
    for c in range(len(counts)):
        members = values[order[starts[c] : starts[c + 1]]]
        n = len(members)
        distinct, multiplicity = np.unique(members, return_counts=True)
        if len(distinct) == 1:
            sums[:, c] = distinct[0] * n
        elif len(distinct) <= MAX_DISTINCT:
            step = max(1, CHUNK_ELEMENTS // len(distinct))
            for b in range(0, resamples, step):
                draws = rng.multinomial(n, multiplicity / n, size=min(step, resamples - b))
                sums[b : b + len(draws), c] = draws @ distinct
        else:
            step = max(1, CHUNK_ELEMENTS // n)
            for b in range(0, resamples, step):
                picks = rng.integers(0, n, size=(min(step, resamples - b), n))
                sums[b : b + len(picks), c] = members[picks].sum(axis=1)
    return sums, counts


def point_micro_macro(values: np.ndarray, classes: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    codes, counts = _strata(classes)
    return float(values.mean()), float((np.bincount(codes, weights=values) / counts).mean())


def percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[~np.isnan(samples)]
    if len(samples) == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def micro_macro_samples(
    values: np.ndarray, classes: np.ndarray, resamples: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Resampled micro (mean over queries) and macro (mean of class means), (B,) each."""
    sums, counts = class_resample_sums(values, classes, resamples, rng)
    return sums.sum(axis=1) / counts.sum(), (sums / counts).mean(axis=1)


def mean_intervals(
    values: np.ndarray,
    classes: np.ndarray,
    resamples: int,
    level: float,
    rng: np.random.Generator,
) -> dict[str, tuple[float, float]]:
    """{'micro': (low, high), 'macro': (low, high)} of the per-query values (NaN dropped)."""
    values = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(values)
    if not ok.any():
        return {"micro": (np.nan, np.nan), "macro": (np.nan, np.nan)}
    micro, macro = micro_macro_samples(values[ok], np.asarray(classes)[ok], resamples, rng)
    return {
        "micro": percentile_interval(micro, level),
        "macro": percentile_interval(macro, level),
    }


def retrieval_intervals(
    records: pd.DataFrame,
    ns,
    resamples: int,
    level: float,
    seed: int,
    prefix: str = "",
    value_column: str = "P@{n}",
    names=("micro/P_at_{n}", "macro/P_at_{n}"),
) -> dict[str, float]:
    """`<metric>_ci_low` / `_ci_high` for micro and macro of each N, overall and per modality,
    from per-query records with columns class, modality and the value columns."""
    out: dict[str, float] = {}
    if resamples <= 0 or records.empty:
        return out
    subsets = [("", np.ones(len(records), bool))]
    subsets += [
        (f"modality/{m}/", (records["modality"].astype(str) == m).to_numpy())
        for m in sorted(records["modality"].astype(str).unique())
    ]
    for n in ns:
        column = value_column.format(n=n)
        for subset, mask in subsets:
            part = records[mask]
            rng = rng_for(seed, prefix + subset + column)
            bounds = mean_intervals(part[column].to_numpy(), part["class"].to_numpy(), resamples, level, rng)
            for average, template in zip(("micro", "macro"), names):
                name = prefix + subset + template.format(n=n)
                out[f"{name}_ci_low"], out[f"{name}_ci_high"] = bounds[average]
    return out


# ------------------------------------------------------------------ classification
def _resampled_confusions(
    truth: np.ndarray,
    predicted: np.ndarray,
    n_classes: int,
    resamples: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(B, C, C) confusion matrices of stratified resamples: each true class's row is a
    multinomial draw of its query count over the predicted classes of its queries."""
    matrix = np.zeros((n_classes, n_classes))
    np.add.at(matrix, (truth, predicted), 1)
    out = np.zeros((resamples, n_classes, n_classes))
    for c in np.flatnonzero(matrix.sum(axis=1)):
        n = int(matrix[c].sum())
        out[:, c, :] = rng.multinomial(n, matrix[c] / n, size=resamples)
    return out


def f1_from_confusions(confusions: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy and macro F1 of each confusion matrix (scikit-learn's definitions: macro over
    the classes present in the truth or the prediction, 0 where a denominator is 0)."""
    tp = np.diagonal(confusions, axis1=1, axis2=2)
    rows, cols = confusions.sum(axis=2), confusions.sum(axis=1)
    denominator = rows + cols
    f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
    present = denominator > 0
    return {
        "accuracy": tp.sum(axis=1) / confusions.sum(axis=(1, 2)),
        "macro_f1": (f1 * present).sum(axis=1) / np.maximum(present.sum(axis=1), 1),
    }


def _stratified_weights(codes: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(B, Q) how often each query is drawn in each stratified resample."""
    weights = np.zeros((resamples, len(codes)))
    for c in np.unique(codes):
        members = np.flatnonzero(codes == c)
        weights[:, members] = rng.multinomial(len(members), np.full(len(members), 1 / len(members)), size=resamples)
    return weights


def weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B,) ROC-AUC of `scores` against `positive` with each row counted weights[b, i] times
    (ties count one half, as scikit-learn); NaN where a resample has no positive or negative."""
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    w = weights[:, order]
    pos = positive[order].astype(np.float64)
    pos_groups = np.add.reduceat(w * pos, starts, axis=1)
    neg_groups = np.add.reduceat(w * (1.0 - pos), starts, axis=1)
    below = np.cumsum(neg_groups, axis=1) - neg_groups
    wins = (pos_groups * (below + 0.5 * neg_groups)).sum(axis=1)
    n_pos, n_neg = pos_groups.sum(axis=1), neg_groups.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), wins / (n_pos * n_neg), np.nan)


AUC_MAX_CELLS = 20_000_000  # resamples x queries x classes above which ROC-AUC intervals are skipped


def classification_intervals(
    truth: np.ndarray,
    probabilities: np.ndarray,
    resamples: int,
    level: float,
    seed: int,
    modality=None,
    prefix: str = "",
) -> dict[str, float]:
    """Intervals of accuracy, micro F1 (= accuracy for single-label), macro F1 and, when small
    enough to recompute (AUC_MAX_CELLS), micro/macro ROC-AUC; overall and per modality."""
    out: dict[str, float] = {}
    truth = np.asarray(truth, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if resamples <= 0 or len(truth) == 0:
        return out
    subsets = [("", np.ones(len(truth), bool))]
    if modality is not None:
        modality = np.asarray(modality).astype(str)
        subsets += [(f"modality/{m}/", modality == m) for m in sorted(set(modality))]
    n_classes = probabilities.shape[1]
    predicted = probabilities.argmax(axis=1)
    for subset, mask in subsets:
        name = prefix + subset
        t, p, prob = truth[mask], predicted[mask], probabilities[mask]
        stats = f1_from_confusions(_resampled_confusions(t, p, n_classes, resamples, rng_for(seed, name + "f1")))
        stats["micro_f1"] = stats["accuracy"]
        for metric, samples in stats.items():
            out[f"{name}{metric}_ci_low"], out[f"{name}{metric}_ci_high"] = percentile_interval(samples, level)
        if resamples * len(t) * n_classes > AUC_MAX_CELLS or n_classes < 2:
            continue
        rng = rng_for(seed, name + "auc")
        one_hot = np.zeros_like(prob, dtype=bool)
        one_hot[np.arange(len(t)), t] = True
        per_class, micro = [], []
        step = max(1, AUC_MAX_CELLS // 4 // max(len(t) * n_classes, 1))
        for b in range(0, resamples, step):
            weights = _stratified_weights(t, min(step, resamples - b), rng)
            present = [c for c in range(n_classes) if one_hot[:, c].any() and not one_hot[:, c].all()]
            per_class.append(
                np.stack(
                    [weighted_auc(prob[:, c], one_hot[:, c], weights) for c in present],
                    axis=1,
                )
                if present
                else np.full((len(weights), 1), np.nan)
            )
            micro.append(weighted_auc(prob.ravel(), one_hot.ravel(), np.repeat(weights, n_classes, axis=1)))
        with np.errstate(invalid="ignore"):
            macro = np.nanmean(np.concatenate(per_class), axis=1)  # a class without a positive is skipped
        out[f"{name}macro_roc_auc_ci_low"], out[f"{name}macro_roc_auc_ci_high"] = percentile_interval(macro, level)
        out[f"{name}micro_roc_auc_ci_low"], out[f"{name}micro_roc_auc_ci_high"] = percentile_interval(
            np.concatenate(micro), level
        )
    return out


# ------------------------------------------------------------------ paired comparisons
def sign_flip_p(
    differences: np.ndarray,
    classes: np.ndarray,
    average: str,
    flips: int,
    rng: np.random.Generator,
) -> float:
    """Two-sided p of the paired sign-flip permutation test of mean(d) (micro) or the mean of
    class means of d (macro). Exact when 2**(nonzero differences) <= flips. Queries with equal
    |d| * weight flip as a group: their signed sum is a scaled Binomial(m, 1/2), so a random flip
    costs one binomial draw per distinct value instead of one sign per query."""
    d = np.asarray(differences, dtype=np.float64)
    codes, counts = _strata(classes)
    weight = np.full(len(d), 1 / len(d)) if average == "micro" else 1 / (counts[codes] * len(counts))
    x = np.abs(d) * weight
    observed = abs(float((d * weight).sum()))
    x = x[x > 0]
    if len(x) == 0:
        return 1.0
    tolerance = 1e-12 * max(observed, 1e-300) + 1e-15
    if 2 ** len(x) <= flips:
        signs = 1 - 2 * ((np.arange(2 ** len(x))[:, None] >> np.arange(len(x))) & 1)
        flipped = np.abs(signs @ x)
        return float(np.mean(flipped >= observed - tolerance))
    distinct, multiplicity = np.unique(x, return_counts=True)
    exceed = 0
    step = max(1, CHUNK_ELEMENTS // len(distinct))
    for b in range(0, flips, step):
        heads = rng.binomial(multiplicity, 0.5, size=(min(step, flips - b), len(distinct)))
        exceed += int((np.abs((2 * heads - multiplicity) @ distinct) >= observed - tolerance).sum())
    return (1 + exceed) / (1 + flips)


def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    adjusted = np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order])
    out = np.empty_like(p)
    out[order] = np.minimum(adjusted, 1.0)
    return out


@dataclass
class PairedDifference:
    difference: float
    low: float
    high: float
    p: float


def paired_difference(
    a: np.ndarray,
    b: np.ndarray,
    classes: np.ndarray,
    average: str,
    resamples: int,
    level: float,
    flips: int,
    seed: int,
    name: str = "",
) -> PairedDifference:
    """Difference A - B of micro or macro mean of paired per-query values (same queries, same
    order), its stratified bootstrap interval and sign-flip p."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    classes = np.asarray(classes)
    micro, macro = point_micro_macro(d, classes)
    point = micro if average == "micro" else macro
    low = high = float("nan")
    if resamples > 0:
        samples = micro_macro_samples(d, classes, resamples, rng_for(seed, "diff", name, average))
        low, high = percentile_interval(samples[0 if average == "micro" else 1], level)
    return PairedDifference(
        point,
        low,
        high,
        sign_flip_p(d, classes, average, flips, rng_for(seed, "flip", name, average)),
    )


def compare_runs(
    records: dict[str, pd.DataFrame],
    metrics,
    resamples: int,
    level: float,
    flips: int,
    seed: int,
) -> pd.DataFrame:
    """Every pair of runs (name -> per-query records with columns row, class and the metric
    columns, the same queries) for each (average, column) in `metrics`, e.g. ("micro", "P@1").
    Columns: metric, a, b, difference, ci_low, ci_high, p, p_holm (Holm over the pairs of that
    metric), and the tied-for-best verdict per run (see `tied_for_best`)."""
    names = sorted(records)
    rows = []
    aligned = {n: records[n].sort_values("row").reset_index(drop=True) for n in names}
    for name in names[1:]:
        if not np.array_equal(aligned[name]["row"].to_numpy(), aligned[names[0]]["row"].to_numpy()):
            raise ValueError(f"runs {names[0]} and {name} answered different queries: not a paired comparison")
    for average, column in metrics:
        label = f"{average} {column}"
        for a, b in itertools.combinations(names, 2):
            ra, rb = aligned[a], aligned[b]
            ok = (ra[column].notna() & rb[column].notna()).to_numpy()
            result = paired_difference(
                ra[column].to_numpy()[ok],
                rb[column].to_numpy()[ok],
                ra["class"].to_numpy()[ok],
                average,
                resamples,
                level,
                flips,
                seed,
                f"{label}|{a}|{b}",
            )
            rows.append(
                {
                    "metric": label,
                    "a": a,
                    "b": b,
                    "difference": result.difference,
                    "ci_low": result.low,
                    "ci_high": result.high,
                    "p": result.p,
                }
            )
    table = pd.DataFrame(rows, columns=["metric", "a", "b", "difference", "ci_low", "ci_high", "p"])
    table["p_holm"] = table.groupby("metric")["p"].transform(lambda p: holm(p.to_numpy())) if len(table) else []
    return table


def tied_for_best(values: dict[str, float], pairs: pd.DataFrame, alpha: float = TIED_ALPHA) -> list[str]:
    """The best run (highest value) and every run whose Holm-adjusted p against it is >= alpha."""
    best = max(values, key=lambda name: (values[name], name))
    tied = [best]
    for name in sorted(values):
        if name == best:
            continue
        pair = pairs[((pairs["a"] == best) & (pairs["b"] == name)) | ((pairs["a"] == name) & (pairs["b"] == best))]
        if len(pair) and float(pair["p_holm"].iloc[0]) >= alpha:
            tied.append(name)
    return tied


def fmt_interval(value, low=None, high=None, digits: int = 3) -> str:
    """`0.409 [0.37, 0.45]`, or the value alone when there is no interval."""

    def missing(x) -> bool:
        return x is None or bool(np.isnan(x))

    if missing(value):
        return "-"
    if missing(low) or missing(high):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits - 1}f}, {high:.{digits - 1}f}]"


def with_interval(metrics: dict, name: str, digits: int = 3) -> str:
    """A metric from a dict of metrics, with its `_ci_low`/`_ci_high` when logged."""
    return fmt_interval(
        metrics.get(name),
        metrics.get(f"{name}_ci_low"),
        metrics.get(f"{name}_ci_high"),
        digits,
    )


def merge_interval_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """For tables people read: each column `X` that has `X low` and `X high` beside it becomes
    the text `0.409 [0.37, 0.45]` and the two bound columns go."""
    frame = frame.copy()
    for column in [c for c in frame.columns if f"{c} low" in frame and f"{c} high" in frame]:
        frame[column] = [
            fmt_interval(v, lo, hi) for v, lo, hi in zip(frame[column], frame[f"{column} low"], frame[f"{column} high"])
        ]
        frame = frame.drop(columns=[f"{column} low", f"{column} high"])
    return frame
