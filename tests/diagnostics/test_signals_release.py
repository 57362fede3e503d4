"""The released training code's selection and signals, each against a plain reference from its definition.

The release is TA-OPD/slime_ta_opd/slime/rollout/tip_compat.py of the public repository
ckjsuperhh/taopd-baseline; each test names the lines it reproduces. References live in
signals_reference.py (loops over Python lists, float64 unless stated).
"""

from __future__ import annotations

import math

import pytest
import torch

from diagnostics.signals import (
    SelectionOptions,
    get_score,
    normalize_batch,
    normalize_release,
    select,
    select_by_name,
    selection_scores,
    token_signals,
)
from diagnostics.signals.selectors import tie_order_for

from signals_reference import (
    random_logits,
    ref_disagreement_topk_proxy,
    ref_log_softmax,
    ref_release_normalize,
    ref_release_selection,
    ref_topk,
)


def _tied_scores(b: int, t: int, seed: int) -> torch.Tensor:
    """Scores from {0, 0.25, 0.5, 1}: most positions tie with many others."""
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([0.0, 0.25, 0.5, 1.0])[torch.randint(0, 4, (b, t), generator=g)]


def _ref_ties(score: list[list[float]], valid: list[list[bool]], n: int, reverse: bool) -> set[tuple[int, int]]:
    """The release's ``_top_indices`` (tip_compat.py L517-523): rows in sample-then-position order,
    sorted by the key (score, -tok_pos) with ``reverse``, stable, first n."""
    rows = [(b, t) for b in range(len(score)) for t in range(len(score[b])) if valid[b][t]]
    rows.sort(key=lambda r: (score[r[0]][r[1]], -r[1]), reverse=reverse)
    return set(rows[:n])


def _as_set(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(b), int(t)) for b, t in mask.nonzero().tolist()}


# ---------------------------------------------------------------------------------------------- ties


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_earliest_position_ties_are_the_release_key(seed):
    score = _tied_scores(5, 17, seed)
    valid = torch.rand(5, 17, generator=torch.Generator().manual_seed(seed + 9)) < 0.85
    n = math.ceil(0.2 * int(valid.sum()) - 1e-9)
    got = select(score, valid, 0.2, min_per_sequence=0, tie_order="earliest_position")
    assert _as_set(got) == _ref_ties(score.tolist(), valid.tolist(), n, reverse=True)
    # the project's row-major rule keeps a different set on the same ties (earliest sequences first)
    row_major = select(score, valid, 0.2, min_per_sequence=0)
    assert _as_set(row_major) != _as_set(got)


@pytest.mark.parametrize("seed", [0, 1])
def test_latest_position_is_the_release_ascending_sort_of_the_negated_score(seed):
    """A "low" selector: the release sorts the signal ascending by (signal, -tok_pos) (L501-503, L522);
    here the score is -signal, kept highest first with tie_order latest_position."""
    signal = _tied_scores(4, 13, seed)
    valid = torch.ones(4, 13, dtype=torch.bool)
    n = math.ceil(0.3 * 52 - 1e-9)
    got = select(-signal, valid, 0.3, min_per_sequence=0, tie_order="latest_position")
    assert _as_set(got) == _ref_ties(signal.tolist(), valid.tolist(), n, reverse=False)
    assert tie_order_for("q3_low_compat", "earliest_position") == "latest_position"
    assert tie_order_for("teachability", "earliest_position") == "earliest_position"
    assert tie_order_for("q3_low_compat", "row_major") == "row_major"
    with pytest.raises(ValueError, match="not both"):
        select(signal, valid, 0.3, seed=1, tie_order="earliest_position")
    with pytest.raises(ValueError, match="tie_order"):
        select(signal, valid, 0.3, tie_order="position")


# ---------------------------------------------------------------------------------------------- top-up


