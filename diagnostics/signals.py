"""Per-token teacher/student signals, batch-robust normalisation, selection scores and selection.

This module is the base of the package (spec section 2). It holds:

* ``token_signals``: every signal of spec section 2 from full ``[N, V]`` logits of both models
  (entropies, full-vocabulary KLs, the top-K disagreement D, the compatibility mass C and the
  support proxies), computed exactly in float32, chunked over rows.
* ``token_signals_topk``: the same signals when only each side's top-K log-probabilities are known
  (a teacher served by vLLM ``prompt_logprobs``): D and Bhattacharyya use the released code's
  1e-12 floor for a missing probability, C is the lower bound, full-vocabulary keys are absent.
* ``normalize_batch``: the spec's robust normalisation clip((z - Q05) / (Q95 - Q05 + eps), 0, 1).
* A score registry (``register_score``, ``get_score``, ``list_scores``) and ``selection_scores``,
  which normalises H, D, C over a rollout batch and evaluates every registered score by name.
* ``select``: the budgeted top-ceil(rho * |I|) mask over the whole batch, ties toward earlier positions.

Conventions shared by all functions (each is tested against a float64 reference):

* Top-K sets: the K largest logits, equal logits ordered by lower token id first. The same rule
  orders the set, so the "top-1" is the lowest id among the maximal logits. K >= V means the whole
  vocabulary; the effective K = min(K, V) is used for the sets, for ``overlap`` = |S cap T| / K_eff
  and for the log K of ``student_entropy_topk``.
* Masking: -inf logits (log-probs) are allowed and mean probability 0. 0 * log 0 is 0 everywhere,
  KL terms where the first argument has probability 0 contribute 0, and KL(P || Q) is +inf when P
  puts mass where Q has none (mathematically right, not an error). NaN, +inf and all -inf rows raise.
* Exact mode, per chunk of rows: strided column maxima give the row max (and flag NaN, +inf or
  all -inf rows, so validation costs nothing on clean rows) and the top-K candidates; d = x - max
  and e = exp(d) are written into reused buffers; one batched GEMM gives sum_v e (d_s, d_t, 1),
  from which Z, both entropies and both KLs follow (spec 2 identities at ``_exact_signals``);
  D, C and the proxies need only the log-probs at S and T. Extra memory: 5 x chunk x V float32.
  Rows with -inf logits take a second GEMM (about +80% time for those chunks).
* Simplifications: no autograd (signals are diagnostics; ``token_signals`` runs under
  ``torch.no_grad``), float32 throughout, and entropies and KL-type outputs are floored at 0 to
  drop float32 rounding (they are >= 0 mathematically; inputs themselves are never clamped).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor

__all__ = [
    "SignalDict",
    "ScoreSpec",
    "token_signals",
    "token_signals_topk",
    "normalize_batch",
    "register_score",
    "get_score",
    "list_scores",
    "selection_scores",
    "select",
    "FULL_VOCAB_KEYS",
    "TOPK_KEYS",
    "SAMPLED_KEYS",
]

NEG_INF = float("-inf")

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
)
# Signals added when the sampled token of each position is given.
SAMPLED_KEYS = ("sampled_in_student_topk", "student_logprob_sampled", "teacher_logprob_sampled")

# Logits per side per chunk in ``token_signals`` when chunk_size is None: rows = this // V, i.e.
# 20 rows at V = 151,936 and 98 at V = 32,000. The float32 work buffers hold 5 x rows x V values
# (shifted logits of both sides plus a ones row, and their exp): 61 MB at V = 151,936. Tuned with
# benchmarks/bench_signals.py on a 2-core CPU: on an idle machine 8-16 rows at V = 151,936 are
# fastest (the chunk stays cache-resident; 55 rows cost +40%); when other processes compete for
# the cores, larger chunks (fewer OpenMP regions) win. This is the compromise.
DEFAULT_CHUNK_LOGITS = 3 * 2**20
# Top-K candidates come from strided token columns of _GROUP tokens (see ``_column_candidates``);
# vocabularies with fewer than _MIN_COLUMNS columns take every token as a candidate.
_GROUP = 128
_MIN_COLUMNS = 64


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


# --------------------------------------------------------------------------------------------
# Input validation (every message names the argument and the first offending position/value)
# --------------------------------------------------------------------------------------------


def _first_index(mask: Tensor) -> tuple[int, ...]:
    """Row-major position of the first True of a non-empty boolean mask."""
    return tuple(int(i) for i in mask.nonzero()[0])


def _check_ids(ids: Tensor, name: str, shape: tuple[int, ...], vocab: int | None) -> None:
    """Integer ids of the given shape, >= 0 and (if ``vocab`` is known) < vocab."""
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    if tuple(ids.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(ids.shape)}")
    out = ids < 0 if vocab is None else (ids < 0) | (ids >= vocab)
    if out.any():
        pos = _first_index(out)
        bound = ">= 0" if vocab is None else f"in [0, {vocab})"
        raise ValueError(f"{name} must be {bound}: value {int(ids[pos])} at {_where(pos)}")


def _where(pos: tuple[int, ...]) -> str:
    """'row r, column c' for a 2-D position, 'position [i, ...]' otherwise."""
    return f"row {pos[0]}, column {pos[1]}" if len(pos) == 2 else f"position {list(pos)}"


def _check_float(x: Tensor, name: str, shape: tuple[int, ...] | None = None) -> None:
    """Floating tensor (of ``shape`` if given) without NaN or +inf; -inf is allowed."""
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    bad = torch.isnan(x) | torch.isposinf(x)
    if bad.any():
        pos = _first_index(bad)
        raise ValueError(f"{name} has {'NaN' if torch.isnan(x[pos]) else '+inf'} at {_where(pos)}")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


# --------------------------------------------------------------------------------------------
# Deterministic top-K (value descending, then token id ascending)
# --------------------------------------------------------------------------------------------


def _order_desc_id_asc(vals: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row of ``vals``/``ids`` [r, m] by value descending, ties by id ascending."""
    ids, perm = ids.sort(dim=1)
    vals = vals.gather(1, perm)
    vals, perm = vals.sort(dim=1, descending=True, stable=True)  # stable: keeps id order in ties
    return vals, ids.gather(1, perm)


