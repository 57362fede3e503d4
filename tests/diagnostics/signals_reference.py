"""Plain float64 references and input generators shared by the tests of diagnostics/signals/.

The references loop in Python over the spec's definitions (section 2); the generators make small
vocabularies with adversarial logits (ties, -inf, one-hot).
"""

from __future__ import annotations

import math

import torch

INF = math.inf


# ----------------------------------------------------------------------------------------------
# Plain float64 reference (loops over the definitions)
# ----------------------------------------------------------------------------------------------


def ref_topk(row: list[float], k: int) -> list[int]:
    """Top-k ids: larger value first, equal values by lower id first."""
    return sorted(range(len(row)), key=lambda v: (-row[v], v))[: min(k, len(row))]


def ref_log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row if x != -INF))
    return [x - lse if x != -INF else -INF for x in row]


def ref_entropy(logp: list[float]) -> float:
    return -sum(math.exp(lp) * lp for lp in logp if lp != -INF)  # 0 log 0 = 0


def ref_kl(lp: list[float], lq: list[float]) -> float:
    """KL(P||Q) = sum_v p (log p - log q): p = 0 terms are 0; p > 0 where q = 0 gives +inf."""
    total = 0.0
    for a, b in zip(lp, lq):
        if a == -INF:
            continue
        if b == -INF:
            return INF
        total += math.exp(a) * (a - b)
    return total


def ref_union(S: list[int], T: list[int], ps: dict, pt: dict) -> tuple[float, float]:
    """D = KL(T'||S') and Bhattacharyya on U = S cup T, from probabilities ps, pt on U."""
    U = S + [v for v in T if v not in S]
    zs, zt = sum(ps[v] for v in U), sum(pt[v] for v in U)
    d, bc = 0.0, 0.0
    for v in U:
        a, b = pt[v] / zt, ps[v] / zs
        bc += math.sqrt(a * b)
        if a == 0:
            continue
        d = INF if b == 0 else d + a * math.log(a / b)
    return d, bc


def ref_entropy_topk(S: list[int], logp_of: dict) -> float:
    z = sum(math.exp(logp_of[v]) for v in S)
    q = [math.exp(logp_of[v]) / z for v in S]
    h = -sum(x * math.log(x) for x in q if x > 0)
    return h / math.log(len(S)) if len(S) > 1 else 0.0


def ref_disagreement_topk_proxy(S: list[int], T: list[int], s_list: dict, t_list: dict, eps=1e-12) -> float:
    """The release's top-K D (TA-OPD/slime_ta_opd/slime/rollout/tip_compat.py L337-354, ``_union_geometry``):
    s_list / t_list hold each side's probabilities on its OWN top-K list only (anything else is 0);
    both are divided by their sum over U, THEN floored at eps, and summed over every v in U."""
    U = S + [v for v in T if v not in S]
    zs, zt = sum(s_list.get(v, 0.0) for v in U), sum(t_list.get(v, 0.0) for v in U)
    total = 0.0
    for v in U:
        a = max(t_list.get(v, 0.0) / zt, eps)
        b = max(s_list.get(v, 0.0) / zs, eps)
        total += a * (math.log(a) - math.log(b))
    return total


def ref_set_signals(S, T, ps, pt, pt_known, h_topk, d_proxy) -> dict[str, float]:
    """Set signals; ps, pt: probabilities on U used for D (floored in top-K mode); pt_known: the
    teacher probabilities known on S (all of S in exact mode, S cap T in top-K mode); d_proxy: the
    release's top-K D (``ref_disagreement_topk_proxy``)."""
    k = len(S)
    inter = [v for v in T if v in S]
    d, bc = ref_union(S, T, ps, pt)
    return {
        "disagreement": d,
        "compat_mass": sum(pt_known.get(v, 0.0) for v in S),
        "compat_mass_lower": sum(pt_known[v] for v in inter),
        "overlap": len(inter) / k,
        "jaccard": len(inter) / (2 * k - len(inter)),
        "bhattacharyya": bc,
        "teacher_top1_in_student_topk": float(T[0] in S),
        "student_entropy_topk": h_topk,
        "disagreement_topk_proxy": d_proxy,
    }