def test_top_up_uses_its_own_score_over_all_valid_positions():
    """``_ensure_min_keep_per_sample`` (L526-538): a response with fewer than min_keep kept positions gets
    its best remaining by the top-up score over ALL its valid positions (not only the candidates),
    ties toward earlier positions."""
    g = torch.Generator().manual_seed(3)
    score = torch.rand(6, 11, generator=g)
    score[2:4] = -math.inf  # rows 2, 3 hold no candidate (as a row without Q3 positions)
    top_up = _tied_scores(6, 11, 4)
    valid = torch.ones(6, 11, dtype=torch.bool)
    valid[3, 5:] = False
    for m in (1, 2):
        got = select(score, valid, 0.1, min_per_sequence=m, tie_order="earliest_position", top_up_score=top_up)
        want = _ref_ties(score.tolist(), valid.tolist(), math.ceil(0.1 * int(valid.sum()) - 1e-9), reverse=True)
        for b in range(6):
            kept = [r for r in want if r[0] == b]
            if len(kept) < m:
                mine = [[valid[i][t].item() and i == b and (b, t) not in want for t in range(11)] for i in range(6)]
                want |= _ref_ties(top_up.tolist(), mine, m - len(kept), reverse=True)
        assert _as_set(got) == want
        assert all(int(got[b].sum()) >= m for b in range(6))
    # the project's top-up (no top_up_score) cannot reach rows without candidates
    plain = select(score, valid, 0.1, min_per_sequence=1)
    assert plain[2:4].sum() == 0


# ---------------------------------------------------------------------------------------------- fill


def test_fill_past_candidates_ranks_the_rest_by_the_fill_score():
    g = torch.Generator().manual_seed(5)
    base = torch.rand(3, 10, generator=g)
    inside = torch.rand(3, 10, generator=g) < 0.2
    score = base.masked_fill(~inside, -math.inf)
    valid = torch.ones(3, 10, dtype=torch.bool)
    got = select(score, valid, 0.5, min_per_sequence=0, fill_score=base)
    n = 15
    want = {(b, t) for b, t in inside.nonzero().tolist()}
    rest = sorted(((b, t) for b in range(3) for t in range(10) if not inside[b, t]),
                  key=lambda r: -base[r].item())
    want |= set(rest[: n - len(want)])
    assert _as_set(got) == want and int(got.sum()) == n
    assert int(select(score, valid, 0.5, min_per_sequence=0).sum()) == int(inside.sum())  # no fill: Q3 only


# ---------------------------------------------------------------------------------------------- scores


def test_release_scores_are_their_definitions():
    """tip_compat.py L375-393: Norm(D C) normalises the raw product; ca_softor = softor(H~, Norm(D C));
    split_ca = (1 - H~) Norm(D C) inside Q3; low-C / low-D^L rank -C~ / -D~ C~ inside Q3."""
    g = torch.Generator().manual_seed(6)
    sig = {"student_entropy": torch.rand(4, 25, generator=g) * 3, "disagreement": torch.rand(4, 25, generator=g),
           "compat_mass": torch.rand(4, 25, generator=g)}
    valid = torch.rand(4, 25, generator=g) < 0.9
    out, norm = selection_scores(sig, valid, return_normalized=True)
    h, d, c = (normalize_batch(sig[k], valid) for k in ("student_entropy", "disagreement", "compat_mass"))
    ndc = normalize_batch(sig["disagreement"] * sig["compat_mass"], valid)
    assert not torch.equal(ndc, d * c)  # Norm(D C) is not D~ C~
    torch.testing.assert_close(out["teachability_entropy_ndc"], h + ndc - h * ndc)
    torch.testing.assert_close(out["teachability_entropy"], h + d * c - h * d * c)  # the project's, kept
    q3 = out["q3"]
    for name, want in (("q3_only_ranked", (1 - h) * ndc), ("q3_low_compat", -c), ("q3_low_teachability", -d * c)):
        assert get_score(name).restrict_to_q3
        torch.testing.assert_close(out[name][q3], want[q3])
        assert torch.isneginf(out[name][valid & ~q3]).all()
    assert get_score("q3_low_compat").low_first and get_score("q3_low_teachability").low_first
    assert not get_score("q3_only_ranked").low_first


# ---------------------------------------------------------------------------------------------- normalisation