def _scan_maxima(s: Tensor, t: Tensor, m: int) -> tuple[Tensor, Tensor | None]:
    """Row maxima of both sides and, for large V, the m best strided columns of every row.

    With nb = V // _GROUP, column j of a row holds the tokens {i * nb + j : i < _GROUP}: a
    [c, _GROUP, nb] view reduced over its middle dim (a vertical SIMD max, as fast as a plain row
    max). Tokens >= _GROUP * nb form a tail outside the columns.
    Returns:
        row_max: [c, 2] float32 (student, teacher). NaN, +inf and all -inf rows make it
            non-finite (amax propagates NaN and topk ranks NaN first): the cheap validity check.
        cols: [2c, m] ids of the m columns with the largest maxima (student rows, then teacher
            rows), or None when V has fewer than max(_MIN_COLUMNS, 4 m) columns.
    """
    c, vocab = s.shape
    nb = vocab // _GROUP
    if nb < max(_MIN_COLUMNS, 4 * m):
        return torch.stack([s.amax(dim=1), t.amax(dim=1)], dim=1).float(), None
    col_max = torch.cat([x[:, : nb * _GROUP].unflatten(1, (_GROUP, nb)).amax(dim=1) for x in (s, t)])
    best = col_max.topk(m, dim=1)  # [2c, m]
    row_max = best.values[:, 0]  # the best column's max is the row max (outside the tail)
    if nb * _GROUP < vocab:
        row_max = torch.maximum(row_max, torch.cat([s[:, nb * _GROUP :], t[:, nb * _GROUP :]]).amax(dim=1))
    return row_max.float().view(2, c).T, best.indices


def _column_candidates(cols: Tensor, nb: int, vocab: int) -> Tensor:
    """Token ids [r, m * _GROUP + tail] of the columns ``cols`` [r, m] plus the tail tokens.

    These contain the top-m values (as a multiset) of each row when ``cols`` are its m columns with
    the largest maxima. Let tau be the m-th largest value: every token above tau lies in a column
    whose max is above tau, and fewer than m columns hold such tokens, so the chosen columns
    include them all plus, for each chosen column whose max equals tau, a token equal to tau:
    enough to complete the top-m multiset.
    """
    ids = (cols[:, :, None] + nb * torch.arange(_GROUP, device=cols.device)).flatten(1)  # [r, m * _GROUP]
    if nb * _GROUP < vocab:
        tail = torch.arange(nb * _GROUP, vocab, device=cols.device)
        ids = torch.cat([ids, tail.expand(len(ids), -1)], dim=1)
    return ids


def _resolve_boundary_ties(x: Tensor, tau: Tensor, k: int) -> Tensor:
    """Top-k ids of rows ``x`` [r, V] whose k-th and (k+1)-th largest values tie at ``tau`` [r].

    Keeps every token above tau, then the lowest ids among tokens equal to tau until k are kept.
    Returns ids [r, k] in ascending id order (the caller re-orders them by value).
    """
    above = x > tau[:, None]
    equal = x == tau[:, None]
    need = k - above.sum(dim=1, dtype=torch.int32)  # >= 1: fewer than k tokens are above tau
    keep = above | (equal & (equal.cumsum(dim=1, dtype=torch.int32) <= need[:, None]))
    return keep.nonzero()[:, 1].view(-1, k)  # row-major nonzero: ascending ids, k per row