def ref_exact(s: torch.Tensor, t: torch.Tensor, k: int, sampled=None) -> dict[str, list[float]]:
    """Reference for token_signals, row by row in float64."""
    out: dict[str, list[float]] = {}
    for i, (srow, trow) in enumerate(zip(s.double().tolist(), t.double().tolist())):
        ls, lt = ref_log_softmax(srow), ref_log_softmax(trow)
        S, T = ref_topk(srow, k), ref_topk(trow, k)
        U = S + [v for v in T if v not in S]
        ps = {v: math.exp(ls[v]) for v in U}
        pt = {v: math.exp(lt[v]) for v in U}
        row = {
            "student_entropy": ref_entropy(ls),
            "teacher_entropy": ref_entropy(lt),
            "kl_forward": ref_kl(lt, ls),
            "kl_reverse": ref_kl(ls, lt),
        }
        h_topk = ref_entropy_topk(S, dict(enumerate(ls)))
        d_proxy = ref_disagreement_topk_proxy(S, T, {v: math.exp(ls[v]) for v in S}, {v: math.exp(lt[v]) for v in T})
        row.update(ref_set_signals(S, T, ps, pt, {v: pt[v] for v in S}, h_topk, d_proxy))
        if sampled is not None:
            y = int(sampled[i])
            row.update({"sampled_in_student_topk": float(y in S),
                        "student_logprob_sampled": ls[y], "teacher_logprob_sampled": lt[y]})
        for key, val in row.items():
            out.setdefault(key, []).append(val)
    return out


def ref_topk_mode(s_ids, s_lp, t_ids, t_lp, floor=1e-12) -> dict[str, list[float]]:
    """Reference for token_signals_topk: unknown probability 0, every p on U floored at 1e-12."""
    out: dict[str, list[float]] = {}
    for si, sl, ti, tl in zip(s_ids.tolist(), s_lp.double().tolist(), t_ids.tolist(), t_lp.double().tolist()):
        s_of, t_of = dict(zip(si, sl)), dict(zip(ti, tl))
        S = sorted(si, key=lambda v: (-s_of[v], v))
        T = sorted(ti, key=lambda v: (-t_of[v], v))
        U = S + [v for v in T if v not in S]
        ps = {v: max(math.exp(s_of[v]) if v in s_of else 0.0, floor) for v in U}
        pt = {v: max(math.exp(t_of[v]) if v in t_of else 0.0, floor) for v in U}
        known = {v: math.exp(t_of[v]) for v in S if v in t_of}
        d_proxy = ref_disagreement_topk_proxy(S, T, {v: math.exp(x) for v, x in s_of.items()},
                                              {v: math.exp(x) for v, x in t_of.items()})
        row = ref_set_signals(S, T, ps, pt, known, ref_entropy_topk(S, s_of), d_proxy)
        for key, val in row.items():
            out.setdefault(key, []).append(val)
    return out


def assert_matches(got: dict, ref: dict, keys=None, atol=1e-5, rtol=1e-5) -> None:
    for key in keys or ref:
        want = torch.tensor(ref[key], dtype=torch.float64)
        have = got[key]
        assert have.dtype == torch.float32 and have.shape == want.shape, key
        assert not torch.isnan(have).any(), key
        torch.testing.assert_close(have.double(), want, atol=atol, rtol=rtol, msg=lambda m: f"{key}: {m}")


# ----------------------------------------------------------------------------------------------
# Logit generators (small V; adversarial cases)
# ----------------------------------------------------------------------------------------------