def test_all_response_rows_normalisation_is_the_release_formula():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 20, generator=g)
    x[0, 3] = math.inf  # an infinite value: left out of the quantiles, normalised to 0 (L405, L419)
    rows = torch.rand(3, 20, generator=g) < 0.9
    rows[0, 3] = True
    got = normalize_release(x, rows)
    flat = [x[b, t].item() for b in range(3) for t in range(20) if rows[b, t]]
    want = iter(ref_release_normalize(flat))
    for b in range(3):
        for t in range(20):
            assert got[b, t].item() == pytest.approx(next(want), abs=1e-7) if rows[b, t] else got[b, t] == 0
    assert torch.equal(normalize_release(torch.full((2, 3), 4.0), torch.ones(2, 3, dtype=torch.bool)),
                       torch.zeros(2, 3))
    # the paper text's rule differs: its eps 1e-6 in the denominator (and valid rows only)
    x2 = torch.randn(4, 9, generator=g)
    every = torch.ones(4, 9, dtype=torch.bool)
    assert not torch.equal(normalize_release(x2, every), normalize_batch(x2, every))
    torch.testing.assert_close(normalize_release(x2, every), normalize_batch(x2, every), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="NaN"):
        normalize_release(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2, dtype=torch.bool))


def test_all_response_rows_normalises_over_rows_the_selection_cannot_keep():
    g = torch.Generator().manual_seed(8)
    sig = {"student_entropy": torch.rand(3, 16, generator=g), "disagreement": torch.rand(3, 16, generator=g),
           "compat_mass": torch.rand(3, 16, generator=g)}
    rows = torch.ones(3, 16, dtype=torch.bool)
    valid = rows.clone()
    valid[:, :5] = False  # loss mask 0: normalised over, never selected
    _, norm = selection_scores(sig, valid, normalization="all_response_rows", response_rows=rows,
                               return_normalized=True)
    want = normalize_release(sig["student_entropy"], rows).masked_fill(~valid, 0.0)
    assert torch.equal(norm["H"], want)
    _, on_valid = selection_scores(sig, valid, normalization="all_response_rows", return_normalized=True)
    assert not torch.equal(on_valid["H"], norm["H"])  # the quantiles moved with the rows
    with pytest.raises(ValueError, match="superset"):
        selection_scores(sig, rows, normalization="all_response_rows", response_rows=valid)
    with pytest.raises(ValueError, match="normalization"):
        selection_scores(sig, valid, normalization="per_batch")


# ---------------------------------------------------------------------------------------------- signals


def test_release_topk_signals_are_the_release_definitions():
    """``_compute_topk_metrics`` (L271-324) from each side's top-K list alone: Hs_topk_norm (``_entropy``,
    L327-334), KLf_union (``_union_geometry``, L337-354), Cmass = sum over S of pT known on T (L309)."""
    k = 4
    s, t = random_logits(12, 11, 0)
    got = token_signals(s, t, k=k)
    for i in range(12):
        ls, lt = ref_log_softmax(s[i].double().tolist()), ref_log_softmax(t[i].double().tolist())
        S, T = ref_topk(s[i].tolist(), k), ref_topk(t[i].tolist(), k)
        s_list = {v: math.exp(ls[v]) for v in S}
        t_list = {v: math.exp(lt[v]) for v in T}
        z = sum(s_list.values())
        h = -sum(p / z * math.log(max(p / z, 1e-12)) for p in s_list.values()) / math.log(max(len(S), 2))
        assert got["student_entropy_topk"][i].item() == pytest.approx(h, abs=1e-5)
        assert got["compat_mass_lower"][i].item() == pytest.approx(sum(t_list.get(v, 0.0) for v in S), abs=1e-6)
        d = ref_disagreement_topk_proxy(S, T, s_list, t_list)
        assert got["disagreement_topk_proxy"][i].item() == pytest.approx(d, rel=1e-4, abs=1e-5)
    # floor after the renormalisation (the release) vs before (the project's top-K mode) vs exact: all differ
    assert not torch.allclose(got["disagreement_topk_proxy"], got["disagreement"])


