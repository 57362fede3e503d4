"""The selection-score registry, the registered scores of spec section 2, and ``selection_scores``.

A score is a pure function of the batch-normalised signals H~, D~, C~ and Norm(D C) (over one rollout
batch, by a named normalisation: ``normalize.SIGNAL_NORMALIZATIONS``). ``register_score`` adds one by
name; ``register_q3_variant`` derives the Q3-restricted copy of a registered score (same function, -inf outside Q3);
``selection_scores`` normalises H, D, C once and evaluates every registered score, in registration
order, plus the Q3 mask. The diagnostic (``score_<name>`` columns), the analysis and the trainer's
selectors all read this one registry. ``SELECTION_SIGNAL_SOURCES`` names which signal keys feed H, D, C
(``exact`` or the released training code's top-K proxies, ``release_topk``).

Every score ranks HIGHER first. The release's "low" Q3 selectors (Q3 + low-C, Q3 + low-D^L) are the
negated signal here, with ``low_first=True`` recording that the release sorts them ascending, which
turns its (score, -position) tie key into latest-position-first (``selectors.tie_order_for``).

A rule may also read raw signals (``RAW_SIGNALS``: the teacher's entropy, the sampled token's two log-probs, the
top-K overlap), passed to its function under their own keys beside H~, D~, C~; a caller without one of them gets
no value for that rule (``selection_scores`` leaves it out, ``select_by_name`` says which signal is missing).
A rule's ``kind`` is "selection" (a score, ranked under a budget) or "weight" (``register_weight``: a per-token
weight of every valid token in the loss, never ranked; ``rule_weights``). The published rules beside TA-OPD's
register themselves in ``rules`` (docs/selection_rules.md).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, overload

import torch
from torch import Tensor

from diagnostics.core.registry import add_once, lookup
from diagnostics.signals.checks import NEG_INF
from diagnostics.signals.normalize import (
    SIGNAL_NORMALIZATIONS,
    normalize_batch,
    normalize_release,
    quantile_linear,
    quantile_release,
)

ScoreFn = Callable[[dict[str, Tensor], Tensor, torch.Generator], Tensor]
_NORMALISED = ("H", "D", "C", "DC")  # the normalised signals a score may use: H~, D~, C~, Norm(D C)
# Raw [B, T] signal keys a rule may read as they are (diagnostics.signals.token_signals' names)
RAW_SIGNALS = ("teacher_entropy", "student_logprob_sampled", "teacher_logprob_sampled", "overlap")
RULE_KINDS = ("selection", "weight")

# Which signal keys feed H, D and C (selection_scores reads H, D, C under the exact keys' names).
SELECTION_SIGNAL_SOURCES = {
    # exact: the full-vocabulary student entropy, the exact union-top-K D, the exact C (spec 2)
    "exact": {"student_entropy": "student_entropy", "disagreement": "disagreement", "compat_mass": "compat_mass"},
    # release_topk: what the released training code selects on (tip_compat.py L372-374 over L271-354): the
    # entropy of the student's top-K-renormalised distribution / log K, D floored at 1e-12 after the union
    # renormalisation, C as the lower bound sum over S cap T of pT
    "release_topk": {"student_entropy": "student_entropy_topk", "disagreement": "disagreement_topk_proxy",
                     "compat_mass": "compat_mass_lower"},
}


@dataclass(frozen=True)
class ScoreSpec:
    """One registered selection score.

    fn(norm, valid, generator) -> [B, T] float, pure: ``norm`` maps "H", "D", "C" to the
    normalised [B, T] signals (0 at invalid positions) and each RAW_SIGNALS key in ``needs`` to its raw
    [B, T] values (0 at invalid positions), ``valid`` is the [B, T] bool mask, and ``generator`` a
    torch.Generator seeded per (seed, name) for random scores. kind "weight": the output is a weight >= 0.
    """

    name: str
    fn: ScoreFn
    description: str
    needs: tuple[str, ...] = field(default_factory=tuple)
    restrict_to_q3: bool = False
    low_first: bool = False  # the release ranks the underlying signal ascending (see the module docstring)
    kind: str = "selection"  # "selection" (ranked under a budget) | "weight" (weights every token)

    @property
    def raw_needs(self) -> tuple[str, ...]:
        """The RAW_SIGNALS keys the rule reads."""
        return tuple(n for n in self.needs if n in RAW_SIGNALS)


_SCORES: dict[str, ScoreSpec] = {}


def register_score(
    name: str, *, description: str, needs: Iterable[str] = (), q3: bool = False, low_first: bool = False,
    kind: str = "selection",
) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator registering a score function under ``name``.

    ``needs``: the normalised signals it reads (subset of "H", "D", "C", "DC") and the raw ones (RAW_SIGNALS).
    ``kind``: "selection" or "weight" (``register_weight``). ``q3=True``: the score
    only ranks inside Q3 (low H~, high D~); ``selection_scores`` sets it to -inf outside Q3.
    ``low_first``: the score is a negated signal the release sorts ascending (its ties go to later
    positions under the release's tie rule). Raises ValueError on a duplicate name or an unknown need.
    """
    needs = tuple(needs)
    unknown = [n for n in needs if n not in _NORMALISED + RAW_SIGNALS]
    if unknown:
        raise ValueError(f"score {name!r} needs unknown signals {unknown}; known: {list(_NORMALISED + RAW_SIGNALS)}")
    if kind not in RULE_KINDS or (kind == "weight" and (q3 or low_first)):
        raise ValueError(f"score {name!r}: kind must be one of {list(RULE_KINDS)} (a weight is never Q3 or ranked)")

    if name == "q3":
        raise ValueError('"q3" is reserved: selection_scores returns the Q3 mask under that key')

    def decorator(fn: ScoreFn) -> ScoreFn:
        add_once(_SCORES, "score", name, ScoreSpec(name, fn, description, needs, q3, low_first, kind))
        return fn

    return decorator