def _topk_ids_pair(s: Tensor, t: Tensor, cols: Tensor | None, k: int) -> Tensor:
    """Deterministic top-K ids of both sides, [c, 2, k_eff] from s, t [c, V] (k_eff = min(k, V)).

    Each row is ordered by (logit desc, id asc). ``torch.topk`` alone is not stable under ties,
    so: take the top-(k+1) values among candidate tokens (the columns ``cols`` from
    ``_scan_maxima``, or every token), order them by (value desc, id asc), and where the k-th and
    (k+1)-th values tie (the only case in which the set itself depends on tie-breaking) rebuild
    that row's set exactly. Both sides share one batched pipeline over [2c, ...] tensors.
    """
    c, vocab = s.shape
    every = torch.arange(vocab, device=s.device).expand(2 * c, vocab)
    if k >= vocab:  # the whole vocabulary: only the order is needed
        ids = _order_desc_id_asc(torch.cat([s, t]).float(), every)[1]
        return torch.stack([ids[:c], ids[c:]], dim=1)
    if cols is None:  # small vocabulary: every token is a candidate
        cand = every
        vals = torch.cat([s, t]).float()
    else:
        cand = _column_candidates(cols, vocab // _GROUP, vocab)  # [2c, M]
        vals = torch.cat([s.gather(1, cand[:c]).float(), t.gather(1, cand[c:]).float()])
    top, j = vals.topk(k + 1, dim=1)
    top, ids = _order_desc_id_asc(top, cand.gather(1, j))
    tie = top[:, k - 1] == top[:, k]
    if tie.any():
        for x, half in ((s, slice(0, c)), (t, slice(c, 2 * c))):
            rows = tie[half].nonzero()[:, 0]
            if rows.numel():
                fixed = _resolve_boundary_ties(x[rows], top[half][rows, k - 1], k)
                ids[half][rows, :k] = _order_desc_id_asc(x[rows].gather(1, fixed).float(), fixed)[1]
    return torch.stack([ids[:c, :k], ids[c:, :k]], dim=1)


# --------------------------------------------------------------------------------------------
# Signals shared by both modes: everything that only needs log-probs at S and T
# --------------------------------------------------------------------------------------------


def _xlogy_safe(logp: Tensor) -> Tensor:
    """p * log p with 0 * log 0 = 0 (p = exp(logp); logp = -inf gives 0, not NaN)."""
    return torch.where(logp == NEG_INF, 0.0, logp.exp() * logp)


def _renormalise(logp: Tensor) -> Tensor:
    """log p'(v) = log p(v) - log sum_{u in U} p(u): log-space renormalisation over dim 1 (spec 2, p')."""
    return logp - torch.logsumexp(logp, dim=1, keepdim=True)


def _set_signals(
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
    }


# --------------------------------------------------------------------------------------------
# Exact mode: full logits, chunked over rows
# --------------------------------------------------------------------------------------------


@dataclass
class _RowStats:
    """Per-row results of the chunked pass over the full vocabulary (all [N, ...])."""

    moments: Tensor  # [N, 2, 2] float32: moments[:, a, b] = E_{p_a}[d_b], a, b in (student, teacher)
    log_z: Tensor  # [N, 2] float32: log sum_v exp(d_a(v)), so log p_a = d_a - log_z[:, a]
    ids: Tensor  # [N, 2, k_eff] long: student / teacher top-K ids, (logit desc, id asc)
    logp: Tensor  # [N, 2, 2 k_eff (+1)] float32: log p_a at (S, T[, sampled token])
    kl_inf: Tensor  # [N, 2] bool: KL(T||S), KL(S||T) infinite (mass on a masked token)

    @classmethod
    def empty(cls, n: int, k_eff: int, with_sampled: bool, device: torch.device) -> "_RowStats":
        m = 2 * k_eff + int(with_sampled)
        return cls(
            torch.empty(n, 2, 2, device=device), torch.empty(n, 2, device=device),
            torch.empty(n, 2, k_eff, dtype=torch.long, device=device),
            torch.empty(n, 2, m, device=device), torch.zeros(n, 2, dtype=torch.bool, device=device),
        )


def _check_logit_rows(s: Tensor, t: Tensor, row_ids: Tensor) -> None:
    """Raise on the first row (in row order) of s/t [r, V] with NaN, +inf or all -inf entries.

    ``row_ids`` [r] are the rows' indices in the caller's full input, for the message.
    """
    first = []
    for name, x in (("student_logits", s), ("teacher_logits", t)):
        bad = torch.isnan(x) | torch.isposinf(x)
        all_masked = torch.isneginf(x).all(dim=1)
        bad_rows = (bad.any(dim=1) | all_masked).nonzero()[:, 0]
        if bad_rows.numel():
            r = int(bad_rows[0])
            if all_masked[r]:
                msg = f"{name} row {int(row_ids[r])} is all -inf (no token has probability > 0)"
            else:
                col = int(bad[r].nonzero()[0, 0])
                what = "NaN" if torch.isnan(x[r, col]) else "+inf"
                msg = f"{name} has {what} at row {int(row_ids[r])}, column {col}"
            first.append((r, msg))
    if first:
        raise ValueError(min(first)[1])  # earliest row; student before teacher on the same row
    raise AssertionError("a non-finite row max without NaN, +inf or an all -inf row")


def _own_topk_sums(e_at: Tensor, d1_at: Tensor, k: int) -> Tensor:
    """Side a's own top-K part of the GEMM: [c, 2, 3] = sum_{v in top_a} e_a(v) (d_s, d_t, 1)(v).

    e_at: [c, 2, M] e at the tokens (S, T, ...); d1_at: [c, 3, M] (d_s, d_t, 1) at the same
    tokens. Side a's own top-K is columns [a k, (a + 1) k).
    """
    own = []
    for a in (0, 1):
        cols = slice(a * k, (a + 1) * k)
        own.append((e_at[:, a : a + 1, cols] * d1_at[:, :, cols]).sum(dim=2))  # [c, 3]
    return torch.stack(own, dim=1)


def _chunk_pass(
    s: Tensor, t: Tensor, k: int, sampled: Tensor | None, d1: Tensor, e: Tensor, out: _RowStats, rows: slice
) -> None:
    """One chunk of the full-vocabulary pass; fills ``out`` at ``rows``.

    Args:
        s, t: [c, V] student / teacher logits (any float dtype); sampled: [c] long or None.
        d1: [c, 3, V] float32 buffer: rows 0, 1 get the shifted logits d = x - max(x) of both
            sides; row 2 holds ones (set once), so one GEMM also yields Z = sum_v exp(d).
        e: [c, 2, V] float32 buffer for e = exp(d) (unnormalised probabilities).
    Validation is free on clean rows: NaN, +inf or an all -inf row makes the row max non-finite,
    and only such rows are scanned (they raise).
    """
    c = s.shape[0]
    row_max, cols = _scan_maxima(s, t, k + 1)  # [c, 2]
    if not torch.isfinite(row_max).all():
        idx = (~torch.isfinite(row_max)).any(dim=1).nonzero()[:, 0]
        _check_logit_rows(s[idx], t[idx], idx + rows.start)  # raises
    torch.sub(s, row_max[:, :1], out=d1[:, 0])  # log-space shift: d = x - max(x) <= 0
    torch.sub(t, row_max[:, 1:], out=d1[:, 1])
    torch.exp(d1[:, :2], out=e)  # e <= 1, = 1 at the top-1; -inf logits give e = 0
    ids = _topk_ids_pair(s, t, cols, k)  # [c, 2, k_eff]: S, T
    at = ids.flatten(1) if sampled is None else torch.cat([ids.flatten(1), sampled[:, None]], dim=1)
    d1_at = d1.gather(2, at[:, None, :].expand(c, 3, -1))  # [c, 3, M]: (d_s, d_t, 1) at S, T(, y)
    e_at = e.gather(2, at[:, None, :].expand(c, 2, -1))  # [c, 2, M]
    # One batched GEMM gives gz[a] = sum_v e_a(v) (d_s(v), d_t(v), 1): the moments and Z. Summed
    # over the whole vocabulary in float32 it loses the many tiny tail terms against the top ones
    # (5e-5 relative on peaked rows), so each side's own top-K terms are summed apart and zeroed
    # in e first (then ~4e-7).
    top = _own_topk_sums(e_at, d1_at, ids.shape[2])
    e.scatter_(2, ids, 0.0)
    gz = torch.bmm(e, d1.transpose(1, 2)) + top  # [c, 2, 3]
    if not torch.isfinite(gz).all():
        # -inf logits: 0 * -inf = NaN above. Masked tokens have p = 0, so set d = 0 there
        # (0 log 0 = 0; the log-probs were gathered already) and redo the chunk's sums.
        masked = torch.isneginf(d1[:, :2])  # [c, 2, V]
        d1[:, :2].nan_to_num_(nan=0.0, neginf=0.0)  # only -inf can be left (rows are valid)
        top = _own_topk_sums(e_at, d1_at.nan_to_num(neginf=0.0), ids.shape[2])
        gz = torch.bmm(e, d1.transpose(1, 2)) + top
        # KL(P||Q) = +inf where P > 0 on a token Q masks (invisible to the sums, visible here).
        ms, mt = masked[:, 0], masked[:, 1]
        out.kl_inf[rows] = torch.stack([(ms > mt).any(dim=1), (mt > ms).any(dim=1)], dim=1)
    z = gz[:, :, 2]  # [c, 2]
    log_z = z.log()
    out.moments[rows] = gz[:, :, :2] / z[:, :, None]  # E_{p_a}[d_b]
    out.logp[rows] = d1_at[:, :2] - log_z[:, :, None]  # log p = d - log Z
    out.log_z[rows], out.ids[rows] = log_z, ids


def _exact_signals(st: _RowStats, sampled: Tensor | None) -> dict[str, Tensor]:
    """All exact-mode signals [N] from the per-row results of the chunked pass."""
    g, lz = st.moments, st.log_z
    # Spec 2 with log p_a = d_a - log Z_a and g[a, b] = E_{p_a}[d_b]:
    #   H(p) = -E_p[log p] = log Z - E_p[d]
    #   KL(T||S) = E_pT[log pT - log pS] = E_pT[d_t] - E_pT[d_s] - log Z_t + log Z_s; KL(S||T) mirrored.
    out = {
        "student_entropy": lz[:, 0] - g[:, 0, 0],
        "teacher_entropy": lz[:, 1] - g[:, 1, 1],
        "kl_forward": g[:, 1, 1] - g[:, 1, 0] - lz[:, 1] + lz[:, 0],
        "kl_reverse": g[:, 0, 0] - g[:, 0, 1] - lz[:, 0] + lz[:, 1],
    }
    out = {key: val.clamp_min(0.0) for key, val in out.items()}  # rounding only: H, KL >= 0
    out["kl_forward"][st.kl_inf[:, 0]] = math.inf
    out["kl_reverse"][st.kl_inf[:, 1]] = math.inf
    k_eff = st.ids.shape[2]
    s_ids, t_ids = st.ids[:, 0], st.ids[:, 1]
    ls, lt = st.logp[:, 0, : 2 * k_eff], st.logp[:, 1, : 2 * k_eff]
    out.update(_set_signals(s_ids, t_ids, ls, lt, k_eff=k_eff, floor=None))
    if sampled is not None:
        out["sampled_in_student_topk"] = (s_ids == sampled[:, None]).any(dim=1).float()
        out["student_logprob_sampled"] = st.logp[:, 0, -1].clone()
        out["teacher_logprob_sampled"] = st.logp[:, 1, -1].clone()
    return out


def token_signals(
    student_logits: Tensor,
    teacher_logits: Tensor,
    k: int = 16,
    *,
    chunk_size: int | None = None,
    sampled_ids: Tensor | None = None,
) -> SignalDict:
    """Exact per-token signals of spec section 2 from full logits.

    Args:
        student_logits, teacher_logits: [N, V], any float dtype (read per chunk, computed in
            float32); -inf entries mean a masked token. NaN, +inf or an all -inf row raise ValueError.
        k: top-K size (>= 1); K >= V means the whole vocabulary (effective K = min(k, V)).
        chunk_size: rows per chunk (None: DEFAULT_CHUNK_LOGITS // V). Extra memory: two float32
            buffers, [chunk, 3, V] and [chunk, 2, V], plus O(N k) results.
        sampled_ids: optional [N] integer ids of the sampled tokens (in [0, V)).
    Returns:
        SignalDict (mode="exact") of [N] float32 tensors: FULL_VOCAB_KEYS + TOPK_KEYS (+
        SAMPLED_KEYS with ``sampled_ids``). kl_forward = KL(T||S) is +inf on rows where the
        teacher has mass on a token the student masks, kl_reverse likewise, D likewise on U.
    """
    _check_k(k)
    bad_chunk = isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    if chunk_size is not None and bad_chunk:
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating [N, V] tensor, got {x.dtype} {list(x.shape)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {list(student_logits.shape)} and teacher_logits "
            f"{list(teacher_logits.shape)} must have the same [N, V] shape"
        )
    n, vocab = student_logits.shape
    if vocab < 1:
        raise ValueError("student_logits has an empty vocabulary dimension (V = 0)")
    if sampled_ids is not None:
        _check_ids(sampled_ids, "sampled_ids", (n,), vocab)
        sampled_ids = sampled_ids.long().to(student_logits.device)
    device = student_logits.device
    if teacher_logits.device != device:
        raise ValueError(f"teacher_logits is on {teacher_logits.device}, student_logits on {device}")
    stats = _RowStats.empty(n, min(k, vocab), sampled_ids is not None, device)
    chunk = max(1, min(chunk_size or DEFAULT_CHUNK_LOGITS // vocab, n))
    # Work buffers reused by every chunk (no page faults): (d_s, d_t, ones) and exp(d_s, d_t).
    d1_buf = torch.empty(chunk, 3, vocab, device=device)
    d1_buf[:, 2] = 1.0
    e_buf = torch.empty(chunk, 2, vocab, device=device)
    with torch.no_grad():
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            c = rows.stop - start
            sampled = None if sampled_ids is None else sampled_ids[rows]
            _chunk_pass(student_logits[rows], teacher_logits[rows], k, sampled,
                        d1_buf[:c], e_buf[:c], stats, rows)
        return SignalDict(_exact_signals(stats, sampled_ids), mode="exact", k=k)


# --------------------------------------------------------------------------------------------
# Top-K mode: only each side's top-K log-probs are known
# --------------------------------------------------------------------------------------------


def _lookup(ids: Tensor, table_ids: Tensor, table_vals: Tensor) -> Tensor:
    """table_vals at ids where the id is in table_ids (same row), else -inf; [c, m] from [c, k]."""
    match = ids[:, :, None] == table_ids[:, None, :]  # [c, m, k]; ids are unique within a row
    found = match.any(dim=2)
    vals = table_vals.gather(1, match.int().argmax(dim=2))
    return torch.where(found, vals, NEG_INF)


def _check_topk_side(ids: Tensor, logprobs: Tensor, side: str, shape: tuple[int, ...]) -> None:
    _check_ids(ids, f"{side}_topk_ids", shape, None)
    _check_float(logprobs, f"{side}_topk_logprobs", shape)
    sorted_ids = ids.sort(dim=1).values
    dup = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    if dup.any():
        r, j = _first_index(dup)
        raise ValueError(f"{side}_topk_ids row {r} repeats token id {int(sorted_ids[r, j])}")
    positive = logprobs > 1e-4  # log-probs are <= 0; larger values are logits or a bug upstream
    if positive.any():
        pos = _first_index(positive)
        raise ValueError(f"{side}_topk_logprobs has {float(logprobs[pos]):.4g} > 0 at {_where(pos)} "
                         "(expected log-probabilities)")
    all_masked = torch.isneginf(logprobs).all(dim=1)
    if all_masked.any():
        raise ValueError(f"{side}_topk_logprobs row {_first_index(all_masked)[0]} is all -inf")


def token_signals_topk(
    student_topk_ids: Tensor,
    student_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    *,
    sampled_ids: Tensor | None = None,
    sampled_student_logprob: Tensor | None = None,
    sampled_teacher_logprob: Tensor | None = None,
    missing_logprob: float = math.log(1e-12),
) -> SignalDict:
    """Signals from each side's top-K log-probs only (e.g. a vLLM ``prompt_logprobs`` teacher).

    Args:
        student_topk_ids, teacher_topk_ids: [N, K] integer token ids, unique within a row (any order).
        student_topk_logprobs, teacher_topk_logprobs: [N, K] log-probs at those ids (full-vocabulary
            log-probs, not renormalised); -inf allowed, NaN/+inf raise.
        sampled_ids: optional [N] sampled token ids -> ``sampled_in_student_topk``.
        sampled_student_logprob, sampled_teacher_logprob: optional [N] log-probs of the sampled
            token, passed through as ``student_logprob_sampled`` / ``teacher_logprob_sampled``.
        missing_logprob: log of the floor for a probability on U (default log 1e-12).
    Returns:
        SignalDict (mode="topk", k=K) of [N] float32 tensors with TOPK_KEYS (+ the sampled keys
        given). D and Bhattacharyya: every probability on U = S cup T is floored at
        exp(missing_logprob) (a token outside a side's top-K has unknown probability, taken as 0
        and so floored to exactly 1e-12: the released code's inflated proxy), then renormalised
        to U. ``compat_mass`` IS the lower bound sum_{S cap T} pT (the teacher's mass on S outside
        its own top-K is unknown) and equals ``compat_mass_lower``. Full-vocabulary keys are absent.
    """
    if student_topk_ids.dim() != 2:
        raise ValueError(f"student_topk_ids must be [N, K], got shape {list(student_topk_ids.shape)}")
    shape = tuple(student_topk_ids.shape)
    n, k = shape
    _check_k(k)
    _check_topk_side(student_topk_ids, student_topk_logprobs, "student", shape)
    _check_topk_side(teacher_topk_ids, teacher_topk_logprobs, "teacher", shape)
    if not (math.isfinite(missing_logprob) and missing_logprob <= 0):
        raise ValueError(f"missing_logprob must be finite and <= 0, got {missing_logprob!r}")
    # Order each side by (log-prob desc, id asc) so column 0 is the deterministic top-1.
    ls_s, s_ids = _order_desc_id_asc(student_topk_logprobs.float(), student_topk_ids.long())
    lt_t, t_ids = _order_desc_id_asc(teacher_topk_logprobs.float(), teacher_topk_ids.long())
    # Log-probs at (S, T): known on each side's own top-K, -inf (unknown -> floored) elsewhere.
    ls = torch.cat([ls_s, _lookup(t_ids, s_ids, ls_s)], dim=1)
    lt = torch.cat([_lookup(s_ids, t_ids, lt_t), lt_t], dim=1)
    out = _set_signals(s_ids, t_ids, ls, lt, k_eff=k, floor=missing_logprob)
    if sampled_ids is not None:
        _check_ids(sampled_ids, "sampled_ids", (n,), None)
        out["sampled_in_student_topk"] = (s_ids == sampled_ids.long()[:, None]).any(dim=1).float()
    for key, val, name in (
        ("student_logprob_sampled", sampled_student_logprob, "sampled_student_logprob"),
        ("teacher_logprob_sampled", sampled_teacher_logprob, "sampled_teacher_logprob"),
    ):
        if val is not None:
            _check_float(val, name, (n,))
            out[key] = val.float()
    return SignalDict(out, mode="topk", k=k)


# --------------------------------------------------------------------------------------------
# Batch-robust normalisation
# --------------------------------------------------------------------------------------------


def _check_valid(valid: Tensor, x: Tensor, x_name: str) -> None:
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got dtype {valid.dtype}")
    if valid.shape != x.shape:
        raise ValueError(f"valid shape {list(valid.shape)} differs from {x_name} shape {list(x.shape)}")
    if not valid.any():
        raise ValueError("valid has no True position: nothing to normalise or select")


def _quantile_linear(v: Tensor, qs: Iterable[float]) -> list[float]:
    """Quantiles of a 1-D tensor with linear interpolation (= torch.quantile, without its size cap)."""
    v = v.double().sort().values
    n = v.numel()
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        out.append(float(v[lo] + (pos - lo) * (v[hi] - v[lo])))
    return out


def normalize_batch(
    x: Tensor, valid: Tensor, q_low: float = 0.05, q_high: float = 0.95, eps: float = 1e-6
) -> Tensor:
    """Spec 2 robust normalisation over the valid positions of one rollout batch.

    Norm(z) = clip((z - Q_low) / (Q_high - Q_low + eps), 0, 1); if Q_high - Q_low <= eps every
    score is 0. Quantiles: linear interpolation over the valid entries (torch.quantile's default).

    Args:
        x: any shape (e.g. [B, T]); must be finite at valid positions (an infinite KL from a
            masked vocabulary must be handled upstream: nothing is silently clamped).
        valid: bool, same shape as x, at least one True.
    Returns:
        float32 tensor of x's shape in [0, 1], 0 at invalid positions.
    """
    _check_valid(valid, x, "x")
    if not (0.0 <= q_low < q_high <= 1.0):
        raise ValueError(f"need 0 <= q_low < q_high <= 1, got q_low={q_low}, q_high={q_high}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    x = x.float()
    bad = valid & ~torch.isfinite(x)
    if bad.any():
        pos = _first_index(bad)
        raise ValueError(f"x has non-finite value {float(x[pos])} at valid position {list(pos)}")
    lo, hi = _quantile_linear(x[valid], (q_low, q_high))
    if hi - lo <= eps:  # a flat batch carries no ranking information
        return torch.zeros_like(x)
    z = ((x - lo) / (hi - lo + eps)).clamp(0.0, 1.0)
    return z.masked_fill(~valid, 0.0)


# --------------------------------------------------------------------------------------------
# Score registry
# --------------------------------------------------------------------------------------------

ScoreFn = Callable[[dict[str, Tensor], Tensor, torch.Generator], Tensor]
_NORMALISED = ("H", "D", "C")  # the normalised signals a score may use: H~, D~, C~


@dataclass(frozen=True)
class ScoreSpec:
    """One registered selection score.

    fn(norm, valid, generator) -> [B, T] float, pure: ``norm`` maps "H", "D", "C" to the
    normalised [B, T] signals (0 at invalid positions), ``valid`` is the [B, T] bool mask, and
    ``generator`` a torch.Generator seeded per (seed, name) for random scores.
    """

    name: str
    fn: ScoreFn
    description: str
    needs: tuple[str, ...] = field(default_factory=tuple)
    restrict_to_q3: bool = False


_SCORES: dict[str, ScoreSpec] = {}


def register_score(
    name: str, *, description: str, needs: Iterable[str] = (), q3: bool = False
) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator registering a score function under ``name``.

    ``needs``: the normalised signals it reads (subset of "H", "D", "C"). ``q3=True``: the score
    only ranks inside Q3 (low H~, high D~); ``selection_scores`` sets it to -inf outside Q3.
    Raises ValueError on a duplicate name or an unknown need.
    """
    needs = tuple(needs)
    unknown = [n for n in needs if n not in _NORMALISED]
    if unknown:
        raise ValueError(f"score {name!r} needs unknown signals {unknown}; known: {list(_NORMALISED)}")

    if name == "q3":
        raise ValueError('"q3" is reserved: selection_scores returns the Q3 mask under that key')

    def decorator(fn: ScoreFn) -> ScoreFn:
        if name in _SCORES:
            raise ValueError(f"score {name!r} is already registered (by {_SCORES[name].fn.__qualname__})")
        _SCORES[name] = ScoreSpec(name, fn, description, needs, q3)
        return fn

    return decorator


def get_score(name: str) -> ScoreSpec:
    """The registered ScoreSpec; KeyError listing the registered names if unknown."""
    try:
        return _SCORES[name]
    except KeyError:
        raise KeyError(f"unknown score {name!r}; registered scores: {list_scores()}") from None


def list_scores() -> list[str]:
    """Registered score names, in registration order."""
    return list(_SCORES)


def _soft_or(a: Tensor, b: Tensor) -> Tensor:
    return a + b - a * b


@register_score("full", description="every valid position (full-token OPD baseline)")
def _full(norm, valid, generator):
    return torch.ones(valid.shape, device=valid.device)


@register_score("random", description="uniform random")
def _random(norm, valid, generator):
    return torch.rand(valid.shape, generator=generator).to(valid.device)


@register_score("entropy", description="H~, normalised student entropy", needs=("H",))
def _entropy(norm, valid, generator):
    return norm["H"]


@register_score("kl", description="D~, normalised top-K disagreement (raw KL selector)", needs=("D",))
def _kl(norm, valid, generator):
    return norm["D"]


@register_score("compat", description="C~, normalised compatibility mass (C-only)", needs=("C",))
def _compat(norm, valid, generator):
    return norm["C"]


@register_score("teachability", description="D~ C~, learnable disagreement D^L (TA-OPD)", needs=("D", "C"))
def _teachability(norm, valid, generator):
    return norm["D"] * norm["C"]


@register_score("incompatible", description="D~ (1 - C~), incompatible disagreement D^I", needs=("D", "C"))
def _incompatible(norm, valid, generator):
    return norm["D"] * (1.0 - norm["C"])


@register_score("tip", description="H~ + D~ - H~ D~ (TIP soft-OR)", needs=("H", "D"))
def _tip(norm, valid, generator):
    return _soft_or(norm["H"], norm["D"])


@register_score(
    "teachability_entropy", description="H~ + s - H~ s, s = D~ C~ (TA-OPD + entropy)", needs=("H", "D", "C")
)
def _teachability_entropy(norm, valid, generator):
    return _soft_or(norm["H"], norm["D"] * norm["C"])


@register_score("q3_compat", description="C~ inside Q3", needs=("C",), q3=True)
def _q3_compat(norm, valid, generator):
    return norm["C"]


@register_score("q3_teachability", description="D~ C~ inside Q3", needs=("D", "C"), q3=True)
def _q3_teachability(norm, valid, generator):
    return norm["D"] * norm["C"]


@register_score("q3_incompatible", description="D~ (1 - C~) inside Q3", needs=("D", "C"), q3=True)
def _q3_incompatible(norm, valid, generator):
    return norm["D"] * (1.0 - norm["C"])


@register_score("q3_only", description="uniform random inside Q3 (paper's Q3-only selector)", q3=True)
def _q3_only(norm, valid, generator):
    return torch.rand(valid.shape, generator=generator).to(valid.device)


def _score_generator(seed: int, name: str) -> torch.Generator:
    """Per-score generator: seeded by (seed, name) so adding a score never shifts another's draws."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def selection_scores(signals: dict[str, Tensor], valid: Tensor, *, seed: int = 0) -> dict[str, Tensor]:
    """Every registered score over a rollout batch, plus the Q3 mask.

    Args:
        signals: dict of [B, T] tensors with "disagreement", "compat_mass" and "student_entropy"
            (or, failing it, "student_entropy_topk").
        valid: [B, T] bool mask of the valid response positions (at least one True).
        seed: seeds the random scores (one generator per score name).
    Returns:
        {name: [B, T] float32} for every registered score (0 at invalid positions; q3 scores
        -inf outside Q3), and "q3": [B, T] bool = valid & H~ < median(H~) & D~ >= median(D~),
        medians over the valid positions with linear interpolation.
    """
    h_key = "student_entropy" if "student_entropy" in signals else "student_entropy_topk"
    raw = {}
    for short, key in (("H", h_key), ("D", "disagreement"), ("C", "compat_mass")):
        if key not in signals:
            raise ValueError(f"signals lacks {key!r} (has {sorted(signals)})")
        if signals[key].shape != valid.shape:
            raise ValueError(
                f"signals[{key!r}] shape {list(signals[key].shape)} differs from valid {list(valid.shape)}"
            )
        raw[short] = signals[key]
    norm = {short: normalize_batch(x, valid) for short, x in raw.items()}
    (h_med,) = _quantile_linear(norm["H"][valid], (0.5,))
    (d_med,) = _quantile_linear(norm["D"][valid], (0.5,))
    q3 = valid & (norm["H"] < h_med) & (norm["D"] >= d_med)
    out: dict[str, Tensor] = {}
    for name, spec in _SCORES.items():
        score = spec.fn(norm, valid, _score_generator(seed, name)).float()
        if score.shape != valid.shape:
            raise ValueError(
                f"score {name!r} returned shape {list(score.shape)}, expected {list(valid.shape)}"
            )
        score = score.masked_fill(~valid, 0.0)
        out[name] = score.masked_fill(~q3, NEG_INF) if spec.restrict_to_q3 else score
    out["q3"] = q3
    return out


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def _budget(ratio: float, n_valid: int) -> int:
    """ceil(ratio * n) robust to float error (ceil(0.07 * 100) = 7, not 8), at least 1."""
    return max(1, min(n_valid, math.ceil(ratio * n_valid - 1e-9)))


def select(
    score: Tensor, valid: Tensor, ratio: float, *, min_per_sequence: int = 1, seed: int | None = None
) -> Tensor:
    """Budgeted selection mask over a whole rollout batch (spec 2, "Selection").

    Keeps the top ceil(ratio * |valid|) candidates by score over the WHOLE batch. Candidates are
    the valid positions with score > -inf (a -inf score, e.g. a q3 score outside Q3, is never
    selected, so fewer may be kept when candidates run out). Ties go to the earlier position in
    flattened row-major order (b * T + t); with ``seed`` they go instead by a seeded random
    permutation of the positions (reproducible for a given seed). Then every sequence with fewer
    than ``min_per_sequence`` kept positions gets its best remaining candidates (same order) until
    it has that many or runs out: the total can exceed the budget by up to B * min_per_sequence.
    ratio = 1.0 keeps exactly the candidates (all valid positions for a finite score).

    Args:
        score: [B, T] float, no NaN at valid positions. valid: [B, T] bool, at least one True.
        ratio: retention ratio in (0, 1]. min_per_sequence: >= 0.
    Returns:
        [B, T] bool mask, a subset of ``valid``.
    """
    if score.dim() != 2:
        raise ValueError(f"score must be [B, T], got shape {list(score.shape)}")
    _check_valid(valid, score, "score")
    if not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    if isinstance(min_per_sequence, bool) or not isinstance(min_per_sequence, int) or min_per_sequence < 0:
        raise ValueError(f"min_per_sequence must be an integer >= 0, got {min_per_sequence!r}")
    nan = valid & torch.isnan(score)
    if nan.any():
        raise ValueError(f"score has NaN at valid position {list(_first_index(nan))}")
    b, t = score.shape
    score = score if score.is_floating_point() else score.double()  # no float32 rounding: no new ties
    flat = score.masked_fill(~valid, NEG_INF).flatten()  # [B*T]
    cand = (flat > NEG_INF).view(b, t)
    # Global order: score descending, ties by position (stable sort) or by a seeded permutation.
    if seed is None:
        perm = torch.arange(b * t, device=score.device)
    else:  # drawn on the CPU: the same permutation on every device
        perm = torch.randperm(b * t, generator=torch.Generator().manual_seed(seed)).to(score.device)
    order = perm[flat[perm].sort(descending=True, stable=True).indices]  # positions, best first
    rank = torch.empty(b * t, dtype=torch.long, device=score.device)
    rank[order] = torch.arange(b * t, device=score.device)  # rank[pos] = place of pos in the global order
    rank = rank.view(b, t)
    keep = cand & (rank < _budget(ratio, int(valid.sum())))
    if min_per_sequence > 0:
        # Within-row place in the global order; a row's kept set is always its best-ranked prefix.
        row_place = torch.empty_like(rank)
        places = torch.arange(t, device=score.device).expand(b, t).contiguous()
        row_place.scatter_(1, rank.argsort(dim=1), places)
        keep |= cand & (row_place < min_per_sequence)
    return keep
