"""`taopd evaluate`'s statistics against plain reference computations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from analysis.pass_at_1 import add_evaluation, arm_accuracy, bootstrap_mean_ci, student_accuracy


def synthetic_evaluation(seed: int = 0) -> pd.DataFrame:
    """Base + 2 arms x 2 training seeds; 2 eval seeds x 3 samples x 10 problems each; known accuracies."""
    rng = np.random.default_rng(seed)
    students = [("base", "", math.nan, -1, 0.3), ("full-r1-s0", "full", 1.0, 0, 0.6),
                ("full-r1-s1", "full", 1.0, 1, 0.5), ("tip-r0.05-s0", "tip", 0.05, 0, 0.4),
                ("tip-r0.05-s1", "tip", 0.05, 1, 0.2)]
    rows = []
    for name, selector, ratio, train_seed, p in students:
        for eval_seed in (0, 1):
            for sample in range(3):
                for problem in range(10):
                    rows.append({"student": name, "selector": selector, "ratio": ratio, "train_seed": train_seed,
                                 "eval_seed": eval_seed, "sample": sample, "problem_id": problem, "response": "",
                                 "correct": bool(rng.random() < p)})
    return pd.DataFrame(rows)


def test_bootstrap_matches_a_plain_loop():
    values = np.array([0.0, 1.0, 0.5, 1.0, 0.25, 0.0, 1.0])
    rng = np.random.default_rng(3)
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(200)]
    # same generator draws, one resample at a time (rows of the integer matrix)
    assert bootstrap_mean_ci(values, n_boot=200, seed=3) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))


def test_student_accuracy_against_plain_means():
    evaluation = synthetic_evaluation()
    table = student_accuracy(evaluation, n_boot=200).set_index("student")
    for name, g in evaluation.groupby("student"):
        row = table.loc[name]
        assert row["pass1"] == pytest.approx(sum(g["correct"]) / len(g))
        per_seed = [g[g["eval_seed"] == s]["correct"].mean() for s in (0, 1)]
        assert row["pass1_seed_std"] == pytest.approx(np.std(per_seed, ddof=1))
        assert (row["n_problems"], row["n_samples"], row["n_seeds"]) == (10, 3, 2)
        per_problem = [g[g["problem_id"] == i]["correct"].mean() for i in range(10)]
        assert (row["pass1_ci_low"], row["pass1_ci_high"]) == bootstrap_mean_ci(np.array(per_problem), n_boot=200)
        assert row["pass1_ci_low"] <= row["pass1"] <= row["pass1_ci_high"]


def test_arm_accuracy_t_interval_over_training_seeds():
    students = student_accuracy(synthetic_evaluation(), n_boot=100)
    arms = arm_accuracy(students).set_index("selector")
    assert list(arms.index) == ["full", "tip"]  # base is not an arm
    values = students[students["selector"] == "full"]["pass1"].to_numpy()
    half = scipy.stats.t.ppf(0.975, 1) * values.std(ddof=1) / math.sqrt(2)
    assert arms.loc["full", "eval_pass1_mean"] == pytest.approx(values.mean())
    assert (arms.loc["full", "eval_pass1_ci_low"], arms.loc["full", "eval_pass1_ci_high"]) == pytest.approx(
        (values.mean() - half, values.mean() + half))
    one_seed = arm_accuracy(students[students["train_seed"] != 1]).set_index("selector")
    student = students.set_index("student").loc["tip-r0.05-s0"]
    assert one_seed.loc["tip", "eval_pass1_ci_low"] == student["pass1_ci_low"]  # bootstrap fallback


def test_add_evaluation_joins_on_selector_and_ratio():
    comparison = pd.DataFrame({"selector": ["full", "tip", "kl"], "ratio": [1.0, 0.05, 0.05], "acc_after_mean": 0.0})
    lm_eval = pd.DataFrame({"student": ["full-r1-s0", "full-r1-s1", "base"], "task": "t", "metric": "acc",
                            "filter": "none", "value": [0.2, 0.4, 0.9]})
    out = add_evaluation(comparison, synthetic_evaluation(), lm_eval, n_boot=50)
    assert out["selector"].tolist() == ["full", "tip", "kl"]  # order kept, kl has no evaluation
    assert math.isnan(out.loc[2, "eval_pass1_mean"]) and not math.isnan(out.loc[1, "eval_pass1_mean"])
    assert out.loc[0, "lm_t_acc"] == pytest.approx(0.3) and math.isnan(out.loc[1, "lm_t_acc"])