def random_logits(n, v, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


def tied_logits(n, v, seed):
    """Small integer logits: many ties, also at the top-K boundary."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, 4, (n, v), generator=g).float() for _ in range(2))


def masked_logits(n, v, seed):
    """-inf entries on both sides (never a whole row), some where the other side has mass."""
    s, t = random_logits(n, v, seed)
    g = torch.Generator().manual_seed(seed + 1)
    s[torch.rand(n, v, generator=g) < 0.3] = -INF
    t[torch.rand(n, v, generator=g) < 0.3] = -INF
    s[:, 0], t[:, 0] = 5.0, 5.0  # every row keeps a finite logit
    s[0, :] = -INF  # row 0: only tokens 0 and 1 are allowed for both (fewer than K finite)
    t[0, :] = -INF
    s[0, :2], t[0, :2] = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])
    t[1] = s[1].clone()  # row 1: identical masks, finite KLs
    t[2] = s[2].nan_to_num(neginf=0.0) * 0.5  # row 2: only the student masks: KL(S||T) finite
    return s, t


def one_hot_logits(n, v, seed):
    """Very peaked distributions: one logit at 60, the rest near 0."""
    s, t = random_logits(n, v, seed, scale=0.1)
    s[torch.arange(n), torch.arange(n) % v] = 60.0
    t[torch.arange(n), (torch.arange(n) * 7) % v] = 60.0
    return s, t


CASES = {
    "random": random_logits,
    "ties": tied_logits,
    "masked": masked_logits,
    "one_hot": one_hot_logits,
}


def topk_inputs(s, t, k):
    """Top-K ids (shuffled order) and full-vocabulary log-probs, as vLLM would return them."""
    ls, lt = s.log_softmax(1), t.log_softmax(1)
    si, ti = s.topk(k, 1).indices.flip(1), t.topk(k, 1).indices
    return si, ls.gather(1, si), ti, lt.gather(1, ti)


def batch_signals(b=4, t=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    sig = {
        "student_entropy": torch.rand(b, t, generator=g) * 3,
        "disagreement": torch.rand(b, t, generator=g),
        "compat_mass": torch.rand(b, t, generator=g),
    }
    valid = torch.rand(b, t, generator=g) < 0.8
    raw = torch.Generator().manual_seed(seed + 1)  # the raw signals of the published rules (scores.RAW_SIGNALS)
    sig.update({"teacher_entropy": torch.rand(b, t, generator=raw) * 3, "overlap": torch.rand(b, t, generator=raw),
                "student_logprob_sampled": -torch.rand(b, t, generator=raw) * 3,
                "teacher_logprob_sampled": -torch.rand(b, t, generator=raw) * 3})
    valid[:, 0] = True
    return sig, valid


# ----------------------------------------------------------------------------------------------
# The released training code's selection, as plain loops (TA-OPD/slime_ta_opd/slime/rollout/tip_compat.py)
# ----------------------------------------------------------------------------------------------


def ref_release_normalize(values: list[float], q_low=0.05, q_high=0.95) -> list[float]:
    """``_normalize`` (tip_compat.py L404-419): quantiles over the finite values, the release's
    interpolation xs[lo] (1 - frac) + xs[hi] frac (L422-432), no eps, 0 below a 1e-12 spread."""

    def quantile(xs, q):
        xs = sorted(xs)
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] if lo == hi else xs[lo] * (1.0 - (pos - lo)) + xs[hi] * (pos - lo)

    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [0.0] * len(values)
    lo, hi = quantile(finite, q_low), quantile(finite, q_high)
    if abs(hi - lo) < 1e-12:
        return [0.0] * len(values)
    return [min(1.0, max(0.0, (v - lo) / (hi - lo))) if math.isfinite(v) else 0.0 for v in values]


def ref_release_median(values: list[float]) -> float:
    xs = sorted(values)
    pos = 0.5 * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] if lo == hi else xs[lo] * 0.5 + xs[hi] * 0.5


def ref_release_selection(h, d, c, rows, valid, method: str, ratio: float, min_keep: int = 1,
                          fill_past_q3: bool = False) -> list[list[bool]]:
    """The release's kept mask, row by row (tip_compat.py L364-400 scores, L439-503 selection, L517-538).

    h, d, c: [B][T] raw signals (the selection's H, D, C); rows: [B][T] bool, the response rows
    (normalisation and medians run over these); valid: [B][T] bool, the selectable rows (loss mask 1).
    method: "q3_only_ranked" (release "q3"), "q3_low_compat" ("q3_lowc"), "q3_low_teachability"
    ("q3_dlearn_low"), "teachability_entropy_ndc" ("ca_softor"), "teachability" ("teachability").
    Arithmetic: normalised values rounded to float32 and scores in float32 (numpy scalars), as the
    implementation; the release itself computes in float64, where a near-tie can round the other way.
    fill_past_q3: rank Q3 first, then the other valid rows by the same score (the release's offline
    top-N, tools/matched_fixed_context_topn.py ``prepare``: is_q3 * 2 + score).
    """
    import numpy as np

    f32 = np.float32
    flat = [(b, t) for b in range(len(rows)) for t in range(len(rows[b])) if rows[b][t]]  # sample, then tok_pos
    raw = {"H": [h[b][t] for b, t in flat], "D": [d[b][t] for b, t in flat], "C": [c[b][t] for b, t in flat]}
    raw["DC"] = [float(f32(x) * f32(y)) for x, y in zip(raw["D"], raw["C"])]
    norm = {key: [float(f32(v)) for v in ref_release_normalize(vals)] for key, vals in raw.items()}
    h_mid, d_mid = ref_release_median(norm["H"]), ref_release_median(norm["D"])
    one = f32(1.0)
    score_of = {
        "q3_only_ranked": lambda i: (one - f32(norm["H"][i])) * f32(norm["DC"][i]),
        "q3_low_compat": lambda i: f32(norm["C"][i]),  # the release ranks C~ ascending
        "q3_low_teachability": lambda i: f32(norm["D"][i]) * f32(norm["C"][i]),
        "teachability": lambda i: f32(norm["D"][i]) * f32(norm["C"][i]),
        "teachability_entropy_ndc": lambda i: f32(norm["H"][i]) + f32(norm["DC"][i])
        - f32(norm["H"][i]) * f32(norm["DC"][i]),
    }
    ascending = method in ("q3_low_compat", "q3_low_teachability")
    q3 = [norm["H"][i] < h_mid and norm["D"][i] >= d_mid for i in range(len(flat))]
    selectable = [i for i, (b, t) in enumerate(flat) if valid[b][t]]
    budget = max(1, math.ceil(len(selectable) * ratio - 1e-9))  # the project's exact ceil (see the test)
    candidates = [i for i in selectable if q3[i]] if method.startswith("q3_") else selectable

    def top(cands, key, n, reverse=True, exclude=()):
        xs = [i for i in cands if i not in exclude]
        xs.sort(key=lambda i: (float(key(i)), -flat[i][1]), reverse=reverse)  # stable: sample order on ties
        return xs[:n]

    selected = set(top(candidates, score_of[method], min(budget, len(candidates)), reverse=not ascending))
    if fill_past_q3 and len(candidates) < budget:
        rest = [i for i in selectable if not q3[i]]
        selected |= set(top(rest, score_of[method], budget - len(selected), reverse=not ascending))
    for b in range(len(rows)):  # _ensure_min_keep_per_sample: the TA-OPD + entropy (ca_softor) score
        mine = [i for i in selectable if flat[i][0] == b]
        kept = [i for i in mine if i in selected]
        if mine and len(kept) < min_keep:
            selected |= set(top(mine, score_of["teachability_entropy_ndc"], min_keep - len(kept), exclude=selected))
    out = [[False] * len(r) for r in rows]
    for i in selected:
        out[flat[i][0]][flat[i][1]] = True
    return out
