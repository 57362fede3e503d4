"""Exact mode: every signal of spec section 2 from the full ``[N, V]`` logits of both models.

``token_signals`` computes the entropies, the full-vocabulary KLs, the top-K disagreement D, the
compatibility mass C and the support proxies exactly in float32, chunked over rows. Per chunk:

* strided column maxima give the row max (and flag NaN, +inf or all -inf rows, so validation
  costs nothing on clean rows) and the top-K candidates (``_scan_maxima``, ``_topk_ids_pair``);
* d = x - max and e = exp(d) are written into reused buffers; one batched GEMM gives
  sum_v e (d_s, d_t, 1), from which Z, both entropies and both KLs follow (spec 2 identities at
  ``_exact_signals``); D, C and the proxies need only the log-probs at S and T
  (``diagnostics.signals.sets.set_signals``). Extra memory: 5 x chunk x V float32.
* Rows with -inf logits take a second GEMM (about +80% time for those chunks).

No autograd (signals are diagnostics; ``token_signals`` runs under ``torch.no_grad``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diagnostics.signals.checks import check_ids, check_k
from diagnostics.signals.sets import SignalDict, order_desc_id_asc, set_signals

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
        ids = order_desc_id_asc(torch.cat([s, t]).float(), every)[1]
        return torch.stack([ids[:c], ids[c:]], dim=1)
    if cols is None:  # small vocabulary: every token is a candidate
        cand = every
        vals = torch.cat([s, t]).float()
    else:
        cand = _column_candidates(cols, vocab // _GROUP, vocab)  # [2c, M]
        vals = torch.cat([s.gather(1, cand[:c]).float(), t.gather(1, cand[c:]).float()])
    top, j = vals.topk(k + 1, dim=1)
    top, ids = order_desc_id_asc(top, cand.gather(1, j))
    tie = top[:, k - 1] == top[:, k]
    if tie.any():
        for x, half in ((s, slice(0, c)), (t, slice(c, 2 * c))):
            rows = tie[half].nonzero()[:, 0]
            if rows.numel():
                fixed = _resolve_boundary_ties(x[rows], top[half][rows, k - 1], k)
                ids[half][rows, :k] = order_desc_id_asc(x[rows].gather(1, fixed).float(), fixed)[1]
    return torch.stack([ids[:c, :k], ids[c:, :k]], dim=1)



@dataclass
class _RowStats:
    """Per-row results of the chunked pass over the full vocabulary (all [N, ...])."""

    moments: Tensor  # [N, 2, 2] float32: moments[:, a, b] = E_{p_a}[d_b], a, b in (student, teacher)
    log_z: Tensor  # [N, 2] float32: log sum_v exp(d_a(v)), so log p_a = d_a - log_z[:, a]
    ids: Tensor  # [N, 2, k_eff] long: student / teacher top-K ids, (logit desc, id asc)
    logp: Tensor  # [N, 2, 2 k_eff (+1)] float32: log p_a at (S, T[, sampled token])
    kl_inf: Tensor  # [N, 2] bool: KL(T||S), KL(S||T) infinite (mass on a masked token)

    @classmethod
    def empty(cls, n: int, k_eff: int, with_sampled: bool, device: torch.device) -> _RowStats:
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
    out.update(set_signals(s_ids, t_ids, ls, lt, k_eff=k_eff, floor=None))
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
    check_k(k)
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
        check_ids(sampled_ids, "sampled_ids", (n,), vocab)
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