def register_weight(name: str, *, description: str, needs: Iterable[str] = ()) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator registering a weight rule: fn(norm, valid, generator) -> [B, T] weights >= 0 of every valid
    token in the loss (no budget; ``rule_weights``). Same registry and names as the scores."""
    return register_score(name, description=description, needs=needs, kind="weight")


def register_q3_variant(base: str, *, description: str, name: str | None = None) -> ScoreSpec:
    """Register the registered score ``base`` restricted to Q3 as ``name`` (default ``q3_<base>``).

    The variant runs ``base``'s function with ``base``'s needs; ``selection_scores`` sets it to -inf
    outside Q3. Random scores stay independent: the generator is seeded by the variant's own name.
    """
    spec = get_score(base)
    name = f"q3_{base}" if name is None else name
    register_score(name, description=description, needs=spec.needs, q3=True)(spec.fn)
    return _SCORES[name]


def get_score(name: str) -> ScoreSpec:
    """The registered ScoreSpec; KeyError listing the registered names if unknown."""
    return lookup(_SCORES, "score", "scores", name)


def list_scores(kind: str | None = None) -> list[str]:
    """Registered rule names, in registration order: every kind, or only "selection" or "weight" rules."""
    return [name for name, spec in _SCORES.items() if kind is None or spec.kind == kind]


def missing_signals(name: str, signals: Iterable[str]) -> list[str]:
    """The raw signal keys the rule ``name`` reads that ``signals`` lacks (KeyError if ``name`` is unknown)."""
    have = set(signals)
    return [key for key in get_score(name).raw_needs if key not in have]


# --------------------------------------------------------------------------------------------
# The registered scores (spec section 2 table); registration order is the column order
# --------------------------------------------------------------------------------------------


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


register_q3_variant("compat", description="C~ inside Q3")
register_q3_variant("teachability", description="D~ C~ inside Q3")
register_q3_variant("incompatible", description="D~ (1 - C~) inside Q3")
register_q3_variant("random", name="q3_only", description="uniform random inside Q3 (paper's Q3-only selector)")


# The released training code's selectors the table above does not hold (TA-OPD/slime_ta_opd/slime/rollout/
# tip_compat.py: scores L385-393, the method -> score map L467-485, Q3 candidates L490-500, ascending L501-502).


@register_score(
    "teachability_entropy_ndc",
    description="H~ + s - H~ s, s = Norm(D C) (the release's TA-OPD + entropy, ca_softor)", needs=("H", "DC"),
)
def _teachability_entropy_ndc(norm, valid, generator):
    return _soft_or(norm["H"], norm["DC"])  # tip_compat.py L392: the product normalised, not D~ C~


@register_score(
    "q3_only_ranked", description="(1 - H~) Norm(D C) inside Q3 (the release's Q3-only, split_ca)",
    needs=("H", "DC"), q3=True,
)
def _q3_only_ranked(norm, valid, generator):
    return (1.0 - norm["H"]) * norm["DC"]  # tip_compat.py L393, ranked inside Q3 (L500)


@register_score("q3_low_compat", description="-C~ inside Q3: lowest C first (Q3 + low-C, Table 2)",
                needs=("C",), q3=True, low_first=True)
def _q3_low_compat(norm, valid, generator):
    return -norm["C"]  # negated, not 1 - C~: exact in float32, so no two C~ values merge into a tie


@register_score("q3_low_teachability", description="-D~ C~ inside Q3: lowest D^L first (Q3 + low-D^L, Fig. 3B)",
                needs=("D", "C"), q3=True, low_first=True)
def _q3_low_teachability(norm, valid, generator):
    return -(norm["D"] * norm["C"])


# --------------------------------------------------------------------------------------------
# Every registered score over one rollout batch
# --------------------------------------------------------------------------------------------


def _score_generator(seed: int, name: str) -> torch.Generator:
    """Per-score generator: seeded by (seed, name) so adding a score never shifts another's draws."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def _raw_signals(signals: dict[str, Tensor], valid: Tensor) -> dict[str, Tensor]:
    """{"H", "D", "C": [B, T]} picked from ``signals`` (H: the full-vocabulary entropy if present)."""
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
    return raw


