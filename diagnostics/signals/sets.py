"""What the exact and the top-K modes share: the signal container, the key sets, the top-K set signals.

* ``SignalDict``: the ``dict[str, Tensor]`` both modes return, with its mode and K.
* ``FULL_VOCAB_KEYS`` / ``TOPK_KEYS`` / ``SAMPLED_KEYS``: which signals each mode produces.
* ``order_desc_id_asc``: the deterministic top-K order (value descending, then token id ascending).
* ``set_signals``: D, C, the support proxies and the top-K entropy from log-probs at S and T only
  (spec section 2), computed in float32; exact mode passes exact log-probs, top-K mode passes -inf
  for an unknown probability and a floor. Both modes also give ``disagreement_topk_proxy``, the
  released training code's D from the two top-K lists alone (floor AFTER renormalisation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diagnostics.signals.checks import NEG_INF

# Signals that need the full vocabulary (absent in top-K mode).
FULL_VOCAB_KEYS = ("student_entropy", "teacher_entropy", "kl_forward", "kl_reverse")
# Signals computed in both modes from the two top-K sets.
TOPK_KEYS = (
    "disagreement",
    "compat_mass",
    "compat_mass_lower",
    "overlap",
    "jaccard",
    "bhattacharyya",
    "teacher_top1_in_student_topk",
    "student_entropy_topk",
    "disagreement_topk_proxy",
)
# The released training code's D: its floor for a probability missing from a side's top-K list.
RELEASE_MISSING_PROB = 1e-12
# Signals added when the sampled token of each position is given.
SAMPLED_KEYS = ("sampled_in_student_topk", "student_logprob_sampled", "teacher_logprob_sampled")


class SignalDict(dict):
    """``dict[str, Tensor]`` of per-token signals, each ``[N]`` float32, with provenance.

    Attributes:
        mode: "exact" (``token_signals``, full logits) or "topk" (``token_signals_topk``).
        k: the requested top-K size (the effective one is min(k, V) in exact mode).
    """

    def __init__(self, data: dict[str, Tensor], *, mode: str, k: int):
        super().__init__(data)
        self.mode = mode
        self.k = k

    def __repr__(self) -> str:
        return f"SignalDict(mode={self.mode!r}, k={self.k}, keys={list(self)})"


def order_desc_id_asc(vals: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row of ``vals``/``ids`` [r, m] by value descending, ties by id ascending."""
    ids, perm = ids.sort(dim=1)
    vals = vals.gather(1, perm)
    vals, perm = vals.sort(dim=1, descending=True, stable=True)  # stable: keeps id order in ties
    return vals, ids.gather(1, perm)


def _xlogy_safe(logp: Tensor) -> Tensor:
    """p * log p with 0 * log 0 = 0 (p = exp(logp); logp = -inf gives 0, not NaN)."""
    return torch.where(logp == NEG_INF, 0.0, logp.exp() * logp)


def _renormalise(logp: Tensor) -> Tensor:
    """log p'(v) = log p(v) - log sum_{u in U} p(u): log-space renormalisation over dim 1 (spec 2, p')."""
    return logp - torch.logsumexp(logp, dim=1, keepdim=True)


