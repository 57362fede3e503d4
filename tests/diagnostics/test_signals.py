"""Tests for diagnostics/signals.py.

Every fast path is held against a plain float64 reference written below with Python loops over
the spec's definitions (section 2), on small vocabularies and adversarial logits (ties, -inf,
one-hot, K = 1, K >= V, low-precision dtypes); then math properties, selection, the registry and
the bad-input errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from diagnostics import signals as sg
from diagnostics.signals import (
    FULL_VOCAB_KEYS,
    SAMPLED_KEYS,
    TOPK_KEYS,
    get_score,
    list_scores,
    normalize_batch,
    register_score,
    select,
    selection_scores,
    token_signals,
    token_signals_topk,
)

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


def ref_set_signals(S, T, ps, pt, pt_known, h_topk) -> dict[str, float]:
    """Set signals; ps, pt: probabilities on U used for D (floored in top-K mode); pt_known: the
    teacher probabilities known on S (all of S in exact mode, S cap T in top-K mode)."""
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
        row.update(ref_set_signals(S, T, ps, pt, {v: pt[v] for v in S}, h_topk))
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
        row = ref_set_signals(S, T, ps, pt, known, ref_entropy_topk(S, s_of))
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


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [1, 3, 8, 37, 50])
def test_exact_matches_reference(case, k):
    n, v = 6, 37
    s, t = CASES[case](n, v, seed=k)
    y = torch.arange(n) * 5 % v
    got = token_signals(s, t, k, chunk_size=4, sampled_ids=y)
    assert got.mode == "exact" and got.k == k
    assert set(got) == set(FULL_VOCAB_KEYS + TOPK_KEYS + SAMPLED_KEYS)
    assert_matches(got, ref_exact(s, t, k, y))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", ["random", "ties", "masked"])
def test_exact_low_precision_inputs(dtype, case):
    """bf16/fp16/fp64 inputs: computed in float32, equal to the reference on the cast values."""
    s, t = CASES[case](5, 29, seed=3)
    s, t = s.to(dtype), t.to(dtype)
    assert_matches(token_signals(s, t, 4, chunk_size=2), ref_exact(s, t, 4))


@pytest.mark.parametrize("vocab", [203, 256])  # with and without a tail outside the columns
@pytest.mark.parametrize("case", ["random", "ties", "masked"])
def test_exact_column_candidate_path(monkeypatch, vocab, case):
    """The strided-column top-K search (used for large V) on a small V with tiny columns."""
    monkeypatch.setattr(sg, "_GROUP", 4)
    monkeypatch.setattr(sg, "_MIN_COLUMNS", 4)
    s, t = CASES[case](6, vocab, seed=vocab)
    if case == "ties":  # make the top-K boundary tie across many columns
        s = (s > 2).float() * 3.0 + (s == 1).float()
    got = token_signals(s, t, 5, chunk_size=4)
    assert_matches(got, ref_exact(s, t, 5))


def test_exact_real_vocabulary_matches_vectorised_reference():
    """V = 151,936 with the default columns and bf16-quantised logits (boundary ties)."""
    g = torch.Generator().manual_seed(0)
    n, v, k = 4, 151_936, 16
    s = (torch.randn(n, v, generator=g) * 3).bfloat16()
    t = (s.float() + torch.randn(n, v, generator=g)).bfloat16()
    s[0, 1000:1040] = s[0].max() + 1  # 40 tokens tie at the top
    got = token_signals(s, t, k)
    sd, td = s.double(), t.double()
    ls, lt = sd.log_softmax(1), td.log_softmax(1)
    S = sd.sort(dim=1, descending=True, stable=True).indices[:, :k]  # stable: lower id first in ties
    T = td.sort(dim=1, descending=True, stable=True).indices[:, :k]
    want = {
        "student_entropy": -(ls.exp() * ls).sum(1),
        "kl_forward": (lt.exp() * (lt - ls)).sum(1),
        "kl_reverse": (ls.exp() * (ls - lt)).sum(1),
        "compat_mass": lt.exp().gather(1, S).sum(1),
        "overlap": (T[:, :, None] == S[:, None, :]).any(2).double().mean(1),
    }
    assert torch.equal(S[0], torch.arange(1000, 1016))
    for key, val in want.items():
        torch.testing.assert_close(got[key].double(), val, atol=1e-4, rtol=1e-5, msg=key)


def test_chunking_does_not_change_results():
    s, t = masked_logits(9, 41, seed=5)
    a = token_signals(s, t, 6, chunk_size=1)
    b = token_signals(s, t, 6, chunk_size=1000)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6)


def test_signal_dict_survives_autograd_inputs_and_pickling():
    import pickle

    s, t = random_logits(3, 11, seed=0)
    out = token_signals(s.requires_grad_(), t, 2)
    assert not any(v.requires_grad for v in out.values())
    back = pickle.loads(pickle.dumps(out))
    assert (back.mode, back.k, list(back)) == ("exact", 2, list(out))


def test_empty_batch():
    out = token_signals(torch.empty(0, 10), torch.empty(0, 10), 3)
    assert all(v.shape == (0,) for v in out.values())


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["random", "ties", "masked", "one_hot"])
def test_identical_inputs(case):
    s, _ = CASES[case](6, 37, seed=11)
    out = token_signals(s, s.clone(), 5)
    for key in ("disagreement", "kl_forward", "kl_reverse"):
        torch.testing.assert_close(out[key], torch.zeros(6), atol=1e-6, rtol=0)
    for key in ("overlap", "jaccard", "teacher_top1_in_student_topk", "bhattacharyya"):
        torch.testing.assert_close(out[key], torch.ones(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["compat_mass"], out["compat_mass_lower"])
    torch.testing.assert_close(out["student_entropy"], out["teacher_entropy"])
    full = token_signals(s, s.clone(), 37)  # S = T = whole vocabulary: C = 1
    torch.testing.assert_close(full["compat_mass"], torch.ones(6), atol=1e-6, rtol=0)


def test_k_at_least_vocab_is_whole_vocabulary():
    s, t = random_logits(4, 7, seed=2)
    out = token_signals(s, t, 100)
    torch.testing.assert_close(out["overlap"], torch.ones(4))  # |S cap T| / K_eff with K_eff = V
    torch.testing.assert_close(out["disagreement"], out["kl_forward"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["student_entropy_topk"] * math.log(7), out["student_entropy"])


def test_masked_tokens_give_one_sided_infinite_kl():
    s = torch.tensor([[0.0, -INF, 1.0, 0.5], [0.0, 2.0, 1.0, 0.5], [0.0, -INF, 1.0, -INF]])
    t = torch.tensor([[0.0, 2.0, 0.3, 0.5], [0.0, 2.0, -INF, 0.5], [0.0, -INF, 1.0, -INF]])
    out = token_signals(s, t, 3)
    # row 0: the student masks a teacher token; row 1: the reverse; row 2: shared masks only.
    assert out["kl_forward"].tolist()[:2] == [INF, out["kl_forward"][1].item()] and out["kl_forward"][1] < INF
    assert out["kl_reverse"][0] < INF and out["kl_reverse"][1] == INF
    assert torch.isfinite(out["kl_forward"][2]) and torch.isfinite(out["kl_reverse"][2])
    assert out["disagreement"][0] == INF  # token 1 is in T but masked for the student
    assert_matches(out, ref_exact(s, t, 3))


# ----------------------------------------------------------------------------------------------
# Top-K mode
# ----------------------------------------------------------------------------------------------


def topk_inputs(s, t, k):
    """Top-K ids (shuffled order) and full-vocabulary log-probs, as vLLM would return them."""
    ls, lt = s.log_softmax(1), t.log_softmax(1)
    si, ti = s.topk(k, 1).indices.flip(1), t.topk(k, 1).indices
    return si, ls.gather(1, si), ti, lt.gather(1, ti)


@pytest.mark.parametrize("case", ["random", "ties", "one_hot"])
@pytest.mark.parametrize("k", [1, 4, 16])
def test_topk_mode_matches_reference(case, k):
    s, t = CASES[case](6, 37, seed=k + 100)
    si, sl, ti, tl = topk_inputs(s, t, k)
    got = token_signals_topk(si, sl, ti, tl)
    assert got.mode == "topk" and got.k == k
    assert set(got) == set(TOPK_KEYS)  # no full-vocabulary keys
    assert_matches(got, ref_topk_mode(si, sl, ti, tl))
    torch.testing.assert_close(got["compat_mass"], got["compat_mass_lower"])


def test_topk_mode_agrees_with_exact_on_set_signals():
    s, t = random_logits(8, 50, seed=4)
    exact = token_signals(s, t, 6)
    topk = token_signals_topk(*topk_inputs(s, t, 6))
    same = ("overlap", "jaccard", "teacher_top1_in_student_topk", "student_entropy_topk", "compat_mass_lower")
    for key in same:
        torch.testing.assert_close(topk[key], exact[key], atol=1e-6, rtol=1e-6)
    assert (topk["disagreement"] >= 0).all()


def test_topk_mode_masked_logprobs_and_sampled():
    si = torch.tensor([[3, 1, 2]])
    sl = torch.tensor([[-0.1, -INF, -3.0]])
    ti = torch.tensor([[1, 3, 7]])
    tl = torch.tensor([[-0.5, -1.0, -INF]])
    got = token_signals_topk(si, sl, ti, tl, sampled_ids=torch.tensor([2]),
                             sampled_student_logprob=torch.tensor([-3.0]),
                             sampled_teacher_logprob=torch.tensor([-9.0]))
    assert_matches(got, ref_topk_mode(si, sl, ti, tl), keys=TOPK_KEYS)
    assert got["sampled_in_student_topk"].item() == 1.0
    assert got["student_logprob_sampled"].item() == -3.0 and got["teacher_logprob_sampled"].item() == -9.0


def test_topk_mode_teacher_top1_tie_breaks_by_lower_id():
    si, sl = torch.tensor([[4, 5]]), torch.tensor([[-0.5, -1.0]])
    ti, tl = torch.tensor([[9, 4]]), torch.tensor([[-0.7, -0.7]])  # tie: top-1 is id 4
    assert token_signals_topk(si, sl, ti, tl)["teacher_top1_in_student_topk"].item() == 1.0


# ----------------------------------------------------------------------------------------------
# Normalisation, scores, registry
# ----------------------------------------------------------------------------------------------


def test_normalize_batch_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 30, generator=g)
    valid = torch.rand(4, 30, generator=g) < 0.7
    lo, hi = torch.quantile(x[valid], torch.tensor([0.05, 0.95]))
    want = ((x - lo) / (hi - lo + 1e-6)).clamp(0, 1) * valid
    torch.testing.assert_close(normalize_batch(x, valid), want)
    flat = torch.full((2, 5), 3.0)
    assert torch.equal(normalize_batch(flat, torch.ones(2, 5, dtype=torch.bool)), torch.zeros(2, 5))


def batch_signals(b=4, t=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    sig = {
        "student_entropy": torch.rand(b, t, generator=g) * 3,
        "disagreement": torch.rand(b, t, generator=g),
        "compat_mass": torch.rand(b, t, generator=g),
    }
    valid = torch.rand(b, t, generator=g) < 0.8
    valid[:, 0] = True
    return sig, valid


def test_selection_scores_formulas_and_q3():
    sig, valid = batch_signals()
    out = selection_scores(sig, valid, seed=1)
    assert set(out) == set(list_scores()) | {"q3"}
    h, d, c = (normalize_batch(sig[key], valid) for key in ("student_entropy", "disagreement", "compat_mass"))
    s = d * c
    want = {"teachability": s, "incompatible": d * (1 - c), "entropy": h, "kl": d, "tip": h + d - h * d,
            "compat": c, "teachability_entropy": h + s - h * s, "full": valid.float()}
    for name, val in want.items():
        torch.testing.assert_close(out[name], val * valid, msg=name)
    q3 = valid & (h < torch.quantile(h[valid], 0.5)) & (d >= torch.quantile(d[valid], 0.5))
    assert torch.equal(out["q3"], q3) and q3.any()
    for name, inner in (("q3_compat", c), ("q3_teachability", s), ("q3_incompatible", d * (1 - c))):
        torch.testing.assert_close(out[name][q3], inner[q3])
        assert (out[name][~q3] == -INF).all()
    assert (out["q3_only"][~q3] == -INF).all() and (out["q3_only"][q3] >= 0).all()
    mask = select(out["q3_compat"], valid, 1.0)
    assert torch.equal(mask, q3)  # a q3 selector never keeps a position outside Q3


def test_selection_scores_random_is_seeded_and_topk_entropy_fallback():
    sig, valid = batch_signals()
    a, b = selection_scores(sig, valid, seed=3), selection_scores(sig, valid, seed=3)
    assert torch.equal(a["random"], b["random"])
    assert not torch.equal(a["random"], selection_scores(sig, valid, seed=4)["random"])
    topk_sig = {"student_entropy_topk": sig["student_entropy"]}
    topk_sig.update({key: sig[key] for key in ("disagreement", "compat_mass")})
    torch.testing.assert_close(selection_scores(topk_sig, valid)["tip"], a["tip"])


def test_registry():
    names = list_scores()
    for name in ("full", "random", "entropy", "kl", "compat", "teachability", "incompatible", "tip",
                 "teachability_entropy", "q3_compat", "q3_teachability", "q3_incompatible", "q3_only"):
        assert name in names
    spec = get_score("teachability")
    assert spec.needs == ("D", "C") and not spec.restrict_to_q3 and spec.description
    assert get_score("q3_only").restrict_to_q3
    with pytest.raises(KeyError, match="registered scores: .*teachability"):
        get_score("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_score("kl", description="dup")(lambda norm, valid, g: norm["D"])
    with pytest.raises(ValueError, match="unknown signals"):
        register_score("uses_x", description="bad need", needs=("X",))
    with pytest.raises(ValueError, match="reserved"):
        register_score("q3", description="clashes with the Q3 mask key")


def test_new_score_is_seen_by_selection_scores(monkeypatch):
    monkeypatch.setattr(sg, "_SCORES", dict(sg._SCORES))  # leave the real registry untouched

    @register_score("d_squared", description="D~^2", needs=("D",))
    def _d2(norm, valid, generator):
        return norm["D"] ** 2

    sig, valid = batch_signals()
    out = selection_scores(sig, valid)
    torch.testing.assert_close(out["d_squared"], out["kl"] ** 2)


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


def test_select_exact_count_and_ceil_robustness():
    g = torch.Generator().manual_seed(0)
    score = torch.rand(4, 25, generator=g)
    valid = torch.ones(4, 25, dtype=torch.bool)
    mask = select(score, valid, 0.07, min_per_sequence=0)
    assert mask.sum() == 7  # ceil(0.07 * 100) = 7, not 8
    assert torch.equal(score[mask].sort().values, score.flatten().topk(7).values.sort().values)
    valid[1, :10] = False
    mask = select(score, valid, 0.25, min_per_sequence=0)
    assert mask.sum() == math.ceil(0.25 * 90) and not (mask & ~valid).any()


def test_select_ties_go_to_earlier_positions():
    score, valid = torch.zeros(3, 4), torch.ones(3, 4, dtype=torch.bool)
    mask = select(score, valid, 5 / 12, min_per_sequence=0)
    assert mask.flatten().tolist() == [True] * 5 + [False] * 7


def test_select_min_per_sequence():
    score = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 3.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[2] = False  # a sequence without valid positions gets nothing
    mask = select(score, valid, 0.25)  # budget ceil(0.25 * 8) = 2: both from row 0
    assert mask.tolist() == [[True, True, False, False], [False, True, False, False], [False] * 4]
    assert select(score, valid, 0.25, min_per_sequence=0).sum() == 2


def test_select_ratio_one_keeps_all_valid():
    g = torch.Generator().manual_seed(1)
    score, valid = torch.rand(3, 9, generator=g), torch.rand(3, 9, generator=g) < 0.5
    valid[0, 0] = True
    assert torch.equal(select(score, valid, 1.0), valid)


def test_select_seeded_tie_break_is_reproducible():
    score, valid = torch.zeros(4, 50), torch.ones(4, 50, dtype=torch.bool)
    score[0, 3] = 1.0  # a strict winner is always kept
    a = select(score, valid, 0.1, min_per_sequence=0, seed=7)
    assert torch.equal(a, select(score, valid, 0.1, min_per_sequence=0, seed=7))
    assert not torch.equal(a, select(score, valid, 0.1, min_per_sequence=0, seed=8))
    assert a[0, 3] and a.sum() == 20
    assert not torch.equal(a, select(score, valid, 0.1, min_per_sequence=0))  # not position order


# ----------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument and the first offending position
# ----------------------------------------------------------------------------------------------


def test_bad_logits():
    s, t = random_logits(6, 20, seed=0)
    with pytest.raises(ValueError, match="student_logits .* teacher_logits .* same"):
        token_signals(s, t[:, :19])
    bad = t.clone()
    bad[3, 17] = float("nan")
    with pytest.raises(ValueError, match=r"teacher_logits has NaN at row 3, column 17"):
        token_signals(s, bad, 4, chunk_size=2)
    bad = s.clone()
    bad[4, 2] = INF
    with pytest.raises(ValueError, match=r"student_logits has \+inf at row 4, column 2"):
        token_signals(bad, t, 4, chunk_size=4)
    bad = s.clone()
    bad[5] = -INF
    with pytest.raises(ValueError, match="student_logits row 5 is all -inf"):
        token_signals(bad, t, 4)
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be"):
            token_signals(s, t, k)
    with pytest.raises(ValueError, match="sampled_ids"):
        token_signals(s, t, 4, sampled_ids=torch.full((6,), 20))
    with pytest.raises(ValueError, match="chunk_size"):
        token_signals(s, t, 4, chunk_size=0)


def test_bad_logits_in_column_path(monkeypatch):
    monkeypatch.setattr(sg, "_GROUP", 4)
    monkeypatch.setattr(sg, "_MIN_COLUMNS", 4)
    s, t = random_logits(5, 64, seed=0)
    s[2, 33] = float("nan")
    with pytest.raises(ValueError, match="student_logits has NaN at row 2, column 33"):
        token_signals(s, t, 3)


def test_bad_topk_inputs():
    si, sl, ti, tl = topk_inputs(*random_logits(4, 20, seed=0), 3)
    bad = tl.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="teacher_topk_logprobs has NaN at row 2, column 1"):
        token_signals_topk(si, sl, ti, bad)
    with pytest.raises(ValueError, match="teacher_topk_ids must have shape"):
        token_signals_topk(si, sl, ti[:, :2], tl)
    dup = si.clone()
    dup[1, 2] = dup[1, 0]
    with pytest.raises(ValueError, match="student_topk_ids row 1 repeats"):
        token_signals_topk(dup, sl, ti, tl)
    with pytest.raises(ValueError, match="student_topk_logprobs row 0 is all -inf"):
        token_signals_topk(si, torch.full_like(sl, -INF), ti, tl)


def test_bad_selection_inputs():
    sig, valid = batch_signals()
    score = sig["disagreement"]
    for ratio in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            select(score, valid, ratio)
    with pytest.raises(ValueError, match="valid has no True"):
        select(score, torch.zeros_like(valid), 0.5)
    with pytest.raises(ValueError, match="valid shape"):
        select(score, valid[:, :-1], 0.5)
    with pytest.raises(ValueError, match="valid shape"):
        normalize_batch(score, valid[:-1])
    with pytest.raises(ValueError, match="valid has no True"):
        normalize_batch(score, torch.zeros_like(valid))
    nan = score.clone()
    nan[1, 2] = float("nan")
    valid[1, 2] = True
    with pytest.raises(ValueError, match=r"x has non-finite value nan at valid position \[1, 2\]"):
        normalize_batch(nan, valid)
    with pytest.raises(ValueError, match=r"score has NaN at valid position \[1, 2\]"):
        select(nan, valid, 0.5)
    with pytest.raises(ValueError, match="signals lacks 'compat_mass'"):
        selection_scores({k: v for k, v in sig.items() if k != "compat_mass"}, valid)