def _q3_mask(norm: dict[str, Tensor], valid: Tensor, rows: Tensor, normalization: str) -> Tensor:
    """valid & H~ < median(H~) & D~ >= median(D~), medians over ``rows`` (linear interpolation).

    rows = the valid positions (``valid_rows``) or every response row (``all_response_rows``: the
    release's medians over all rows with its interpolation formula, tip_compat.py L382-383, L422-436).
    """
    if normalization == "all_response_rows":
        h_med = quantile_release(norm["H"][rows].double().tolist(), 0.5)
        d_med = quantile_release(norm["D"][rows].double().tolist(), 0.5)
        # compared in float64 as the release (a float32 compare would round the median to a neighbour)
        return valid & (norm["H"].double() < h_med) & (norm["D"].double() >= d_med)
    (h_med,) = quantile_linear(norm["H"][rows], (0.5,))
    (d_med,) = quantile_linear(norm["D"][rows], (0.5,))
    return valid & (norm["H"] < h_med) & (norm["D"] >= d_med)


def _normalised_signals(
    raw: dict[str, Tensor], valid: Tensor, normalization: str, rows: Tensor
) -> dict[str, Tensor]:
    """{"H", "D", "C", "DC"}: each [B, T] float32 in [0, 1], 0 outside ``rows``. DC = Norm(D C), the
    product of the RAW signals normalised (tip_compat.py L375-380), not D~ C~."""
    raw = {**raw, "DC": raw["D"] * raw["C"]}
    if normalization == "valid_rows":
        return {short: normalize_batch(x, valid) for short, x in raw.items()}
    if normalization == "all_response_rows":
        return {short: normalize_release(x, rows) for short, x in raw.items()}
    raise ValueError(f"normalization: must be one of {list(SIGNAL_NORMALIZATIONS)}, got {normalization!r}")


def unrestricted_score(name: str, norm: dict[str, Tensor], valid: Tensor, seed: int = 0) -> Tensor:
    """The registered score ``name`` WITHOUT its Q3 restriction: [B, T] float32, 0 at invalid positions.

    ``norm`` as returned by ``selection_scores(..., return_normalized=True)``; the random generator is
    the one ``selection_scores`` gives the score, so inside Q3 the values equal its. Used to fill past Q3.
    """
    spec = get_score(name)
    return spec.fn(norm, valid, _score_generator(seed, name)).float().masked_fill(~valid, 0.0)


@overload
def selection_scores(
    signals: dict[str, Tensor], valid: Tensor, *, seed: int = 0, return_normalized: Literal[False] = False,
    normalization: str = "valid_rows", response_rows: Tensor | None = None,
) -> dict[str, Tensor]: ...


@overload
def selection_scores(
    signals: dict[str, Tensor], valid: Tensor, *, seed: int = 0, return_normalized: Literal[True],
    normalization: str = "valid_rows", response_rows: Tensor | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]: ...


