"""Per-token teacher/student signals, batch-robust normalisation, selection scores and selection (spec 2).

One module per concept:

* ``exact``: ``token_signals``, every signal from full ``[N, V]`` logits of both models (entropies,
  full-vocabulary KLs, the top-K disagreement D, the compatibility mass C and the support proxies),
  computed exactly in float32, chunked over rows.
* ``topk``: ``token_signals_topk``, the same signals when only each side's top-K log-probabilities
  are known (a teacher served by vLLM ``prompt_logprobs``).
* ``sets``: what both modes share (``SignalDict``, the key sets, the signals of the two top-K sets).
* ``normalize``: ``normalize_batch``, the spec's clip((z - Q05) / (Q95 - Q05 + eps), 0, 1) over the
  valid positions, and ``normalize_release``, the released training code's over all response rows.
* ``scores``: the score registry (``register_score``, ``register_q3_variant``, ``get_score``,
  ``list_scores``), the registered scores, and ``selection_scores``, which normalises H, D, C over
  a rollout batch and evaluates every registered score by name. A new score is one function plus
  one ``@register_score`` there.
* ``rules``: the published rules beside TA-OPD's (position baselines, teacher entropy, Rho-1 excess loss,
  top-K overlap; IW-OPD's weights, a weight rule: ``register_weight``, ``rule_weights``), each one
  registration with its source (docs/selection_rules.md).
* ``selection``: ``select``, the budgeted top-ceil(rho * |I|) mask over the whole batch (tie order,
  fill past the candidates, per-sequence top-up).
* ``selectors``: ``SelectionOptions`` (the named choices; ``.paper()`` = the release's) and
  ``select_by_name``, signals -> kept mask for a registered selector: what the trainers call.
* ``checks``: input validation shared by the modules.

Conventions shared by all functions (each is tested against a float64 reference):

* Top-K sets: the K largest logits, equal logits ordered by lower token id first. The same rule
  orders the set, so the "top-1" is the lowest id among the maximal logits. K >= V means the whole
  vocabulary; the effective K = min(K, V) is used for the sets, for ``overlap`` = |S cap T| / K_eff
  and for the log K of ``student_entropy_topk``.
* Masking: -inf logits (log-probs) are allowed and mean probability 0. 0 * log 0 is 0 everywhere,
  KL terms where the first argument has probability 0 contribute 0, and KL(P || Q) is +inf when P
  puts mass where Q has none (mathematically right, not an error). NaN, +inf and all -inf rows raise.
* Simplifications: no autograd, float32 throughout, and entropies and KL-type outputs are floored
  at 0 to drop float32 rounding (they are >= 0 mathematically; inputs themselves are never clamped).
"""

from diagnostics.signals.exact import DEFAULT_CHUNK_LOGITS, token_signals
from diagnostics.signals.normalize import SIGNAL_NORMALIZATIONS, normalize_batch, normalize_release
from diagnostics.signals.rules import iw_opd_weights  # registers the published rules (after scores' own)
from diagnostics.signals.scores import (
    RAW_SIGNALS,
    SELECTION_SIGNAL_SOURCES,
    ScoreFn,
    ScoreSpec,
    get_score,
    list_scores,
    missing_signals,
    register_q3_variant,
    register_score,
    register_weight,
    rule_weights,
    selection_scores,
    unrestricted_score,
)
from diagnostics.signals.selection import TIE_ORDERS, select
from diagnostics.signals.selectors import SelectionOptions, select_by_name
from diagnostics.signals.sets import FULL_VOCAB_KEYS, SAMPLED_KEYS, TOPK_KEYS, SignalDict
from diagnostics.signals.topk import token_signals_topk

__all__ = [
    "SignalDict",
    "ScoreSpec",
    "ScoreFn",
    "token_signals",
    "token_signals_topk",
    "normalize_batch",
    "normalize_release",
    "SIGNAL_NORMALIZATIONS",
    "SELECTION_SIGNAL_SOURCES",
    "unrestricted_score",
    "TIE_ORDERS",
    "SelectionOptions",
    "select_by_name",
    "register_score",
    "register_weight",
    "rule_weights",
    "missing_signals",
    "iw_opd_weights",
    "RAW_SIGNALS",
    "register_q3_variant",
    "get_score",
    "list_scores",
    "selection_scores",
    "select",
    "FULL_VOCAB_KEYS",
    "TOPK_KEYS",
    "SAMPLED_KEYS",
    "DEFAULT_CHUNK_LOGITS",
]
