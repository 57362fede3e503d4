"""Statistics of `taopd evaluate`: pass@1 of each student with intervals, per arm over training seeds,
and the columns it adds to a training run's comparison table.

`evaluation.parquet` holds one row per student x eval seed x sample x problem (`correct`). A student's
pass@1 is the mean correctness over problems, samples and seeds; its 95% interval is a percentile
bootstrap over problems (the problem is the unit that repeats: samples and seeds of one problem are
correlated). Over a run's arms, the trained students of one (selector, ratio) differ by training seed:
their mean pass@1 gets a t interval over those seeds (>= 2; clipped to [0, 1]), as the live gain does in
`analysis.training`; one seed falls back to the student's bootstrap interval.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import scipy.stats

from analysis.io import require_columns

EVALUATION_REQUIRED = ("student", "selector", "ratio", "train_seed", "eval_seed", "sample", "problem_id", "correct")
LM_EVAL_REQUIRED = ("student", "task", "metric", "filter", "value")
STUDENT_COLUMNS = ("student", "selector", "ratio", "train_seed", "n_problems", "n_samples", "n_seeds", "pass1",
                   "pass1_seed_std", "pass1_ci_low", "pass1_ci_high")


def bootstrap_mean_ci(values: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
                      ) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one value per cluster)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))
    lo, hi = np.quantile(values[idx].mean(1), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def student_accuracy(evaluation: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per student (first-seen order): pass@1 over problems, samples and seeds; the std of
    the per-seed pass@1 (NaN with one seed); a 95% bootstrap interval over problems."""
    require_columns(evaluation, EVALUATION_REQUIRED, "evaluation")
    rows = []
    for student, g in evaluation.groupby("student", sort=False):
        per_problem = g.groupby("problem_id")["correct"].mean().to_numpy(dtype=float)
        per_seed = g.groupby("eval_seed")["correct"].mean()
        lo, hi = bootstrap_mean_ci(per_problem, n_boot=n_boot, seed=seed)
        first = g.iloc[0]
        rows.append({
            "student": student, "selector": first["selector"], "ratio": float(first["ratio"]),
            "train_seed": int(first["train_seed"]), "n_problems": len(per_problem),
            "n_samples": int(g.groupby(["problem_id", "eval_seed"]).size().max()),
            "n_seeds": int(g["eval_seed"].nunique()), "pass1": float(g["correct"].mean()),
            "pass1_seed_std": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else math.nan,
            "pass1_ci_low": lo, "pass1_ci_high": hi,
        })
    return pd.DataFrame(rows, columns=list(STUDENT_COLUMNS))


def arm_accuracy(students: pd.DataFrame) -> pd.DataFrame:
    """Per (selector, ratio) of a run's arm students: eval_pass1_mean over training seeds, its std, and
    a 95% interval (t over training seeds with >= 2 seeds, else the one student's bootstrap interval)."""
    arms = students[students["selector"] != ""]
    rows = []
    for (selector, ratio), g in arms.groupby(["selector", "ratio"], sort=False):
        values = g["pass1"].to_numpy(dtype=float)
        mean = float(values.mean())
        if len(values) >= 2:
            half = scipy.stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
            lo, hi = max(mean - half, 0.0), min(mean + half, 1.0)  # an accuracy: the t interval clipped to [0, 1]
        else:
            lo, hi = float(g["pass1_ci_low"].iloc[0]), float(g["pass1_ci_high"].iloc[0])
        rows.append({"selector": selector, "ratio": float(ratio), "eval_pass1_mean": mean,
                     "eval_pass1_std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                     "eval_pass1_ci_low": float(lo), "eval_pass1_ci_high": float(hi)})
    return pd.DataFrame(rows, columns=["selector", "ratio", "eval_pass1_mean", "eval_pass1_std",
                                       "eval_pass1_ci_low", "eval_pass1_ci_high"])


def lm_eval_arm_columns(lm_eval: pd.DataFrame, students: pd.DataFrame) -> pd.DataFrame:
    """Per (selector, ratio): one column `lm_<task>_<metric>` per lm-eval result, mean over training seeds."""
    require_columns(lm_eval, LM_EVAL_REQUIRED, "lm_eval")
    arms = students.loc[students["selector"] != "", ["student", "selector", "ratio"]]
    merged = lm_eval.merge(arms, on="student")
    if merged.empty:
        return pd.DataFrame(columns=["selector", "ratio"])
    merged = merged.assign(column="lm_" + merged["task"] + "_" + merged["metric"]
                           + np.where(merged["filter"] == "none", "", "_" + merged["filter"]))
    wide = merged.pivot_table(index=["selector", "ratio"], columns="column", values="value", aggfunc="mean",
                              sort=False)
    return wide.reset_index().rename_axis(columns=None)


def add_evaluation(comparison: pd.DataFrame, evaluation: pd.DataFrame, lm_eval: pd.DataFrame | None = None,
                   *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The comparison table with `taopd evaluate`'s columns joined on (selector, ratio): eval_pass1_*
    (and lm_* when lm-eval ran). Rows keep their order; arms without an evaluation get NaN."""
    students = student_accuracy(evaluation, n_boot=n_boot, seed=seed)
    out = comparison.merge(arm_accuracy(students), on=["selector", "ratio"], how="left")
    if lm_eval is not None and not lm_eval.empty:
        out = out.merge(lm_eval_arm_columns(lm_eval, students), on=["selector", "ratio"], how="left")
    return out