def selection_scores(
    signals: dict[str, Tensor], valid: Tensor, *, seed: int = 0, return_normalized: bool = False,
    normalization: str = "valid_rows", response_rows: Tensor | None = None,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Every registered selection score over a rollout batch, plus the Q3 mask.

    Args:
        signals: dict of [B, T] tensors with "disagreement", "compat_mass" and "student_entropy"
            (or, failing it, "student_entropy_topk"); any RAW_SIGNALS keys present feed the rules reading
            them (a rule whose raw signal is absent is left out of the result).
        valid: [B, T] bool mask of the valid response positions (at least one True).
        seed: seeds the random scores (one generator per score name).
        return_normalized: also return the normalised signals the scores were computed from.
        normalization: "valid_rows" (default: quantiles and Q3 medians over ``valid``, spec 2) or
            "all_response_rows" (the release: over ``response_rows``, its formula; ``normalize``).
        response_rows: [B, T] bool, a superset of ``valid``: every response row, selectable or not
            (default ``valid``; the trainer has no rows beyond its valid ones). "all_response_rows" only.
    Returns:
        scores: {name: [B, T] float32} for every registered selection score whose signals are given (0 at
        invalid positions; q3
        scores -inf outside Q3), and "q3": [B, T] bool = valid & H~ < median(H~) & D~ >= median(D~),
        medians over the valid positions with linear interpolation.
        With ``return_normalized``: (scores, normalized), normalized = {"H": H~, "D": D~, "C": C~,
        "DC": Norm(D C)}, each [B, T] float32 (0 at invalid positions).
    """
    rows = valid if response_rows is None or normalization == "valid_rows" else response_rows
    if rows is not valid and (rows.shape != valid.shape or (valid & ~rows).any()):
        raise ValueError("response_rows must be a [B, T] bool superset of valid")
    on_rows = _normalised_signals(_raw_signals(signals, valid), valid, normalization, rows)  # 0 outside rows
    q3 = _q3_mask(on_rows, valid, rows, normalization)  # medians over the normalisation's rows
    norm = {short: x.masked_fill(~valid, 0.0) for short, x in on_rows.items()}  # scores: valid positions
    inputs = {**norm, **_raw_inputs(signals, valid)}
    out: dict[str, Tensor] = {}
    for name, spec in _SCORES.items():
        if spec.kind != "selection" or missing_signals(name, inputs):
            continue  # a weight rule (rule_weights), or a rule reading a signal the caller does not have
        score = spec.fn(inputs, valid, _score_generator(seed, name)).float()
        if score.shape != valid.shape:
            raise ValueError(
                f"score {name!r} returned shape {list(score.shape)}, expected {list(valid.shape)}"
            )
        score = score.masked_fill(~valid, 0.0)
        out[name] = score.masked_fill(~q3, NEG_INF) if spec.restrict_to_q3 else score
    out["q3"] = q3
    return (out, norm) if return_normalized else out


def _raw_inputs(signals: dict[str, Tensor], valid: Tensor) -> dict[str, Tensor]:
    """{key: [B, T] float32, 0 at invalid positions} for the RAW_SIGNALS keys ``signals`` holds."""
    out = {}
    for key in RAW_SIGNALS:
        if key in signals:
            if signals[key].shape != valid.shape:
                raise ValueError(f"signals[{key!r}] shape {list(signals[key].shape)} differs from valid "
                                 f"{list(valid.shape)}")
            out[key] = torch.where(valid, signals[key].float(), 0.0)
    return out


def rule_weights(
    signals: dict[str, Tensor], valid: Tensor, *, seed: int = 0, names: Iterable[str] | None = None
) -> dict[str, Tensor]:
    """{name: [B, T] float32 weights, 0 at invalid positions} of the weight rules (``kind="weight"``).

    ``signals``: [B, T] raw signals (RAW_SIGNALS keys); ``names``: the rules to evaluate (default: every
    registered weight rule whose signals are given). A selection rule, or a named rule whose signal is
    missing, raises ValueError naming it. A negative or non-finite weight at a valid position raises.
    """
    inputs = _raw_inputs(signals, valid)
    chosen = list_scores("weight") if names is None else list(names)
    out: dict[str, Tensor] = {}
    for name in chosen:
        spec = get_score(name)
        if spec.kind != "weight":
            raise ValueError(f"{name!r} is a selection rule (a score ranked under a budget), not a weight rule; "
                             f"weight rules: {list_scores('weight')}")
        missing = missing_signals(name, inputs)
        if missing and names is None:
            continue
        if missing:
            raise ValueError(f"weight rule {name!r} needs the signal(s) {missing} (have {sorted(signals)})")
        weight = spec.fn(inputs, valid, _score_generator(seed, name)).float().masked_fill(~valid, 0.0)
        if weight.shape != valid.shape or not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
            raise ValueError(f"weight rule {name!r} returned a {list(weight.shape)} tensor with a negative or "
                             f"non-finite weight (expected [B, T] = {list(valid.shape)}, finite, >= 0)")
        out[name] = weight
    return out
