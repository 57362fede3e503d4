"""Schema-faithful synthetic result tables with planted effects, for tests, the committed fixture and demos.

Nothing here is a measurement. `synthetic_tokens` draws a token table with the columns of the
diagnostic's ``tokens.parquet`` (raw signals, bank-robust-normalised signals, every selector score,
``_k{K}`` repeats for extra K values, gains), where the gain is planted as

    G = scale * (b_L D^L + b_I D^I + b_H (H~ - 1/2) + u_prompt + v_prompt D^L + noise),

with a random intercept u and a random D^L slope v per prompt, so tokens of one prompt are
correlated (the reason the analysis bootstraps prompts). b_L == b_I makes G independent of C given D.
The normalised signals, every registered selector score and the Q3 flag come from the score registry
(``diagnostics.signals.selection_scores`` over the whole table as one batch, as the diagnostic does
over its bank), so a newly registered score appears here too. `synthetic_training` draws
``metrics.parquet`` / ``comparison.parquet`` tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from diagnostics.signals import normalize_batch, selection_scores

_WORDS = (
    "the", " of", " and", " to", " a", " in", " is", " we", " that", " x", " =", " +", " 2", " 3",
    " so", " then", " let", " sum", " answer", " is", ".", ",", "\n", " therefore", " (", ")", " n",
    " equals", " prime", " root", " because", " since", " boxed", "{", "}", " 1", " 0", " -", " *",
)


def _as_batch(x: np.ndarray) -> torch.Tensor:
    """A table column as one [1, n] float32 batch (the diagnostic's bank grid holds float32)."""
    return torch.tensor(x, dtype=torch.float32)[None]


def _registry_columns(h_raw: np.ndarray, d_raw: np.ndarray, c_raw: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """norm_entropy/disagreement/compat, every registered ``score_<name>`` and ``q3``, from the registry."""
    signals = {"student_entropy": _as_batch(h_raw), "disagreement": _as_batch(d_raw), "compat_mass": _as_batch(c_raw)}
    valid = torch.ones(1, h_raw.size, dtype=torch.bool)  # the whole table is one batch
    scores, norm = selection_scores(signals, valid, seed=seed, return_normalized=True)
    out = {"norm_entropy": norm["H"], "norm_disagreement": norm["D"], "norm_compat": norm["C"]}
    out.update({name if name == "q3" else f"score_{name}": score for name, score in scores.items()})
    return {name: v[0].numpy() if v.dtype == torch.bool else v[0].double().numpy() for name, v in out.items()}


def _topk_block(rng: np.random.Generator, d_raw: np.ndarray, c_raw: np.ndarray, h_raw: np.ndarray,
                k: int, seed: int) -> dict[str, np.ndarray]:
    """Raw and normalised K-dependent columns plus scores and the Q3 flag at one K."""
    n = d_raw.size
    overlap = np.clip(np.round(c_raw * k + rng.normal(0, 1, n)), 0, k) / k
    block = {
        "disagreement": d_raw,
        "compat_mass": c_raw,
        "compat_mass_lower": c_raw * rng.uniform(0.75, 1.0, n),
        "overlap": overlap,
        "jaccard": overlap / (2.0 - overlap),
        "bhattacharyya": np.clip(1.0 / (1.0 + d_raw) + rng.normal(0, 0.02, n), 0.0, 1.0),
        "teacher_top1_in_student_topk": (rng.uniform(size=n) < c_raw).astype(np.float64),
        "student_entropy_topk": np.minimum(h_raw, np.log(k)) / np.log(k),
        "sampled_in_student_topk": (rng.uniform(size=n) < 0.9 + 0.01 * np.log2(k)).astype(np.float64),
    }
    block.update(_registry_columns(h_raw, d_raw, c_raw, seed))
    return block


def synthetic_tokens(
    *,
    n_prompts: int = 40,
    seqs_per_prompt: int = 2,
    min_len: int = 24,
    max_len: int = 48,
    k: int = 8,
    extra_k: Sequence[int] = (16, 32),
    b_l: float = 1.0,
    b_i: float = 0.5,
    b_h: float = -0.2,
    prompt_sd: float = 0.3,
    slope_sd: float = 0.3,
    noise_sd: float = 1.0,
    scale: float = 0.05,
    nan_gains: int = 0,
    seed: int = 0,
) -> pd.DataFrame:
    """A token table with the diagnostic's schema and a planted gain model (see the module docstring)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(min_len, max_len + 1, size=n_prompts * seqs_per_prompt)
    seq_id = np.repeat(np.arange(lens.size), lens)
    prompt_id = seq_id // seqs_per_prompt
    pos = np.concatenate([np.arange(L) for L in lens])
    resp_len = lens[seq_id]
    n = seq_id.size

    # Raw signals (nats), with a prompt-level shift so features are correlated within a prompt.
    shift = rng.normal(0, 0.3, n_prompts)[prompt_id]
    h_raw = rng.gamma(2.0, 0.6, n) * np.exp(shift)
    ht_raw = 0.5 * h_raw + rng.gamma(1.5, 0.4, n)
    d_raw = rng.gamma(1.2, 0.5, n) * (0.5 + 0.5 * h_raw / (1.0 + h_raw))
    c_raw = rng.beta(4.0, 1.5, n) / (1.0 + 0.3 * d_raw)
    kl_f = d_raw * 1.3 + rng.gamma(1.0, 0.1, n)
    kl_r = d_raw * 1.1 + rng.gamma(1.0, 0.1, n)

    everywhere = torch.ones(1, n, dtype=torch.bool)
    cols: dict[str, np.ndarray] = {
        "seq_id": seq_id, "prompt_id": prompt_id, "pos": pos, "resp_len": resp_len, "rel_pos": pos / resp_len,
        "token_id": rng.integers(0, len(_WORDS), n),
        "student_entropy": h_raw, "teacher_entropy": ht_raw, "kl_forward": kl_f, "kl_reverse": kl_r,
        "norm_teacher_entropy": normalize_batch(_as_batch(ht_raw), everywhere)[0].double().numpy(),
    }
    cols["token"] = np.asarray(_WORDS, dtype=object)[cols["token_id"]]
    base = _topk_block(rng, d_raw, c_raw, h_raw, k, seed)
    cols.update(base)
    for kk in extra_k:
        grow = (k / kk) ** 0.5  # a larger K covers more teacher mass (C^grow > C) and changes D a little
        d_k = d_raw ** (0.9 + 0.1 * grow) * np.exp(rng.normal(0, 0.1, n))
        c_k = np.clip(c_raw**grow + rng.normal(0, 0.03, n), 0.0, 1.0)
        block = _topk_block(rng, d_k, c_k, h_raw, kk, seed)
        cols.update({f"{name}_k{kk}": v for name, v in block.items()})

    dl, di, hn = base["score_teachability"], base["score_incompatible"], base["norm_entropy"]
    u = rng.normal(0, prompt_sd, n_prompts)[prompt_id]
    v = rng.normal(0, slope_sd, n_prompts)[prompt_id]
    gain = scale * (b_l * dl + b_i * di + b_h * (hn - 0.5) + u + v * dl + rng.normal(0, noise_sd, n))
    if nan_gains:
        gain[rng.choice(n, size=nan_gains, replace=False)] = np.nan
    cols.update({
        "kl_forward_before": kl_f, "kl_forward_after": kl_f - gain, "gain": gain, "gain_rel": gain / kl_f,
        "kl_reverse_before": kl_r,
    })
    rev_change = 0.8 * gain + rng.normal(0, 0.2 * scale, n)
    cols["kl_reverse_after"] = kl_r - rev_change
    cols["kl_reverse_change"] = rev_change
    cols["spillover"] = rng.normal(0, 0.1 * scale, n)
    return pd.DataFrame(cols)


def synthetic_training(
    *,
    selectors: Sequence[str] = ("full", "teachability", "kl", "entropy", "random"),
    ratio: float = 0.05,
    seeds: Sequence[int] = (0, 1),
    steps: int = 40,
    eval_every: int = 10,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(metrics, comparison) tables with the training run schema; accuracy/KL are NaN between evaluations."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, sel in enumerate(selectors):
        r = 1.0 if sel == "full" else ratio
        rate = 0.004 + 0.002 * rng.uniform()
        for s in seeds:
            for step in range(steps + 1):
                ev = step % eval_every == 0
                rows.append(dict(
                    step=step, selector=sel, ratio=r, seed=s,
                    loss=float(0.5 * np.exp(-rate * step) + rng.normal(0, 0.01)),
                    kept_tokens=int(round(r * 4096)),
                    accuracy=float(0.30 + rate * step * 2 + rng.normal(0, 0.01)) if ev else np.nan,
                    kl_to_teacher=float(0.8 * np.exp(-rate * step) + rng.normal(0, 0.01)) if ev else np.nan,
                    wall_time_s=float(step * (0.5 if sel == "full" else 0.3)),
                    peak_mem_mb=float(1500 + 10 * i),
                ))
    metrics = pd.DataFrame(rows)
    comp = []
    for sel, g in metrics.groupby("selector", sort=False):
        ev = g.dropna(subset=["accuracy"])
        first = ev[ev["step"] == ev["step"].min()]["accuracy"]
        last = ev[ev["step"] == ev["step"].max()]["accuracy"]
        live = 0.02 + 0.01 * rng.uniform()
        comp.append(dict(
            selector=sel, ratio=float(g["ratio"].iloc[0]), n_seeds=int(g["seed"].nunique()),
            acc_before_mean=float(first.mean()), acc_before_std=float(first.std(ddof=1)),
            acc_after_mean=float(last.mean()), acc_after_std=float(last.std(ddof=1)),
            supervised_tokens=int(g["kept_tokens"].sum()), time_s=float(g["wall_time_s"].max()),
            peak_mem_mb=float(g["peak_mem_mb"].max()),
            live_gain_mean=live, live_gain_ci_low=live - 0.005, live_gain_ci_high=live + 0.005,
        ))
    return metrics, pd.DataFrame(comp)
