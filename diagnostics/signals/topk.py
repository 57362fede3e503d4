"""Top-K mode: the signals when only each side's top-K log-probabilities are known.

``token_signals_topk`` serves a teacher scored by vLLM ``prompt_logprobs``: D and Bhattacharyya
use the released code's 1e-12 floor for a missing probability, C is the lower bound
sum_{S cap T} pT, and the full-vocabulary keys (entropies, KLs) are absent.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diagnostics.signals.checks import NEG_INF, check_float, check_ids, check_k, describe_pos, first_index
from diagnostics.signals.sets import SignalDict, order_desc_id_asc, set_signals


def _lookup(ids: Tensor, table_ids: Tensor, table_vals: Tensor) -> Tensor:
    """table_vals at ids where the id is in table_ids (same row), else -inf; [c, m] from [c, k]."""
    match = ids[:, :, None] == table_ids[:, None, :]  # [c, m, k]; ids are unique within a row
    found = match.any(dim=2)
    vals = table_vals.gather(1, match.int().argmax(dim=2))
    return torch.where(found, vals, NEG_INF)


def _check_topk_side(ids: Tensor, logprobs: Tensor, side: str, shape: tuple[int, ...]) -> None:
    check_ids(ids, f"{side}_topk_ids", shape, None)
    check_float(logprobs, f"{side}_topk_logprobs", shape)
    sorted_ids = ids.sort(dim=1).values
    dup = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    if dup.any():
        r, j = first_index(dup)
        raise ValueError(f"{side}_topk_ids row {r} repeats token id {int(sorted_ids[r, j])}")
    positive = logprobs > 1e-4  # log-probs are <= 0; larger values are logits or a bug upstream
    if positive.any():
        pos = first_index(positive)
        raise ValueError(f"{side}_topk_logprobs has {float(logprobs[pos]):.4g} > 0 at {describe_pos(pos)} "
                         "(expected log-probabilities)")
    all_masked = torch.isneginf(logprobs).all(dim=1)
    if all_masked.any():
        raise ValueError(f"{side}_topk_logprobs row {first_index(all_masked)[0]} is all -inf")


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
    check_k(k)
    _check_topk_side(student_topk_ids, student_topk_logprobs, "student", shape)
    _check_topk_side(teacher_topk_ids, teacher_topk_logprobs, "teacher", shape)
    if not (math.isfinite(missing_logprob) and missing_logprob <= 0):
        raise ValueError(f"missing_logprob must be finite and <= 0, got {missing_logprob!r}")
    # Order each side by (log-prob desc, id asc) so column 0 is the deterministic top-1.
    ls_s, s_ids = order_desc_id_asc(student_topk_logprobs.float(), student_topk_ids.long())
    lt_t, t_ids = order_desc_id_asc(teacher_topk_logprobs.float(), teacher_topk_ids.long())
    # Log-probs at (S, T): known on each side's own top-K, -inf (unknown -> floored) elsewhere.
    ls = torch.cat([ls_s, _lookup(t_ids, s_ids, ls_s)], dim=1)
    lt = torch.cat([_lookup(s_ids, t_ids, lt_t), lt_t], dim=1)
    out = set_signals(s_ids, t_ids, ls, lt, k_eff=k, floor=missing_logprob)
    if sampled_ids is not None:
        check_ids(sampled_ids, "sampled_ids", (n,), None)
        out["sampled_in_student_topk"] = (s_ids == sampled_ids.long()[:, None]).any(dim=1).float()
    for key, val, name in (
        ("student_logprob_sampled", sampled_student_logprob, "sampled_student_logprob"),
        ("teacher_logprob_sampled", sampled_teacher_logprob, "sampled_teacher_logprob"),
    ):
        if val is not None:
            check_float(val, name, (n,))
            out[key] = val.float()
    return SignalDict(out, mode="topk", k=k)
