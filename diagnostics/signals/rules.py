"""The published token-selection rules for OPD beside TA-OPD's, each one registration in the score registry.

Selection rules (a score; the budget keeps its top ceil(rho |I|) over the batch, as every score):

* ``prefix`` / ``suffix``: position baselines, the earliest (latest) positions of each response first.
* ``teacher_entropy``: the teacher's full-vocabulary entropy (entropy-aware OPD).
* ``excess_loss``: Rho-1's excess loss with the teacher as the reference model, log pT(y_t) - log pS(y_t).
* ``topk_overlap``: the share of the student's top-K also in the teacher's top-K (Rethinking-OPD).

Weight rules (every valid token is trained, weighted; ``kind="weight"``, never a selection):

* ``iw_opd``: IW-OPD's prefix-discrepancy importance weights.

The 80/20 high-entropy forking tokens (arXiv 2506.01939) are the registered ``entropy`` score at ratio 0.2: at
that budget its kept set equals the top-20% of the raw student entropy (H~ is a monotone clip of H, and its
clipped top, H >= Q95, lies inside the top 20%), so no alias is registered (docs/selection_rules.md).

These rules read raw signals (``scores.RAW_SIGNALS``), never the batch-normalised H~, D~, C~: a rank is all a
selection needs, and the papers define them on the raw values. Reimplemented from the papers' definitions;
the sources are cited at each function (docs/selection_rules.md has the table).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diagnostics.signals.scores import register_score, register_weight

IW_OPD_GAMMA = 0.5  # TRL's IWOPDConfig.iw_opd_gamma default (Algorithm 1's amplification, the paper's value)
IW_OPD_EPSILON = 1e-8  # TRL's IWOPDConfig.iw_opd_epsilon default (a 0/0 guard for an all-agreeing response)


def response_rank(valid: Tensor) -> tuple[Tensor, Tensor]:
    """(r, L): [B, T] float32 index of each valid position among its row's valid positions (0 = first)
    and [B, 1] float32 count of the row's valid positions (>= 1). r is 0 at invalid positions."""
    counts = valid.sum(dim=1, keepdim=True).float().clamp_min(1.0)  # [B, 1]
    rank = (valid.long().cumsum(dim=1) - 1).clamp_min(0).float()  # [B, T]
    return rank.masked_fill(~valid, 0.0), counts


@register_score("prefix", description="1 - r/L, r = index in the response, L = its length: earliest tokens first "
                "(position baseline; IW-OPD arXiv 2606.22600 reports the first ~30% close to all tokens)")
def _prefix(inputs, valid, generator):
    rank, counts = response_rank(valid)
    return 1.0 - rank / counts  # relative position: each response keeps about its first rho of tokens


@register_score("suffix", description="(r + 1)/L: latest tokens of each response first (position control)")
def _suffix(inputs, valid, generator):
    rank, counts = response_rank(valid)
    return (rank + 1.0) / counts


@register_score("teacher_entropy", description="H(pT), the teacher's full-vocabulary entropy, raw "
                "(entropy-aware OPD, arXiv 2603.07079)", needs=("teacher_entropy",))
def _teacher_entropy(inputs, valid, generator):
    return inputs["teacher_entropy"]


@register_score("excess_loss", description="log pT(y_t) - log pS(y_t) at the sampled token: Rho-1's excess loss "
                "with the teacher as reference (arXiv 2404.07965, microsoft/rho)",
                needs=("teacher_logprob_sampled", "student_logprob_sampled"))
def _excess_loss(inputs, valid, generator):
    # Rho-1 (sec. 2.2): L_delta = L_student(x_i) - L_ref(x_i) with L = -log p(x_i); the reference model here is the
    # teacher, so L_delta = log pT(y_t) - log pS(y_t) = the sampled-token OPD advantage A_t. High: the teacher
    # puts far more mass on the sampled token than the student (the student should raise it); negative: the
    # student is over-confident on a token the teacher finds unlikely (sampled_pg pushes it down).
    return inputs["teacher_logprob_sampled"] - inputs["student_logprob_sampled"]


@register_score("topk_overlap", description="|S cap T| / K, the share of the student's top-K in the teacher's "
                "top-K, most overlap first (Rethinking-OPD arXiv 2604.13016, thunlp/OPD)", needs=("overlap",))
def _topk_overlap(inputs, valid, generator):
    return inputs["overlap"]  # the support proxy ``overlap`` of diagnostics.signals (sets.set_signals)


def iw_opd_weights(teacher_logprob: Tensor, student_logprob: Tensor, valid: Tensor, *,
                   gamma: float = IW_OPD_GAMMA, epsilon: float = IW_OPD_EPSILON) -> Tensor:
    """IW-OPD's per-token importance weights: [B, T] float32, 0 at invalid positions.

    arXiv 2606.22600 (Algorithm 1; TRL 1.16.0 ``trl/experimental/iw_opd/iw_opd_trainer.py``,
    ``IWOPDTrainer._compute_iw_opd_loss`` L1212: a_opd L1238-1239, weights L1241-1244): with
    a_t = log pT(y_t) - log pS_old(y_t) (0 at invalid positions), P_t = sum_{s < t} |a_s| (the accumulated
    prefix discrepancy, position t excluded) and S = max(sum_s |a_s|, epsilon) per response,

        w_t = 1 + gamma (1 - P_t / S),

    so w falls from 1 + gamma at the first token to 1 + gamma |a_last| / S at the last: tokens after a
    drifted prefix weigh less. Inputs [B, T] float; computed in float32.
    """
    a = torch.where(valid, teacher_logprob.float() - student_logprob.float(), 0.0)
    absolute = a.abs()
    prefix = absolute.cumsum(dim=1) - absolute  # exclusive prefix sum: P_t
    total = absolute.sum(dim=1, keepdim=True).clamp_min(epsilon)  # S, [B, 1]
    return torch.where(valid, 1.0 + gamma * (1.0 - prefix / total), 0.0)


@register_weight("iw_opd", description="WEIGHT rule (every token): 1 + gamma (1 - P_t / S), P_t = prefix sum "
                 "of |log pT - log pS| at the sampled tokens, gamma 0.5: IW-OPD (arXiv 2606.22600; TRL "
                 "experimental/iw_opd)",
                 needs=("teacher_logprob_sampled", "student_logprob_sampled"))
def _iw_opd(inputs, valid, generator):
    return iw_opd_weights(inputs["teacher_logprob_sampled"], inputs["student_logprob_sampled"], valid)