# ---------------------------------------------------------------------------------------------- end to end


def _release_batch(seed: int, b: int = 5, t: int = 24):
    g = torch.Generator().manual_seed(seed)
    sig = {"student_entropy_topk": torch.rand(b, t, generator=g),
           "disagreement_topk_proxy": torch.rand(b, t, generator=g) ** 3 * 5,
           "compat_mass_lower": torch.rand(b, t, generator=g)}
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    rows = torch.arange(t)[None, :] < lengths[:, None]
    valid = rows & (torch.rand(b, t, generator=g) < 0.9)  # loss mask 0 on ~10% of the rows
    return sig, rows, valid


@pytest.mark.parametrize("selector", ["q3_only_ranked", "q3_low_compat", "q3_low_teachability",
                                      "teachability", "teachability_entropy_ndc"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paper_options_reproduce_the_release_selection(selector, seed):
    """SelectionOptions.paper() end to end against ``ref_release_selection`` (L364-538)."""
    sig, rows, valid = _release_batch(seed)
    for ratio, q3_fill in ((0.1, False), (0.05, False), (0.6, False), (0.6, True)):
        options = SelectionOptions.paper() if not q3_fill else SelectionOptions(**{
            **SelectionOptions.paper().to_dict(), "q3_fill": True})
        got = select_by_name(sig, valid, selector, ratio, min_per_sequence=1, seed=0, options=options,
                             response_rows=rows)
        want = ref_release_selection(sig["student_entropy_topk"].tolist(), sig["disagreement_topk_proxy"].tolist(),
                                     sig["compat_mass_lower"].tolist(), rows.tolist(), valid.tolist(), selector,
                                     ratio, fill_past_q3=q3_fill)
        assert got.tolist() == want, (selector, ratio, q3_fill)


def test_q3_only_ranked_keeps_only_q3_without_fill():
    sig, rows, valid = _release_batch(4)
    options = SelectionOptions.paper()
    got = select_by_name(sig, valid, "q3_only_ranked", 0.6, min_per_sequence=0, seed=0, options=options,
                         response_rows=rows)
    named = {"student_entropy": sig["student_entropy_topk"], "disagreement": sig["disagreement_topk_proxy"],
             "compat_mass": sig["compat_mass_lower"]}
    q3 = selection_scores(named, valid, normalization="all_response_rows", response_rows=rows)["q3"]
    assert torch.equal(got, q3)  # fewer Q3 positions than the budget: every one, nothing else (L503)
    filled = select_by_name(sig, valid, "q3_only_ranked", 0.6, min_per_sequence=0, seed=0, response_rows=rows,
                            options=SelectionOptions(**{**options.to_dict(), "q3_fill": True}))
    assert int(filled.sum()) == math.ceil(0.6 * int(valid.sum()) - 1e-9) and (filled & q3).sum() == q3.sum()


def test_default_options_are_the_project_selection_for_every_selector():
    sig, rows, valid = _release_batch(5)
    exact = {"student_entropy": sig["student_entropy_topk"] * 3, "disagreement": sig["disagreement_topk_proxy"],
             "compat_mass": sig["compat_mass_lower"]}
    scores = selection_scores(exact, valid, seed=11)
    for name in scores.keys() - {"q3"}:  # every selection rule whose signals are here (the published rules: rules.py)
        got = select_by_name(exact, valid, name, 0.1, min_per_sequence=1, seed=11)
        assert torch.equal(got, select(scores[name], valid, 0.1, min_per_sequence=1)), name


def test_selection_options_reject_bad_values():
    with pytest.raises(ValueError, match="signals"):
        SelectionOptions(signals="topk")
    with pytest.raises(ValueError, match="tie_break"):
        SelectionOptions(tie_break="random")
    with pytest.raises(KeyError, match="teachability"):
        SelectionOptions(top_up="nope")
    with pytest.raises(ValueError, match="Q3"):
        SelectionOptions(top_up="q3_only")
    assert SelectionOptions.paper().source_keys() == ("student_entropy_topk", "disagreement_topk_proxy",
                                                      "compat_mass_lower")