def set_signals(
    s_ids: Tensor, t_ids: Tensor, ls: Tensor, lt: Tensor, k_eff: int, floor: float | None
) -> dict[str, Tensor]:
    """Top-K signals from log-probs at the two sets; all [n] float32.

    Args:
        s_ids, t_ids: [n, k] student / teacher top-K ids, column 0 the top-1.
        ls, lt: [n, 2k] student / teacher log-probs at (s_ids, t_ids) concatenated; -inf where a
            probability is 0 or unknown (top-K mode: a token outside that side's top-K).
        k_eff: the effective K (for overlap and the top-K entropy's log K).
        floor: if set (top-K mode), every probability on U is floored at exp(floor) before the
            renormalisation for D and Bhattacharyya (the released code's 1e-12 clamp; spec 2).
    """
    k = s_ids.shape[1]
    t_in_s = (t_ids[:, :, None] == s_ids[:, None, :]).any(dim=2)  # [n, k]: T-token also in S
    inter = t_in_s.sum(dim=1).float()
    # U = S + (T \ S): drop the T-copies of tokens already in S so each token counts once.
    in_u = torch.cat([torch.ones_like(t_in_s), ~t_in_s], dim=1)  # [n, 2k]
    lsu, ltu = (ls, lt) if floor is None else (ls.clamp_min(floor), lt.clamp_min(floor))
    lsu = _renormalise(lsu.masked_fill(~in_u, NEG_INF))  # log pS'(v) on U
    ltu = _renormalise(ltu.masked_fill(~in_u, NEG_INF))  # log pT'(v) on U
    # D = sum_U pT' (log pT' - log pS'): FORWARD KL(T'||S') (spec 2). Terms with pT' = 0 are 0;
    # pT' > 0 with pS' = 0 gives +inf (correct). where() hides the -inf - -inf = NaN of pT' = 0.
    d = torch.where(ltu == NEG_INF, 0.0, ltu.exp() * (ltu - lsu)).sum(dim=1)
    # Bhattacharyya sum_U sqrt(pS' pT') = sum exp((log pS' + log pT') / 2); -inf gives 0.
    bhatt = torch.exp(0.5 * (lsu + ltu)).sum(dim=1)
    # C = sum_{v in S} pT(v): exact when lt is known on S; -inf (unknown) makes it the lower bound.
    compat = lt[:, :k].exp().sum(dim=1)
    compat_lower = torch.where(t_in_s, lt[:, k:].exp(), 0.0).sum(dim=1)  # mass on S cap T
    d_proxy = _disagreement_topk_proxy(s_ids, t_ids, ls, lt, t_in_s, in_u)
    # Top-K-renormalised student entropy / log K (released training code's H); 0 when K == 1.
    h_topk = -_xlogy_safe(_renormalise(ls[:, :k])).sum(dim=1)
    h_topk = h_topk / math.log(k_eff) if k_eff > 1 else torch.zeros_like(h_topk)
    return {
        "disagreement": d.clamp_min(0.0),  # rounding only: KL >= 0
        "compat_mass": compat,
        "compat_mass_lower": compat_lower,
        "overlap": inter / k_eff,
        "jaccard": inter / (2 * k - inter),
        "bhattacharyya": bhatt,
        "teacher_top1_in_student_topk": t_in_s[:, 0].float(),
        "student_entropy_topk": h_topk.clamp_min(0.0),
        "disagreement_topk_proxy": d_proxy.clamp_min(0.0),
    }


def _disagreement_topk_proxy(
    s_ids: Tensor, t_ids: Tensor, ls: Tensor, lt: Tensor, t_in_s: Tensor, in_u: Tensor
) -> Tensor:
    """The released training code's D from the two top-K lists alone; [n] float32.

    Reimplements ``_union_geometry`` (TA-OPD/slime_ta_opd/slime/rollout/tip_compat.py L337-354, KLf):
    each side's probability is known on its OWN top-K list only (0 elsewhere, even when exact logits
    give it), renormalised over U = S cup T, THEN floored at 1e-12 and not renormalised again:
    D = sum_U pT'' (log pT'' - log pS''), p'' = max(p / sum_U p, 1e-12) (a floored p contributes too).
    ``set_signals``' own D floors before the renormalisation (top-K mode) or is exact (exact mode).
    Layout of ls, lt, in_u as in ``set_signals`` ([n, 2k]: S columns, then T columns).
    """
    k = s_ids.shape[1]
    s_in_t = (s_ids[:, :, None] == t_ids[:, None, :]).any(dim=2)  # [n, k]: S-token also in T
    unknown = torch.full_like(ls[:, k:], NEG_INF)
    ls_known = torch.cat([ls[:, :k], unknown], dim=1)  # student: its own top-K only
    lt_known = torch.cat([torch.where(s_in_t, lt[:, :k], NEG_INF), lt[:, k:]], dim=1)  # teacher: T only
    floor = math.log(RELEASE_MISSING_PROB)
    # log p'' = max(log p - log sum_U p, log 1e-12): renormalise on U, then floor (no second renormalisation)
    lsu = _renormalise(ls_known.masked_fill(~in_u, NEG_INF)).clamp_min(floor)
    ltu = _renormalise(lt_known.masked_fill(~in_u, NEG_INF)).clamp_min(floor)
    terms = ltu.exp() * (ltu - lsu)
    return torch.where(in_u, terms, 0.0).sum(dim=1)  # tokens outside U (duplicate T-copies) count 0
